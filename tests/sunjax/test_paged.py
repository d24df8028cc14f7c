"""The paged KV cache: allocator invariants under random traffic, decode write and hand-off
insert against a dense cache, and attention over the written pages.

Letters: B slots, L layers, K kv heads, H head dim, A pages, P page size, M pages per slot.
"""

from __future__ import annotations

import os
import random

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sunjax
from kernels_pallas.paged_attention import gather_pages, paged_attention
from sunjax.cache import KVCache
from sunjax.configs import load_model_config
from sunjax.paged import (
    NULL_PAGE,
    OutOfPages,
    PageAllocator,
    PagedKVCache,
    page_bytes,
    pages_for,
    write_prefix,
    write_token,
)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CFG = sunjax.ModelConfig(
    vocab_size=97, d_model=48, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, ffn_dim=80
)


class TestAllocator:
    def test_500_random_requests_keep_every_invariant(self):
        """500 requests with random prompt and output lengths, growing by random chunks
        (chunked prefill / several decode steps), 5% cancelled at random, preempted
        (freed and requeued) when the pool runs dry.  After every step: ``check()`` and an
        independent shadow count: each live sequence holds exactly ``pages_for(its
        length)`` pages, pairwise disjoint, and free + used = capacity.  At the end every
        page is free."""
        rng = random.Random(0)
        page_size, max_pages = 16, 32
        alloc = PageAllocator(num_pages=257, page_size=page_size, max_pages_per_seq=max_pages)
        queue = []
        for i in range(500):
            prompt = rng.randint(1, 300)
            queue.append((i, prompt, rng.randint(prompt + 1, max_pages * page_size)))
        live: dict[int, list[int]] = {}  # id -> [length, target, prompt]
        finished, cancelled, preempted, steps = set(), set(), 0, 0
        while queue or live:
            steps += 1
            # admit: up to 4 new requests a step, 24 slots, if their prompt fits
            for _ in range(rng.randint(0, 4)):
                if not queue or len(live) >= 24 or not alloc.can_fit(None, queue[0][1]):
                    break
                i, prompt, target = queue.pop(0)
                alloc.allocate(i, prompt)
                live[i] = [prompt, target, prompt]
            # grow each live sequence; preempt a random victim when pages run out
            for i in list(live):
                if i not in live:
                    continue  # preempted earlier in this step
                length, target, prompt = live[i]
                new_len = min(target, length + rng.choice((1, 1, 1, 7, 33)))
                while True:
                    try:
                        alloc.extend(i, new_len)
                        break
                    except OutOfPages:
                        victim = rng.choice([j for j in live if j != i] or [i])
                        alloc.free(victim)
                        queue.insert(0, (victim, live[victim][2], live[victim][1]))
                        del live[victim]
                        preempted += 1
                        if victim == i:
                            break
                if i in live:
                    live[i][0] = new_len
                    if new_len == target:
                        alloc.free(i)
                        del live[i]
                        finished.add(i)
            # cancel
            for i in list(live):
                if rng.random() < 0.05 / 20:
                    alloc.free(i)
                    del live[i]
                    cancelled.add(i)
            alloc.check()
            used = [p for i in live for p in alloc.pages(i)]
            assert len(used) == len(set(used)), "a page in two sequences"
            assert NULL_PAGE not in used
            for i, (length, _, _) in live.items():
                assert len(alloc.pages(i)) == pages_for(length, page_size), i
            assert alloc.num_free + len(used) == alloc.capacity == 256
        assert len(finished) + len(cancelled) == 500 and not finished & cancelled
        assert preempted > 0 and cancelled, (preempted, len(cancelled))  # both paths ran
        assert alloc.num_free == alloc.capacity and len(alloc) == 0 and alloc.num_used == 0
        alloc.check()

    def test_check_catches_corruption(self):
        """The invariant checker is not vacuous: each kind of corruption is reported."""
        corruptions = {
            "belongs to": lambda a: a._pages["b"].__setitem__(0, a._pages["a"][0]),
            "both free and used": lambda a: a._free.append(a._pages["a"][0]),
            "leaked": lambda a: a._free.pop(),
            "twice": lambda a: a._free.append(a._free[0]),
            "not allocatable": lambda a: a._pages["a"].__setitem__(-1, NULL_PAGE),
            "for 20 tokens": lambda a: a._pages["a"].pop(),
        }
        for message, corrupt in corruptions.items():
            alloc = PageAllocator(16, 8, 4)
            alloc.allocate("a", 20)
            alloc.allocate("b", 3)
            alloc.check()
            corrupt(alloc)
            with pytest.raises(RuntimeError, match=message):
                alloc.check()

    def test_out_of_pages_changes_nothing(self):
        alloc = PageAllocator(num_pages=5, page_size=4, max_pages_per_seq=8)
        assert alloc.allocate("a", 9) == [1, 2, 3]
        with pytest.raises(OutOfPages, match="needs 2 pages, 1 are free"):
            alloc.extend("a", 17)
        with pytest.raises(OutOfPages):
            alloc.allocate("b", 5)
        assert "b" not in alloc and alloc.pages("a") == (1, 2, 3) and alloc.num_free == 1
        assert alloc.extend("a", 12) == [] and alloc.extend("a", 13) == [4]
        np.testing.assert_array_equal(alloc.page_row("a", 6), [1, 2, 3, 4, 0, 0])
        np.testing.assert_array_equal(
            alloc.page_table(["a", None], 5), [[1, 2, 3, 4, 0], [0, 0, 0, 0, 0]]
        )
        assert alloc.free("a") == 4 and alloc.allocate("c", 1) == [1]  # freed pages reused
        alloc.check()

    def test_errors_name_the_bad_value(self):
        alloc = PageAllocator(num_pages=9, page_size=4, max_pages_per_seq=2)
        alloc.allocate("a", 1)
        with pytest.raises(ValueError, match="'a' is already allocated"):
            alloc.allocate("a", 1)
        with pytest.raises(ValueError, match="unknown sequence 'z'"):
            alloc.extend("z", 4)
        with pytest.raises(ValueError, match="unknown sequence 'z'"):
            alloc.free("z")
        with pytest.raises(ValueError, match="num_tokens=9 needs 3 pages"):
            alloc.extend("a", 9)
        with pytest.raises(ValueError, match="num_tokens=9 needs 3 pages"):
            alloc.allocate("b", 9)
        assert "b" not in alloc
        with pytest.raises(ValueError, match="num_pages=1"):
            PageAllocator(1, 4, 2)
        alloc.check()


