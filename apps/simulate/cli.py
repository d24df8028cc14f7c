"""``sunjax simulate {run,validate,report}``."""

from __future__ import annotations

import argparse
import json
import os
import sys

H200_MODEL = "configs/models/llama-3.1-8b.yaml"


def load_table(spec: str, model: str = H200_MODEL):
    """``h200`` (the roofline table for ``model``), ``h200-xla`` (its QSUN row from the
    measured XLA int4 / int8 matmuls) or a ``steps.json`` path."""
    from apps.simulate.tables import StepTable, qsun_xla_table, roofline_h200

    if spec in ("h200", "h200-xla"):
        from sunjax.configs import load_model_config
        from sunjax.quant import QUANT_DEFAULTS

        cfg = load_model_config(model, scan_layers=False)
        name = os.path.splitext(os.path.basename(model))[0]
        table = roofline_h200(cfg, QUANT_DEFAULTS, name=name)
        return qsun_xla_table(table) if spec == "h200-xla" else table
    if not os.path.isfile(spec):
        raise ValueError(f"table {spec!r} is neither 'h200', 'h200-xla' nor a file")
    return StepTable.load(spec)


def run_main(argv: list[str]) -> int:
    from apps.simulate.model import ClusterConfig, read_jsonl, simulate, synthetic, zipf_weights

    ap = argparse.ArgumentParser(prog="sunjax simulate run")
    ap.add_argument("--table", default="h200", help="h200 | h200-xla | a steps.json")
    ap.add_argument("--model", default=H200_MODEL, help="model shape of the roofline table")
    ap.add_argument("--policy", default="sun", choices=("sun", "qsun", "conventional"))
    ap.add_argument("--mode", default="cluster", choices=("cluster", "engine"))
    ap.add_argument("--split", default="even", choices=("even", "popularity"))
    ap.add_argument("--tasks", type=int, default=4, help="task models (synthetic workload)")
    ap.add_argument("--decode-instances", type=int, default=4)
    ap.add_argument("--slots", type=int, default=64)
    ap.add_argument("--prefill-instances", type=int, default=None)
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--rate", type=float, default=20.0, help="arrivals per second")
    ap.add_argument("--alpha", type=float, default=1.0, help="Zipf alpha of task popularity")
    ap.add_argument("--prompt-len", type=int, nargs=2, default=(256, 1024))
    ap.add_argument("--output-len", type=int, nargs=2, default=(64, 512))
    ap.add_argument("--requests-file", default=None, help="JSONL request file instead")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    table = load_table(args.table, args.model)
    if args.requests_file:
        reqs = read_jsonl(args.requests_file)
        tasks = sorted({r.model for r in reqs})
        weights = None
    else:
        tasks = [f"task{i:02d}" for i in range(args.tasks)]
        reqs = synthetic(
            requests=args.requests,
            rate=args.rate,
            zipf_alpha=args.alpha,
            tasks=tasks,
            prompt_len=tuple(args.prompt_len),
            output_len=tuple(args.output_len),
            seed=args.seed,
        )
        weights = dict(zip(tasks, zipf_weights(len(tasks), args.alpha), strict=True))
    config = ClusterConfig(
        policy=args.policy,
        mode=args.mode,
        split=args.split,
        decode_instances=args.decode_instances,
        slots=args.slots,
        prefill_instances=args.prefill_instances,
    )
    print(json.dumps(simulate(config, table, reqs, tasks=tasks, weights=weights), indent=2))
    return 0


def validate_main(argv: list[str]) -> int:
    from apps.simulate.validate import KEYS, validate, validate_cluster

    ap = argparse.ArgumentParser(prog="sunjax simulate validate")
    ap.add_argument("--out", required=True)
    ap.add_argument("--config", default="configs/serve/tiny-sun.yaml")
    ap.add_argument("--alphas", default="0,1,1.5")
    ap.add_argument("--policies", nargs="+", default=["sun", "conventional"])
    ap.add_argument("--requests", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument(
        "--cluster",
        action="store_true",
        help="the real multi-process cluster (1 prefill + --decode SUN decode processes) "
        "against cluster mode, instead of the serving loop against engine mode",
    )
    ap.add_argument("--decode", type=int, default=1, help="--cluster: decode processes")
    ap.add_argument("--slots", type=int, default=8, help="--cluster: slots per decode process")
    args = ap.parse_args(argv)
    alphas = [float(a) for a in args.alphas.split(",")]
    if args.cluster:
        result = validate_cluster(
            alphas=alphas,
            requests=args.requests or 120,
            repeats=args.repeats,
            slots=args.slots,
            decode=args.decode,
        )
    else:
        result = validate(
            args.config,
            alphas=alphas,
            policies=args.policies,
            requests=args.requests,
            repeats=args.repeats,
        )
    os.makedirs(args.out, exist_ok=True)
    name = "cluster_validation.json" if args.cluster else "validation.json"
    with open(os.path.join(args.out, name), "w") as f:
        json.dump(result, f, indent=2)
    print(
        f"{'policy':>12} {'alpha':>5} "
        + " ".join(f"{k + ' real/sim/err':>34}" for k in KEYS)
        + f" {'noise':>6}"
    )
    for r in result["rows"]:
        cells = " ".join(
            f"{r['real_' + k]:>12.2f} {r['sim_' + k]:>12.2f} {100 * r['err_' + k]:>7.1f}%"
            for k in KEYS
        )
        print(f"{r['policy']:>12} {r['zipf_alpha']:>5} {cells} {100 * r['noise']:>5.0f}%")
        if "phases_ms_p50" in r:
            for side in ("real", "table"):
                ph = r["phases_ms_p50"][side]
                print(
                    f"{'':>18} {side:>5} ms p50: "
                    + ", ".join(f"{k} {v:.3f}" for k, v in ph.items() if v is not None)
                )
    print(
        f"{result['repeats']} rounds of the table interleaved with the real runs; the table's "
        f"rounds spread {100 * result['table_drift']:.0f}% (the machine's drift)"
    )
    return 0


def report_main(argv: list[str]) -> int:
    from apps.simulate.report import ReportConfig, build_report, write

    ap = argparse.ArgumentParser(prog="sunjax simulate report")
    ap.add_argument("--out", default="reports/cluster")
    ap.add_argument("--table", default="h200")
    ap.add_argument("--tasks", type=int, nargs="+", default=[4, 8, 16])
    ap.add_argument("--requests-per-task", type=int, default=150)
    args = ap.parse_args(argv)
    table = load_table(args.table)
    cfg = ReportConfig(task_counts=tuple(args.tasks), requests_per_task=args.requests_per_task)
    report = build_report(table, cfg, log=lambda s: print(s, file=sys.stderr))
    write(report, table, args.out, ["sunjax simulate report", *argv])
    print(json.dumps(report["headline"], indent=2))
    return 0


SUBCOMMANDS = {"run": run_main, "validate": validate_main, "report": report_main}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in SUBCOMMANDS:
        print(f"usage: sunjax simulate {{{','.join(SUBCOMMANDS)}}} [args]", file=sys.stderr)
        return 2
    return SUBCOMMANDS[argv[0]](argv[1:])
