"""The simulator against the real engine on this machine.

``validate`` measures a step-time table (``apps.bench.steps.StepBench``) for the serving setup
of a ``configs/serve`` YAML, replays the same seeded workloads through the real serving loop
(``serve.loop.build`` + ``serve_once``, as ``sunjax bench serve`` does) and through the model
in ``engine`` mode, and reports both and the relative error of throughput, TPOT (p50) and
decode steps per policy and Zipf alpha.

The table and the real runs are measured interleaved: round ``r`` of the table, then repeat
``r`` of every real workload (in a shuffled order), and so on. On a shared VM the machine's
speed drifts by tens of percent over seconds; measured one after the other, the table and
the runs would see different machines, and the comparison would test the drift, not the
model. Interleaved, both medians sample the same stretch of time.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from apps.bench.steps import StepBench, StepsConfig, ensure_cpu_devices
from apps.simulate.model import ClusterConfig, from_arrivals, simulate

KEYS = ("throughput_tok_s", "tpot_ms_p50", "decode_steps")


def rel_err(pred: float, real: float) -> float:
    return abs(pred - real) / abs(real)


def validate(
    config_path: str,
    *,
    alphas: Sequence[float] = (0.0, 1.0, 1.5),
    requests: int | None = None,
    policies: Sequence[str] = ("sun",),
    steps: StepsConfig | None = None,
    repeats: int = 3,
    seed: int = 0,
) -> dict:
    """Per policy and alpha: the real loop ``repeats`` times (median of each metric, and the
    spread ``max / min - 1`` of its throughput: the machine's run-to-run noise) beside the
    model's prediction from a table of ``repeats`` rounds taken between them."""
    if repeats < 1:
        raise ValueError(f"repeats={repeats} must be >= 1")
    from serve.loop import LOADERS, build, load_config, serve_once
    from serve.workload import make_workload

    base = load_config(config_path)
    ensure_cpu_devices(base.workers)
    steps = steps or StepsConfig(
        workers=base.workers,
        slots_per_worker=base.slots_per_worker,
        max_len=base.max_len,
        min_bucket=base.min_bucket,
        trees=tuple(policies),
    )
    bench = StepBench(steps)
    models = LOADERS[base.loader](base)
    tasks = sorted(models.prefill)

    def arrivals_for(config, **workload):
        wl = dataclasses.replace(config, workload=dict(base.workload, **workload))
        return make_workload(wl.workload_config, tasks, models.cfg.vocab_size)

    cells = []  # (policy, alpha, config, pool, router, arrivals)
    for policy in policies:
        config = dataclasses.replace(base, policy=policy)
        pool, router = build(config, models)
        serve_once(config, models, pool, router, arrivals_for(config, requests=8))  # compile
        for alpha in alphas:
            more = {"requests": requests} if requests else {}
            arrivals = arrivals_for(config, zipf_alpha=alpha, **more)
            cells.append((policy, alpha, config, pool, router, arrivals))
    runs: list[list[dict]] = [[] for _ in cells]
    rng = np.random.default_rng(seed)
    for _ in range(repeats):
        bench.round()
        for i in rng.permutation(len(cells)):
            _, _, config, pool, router, arrivals = cells[i]
            runs[i].append(serve_once(config, models, pool, router, arrivals)[0])
    table = bench.table()
    rows = []
    for (policy, alpha, _, _, _, arrivals), reps in zip(cells, runs, strict=True):
        real = {k: float(np.median([r[k] for r in reps])) for k in KEYS}
        tput = [r["throughput_tok_s"] for r in reps]
        sim = simulate(
            ClusterConfig(
                policy=policy,
                mode="engine",
                decode_instances=base.workers,
                slots=base.slots_per_worker,
            ),
            table,
            from_arrivals(arrivals),
            tasks=tasks,
        )
        row = {"policy": policy, "zipf_alpha": alpha, "noise": max(tput) / min(tput) - 1}
        for k in KEYS:
            row[f"real_{k}"] = real[k]
            row[f"sim_{k}"] = sim[k]
            row[f"err_{k}"] = rel_err(sim[k], real[k])
        rows.append(row)
    return {
        "config": config_path,
        "repeats": repeats,
        "table_drift": bench.drift(),
        "table": table.to_json(),
        "rows": rows,
    }
