"""Host free list against jitted page allocation: cost per decode step (the measurement behind
the choice documented in ``sunjax/paged.py``).

    python scripts/bench_paged_allocator.py --out reports/paged [--batch 32] [--steps 2048]

Both simulate ``--batch`` sequences that each grow by one token per decode step (a sequence
that reaches ``max_len`` is freed and restarted), pages of ``--page-size`` tokens:

* ``host``: ``sunjax.paged.PageAllocator.extend`` for every sequence, each new page written
  into the engine's host copy of the ``[B, M]`` page table, and on the steps where a page
  was added the table put on the device (``jax.device_put``) before the decode step;
* ``jitted``: the same bookkeeping as one pure jitted function over device arrays (a free
  mask ``[A]``, the page table, the lengths), MaxText ``PageState`` style: sequences that
  cross a page boundary take the first free pages (``jnp.nonzero(size=B)``), ranked by a
  cumulative sum; ``jitted_sync`` also reads the free-page count back to the host each step,
  which a scheduler needs to admit or preempt.

Times are per step, median over ``--runs``, on whatever device JAX picks (this CPU).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from sunjax.paged import NULL_PAGE, PageAllocator


def host_steps(batch, page_size, max_pages, num_pages, steps) -> float:
    alloc = PageAllocator(num_pages, page_size, max_pages)
    max_len = max_pages * page_size
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, max_len, batch).tolist()
    gen = [0] * batch  # sequence names (slot, generation)
    for i, n in enumerate(lengths):
        alloc.allocate((i, 0), n)
    rows = alloc.page_table([(i, 0) for i in range(batch)])  # the engine's host copy
    table = jax.device_put(rows)
    t0 = time.perf_counter()
    for _ in range(steps):
        changed = False
        for i in range(batch):
            if lengths[i] == max_len:
                alloc.free((i, gen[i]))
                gen[i] += 1
                lengths[i] = 0
                alloc.allocate((i, gen[i]), 0)
                rows[i] = NULL_PAGE
                changed = True
            lengths[i] += 1
            new = alloc.extend((i, gen[i]), lengths[i])
            if new:
                rows[i, (lengths[i] - 1) // page_size] = new[0]
                changed = True
        if changed:
            table = jax.device_put(rows)
    jax.block_until_ready(table)
    return (time.perf_counter() - t0) / steps


def make_jitted(batch, page_size, max_pages, num_pages):
    max_len = max_pages * page_size

    @jax.jit
    def step(free, table, lengths):
        # free: bool [A]; table: int32 [B, M]; lengths: int32 [B] (tokens held so far)
        restart = lengths == max_len
        freed = jnp.where(restart[:, None], table, num_pages).reshape(-1)
        free = free.at[freed].set(True, mode="drop")
        table = jnp.where(restart[:, None], NULL_PAGE, table)
        lengths = jnp.where(restart, 0, lengths)
        need = lengths % page_size == 0  # the next token opens a page
        rank = jnp.cumsum(need) - 1
        first_free = jnp.nonzero(free, size=batch, fill_value=NULL_PAGE)[0]
        page = jnp.where(need, first_free[rank], NULL_PAGE)
        rows = jnp.arange(batch)
        col = lengths // page_size
        table = table.at[rows, col].set(jnp.where(need, page, table[rows, col]), mode="drop")
        free = free.at[jnp.where(need, page, num_pages)].set(False, mode="drop")
        return free, table, lengths + 1

    return step


def jitted_steps(batch, page_size, max_pages, num_pages, steps, sync) -> float:
    step = make_jitted(batch, page_size, max_pages, num_pages)
    alloc = PageAllocator(num_pages, page_size, max_pages)
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, max_pages * page_size, batch)
    for i, n in enumerate(lengths):
        alloc.allocate(i, int(n))
    free = np.zeros(num_pages, bool)
    free[[p for p in range(1, num_pages) if not any(p in alloc.pages(i) for i in range(batch))]] = 1
    state = (jnp.asarray(free), jnp.asarray(alloc.page_table(range(batch))), jnp.asarray(lengths))
    state = jax.block_until_ready(step(*state))
    t0 = time.perf_counter()
    for _ in range(steps):
        state = step(*state)
        if sync:
            int(state[0].sum())
    jax.block_until_ready(state)
    return (time.perf_counter() - t0) / steps


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--page-size", type=int, default=16)
    ap.add_argument("--max-pages", type=int, default=128)
    ap.add_argument("--num-pages", type=int, default=4097)
    ap.add_argument("--steps", type=int, default=2048)
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args(argv)
    shape = (args.batch, args.page_size, args.max_pages, args.num_pages)
    result = {
        "device_kind": jax.devices()[0].device_kind,
        "jax_version": jax.__version__,
        **vars(args),
    }
    for name, fn in (
        ("host", lambda: host_steps(*shape, args.steps)),
        ("jitted", lambda: jitted_steps(*shape, args.steps, sync=False)),
        ("jitted_sync", lambda: jitted_steps(*shape, args.steps, sync=True)),
    ):
        us = statistics.median(fn() for _ in range(args.runs)) * 1e6
        result[f"{name}_us_per_step"] = us
        print(f"{name:<12} {us:8.1f} us per decode step (B={args.batch})", flush=True)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "allocator.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
