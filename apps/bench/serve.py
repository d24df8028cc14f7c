"""SUN vs conventional disaggregation on one seeded workload: ``sunjax bench serve --out DIR``.

The same requests (Poisson arrivals, Zipf(alpha) popularity over M task models, uniform prompt
and output lengths) are served by

* ``sun``: one decode pool of W workers holding the shared decode tree, least-loaded routing;
* ``conventional``: the same W workers, each holding one model's full tree, model-affine routing;

for each alpha in the sweep. Writes ``DIR/bench.json`` (``{policy: {alpha: summary}}``) and
``DIR/bench.png`` (throughput, TPOT and decode steps vs alpha). ``--tiny`` (the default) uses a
tiny random model and runs in about a minute on two CPU cores.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os

from serve.loop import LOADERS, Summary, build, load_config, serve_once
from serve.pool import ensure_cpu_devices
from serve.workload import make_workload

POLICIES = ("sun", "conventional")


def plot(results: dict[str, dict[str, Summary]], path: str) -> bool:
    """Throughput, TPOT p50 and decode steps vs alpha; False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    panels = (
        ("throughput_tok_s", "throughput (tok/s)"),
        ("tpot_ms_p50", "TPOT p50 (ms)"),
        ("decode_steps", "decode steps"),
    )
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.2))
    for ax, (key, label) in zip(axes, panels, strict=True):
        for policy, by_alpha in results.items():
            alphas = sorted(by_alpha, key=float)
            ax.plot(
                [float(a) for a in alphas], [by_alpha[a][key] for a in alphas], "o-", label=policy
            )
        ax.set_xlabel("Zipf alpha")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="sunjax bench serve", description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument(
        "--config",
        default=None,
        help="a configs/serve YAML (default --tiny: configs/serve/tiny-sun.yaml)",
    )
    ap.add_argument("--tiny", action="store_true", help="tiny random model (the default)")
    ap.add_argument("--alphas", default="0,0.5,1.0,1.5", help="comma-separated Zipf alphas")
    ap.add_argument("--requests", type=int, default=None, help="requests per run")
    args = ap.parse_args(argv)
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = args.config or os.path.join(here, "configs", "serve", "tiny-sun.yaml")
    base = load_config(path)
    ensure_cpu_devices(base.workers)
    alphas = [float(a) for a in args.alphas.split(",")]

    models = LOADERS[base.loader](base)
    tasks = list(models.prefill)
    results: dict[str, dict[str, Summary]] = {p: {} for p in POLICIES}
    for policy in POLICIES:
        config = dataclasses.replace(base, policy=policy)
        pool, router = build(config, models)
        warm = dataclasses.replace(config, workload=dict(base.workload, requests=16))
        serve_once(
            config,
            models,
            pool,
            router,
            make_workload(warm.workload_config, tasks, models.cfg.vocab_size),
        )
        for alpha in alphas:
            wl = dict(base.workload, zipf_alpha=alpha)
            if args.requests:
                wl["requests"] = args.requests
            workload = dataclasses.replace(config, workload=wl).workload_config
            arrivals = make_workload(workload, tasks, models.cfg.vocab_size)
            summary, _ = serve_once(config, models, pool, router, arrivals)
            summary["zipf_alpha"] = alpha
            results[policy][str(alpha)] = summary
            print(
                json.dumps(
                    {
                        k: summary[k]
                        for k in (
                            "policy",
                            "zipf_alpha",
                            "output_tokens",
                            "decode_steps",
                            "mean_batch_occupancy",
                            "throughput_tok_s",
                            "tpot_ms_p50",
                            "ttft_ms_p50",
                        )
                    }
                )
            )
    os.makedirs(args.out, exist_ok=True)
    bench = {"config": path, "workload": dict(base.workload), "tasks": tasks, **results}
    with open(os.path.join(args.out, "bench.json"), "w") as f:
        json.dump(bench, f, indent=2)
    plot(results, os.path.join(args.out, "bench.png"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
