"""Greedy generation throughput: sunjax vs Hugging Face transformers, same prompts, one run.

    sunjax bench generate --out DIR [--model smollm2] [--batches 1 16] [--new-tokens 32]

Both sides generate exactly ``new_tokens`` per sequence (EOS disabled), greedy, float32, on
the same chat prompts; the first call of each configuration is a warm-up (compile / allocator),
then the median of ``--repeats`` timed calls is reported. Each side runs in its own child
process, one after the other: in one process XLA's and PyTorch's idle worker threads spin on
the same cores and slow the other side down (measured: transformers 6x slower at batch 1).
Recompilation is checked by counting the compiled variants of the jitted decode step before
and after the timed calls.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about autumn leaves.",
    "Explain what a hash table is in one paragraph.",
    "Give me three tips for learning to cook.",
    "Why is the sky blue?",
    "Translate 'good morning' into Spanish and German.",
    "What is 17 times 23?",
    "Name four planets of the solar system.",
    "Summarize the plot of Romeo and Juliet.",
    "How do vaccines work?",
    "Write a Python function that reverses a string.",
    "What are the primary colors?",
    "Describe a sunset to someone who cannot see.",
    "What is the boiling point of water in Fahrenheit?",
    "List three benefits of regular exercise.",
    "Who wrote 'Pride and Prejudice'?",
]


def _time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _side(side: str, model: str, batches: list[int], n: int, repeats: int) -> dict:
    """Time one side in this process; returns {batch: (seconds, recompiles)}."""
    from sunjax import hub
    from sunjax.tokenizer import chat_prompt, load_tokenizer

    path = hub.resolve(model)
    tok = load_tokenizer(path)
    results = {}
    if side == "sunjax":
        from sunjax import count_compiles
        from sunjax.generate import generate

        cfg, params, _ = hub.load(path)
        for batch in batches:
            prompts = [chat_prompt(tok, PROMPTS[i % len(PROMPTS)]) for i in range(batch)]

            def run(prompts=prompts):
                out = generate(cfg, params, prompts, max_new_tokens=n)
                assert all(len(t) == n for t in out.tokens)

            run()
            with count_compiles() as compiles:
                seconds = _time(run, repeats)
            results[batch] = (seconds, compiles.n)
        return results

    import torch
    from transformers import AutoModelForCausalLM

    if path.endswith(".gguf"):
        hf = AutoModelForCausalLM.from_pretrained(
            os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32
        )
    else:
        hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    hf.eval()
    pad = tok.pad_token_id or 0
    for batch in batches:
        prompts = [chat_prompt(tok, PROMPTS[i % len(PROMPTS)]) for i in range(batch)]
        width = max(map(len, prompts))
        ids = torch.full((batch, width), pad, dtype=torch.long)
        mask = torch.zeros((batch, width), dtype=torch.long)
        for i, pr in enumerate(prompts):  # left padding, as transformers expects
            ids[i, width - len(pr) :] = torch.tensor(pr)
            mask[i, width - len(pr) :] = 1

        def run(ids=ids, mask=mask, width=width):
            with torch.no_grad():
                out = hf.generate(
                    ids,
                    attention_mask=mask,
                    max_new_tokens=n,
                    min_new_tokens=n,
                    do_sample=False,
                    eos_token_id=None,
                    pad_token_id=pad,
                )
            assert out.shape[1] == width + n

        results[batch] = (_time(run, repeats), 0)
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="sunjax bench generate", description=__doc__)
    p.add_argument("--model", default="smollm2")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default="out/bench_generate")
    p.add_argument("--side", choices=["sunjax", "transformers"], help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.side:
        res = _side(args.side, args.model, args.batches, args.new_tokens, args.repeats)
        print("RESULT " + json.dumps(res))
        return 0

    import jax
    import torch

    from sunjax import hub

    path = hub.resolve(args.model)
    timings = {}
    for side in ("transformers", "sunjax"):
        cmd = [
            sys.executable,
            "-m",
            "apps.bench.generate",
            "--side",
            side,
            "--model",
            path,
            "--new-tokens",
            str(args.new_tokens),
            "--repeats",
            str(args.repeats),
            "--batches",
            *map(str, args.batches),
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode != 0 or not line:
            print(proc.stderr[-3000:], file=sys.stderr)
            raise SystemExit(f"the {side} side failed (exit {proc.returncode})")
        timings[side] = {int(b): v for b, v in json.loads(line[0][7:]).items()}

    rows = []
    for batch in args.batches:
        (t_ours, recompiles), (t_hf, _) = timings["sunjax"][batch], timings["transformers"][batch]
        toks = batch * args.new_tokens
        rows.append(
            {
                "batch": batch,
                "new_tokens": args.new_tokens,
                "sunjax_s": t_ours,
                "transformers_s": t_hf,
                "sunjax_tok_s": toks / t_ours,
                "transformers_tok_s": toks / t_hf,
                "speedup": t_hf / t_ours,
                "recompiles_during_timing": recompiles,
            }
        )

    env = {
        "machine": platform.machine(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "jax": jax.__version__,
        "jax_backend": jax.default_backend(),
        "torch": torch.__version__,
        "model": os.path.basename(path),
    }
    print(
        f"greedy generation, {args.new_tokens} new tokens, {env['model']}, "
        f"{env['jax_backend']} ({env['cpu_count']} cores)"
    )
    print(
        f"{'batch':>5} {'sunjax tok/s':>13} {'transformers tok/s':>19} {'speedup':>8} "
        f"{'recompiles':>10}"
    )
    for r in rows:
        print(
            f"{r['batch']:>5} {r['sunjax_tok_s']:>13.1f} {r['transformers_tok_s']:>19.1f} "
            f"{r['speedup']:>7.2f}x {r['recompiles_during_timing']:>10}"
        )
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "bench_generate.json"), "w") as f:
        json.dump({"env": env, "rows": rows}, f, indent=2)
    print(f"wrote {os.path.join(args.out, 'bench_generate.json')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