def _normal(seed, *shape):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def _dense_prefix(seed, length, max_len):
    """A batch-1 dense ``KVCache`` (random K/V, ``length`` valid of ``max_len``)."""
    shape = (CFG.n_layers, 1, CFG.n_kv_heads, max_len, CFG.head_dim)
    k, v = _normal(seed, *shape), _normal(seed + 1000, *shape)
    return KVCache(k=tuple(k), v=tuple(v), lengths=jnp.array([length], jnp.int32))


class TestPagedKVCache:
    def test_init_paged_cache(self):
        cache = CFG.init_paged_cache(3, 40, num_pages=12, page_size=8)
        assert len(cache.k) == len(cache.v) == CFG.n_layers
        for leaf in (*cache.k, *cache.v):
            chex.assert_shape(leaf, (CFG.n_kv_heads, 12, 8, CFG.head_dim))
        chex.assert_trees_all_equal(cache.page_table, jnp.zeros((3, 5), jnp.int32))
        chex.assert_trees_all_equal(cache.lengths, jnp.zeros((3,), jnp.int32))
        assert (cache.batch, cache.num_pages, cache.page_size) == (3, 12, 8)
        assert (cache.max_pages_per_seq, cache.max_len) == (5, 40)
        assert cache.k[0].dtype == jnp.float32
        assert CFG.init_paged_cache(1, 8, num_pages=2, dtype="bfloat16").k[0].dtype == jnp.bfloat16
        with pytest.raises(ValueError, match="num_pages=1"):
            CFG.init_paged_cache(1, 8, num_pages=1)
        with pytest.raises(ValueError, match="max_len=0"):
            CFG.init_paged_cache(1, 0, num_pages=4)

    def test_llama_8b_shapes_without_allocating(self):
        cfg = load_model_config(os.path.join(ROOT, "configs/models/llama-3.1-8b.yaml"))
        shapes = jax.eval_shape(
            lambda: cfg.init_paged_cache(32, 8192, num_pages=4097, page_size=16)
        )
        chex.assert_shape(shapes.k[0], (8, 4097, 16, 128))
        chex.assert_shape(shapes.page_table, (32, 512))
        assert shapes.k[0].dtype == jnp.bfloat16
        assert page_bytes(cfg, 16) == 2 * 32 * 8 * 16 * 128 * 2  # 2 MiB per 16-token page

    def test_insert_then_decode_writes_match_a_dense_cache(self):
        """Hand-off inserts (bucket-padded prefixes) into random pages, then decode writes
        for every slot (one free); each slot's gathered pages equal the dense K/V, pages
        nobody owns stay untouched, and attention over the pages equals attention over the
        dense buffers."""
        page_size, max_len, steps = 8, 48, 5
        cache = CFG.init_paged_cache(4, max_len, num_pages=40, page_size=page_size)
        alloc = cache.allocator()
        rng = random.Random(1)
        for filler in range(8):  # holes in the free list: slots get scattered pages
            alloc.allocate(("filler", filler), rng.randint(1, 20))
        for filler in range(0, 8, 2):
            alloc.free(("filler", filler))
        prefix_lengths = {0: 5, 1: 16, 3: 30}  # slot 2 stays free
        dense_k = np.zeros((CFG.n_layers, 4, CFG.n_kv_heads, max_len, CFG.head_dim), np.float32)
        dense_v = np.zeros_like(dense_k)
        insert = jax.jit(lambda c, p, s, r: c.insert(p, s, r), donate_argnums=0)
        for i, (slot, n) in enumerate(prefix_lengths.items()):
            prefix = _dense_prefix(i, n, 32)  # bucket 32 > n
            alloc.allocate(slot, n + steps)
            cache = insert(cache, prefix, slot, jnp.asarray(alloc.page_row(slot)))
            for layer in range(CFG.n_layers):
                dense_k[layer, slot, :, :n] = prefix.k[layer][0, :, :n]
                dense_v[layer, slot, :, :n] = prefix.v[layer][0, :, :n]
        chex.assert_trees_all_equal(cache.lengths, jnp.array([5, 16, 0, 30], jnp.int32))

        @jax.jit
        def decode_write(cache, k_new, v_new):  # k_new, v_new: L x [B, K, H]
            write = lambda pages, new: write_token(pages, new, cache.page_table, cache.lengths)
            return PagedKVCache(
                k=tuple(map(write, cache.k, k_new)),
                v=tuple(map(write, cache.v, v_new)),
                page_table=cache.page_table,
                lengths=cache.lengths + jnp.array([1, 1, 0, 1]),
            )

        for t in range(steps):
            k_new = _normal(100 + t, CFG.n_layers, 4, 2, 16)
            v_new = _normal(200 + t, CFG.n_layers, 4, 2, 16)
            for slot, n in prefix_lengths.items():
                dense_k[:, slot, :, n + t] = k_new[:, slot]
                dense_v[:, slot, :, n + t] = v_new[:, slot]
            cache = decode_write(cache, tuple(k_new), tuple(v_new))

        lengths = np.asarray(cache.lengths)
        np.testing.assert_array_equal(lengths, [10, 21, 0, 35])
        owned = {p for s in prefix_lengths for p in alloc.pages(s)}
        for layer in range(CFG.n_layers):
            for paged, dense in (
                (cache.k[layer], dense_k[layer]),
                (cache.v[layer], dense_v[layer]),
            ):
                got = np.asarray(gather_pages(paged, cache.page_table))  # [K, B, S, H]
                for slot, n in enumerate(lengths):
                    np.testing.assert_array_equal(got[:, slot, :n], dense[slot, :, :n])
                others = sorted(set(range(1, cache.num_pages)) - owned)
                np.testing.assert_array_equal(np.asarray(paged)[:, others], 0.0)

        q = _normal(7, 4, CFG.n_heads, CFG.head_dim)
        out = paged_attention(q, cache.k[1], cache.v[1], cache.lengths, cache.page_table)
        qg = np.asarray(q).reshape(4, CFG.n_kv_heads, -1, CFG.head_dim)
        for slot, n in enumerate(lengths):
            k, v = dense_k[1, slot, :, :n], dense_v[1, slot, :, :n]  # [K, n, H]
            logits = np.einsum("kgh,knh->kgn", qg[slot], k) / np.sqrt(CFG.head_dim)
            w = np.exp(logits - logits.max(-1, keepdims=True, initial=-np.inf))
            want = np.einsum("kgn,knh->kgh", w / w.sum(-1, keepdims=True), v) if n else 0.0
            np.testing.assert_allclose(
                np.asarray(out[slot]).reshape(qg[slot].shape), want, atol=1e-5, rtol=0
            )

    def test_out_of_range_writes_go_to_the_null_page(self):
        pages = jnp.zeros((1, 4, 2, 3))  # [K, A, P, H]
        row = jnp.array([2, NULL_PAGE], jnp.int32)  # the sequence owns page 2 only
        new = jnp.arange(1.0, 1.0 + 5 * 3).reshape(1, 5, 3)  # 5 tokens, 3 past its page
        out = np.asarray(write_prefix(pages, new, row))
        np.testing.assert_array_equal(out[0, 2], new[0, :2])
        np.testing.assert_array_equal(out[0, [1, 3]], 0.0)  # other pages untouched
        table = jnp.array([[3, 1]], jnp.int32)
        out = np.asarray(write_token(pages, jnp.ones((1, 1, 3)), table, jnp.array([4])))
        np.testing.assert_array_equal(out[0, 1:], 0.0)  # position 4 >= M * P: null page
        np.testing.assert_array_equal(out[0, 0, 0], 1.0)

    def test_release_and_insert_errors(self):
        cache = CFG.init_paged_cache(2, 16, num_pages=6, page_size=8)
        row = jnp.array([3, 4], jnp.int32)
        cache = jax.jit(lambda c, p: c.insert(p, 1, row))(cache, _dense_prefix(0, 9, 16))
        released = jax.jit(lambda c: c.release(1))(cache)
        np.testing.assert_array_equal(released.page_table, [[0, 0], [0, 0]])
        np.testing.assert_array_equal(released.lengths, [0, 0])
        chex.assert_trees_all_equal(released.k, cache.k)
        with pytest.raises(ValueError, match="batch=2"):
            cache.insert(KVCache.create(CFG, 2, 8, "float32"), 0, row)
        with pytest.raises(ValueError, match=r"page_row must be \[2\]"):
            cache.insert(_dense_prefix(0, 3, 8), 0, row[:1])
