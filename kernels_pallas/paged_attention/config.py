"""Block sizes for the paged-attention kernels, keyed by platform and device kind.

All entries are UNTUNED starting values (the shipped kernels' own defaults, clipped to the
page table by the wrappers): run ``python -m kernels_pallas.paged_attention.bench --sweep``
on the card and replace them with the winners it reports.
"""

from __future__ import annotations

import dataclasses

import jax

MEGACORE_MODES = (None, "kv_head", "batch")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Config:
    """Tiling of one paged decode-attention call.

    pages_per_compute_block: pages loaded and reduced per inner step (both kernels).  The
        wrappers clip it to the page table and pad the table to a whole number of blocks.
    k_splits: GPU only; the page table is cut into this many partitions, each a separate
        program, whose partial softmax results are merged afterwards (flash-decoding).
        Clipped so that no partition is empty.
    block_h: GPU only; query heads per program (a multiple of 16: the Triton dot minimum).
    num_warps, num_stages: GPU only; Triton launch parameters.
    megacore_mode: TPU only; ``None``, ``"kv_head"`` or ``"batch"`` (two TensorCores per
        chip, e.g. v4 / v5p: leave ``None`` on single-core chips such as v5e, where the
        kernel may hang otherwise).
    inline_seq_dim: TPU only; loop over a sequence's pages inside one kernel instance.
    """

    pages_per_compute_block: int = 8
    k_splits: int = 16
    block_h: int = 16
    num_warps: int = 8
    num_stages: int = 2
    megacore_mode: str | None = None
    inline_seq_dim: bool = True

    def __post_init__(self):
        for name in ("pages_per_compute_block", "k_splits", "block_h", "num_warps", "num_stages"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"Config.{name} must be a positive int, got {v!r}")
        if self.block_h % 16:
            raise ValueError(f"Config.block_h must be a multiple of 16, got {self.block_h}")
        if self.megacore_mode not in MEGACORE_MODES:
            raise ValueError(
                f"Config.megacore_mode must be one of {MEGACORE_MODES}, got {self.megacore_mode!r}"
            )


# Device kind -> Config.  "gpu" / "tpu" are the per-platform defaults.
TABLE: dict[str, Config] = {
    "gpu": Config(pages_per_compute_block=8, k_splits=16, block_h=16, num_warps=8, num_stages=2),
    "tpu": Config(pages_per_compute_block=8),
}

# Substrings of ``jax.Device.device_kind`` -> TABLE key (first match wins).
_KIND_ALIASES: tuple[tuple[str, str], ...] = ()


def table_key(platform: str, device_kind: str) -> str:
    for sub, key in _KIND_ALIASES:
        if sub in device_kind:
            return key
    return "tpu" if platform == "tpu" else "gpu"


def get_config(*, platform: str | None = None, device_kind: str | None = None) -> Config:
    """The tuned (for now: default) config for the given / default device."""
    if platform is None:
        platform = jax.default_backend()
    if device_kind is None:
        device_kind = jax.devices()[0].device_kind
    return TABLE[table_key(platform, device_kind)]
