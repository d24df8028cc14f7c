"""Tests of kernels_pallas.paged_attention: reference, Pallas kernels, dispatch, lowering.

Letters: B sequences, N query heads, K kv heads, G = N / K, H head dim, A pages in the pool,
P tokens per page, M pages per sequence, S key positions.

Every backend is checked by one base class, ``PagedAttentionChecks``, against a dense
attention computed here in float64 numpy from the per-sequence K/V *before* they are
scattered into pages (token by token, in a Python loop), so the paged layout is checked
independently of ``reference.gather_pages``.  Page tables are random permutations of the
pool; entries past a sequence's length point at random pages (other sequences' pages
included), and every position no sequence owns holds large finite garbage (|x| ~ 100), so a
kernel that reads past a length, or reads the wrong page, fails by a wide margin.

Inputs are rounded to bfloat16-representable values (stored as float32): the TPU kernel
rounds K/V to bf16 inside (see ``tpu.py``), so on such inputs every backend computes the
same exact products and float32 results must agree with float64 within 1e-5 (observed
2e-7 to 4e-7 on every backend).  bfloat16 runs (outputs of magnitude <~ 2, so one bf16
ulp is <= 2**-7): the reference and the Mosaic kernel cast the probabilities to bf16 for
the value product and round the output once, 2**-6 (observed 3.8e-3 to 4.9e-3); the Triton
kernel also stores each of its ``k_splits`` partial outputs in bf16 and merges them in
bf16, 2**-5 (observed 1.0e-2).  On a real GPU the Triton kernel's ``pl.dot`` may run
float32 in TF32 (exact for bf16-valued q, k; one 2**-11 rounding of the probabilities
before the value product): 1e-3 there.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels_pallas.paged_attention import (
    Config,
    gather_pages,
    paged_attention,
    paged_attention_reference,
)
from kernels_pallas.paged_attention import gpu as pa_gpu
from kernels_pallas.paged_attention import tpu as pa_tpu

TOL = {jnp.dtype(jnp.float32): 1e-5, jnp.dtype(jnp.bfloat16): 2.0**-6}
GARBAGE = 100.0


# (name, B, N, K, H, P, M, A): GQA, MQA and MHA; M not a multiple of the compute block
# (the wrappers pad the page table); a pool larger than needed so some pages are unowned.
CASES = [
    pytest.param(3, 8, 2, 64, 8, 5, 20, id="gqa-G4"),
    pytest.param(2, 8, 1, 64, 16, 3, 8, id="mqa"),
    pytest.param(2, 2, 2, 32, 8, 4, 10, id="mha"),
]
# Small blocks, so the GPU kernel runs several partitions and compute blocks per sequence.
SMALL = Config(pages_per_compute_block=2, k_splits=2)


class Case:
    """A random paged decode-attention problem and its float64 dense answer inputs."""

    def __init__(self, seed, b, n, kh, h, p, m, a, *, dtype=jnp.float32, lengths=None):
        rng = np.random.default_rng(seed)
        if a < b * m:
            raise ValueError(f"pool of {a} pages cannot give {b} sequences {m} pages each")
        bf16 = lambda x: np.asarray(jnp.asarray(x, jnp.bfloat16), np.float64)
        if lengths is None:
            lengths = rng.integers(0, m * p + 1, size=b)
            lengths[rng.integers(b)] = m * p  # a full page table
        self.lengths = np.asarray(lengths, np.int32)  # [B]
        self.q = bf16(rng.standard_normal((b, n, h)))  # [B, N, H]
        self.k = bf16(rng.standard_normal((b, kh, m * p, h)))  # [B, K, S, H] dense
        self.v = bf16(rng.standard_normal((b, kh, m * p, h)))  # [B, K, S, H] dense
        k_pages = bf16(GARBAGE * rng.standard_normal((kh, a, p, h)))  # [K, A, P, H]
        v_pages = bf16(GARBAGE * rng.standard_normal((kh, a, p, h)))
        owned = rng.permutation(a)[: b * m].reshape(b, m)
        table = rng.integers(0, a, size=(b, m))  # entries past a length: any page
        for i in range(b):
            used = -(-int(self.lengths[i]) // p)
            table[i, :used] = owned[i, :used]
            for t in range(self.lengths[i]):
                k_pages[:, table[i, t // p], t % p] = self.k[i, :, t]
                v_pages[:, table[i, t // p], t % p] = self.v[i, :, t]
        self.page_indices = table.astype(np.int32)  # [B, M]
        self.dtype = jnp.dtype(dtype)
        self.args = (
            jnp.asarray(self.q, dtype),
            jnp.asarray(k_pages, dtype),
            jnp.asarray(v_pages, dtype),
            jnp.asarray(self.lengths),
            jnp.asarray(self.page_indices),
        )

    def dense(self, scale=None, sliding_window=None) -> np.ndarray:
        """Float64 softmax attention of each sequence's query over its own dense K/V."""
        b, n, h = self.q.shape
        g = n // self.k.shape[1]
        scale = h**-0.5 if scale is None else scale
        out = np.zeros((b, n, h))
        for i in range(b):
            hi = int(self.lengths[i])
            lo = 0 if sliding_window is None else max(0, hi - sliding_window)
            if hi == 0:
                continue
            k = np.repeat(self.k[i, :, lo:hi], g, axis=0)  # [N, T, H]
            v = np.repeat(self.v[i, :, lo:hi], g, axis=0)
            logits = np.einsum("nh,nth->nt", self.q[i], k) * scale
            w = np.exp(logits - logits.max(-1, keepdims=True))
            out[i] = np.einsum("nt,nth->nh", w / w.sum(-1, keepdims=True), v)
        return out


