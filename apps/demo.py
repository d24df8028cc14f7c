"""``sunjax demo``: SUN end to end on this machine.

1. a base model (the tiny Llama pretrained here and cached; ``--model smollm2`` for the real one);
2. SUN-train a prefill module for each of three tasks (arith, code, tool) through the frozen
   base decode module, plus the full fine-tuning baseline, and evaluate both pairings;
3. export the shared decode tree and the task prefill modules with Orbax;
4. serve mixed traffic from the export: one shared decode pool (SUN, least-loaded routing)
   and the conventional baseline (per-model decode workers, model-affine routing);
5. print the accuracy table and the throughput table, and say where everything was written.
"""

from __future__ import annotations

import argparse
import json
import os


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="sunjax demo", description=__doc__)
    p.add_argument("--out", default="out/demo")
    p.add_argument("--model", default="tiny", help="'tiny' (pretrained here) or 'smollm2'")
    p.add_argument("--steps", type=int, default=150, help="fine-tuning steps per task")
    p.add_argument("--n-test", type=int, default=50)
    p.add_argument("--requests", type=int, default=96)
    args = p.parse_args(argv)

    from serve.pool import ensure_cpu_devices

    workers = 4
    ensure_cpu_devices(workers)

    from serve.loop import ServeConfig, build, load_from_export, serve_once, write_outputs
    from serve.workload import WorkloadConfig, make_workload
    from sunjax.export import export
    from train.base import load_base
    from train.report import markdown, run_report

    out = os.path.abspath(args.out)
    print(f"[1/4] base model: {args.model}")
    cfg, base, tok, tok_source = load_base(args.model)

    print(f"[2/4] fine-tuning 3 tasks x (SUN, full FT), {args.steps} steps each")
    tiny = args.model == "tiny"  # the real model wants a smaller step and batch on a CPU
    report = run_report(
        out=os.path.join(out, "report"),
        steps=args.steps,
        n_train=2000,
        n_test=args.n_test,
        seed=0,
        base=(cfg, base, tok),
        batch_size=16 if tiny else 8,
        learning_rate=2e-3 if tiny else 1e-4,
    )
    trained = report["_trained"]

    print("[3/4] exporting the shared decode tree and the task prefill modules (Orbax)")
    vdir = export(
        os.path.join(out, "export"),
        cfg,
        base,
        {t: m["sun"] for t, m in trained.items()},
        tokenizer_source=tok_source,
        tokenizer=tok,
        metadata={"steps": args.steps, "accuracy": report["accuracy"]},
    )

    print("[4/4] serving mixed traffic: SUN shared pool vs conventional per-model workers")
    summaries = {}
    for policy in ("sun", "conventional"):
        config = ServeConfig(
            policy=policy,
            loader="export",
            export=os.path.join(out, "export"),
            workers=workers,
            slots_per_worker=8,
            max_len=128,
        )
        models = load_from_export(config)
        models.full = {t: m["full"] for t, m in trained.items()}
        wl = WorkloadConfig(
            requests=args.requests,
            rate=1000.0,
            zipf_alpha=1.0,
            prompt_len=(8, 48),
            output_len=(16, 48),
            seed=0,
        )
        arrivals = make_workload(wl, list(models.prefill), cfg.vocab_size)
        pool, router = build(config, models)
        serve_once(config, models, pool, router, arrivals[: workers * 2])  # compile, untimed
        summary, results = serve_once(config, models, pool, router, arrivals)
        write_outputs(os.path.join(out, "serve", policy), results, summary)
        summaries[policy] = summary

    print()
    print(markdown(report))
    if tiny:
        print(
            "The tiny base is too weak a decode module for SUN: its frozen layers cannot copy\n"
            "names and values out of another module's KV (full FT can, by changing them).\n"
            "With a real pretrained model SUN matches full fine-tuning: see\n"
            "reports/smollm2-cpu/report.md (SmolLM2-135M), or `sunjax demo --model smollm2`.\n"
        )
    keys = (
        "completed",
        "output_tokens",
        "decode_steps",
        "mean_batch_occupancy",
        "throughput_tok_s",
        "tpot_ms_p50",
        "ttft_ms_p50",
    )
    print("| policy | " + " | ".join(keys) + " |")
    print("|---" * (len(keys) + 1) + "|")
    for policy, s in summaries.items():
        cells = [f"{s[k]:.2f}" if isinstance(s[k], float) else str(s[k]) for k in keys]
        print(f"| {policy} | " + " | ".join(cells) + " |")
    with open(os.path.join(out, "serve", "summary.json"), "w") as f:
        json.dump(summaries, f, indent=2)
    print(f"\nwritten: {out}/report (accuracy), {vdir} (export), {out}/serve (outputs, summaries)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
