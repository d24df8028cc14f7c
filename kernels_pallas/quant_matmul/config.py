"""Block sizes for the quantized-matmul kernels, keyed by device kind and M bucket.

All entries below are UNTUNED starting values written without access to the hardware:
run ``python -m kernels_pallas.quant_matmul.bench --out DIR --sweep`` on the card and
replace them with the winners it reports.

GPU (Triton) rationale: decode-time M is tiny, so the kernel is a memory-bound GEMV.
M = 1 uses the CUDA-core GEMV path (``block_m=1``); other small M use the Triton dot
minimum (16) for ``block_m``.  A narrow ``block_n`` and split-K (``split_k=None``: chosen
so that the grid covers every SM) keep enough programs in flight for N = 4096 on 132
SMs, and ``num_stages``-deep pipelining keeps several weight tiles in flight per
program.  TPU (Mosaic): wide lane-dense tiles and a
K step of 8 groups (so the scale block is one (8, 128) tile).
"""

from __future__ import annotations

import dataclasses

import jax


@dataclasses.dataclass(frozen=True)
class Config:
    """Tiling of one quantized matmul.

    block_m, block_n: output tile (rows of x, columns of W) per program.  On GPU,
        ``block_m=1`` selects the CUDA-core GEMV path, anything else tensor-core dots
        with a power-of-two tile of at least 16 rows.
    block_k: logical K elements per inner step.  int4 rounds it to a whole number of
        groups dividing ``G``; the GPU int8 kernel uses it as is (a power of two); the
        TPU kernel rounds it to a legal tile dividing K (or takes all of K).
    num_warps, num_stages: Triton launch / software-pipelining parameters (GPU only).
    split_k: number of K slices reduced in float32 afterwards (GPU only); ``None``
        picks one so that the grid has at least one program per SM.
    """

    block_m: int
    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 3
    split_k: int | None = 1

    def __post_init__(self):
        for name in ("block_m", "block_n", "block_k", "num_warps", "num_stages"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"Config.{name} must be a positive int, got {v!r}")
        if self.split_k is not None and (not isinstance(self.split_k, int) or self.split_k < 1):
            raise ValueError(f"Config.split_k must be a positive int or None, got {self.split_k!r}")


M_BUCKETS = (1, 16, 64, 256)

_GPU = {
    # block_m == 1 is the CUDA-core GEMV path (M = 1 only); larger ones use tensor cores.
    1: Config(block_m=1, block_n=64, block_k=256, num_warps=4, num_stages=4, split_k=None),
    16: Config(block_m=16, block_n=64, block_k=256, num_warps=4, num_stages=4, split_k=None),
    64: Config(block_m=64, block_n=64, block_k=256, num_warps=4, num_stages=3, split_k=None),
    256: Config(block_m=64, block_n=128, block_k=128, num_warps=8, num_stages=3, split_k=1),
}
_TPU = {
    1: Config(block_m=16, block_n=512, block_k=1024),
    16: Config(block_m=16, block_n=512, block_k=1024),
    64: Config(block_m=64, block_n=512, block_k=1024),
    256: Config(block_m=256, block_n=512, block_k=1024),
}

# Device kind -> {M bucket -> Config}.  "gpu" / "tpu" are the per-platform defaults.
TABLE: dict[str, dict[int, Config]] = {
    "H100": dict(_GPU),
    "H200": dict(_GPU),
    "gpu": dict(_GPU),
    "TPU v5e": dict(_TPU),
    "tpu": dict(_TPU),
}

# Substrings of ``jax.Device.device_kind`` -> TABLE key (first match wins).
_KIND_ALIASES = (
    ("H200", "H200"),
    ("H100", "H100"),
    ("TPU v5 lite", "TPU v5e"),
    ("TPU v5e", "TPU v5e"),
)


def m_bucket(m: int) -> int:
    """Smallest bucket >= m (the largest bucket for anything bigger)."""
    for b in M_BUCKETS:
        if m <= b:
            return b
    return M_BUCKETS[-1]


def table_key(platform: str, device_kind: str) -> str:
    for sub, key in _KIND_ALIASES:
        if sub in device_kind:
            return key
    return "tpu" if platform == "tpu" else "gpu"


def get_config(m: int, *, platform: str | None = None, device_kind: str | None = None) -> Config:
    """The tuned (for now: default) config for ``m`` rows on the given / default device."""
    if platform is None:
        platform = jax.default_backend()
    if device_kind is None:
        device_kind = jax.devices()[0].device_kind
    return TABLE[table_key(platform, device_kind)][m_bucket(m)]