def assert_matches_dense(out, case, tol, **kw):
    chex.assert_shape(out, case.q.shape)
    assert out.dtype == case.dtype
    got = np.asarray(out, np.float64)
    assert np.isfinite(got).all()
    want = case.dense(**kw)
    err = np.abs(got - want)
    worst = np.unravel_index(np.argmax(err), err.shape)
    assert err.max() <= tol, f"max error {err.max():.3g} > {tol:.3g} at {worst}"


class PagedAttentionChecks:
    """Checks shared by every backend; subclasses define ``run`` and the class attributes."""

    has_window = False
    tol = TOL

    def run(self, case: Case, *, scale=None, sliding_window=None, config=None):
        raise NotImplementedError

    @pytest.mark.parametrize("b, n, kh, h, p, m, a", CASES)
    def test_matches_dense_float32(self, b, n, kh, h, p, m, a):
        case = Case(0, b, n, kh, h, p, m, a)
        assert_matches_dense(self.run(case), case, self.tol[case.dtype])

    def test_matches_dense_bfloat16(self):
        case = Case(1, 3, 8, 2, 64, 8, 5, 20, dtype=jnp.bfloat16)
        assert_matches_dense(self.run(case), case, self.tol[case.dtype])

    def test_small_blocks_scale_and_edge_lengths(self):
        """Several partitions / compute blocks per sequence, a non-default scale, and the
        lengths 0 (zero output), 1, a page boundary and a full table."""
        case = Case(2, 5, 4, 2, 64, 8, 6, 32, lengths=[0, 1, 8, 17, 48])
        out = self.run(case, scale=0.3, config=SMALL)
        assert_matches_dense(out, case, self.tol[case.dtype], scale=0.3)
        np.testing.assert_array_equal(np.asarray(out[0]), 0.0)

    @pytest.mark.parametrize("window", [1, 5, 100])
    def test_sliding_window(self, window):
        if not self.has_window:
            pytest.skip("this kernel has no sliding window; TestApi checks the XLA fallback")
        case = Case(3, 3, 8, 2, 64, 8, 5, 20, lengths=[40, 3, 23])
        out = self.run(case, sliding_window=window)
        assert_matches_dense(out, case, self.tol[case.dtype], sliding_window=window)


