"""The simulator against the real engine on this machine.

``validate`` measures a step-time table (``apps.bench.steps``) for the serving setup of a
``configs/serve`` YAML, replays the same seeded workloads through the real serving loop
(``serve.loop.build`` + ``serve_once``, as ``sunjax bench serve`` does) and through the model
in ``engine`` mode, and reports both and the relative error of throughput, TPOT (p50) and
decode steps per Zipf alpha.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from apps.bench.steps import StepsConfig, ensure_cpu_devices, measure
from apps.simulate.model import ClusterConfig, from_arrivals, simulate
from apps.simulate.tables import StepTable

KEYS = ("throughput_tok_s", "tpot_ms_p50", "decode_steps")


def rel_err(pred: float, real: float) -> float:
    return abs(pred - real) / abs(real)


def validate(
    config_path: str,
    *,
    alphas: Sequence[float] = (0.0, 1.0, 1.5),
    requests: int | None = None,
    policies: Sequence[str] = ("sun",),
    table: StepTable | None = None,
    steps: StepsConfig | None = None,
    repeats: int = 3,
) -> dict:
    """Per policy and alpha: the real loop ``repeats`` times (median of each metric, and the
    spread ``max / min - 1`` of its throughput: the machine's run-to-run noise) beside the
    model's prediction."""
    if repeats < 1:
        raise ValueError(f"repeats={repeats} must be >= 1")
    from serve.loop import LOADERS, build, load_config, serve_once
    from serve.workload import make_workload

    base = load_config(config_path)
    ensure_cpu_devices(base.workers)
    if table is None:
        steps = steps or StepsConfig(
            workers=base.workers,
            slots_per_worker=base.slots_per_worker,
            max_len=base.max_len,
            min_bucket=base.min_bucket,
            trees=tuple(policies),
        )
        table = measure(steps)
    models = LOADERS[base.loader](base)
    tasks = sorted(models.prefill)
    rows = []
    for policy in policies:
        config = dataclasses.replace(base, policy=policy)
        pool, router = build(config, models)
        warm = dict(base.workload, requests=8)
        warm_arrivals = make_workload(
            dataclasses.replace(config, workload=warm).workload_config, tasks, models.cfg.vocab_size
        )
        serve_once(config, models, pool, router, warm_arrivals)
        for alpha in alphas:
            wl = dict(base.workload, zipf_alpha=alpha)
            if requests:
                wl["requests"] = requests
            arrivals = make_workload(
                dataclasses.replace(config, workload=wl).workload_config,
                tasks,
                models.cfg.vocab_size,
            )
            runs = [serve_once(config, models, pool, router, arrivals)[0] for _ in range(repeats)]
            real = {k: float(np.median([r[k] for r in runs])) for k in KEYS}
            tput = [r["throughput_tok_s"] for r in runs]
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
    return {"config": config_path, "table": table.to_json(), "rows": rows}
