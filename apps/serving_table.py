"""SUN's shared decode pool against conventional per-model decode workers, on identical work.

Both policies serve the same requests (real task prompts, Zipf(alpha) task popularity, all
arriving at once) with the same output lengths (``ignore_eos``: every request generates exactly
its ``max_tokens``), so they produce the same number of tokens and differ only in how decode
batches form. For each alpha: decode steps, mean batch occupancy, decode tokens per decode
step (tokens made by decode steps, i.e. without each request's first token, which prefill
makes) and TPOT. Then: how many decode workers the conventional layout needs to match the
shared pool's decode steps at alpha = 1.

With every request arriving at once and its length fixed, the decode steps a policy takes
depend only on the scheduling, never on the weights; so the worker search runs on a tiny
random stand-in model with the same vocabulary (seconds instead of a compile and a run of the
real model per worker count), after checking that the stand-in reproduces the real model's
decode steps for both policies at the base worker count.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping, Sequence

import jax
import numpy as np
from tqdm import tqdm

from serve.loop import Models, ServeConfig, build, serve_once
from serve.scheduler import Request
from serve.workload import Arrival, zipf_weights
from sunjax.config import ModelConfig
from sunjax.model import init_params

KEYS = ("decode_steps", "mean_batch_occupancy", "tokens_per_step", "tpot_ms_p50", "output_tokens")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Setup:
    workers: int = 4
    slots_per_worker: int = 8
    max_len: int = 128
    requests: int = 48
    output_len: tuple[int, int] = (8, 24)
    alphas: tuple[float, ...] = (0.0, 1.0, 1.5)
    max_conventional_workers: int = 12
    seed: int = 0


def workload(
    prompts: Mapping[str, Sequence[Sequence[int]]], alpha: float, setup: Setup
) -> list[Arrival]:
    """``setup.requests`` requests over the tasks of ``prompts`` (ranked in the given order),
    each a real prompt of its task, fixed output lengths, all arriving at t=0."""
    rng = np.random.default_rng(setup.seed)
    tasks = list(prompts)
    which = rng.choice(len(tasks), size=setup.requests, p=zipf_weights(len(tasks), alpha))
    lengths = rng.integers(setup.output_len[0], setup.output_len[1] + 1, setup.requests)
    out, used = [], dict.fromkeys(tasks, 0)
    for i, (t, n) in enumerate(zip(which, lengths, strict=True)):
        task = tasks[t]
        prompt = prompts[task][used[task] % len(prompts[task])]
        used[task] += 1
        req = Request(
            id=f"req-{i}", model=task, prompt=tuple(prompt), max_tokens=int(n), ignore_eos=True
        )
        out.append(Arrival(at=0.0, request=req))
    return out


def stand_in(models: Models) -> Models:
    """A tiny random model with the real one's vocabulary and positions, one tree for every
    task (weights do not change decode-step counts of fixed-length requests)."""
    real = models.cfg
    cfg = ModelConfig(
        vocab_size=real.vocab_size,
        d_model=16,
        n_layers=1,
        n_heads=2,
        n_kv_heads=1,
        head_dim=8,
        ffn_dim=32,
        max_position_embeddings=real.max_position_embeddings,
        tie_word_embeddings=True,
    )
    tree = init_params(cfg, jax.random.PRNGKey(0))
    tasks = list(models.prefill)
    return Models(
        cfg=cfg, decode=tree, prefill=dict.fromkeys(tasks, tree), full=dict.fromkeys(tasks, tree)
    )


def _row(summary: dict) -> dict:
    decode_tokens = summary["output_tokens"] - summary["completed"]  # first tokens: prefill
    return {
        "decode_steps": summary["decode_steps"],
        "mean_batch_occupancy": summary["mean_batch_occupancy"],
        "tokens_per_step": decode_tokens / max(summary["decode_steps"], 1),
        "tpot_ms_p50": summary["tpot_ms_p50"],
        "output_tokens": summary["output_tokens"],
        "completed": summary["completed"],
    }


def compare(
    models: Models, prompts: Mapping[str, Sequence[Sequence[int]]], setup: Setup, *, progress=True
) -> dict:
    """``{"sun": {alpha: row}, "conventional": {alpha: row}, "workers_to_match": {...}}``."""
    lengths = [len(p) for ps in prompts.values() for p in ps]
    runs = 2 * len(setup.alphas) + 2 + setup.max_conventional_workers - setup.workers
    bar = tqdm(total=runs, desc="serving", disable=not progress)
    table: dict = {"setup": dataclasses.asdict(setup)}

    def serve(policy: str, workers: int, alphas: Sequence[float], models=models) -> dict:
        config = ServeConfig(
            policy=policy,
            loader="export",
            workers=workers,
            slots_per_worker=setup.slots_per_worker,
            max_len=setup.max_len,
            tasks=tuple(prompts),
        )
        pool, router = build(config, models, prompt_lengths=lengths)
        rows = {}
        for alpha in alphas:
            arrivals = workload(prompts, alpha, setup)
            summary, _ = serve_once(config, models, pool, router, arrivals)
            if summary["completed"] != setup.requests:
                raise RuntimeError(f"{policy}: only {summary['completed']} requests completed")
            rows[alpha] = _row(summary)
            bar.update()
        return rows

    for policy in ("sun", "conventional"):
        table[policy] = serve(policy, setup.workers, setup.alphas)
    for alpha in setup.alphas:  # identical work: the same tokens under both policies
        same = table["sun"][alpha]["output_tokens"] == table["conventional"][alpha]["output_tokens"]
        if not same:
            raise RuntimeError(f"alpha={alpha}: the policies produced different token counts")
    target = table["sun"][1.0]["decode_steps"] if 1.0 in setup.alphas else None
    match = {"alpha": 1.0, "sun_workers": setup.workers, "sun_decode_steps": target}
    steps_by_workers = {setup.workers: table["conventional"].get(1.0, {}).get("decode_steps")}
    needed = None
    if target is not None:
        small = stand_in(models)
        check = {
            p: serve(p, setup.workers, (1.0,), models=small)[1.0]["decode_steps"]
            for p in ("sun", "conventional")
        }
        real = {p: table[p][1.0]["decode_steps"] for p in ("sun", "conventional")}
        if check != real:
            raise RuntimeError(f"the stand-in took {check} decode steps, the model {real}")
        match["stand_in_decode_steps"] = check
        for w in range(setup.workers + 1, setup.max_conventional_workers + 1):
            if steps_by_workers[max(steps_by_workers)] <= target:
                break
            rows = serve("conventional", w, (1.0,), models=small)
            steps_by_workers[w] = rows[1.0]["decode_steps"]
        fits = [w for w, s in steps_by_workers.items() if s <= target]
        needed = min(fits) if fits else None
    bar.close()
    match["conventional_decode_steps_by_workers"] = steps_by_workers
    match["conventional_workers_needed"] = needed
    table["workers_to_match"] = match
    return table


def markdown(table: dict) -> str:
    setup = table["setup"]
    lines = [
        f"Serving on identical work ({setup['requests']} requests of real task prompts, "
        f"{setup['output_len'][0]}-{setup['output_len'][1]} output tokens each, EOS ignored; "
        f"{setup['workers']} decode workers x {setup['slots_per_worker']} slots)",
        "",
        "| Zipf alpha | policy | decode steps | batch occupancy | decode tokens / step | "
        "TPOT p50 (ms) | output tokens |",
        "|---|---|---|---|---|---|---|",
    ]
    for alpha in setup["alphas"]:
        for policy in ("sun", "conventional"):
            r = table[policy][alpha]
            lines.append(
                f"| {alpha:g} | {policy} | {r['decode_steps']} | {r['mean_batch_occupancy']:.2f} "
                f"| {r['tokens_per_step']:.1f} | {r['tpot_ms_p50']:.1f} | {r['output_tokens']} |"
            )
    m = table["workers_to_match"]
    if m["sun_decode_steps"] is not None:
        steps = ", ".join(
            f"{w} workers: {s}" for w, s in m["conventional_decode_steps_by_workers"].items()
        )
        need = m["conventional_workers_needed"]
        lines += [
            "",
            f"At alpha = 1 the shared pool of {m['sun_workers']} workers needs "
            f"{m['sun_decode_steps']} decode steps; the conventional layout needs "
            + (f"{need} workers to match ({steps})." if need else f"more than {steps}."),
        ]
    return "\n".join(lines) + "\n"


def plot(table: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    alphas = table["setup"]["alphas"]
    panels = (
        ("decode_steps", "decode steps"),
        ("mean_batch_occupancy", "batch occupancy"),
        ("tpot_ms_p50", "TPOT p50 (ms)"),
    )
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.2))
    for ax, (key, label) in zip(axes, panels, strict=True):
        for policy in ("sun", "conventional"):
            ax.plot(alphas, [table[policy][a][key] for a in alphas], "o-", label=policy)
        ax.set_xlabel("Zipf alpha")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle("same requests, same output tokens")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write(table: dict, out: str) -> None:
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(table, f, indent=2)
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write(markdown(table))
    plot(table, os.path.join(out, "serving.png"))