class TestReference(PagedAttentionChecks):
    has_window = True

    def run(self, case, *, scale=None, sliding_window=None, config=None):
        return paged_attention_reference(*case.args, scale=scale, sliding_window=sliding_window)


class TritonChecks(PagedAttentionChecks):
    interpret = True
    tol = {**TOL, jnp.dtype(jnp.bfloat16): 2.0**-5}  # bf16 partials, see the module doc

    def run(self, case, *, scale=None, sliding_window=None, config=None):
        assert sliding_window is None
        scale = case.q.shape[-1] ** -0.5 if scale is None else scale
        return pa_gpu.paged_attention_gpu(
            *case.args, scale=scale, config=config or Config(), interpret=self.interpret
        )


class MosaicChecks(PagedAttentionChecks):
    interpret = True

    def run(self, case, *, scale=None, sliding_window=None, config=None):
        assert sliding_window is None
        scale = case.q.shape[-1] ** -0.5 if scale is None else scale
        return pa_tpu.paged_attention_tpu(
            *case.args, scale=scale, config=config or Config(), interpret=self.interpret
        )


class TestTritonInterpret(TritonChecks):
    pass


class TestMosaicInterpret(MosaicChecks):
    def test_needs_the_tpu_interpreter_on_cpu(self):
        """``interpret=True`` is what makes the Mosaic kernel run here: without
        ``pltpu.force_tpu_interpret_mode()`` it cannot run on a CPU at all."""
        if jax.default_backend() != "cpu":
            pytest.skip("checks the CPU-only failure without the interpreter")
        q, kp, vp, lengths, table = Case(4, 2, 8, 1, 64, 16, 3, 8).args
        with pytest.raises(Exception, match="Only interpret mode is supported on CPU"):
            pa_tpu.paged_attention_tpu(
                q, kp, vp, lengths, table, scale=0.125, config=Config(), interpret=False
            )


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU backend")
class TestTritonGPU(TritonChecks):
    interpret = False
    tol = {**TritonChecks.tol, jnp.dtype(jnp.float32): 1e-3}  # TF32, see the module doc


@pytest.mark.skipif(jax.default_backend() != "tpu", reason="needs a TPU backend")
class TestMosaicTPU(MosaicChecks):
    interpret = False


class TestGatherPages:
    def test_gather_is_the_dense_layout(self):
        case = Case(5, 3, 8, 2, 64, 8, 5, 20)
        k = np.asarray(gather_pages(case.args[1], case.args[4]), np.float64)  # [K, B, S, H]
        for i, n in enumerate(case.lengths):
            np.testing.assert_array_equal(k[:, i, :n], case.k[i, :, :n])


class TestApi:
    def test_default_dispatch(self):
        """implementation=None: XLA on CPU (bitwise the reference), the kernel elsewhere."""
        case = Case(6, 3, 8, 2, 64, 8, 5, 20)
        out = paged_attention(*case.args)
        if jax.default_backend() == "cpu":
            chex.assert_trees_all_equal(out, paged_attention_reference(*case.args))
        assert_matches_dense(out, case, TOL[case.dtype])

    def test_pallas_on_cpu_runs_triton_interpret(self):
        case = Case(7, 2, 8, 1, 64, 16, 3, 8)
        out = paged_attention(*case.args, implementation="pallas", config=SMALL)
        assert_matches_dense(out, case, TOL[case.dtype])
        if jax.default_backend() == "cpu":
            chex.assert_trees_all_equal(
                out,
                pa_gpu.paged_attention_gpu(
                    *case.args, scale=64**-0.5, config=SMALL, interpret=True
                ),
            )

    def test_sliding_window_falls_back_to_xla(self):
        """Neither kernel has a sliding window: the default falls back (bitwise the
        reference, even when interpret mode asks for the kernel); "pallas" refuses."""
        case = Case(8, 3, 8, 2, 64, 8, 5, 20, lengths=[40, 3, 23])
        out = paged_attention(*case.args, sliding_window=7, interpret=True)
        chex.assert_trees_all_equal(out, paged_attention_reference(*case.args, sliding_window=7))
        assert_matches_dense(out, case, TOL[case.dtype], sliding_window=7)
        with pytest.raises(ValueError, match="sliding window"):
            paged_attention(*case.args, sliding_window=7, implementation="pallas")

    def test_supports_reasons(self):
        ok = dict(dtype=jnp.bfloat16, head_dim=128, page_size=16)
        assert pa_gpu.supports(**ok) is None and pa_tpu.supports(**ok) is None
        assert "head_dim" in pa_gpu.supports(**{**ok, "head_dim": 96})
        assert "page_size" in pa_gpu.supports(**{**ok, "page_size": 12})
        assert "bfloat16" in pa_tpu.supports(**{**ok, "dtype": jnp.float32})
        assert "head_dim" in pa_tpu.supports(**{**ok, "head_dim": 64})
        assert "page_size" in pa_tpu.supports(**{**ok, "page_size": 4})
        for mod in (pa_gpu, pa_tpu):
            assert "sliding window" in mod.supports(**ok, sliding_window=8)

    def test_blocking_pads_to_whole_blocks(self):
        cfg = Config(pages_per_compute_block=8, k_splits=16)
        assert pa_gpu.blocking(5, 16, cfg) == (8, 1, 8)
        assert pa_gpu.blocking(64, 16, cfg) == (8, 8, 64)
        assert pa_gpu.blocking(513, 16, cfg) == (8, 16, 640)
        assert pa_gpu.blocking(3, 4, cfg) == (4, 1, 4)  # 4 pages x 4 tokens: the dot minimum
        assert pa_tpu.blocking(5, cfg) == (5, 5)
        assert pa_tpu.blocking(20, cfg) == (8, 24)

    def test_errors_name_the_bad_value(self):
        q, kp, vp, lengths, table = Case(9, 2, 8, 2, 64, 8, 3, 8).args
        with pytest.raises(ValueError, match="'cuda'"):
            paged_attention(q, kp, vp, lengths, table, implementation="cuda")
        with pytest.raises(ValueError, match="N=3"):
            paged_attention(q[:, :3], kp, vp, lengths, table)
        with pytest.raises(ValueError, match="head_dim=32"):
            paged_attention(q[..., :32], kp, vp, lengths, table)
        with pytest.raises(ValueError, match="bfloat16"):
            paged_attention(q, kp.astype(jnp.bfloat16), vp, lengths, table)
        with pytest.raises(ValueError, match=r"lengths must be integer \[B=2\]"):
            paged_attention(q, kp, vp, lengths[:1], table)
        with pytest.raises(ValueError, match="page_indices"):
            paged_attention(q, kp, vp, lengths, table.astype(jnp.float32))
        with pytest.raises(ValueError, match="sliding_window must be a positive int"):
            paged_attention(q, kp, vp, lengths, table, sliding_window=0)
        with pytest.raises(ValueError, match="scale"):
            paged_attention(q, kp, vp, lengths, table, scale=-1.0)
        with pytest.raises(ValueError, match="block_h"):
            Config(block_h=8)
        with pytest.raises(ValueError, match="megacore_mode"):
            Config(megacore_mode="core")
        with pytest.raises(ValueError, match="kv heads, got 1"):
            pa_tpu.paged_attention_tpu(
                q,
                kp[:1],
                vp[:1],
                lengths,
                table,
                scale=0.1,
                config=Config(megacore_mode="kv_head"),
                interpret=True,
            )


# The Triton kernel is serialized as this custom call (older / newer jaxlibs); it carries
# no export compatibility guarantee, so the check must be disabled explicitly.
_TRITON_TARGETS = ("__gpu$xla.gpu.triton", "triton_kernel_call_ffi")
_GPU_KIND = jax.devices()[0].device_kind if jax.default_backend() == "gpu" else "NVIDIA H200"
_GPU = jax.sharding.AbstractDevice(device_kind=_GPU_KIND, num_cores=132, platform="gpu")

# Llama-3.1-8B decode: N = 32, K = 8, H = 128, bf16, pages of 16 tokens; ctx 1k and 8k at
# B = 1 and 32.  The pool has B * M + 1 pages (not a power of two).
LLAMA_8B = [pytest.param(b, ctx, id=f"B{b}-ctx{ctx}") for b in (1, 32) for ctx in (1024, 8192)]


def _structs(b, ctx, *, n=32, kh=8, h=128, p=16, dtype=jnp.bfloat16):
    m = ctx // p
    pages = jax.ShapeDtypeStruct((kh, b * m + 1, p, h), dtype)
    return (
        jax.ShapeDtypeStruct((b, n, h), dtype),
        pages,
        pages,
        jax.ShapeDtypeStruct((b,), jnp.int32),
        jax.ShapeDtypeStruct((b, m), jnp.int32),
    )


class TestExport:
    """The kernels lower for their hardware (Triton IR / Mosaic IR), checked without it."""

    @pytest.mark.parametrize("b, ctx", LLAMA_8B)
    def test_triton_lowers_for_cuda(self, b, ctx):
        config = Config()
        f = jax.jit(lambda *a: pa_gpu.paged_attention_gpu(*a, scale=128**-0.5, config=config))
        checks = [jax.export.DisabledSafetyCheck.custom_call(t) for t in _TRITON_TARGETS]
        mesh = jax.sharding.AbstractMesh((1,), ("x",), abstract_device=_GPU)
        try:
            with jax.sharding.use_abstract_mesh(mesh):
                exp = jax.export.export(f, platforms=["cuda"], disabled_checks=checks)(
                    *_structs(b, ctx)
                )
        except RuntimeError as e:
            if "Unsupported GPU device kind" in str(e):
                pytest.skip(f"this jax cannot target an abstract {_GPU_KIND!r} without one: {e}")
            if "does not have a Triton compilation handler" not in str(e):
                raise
            pytest.skip(
                "this jaxlib compiles the Triton module to PTX while lowering, which needs "
                "the compilation handler that only the CUDA plugin registers"
            )
        assert any(t in exp.mlir_module() for t in _TRITON_TARGETS)

    @pytest.mark.parametrize("b, ctx", LLAMA_8B)
    def test_mosaic_lowers_for_tpu(self, b, ctx):
        config = Config()
        f = jax.jit(lambda *a: pa_tpu.paged_attention_tpu(*a, scale=128**-0.5, config=config))
        exp = jax.export.export(f, platforms=["tpu"])(*_structs(b, ctx))
        assert "tpu_custom_call" in exp.mlir_module()

    def test_mosaic_head_dim_64_does_not_lower(self):
        """Why ``tpu.supports`` refuses head_dim 64 (SmolLM2): Mosaic's tiling rule."""
        f = jax.jit(lambda *a: pa_tpu.paged_attention_tpu(*a, scale=0.125, config=Config()))
        with pytest.raises(ValueError, match="divisible by 8 and 128"):
            jax.export.export(f, platforms=["tpu"])(*_structs(2, 256, n=9, kh=3, h=64))


def test_bench_tiny_smoke(tmp_path, capsys):
    """The benchmark runs end to end (the Pallas variant in interpret mode) and writes JSON."""
    import json

    from kernels_pallas.paged_attention import bench

    bench.main(["--out", str(tmp_path), "--tiny", "--batches", "2"])
    result = json.loads((tmp_path / "bench.json").read_text())
    records = {r["variant"]: r for r in result["attention"]}
    assert set(records) == set(bench.VARIANTS)
    assert all(r["error"] is None and r["correct"] for r in records.values()), records
    assert result["capacity"] and result["capacity"][0]["paged_seqs"] > 0
    assert "paged_pallas" in capsys.readouterr().out
