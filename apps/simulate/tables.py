"""Step-time tables: every time the cluster model uses comes from one of these.

A table is a JSON document (``StepTable.to_json`` / ``StepTable.load``) with

* ``decode[tree]``: seconds of one decode step on a grid of batch (active slots in the
  dispatch) x context length (mean cache length of the active slots), per decode tree
  (``sun`` the plain shared tree, ``qsun`` the quantized one, ``conventional`` per-model trees);
* ``prefill``: seconds of one prompt's prefill against its (padded) token count;
* ``handoff``: seconds to move one prefix's KV cache to a decode worker and insert it,
  against its bytes;
* ``release``: seconds to free slots after a step in which a request finished;
* ``host_step``, ``admit``, ``submit``: host work of the single-process serving loop outside
  those calls: per decode step (against active slots), per admitted request, per submitted
  request (measured; absent from the roofline table, whose cluster runs no such loop); in a
  table of a cluster's decode instance (``apps.simulate.validate.ClusterFeed``), ``host_step``
  is the decode process's own work per step (its tokens message) instead;
* ``handoff_decode``: the part of ``handoff`` a cluster's decode instance spends in its own
  loop (issuing the pull, inserting), charged to the step at which the request joins;
* ``hop``: one control message between two processes of a cluster (0: not measured);
* ``kind``: ``measured`` (``sunjax bench steps`` on the machine in ``machine``) or
  ``roofline`` (a model, not a measurement; see ``roofline_h200``).

Lookups interpolate linearly (bilinearly for decode) and extrapolate from the two nearest
points beyond the grid; ``prefill_bucket`` (the engine's smallest bucket) makes the prefill
lookup round a prompt up to the padded length the engine compiles, as the engine does.
"""

from __future__ import annotations

import bisect
import dataclasses
import json
import math
from collections.abc import Mapping, Sequence

import numpy as np

from sunjax.generate import bucket

TREES = ("sun", "qsun", "conventional")


def _bracket(x: float, xs: Sequence[float]) -> tuple[int, float]:
    """``(i, w)``: x = (1 - w) xs[i] + w xs[i + 1] with i clipped to the ends (w may lie
    outside [0, 1]: linear extrapolation)."""
    if len(xs) == 1:
        return 0, 0.0
    i = min(max(bisect.bisect_left(xs, x) - 1, 0), len(xs) - 2)
    return i, (x - xs[i]) / (xs[i + 1] - xs[i])


def _interp(x: float, xs: Sequence[float], ys: Sequence[float]) -> float:
    """Piecewise-linear through (xs, ys), linear extrapolation beyond both ends."""
    i, w = _bracket(x, xs)
    if len(xs) == 1:
        return float(ys[0])
    return float(ys[i] + w * (ys[i + 1] - ys[i]))


@dataclasses.dataclass(frozen=True, kw_only=True)
class Curve:
    """``seconds`` at each point of ``x`` (ascending)."""

    x: tuple[float, ...]
    seconds: tuple[float, ...]

    def __post_init__(self):
        object.__setattr__(self, "x", tuple(float(v) for v in self.x))
        object.__setattr__(self, "seconds", tuple(float(v) for v in self.seconds))
        if not self.x or len(self.x) != len(self.seconds):
            raise ValueError(
                f"x={self.x} and seconds={self.seconds} must be non-empty, same length"
            )
        if any(b <= a for a, b in zip(self.x, self.x[1:], strict=False)):
            raise ValueError(f"x={self.x} must be strictly ascending")

    def __call__(self, x: float) -> float:
        return max(_interp(x, self.x, self.seconds), 0.0)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Grid:
    """``seconds[i][j]`` of a decode step at ``batch[i]`` active slots and context ``ctx[j]``."""

    batch: tuple[float, ...]
    ctx: tuple[float, ...]
    seconds: tuple[tuple[float, ...], ...]

    def __post_init__(self):
        object.__setattr__(self, "batch", tuple(float(v) for v in self.batch))
        object.__setattr__(self, "ctx", tuple(float(v) for v in self.ctx))
        object.__setattr__(self, "seconds", tuple(tuple(map(float, r)) for r in self.seconds))
        shape = (len(self.batch), len(self.ctx))
        if len(self.seconds) != shape[0] or any(len(r) != shape[1] for r in self.seconds):
            raise ValueError(f"seconds must be {shape} (batch x ctx)")
        for name in ("batch", "ctx"):
            v = getattr(self, name)
            if not v or any(b <= a for a, b in zip(v, v[1:], strict=False)):
                raise ValueError(f"{name}={v} must be non-empty and strictly ascending")

    def __call__(self, batch: float, ctx: float) -> float:
        i, w = _bracket(batch, self.batch)
        lo = _interp(ctx, self.ctx, self.seconds[i])
        if len(self.batch) == 1:
            return max(lo, 0.0)
        hi = _interp(ctx, self.ctx, self.seconds[i + 1])
        return max(lo + w * (hi - lo), 0.0)


@dataclasses.dataclass(frozen=True, kw_only=True)
class StepTable:
    kind: str  # "measured" | "roofline"
    label: str
    decode: Mapping[str, Grid]
    prefill: Curve  # x = prompt tokens
    handoff: Curve  # x = KV bytes
    kv_bytes_per_token: int
    release: float = 0.0
    host_step: Curve | None = None  # x = active slots
    admit: float = 0.0  # host seconds per admitted request beyond its prefill and hand-off
    submit: float = 0.0  # host seconds per request when it is submitted
    hop: float = 0.0  # one control message between processes (cluster mode; 0 = none)
    # cluster mode: the hand-off's share that the decode instance's own loop spends, serial
    # with its steps (pull issue + insert), x = KV bytes; None = the hand-off overlaps fully
    handoff_decode: Curve | None = None
    prefill_bucket: int | None = None  # the engine's min_bucket: prompts are padded as it does
    pool: Mapping[str, int] | None = None  # measured: the dispatch unit (workers x slots)
    meta: Mapping[str, object] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        if self.kind not in ("measured", "roofline"):
            raise ValueError(f"kind={self.kind!r} must be 'measured' or 'roofline'")
        bad = sorted(set(self.decode) - set(TREES))
        if bad or not self.decode:
            raise ValueError(
                f"decode trees {sorted(self.decode)} must be a non-empty subset of {TREES}"
            )
        if self.kv_bytes_per_token < 1:
            raise ValueError(f"kv_bytes_per_token={self.kv_bytes_per_token} must be >= 1")

    # -- lookups ---------------------------------------------------------------------------
    def tree_for(self, policy: str) -> str:
        """The decode tree a policy runs: ``conventional`` falls back to ``sun`` (same bytes)."""
        tree = {"sun": "sun", "qsun": "qsun", "conventional": "conventional"}.get(policy)
        if tree is None:
            raise ValueError(f"policy={policy!r} must be one of sun, qsun, conventional")
        if tree == "conventional" and tree not in self.decode:
            tree = "sun"
        if tree not in self.decode:
            raise ValueError(f"table {self.label!r} has no decode entry for {tree!r}")
        return tree

    def decode_time(self, tree: str, batch: int, ctx: float) -> float:
        return self.decode[tree](batch, ctx)

    def padded(self, prompt_tokens: int) -> int:
        if self.prefill_bucket is None:
            return prompt_tokens
        return bucket(prompt_tokens, self.prefill_bucket)

    def prefill_time(self, prompt_tokens: int) -> float:
        return self.prefill(self.padded(prompt_tokens))

    def handoff_time(self, prompt_tokens: int) -> float:
        return self.handoff(self.padded(prompt_tokens) * self.kv_bytes_per_token)

    def handoff_decode_time(self, prompt_tokens: int) -> float:
        if self.handoff_decode is None:
            return 0.0
        return self.handoff_decode(self.padded(prompt_tokens) * self.kv_bytes_per_token)

    def host_time(self, active: int) -> float:
        return 0.0 if self.host_step is None else self.host_step(active)

    # -- JSON ------------------------------------------------------------------------------
    def to_json(self) -> dict:
        def curve(c: Curve | None):
            return None if c is None else {"x": list(c.x), "seconds": list(c.seconds)}

        return {
            "kind": self.kind,
            "label": self.label,
            "decode": {
                t: {
                    "batch": list(g.batch),
                    "ctx": list(g.ctx),
                    "seconds": [list(r) for r in g.seconds],
                }
                for t, g in self.decode.items()
            },
            "prefill": curve(self.prefill),
            "handoff": curve(self.handoff),
            "release": self.release,
            "host_step": curve(self.host_step),
            "admit": self.admit,
            "submit": self.submit,
            "hop": self.hop,
            "handoff_decode": curve(self.handoff_decode),
            "kv_bytes_per_token": self.kv_bytes_per_token,
            "prefill_bucket": self.prefill_bucket,
            "pool": dict(self.pool) if self.pool else None,
            "meta": dict(self.meta),
        }

    @classmethod
    def from_json(cls, d: Mapping) -> StepTable:
        curve = lambda c: None if c is None else Curve(x=c["x"], seconds=c["seconds"])
        return cls(
            kind=d["kind"],
            label=d["label"],
            decode={t: Grid(**g) for t, g in d["decode"].items()},
            prefill=curve(d["prefill"]),
            handoff=curve(d["handoff"]),
            release=float(d.get("release", 0.0)),
            host_step=curve(d.get("host_step")),
            admit=float(d.get("admit", 0.0)),
            submit=float(d.get("submit", 0.0)),
            hop=float(d.get("hop", 0.0)),
            handoff_decode=curve(d.get("handoff_decode")),
            kv_bytes_per_token=int(d["kv_bytes_per_token"]),
            prefill_bucket=d.get("prefill_bucket"),
            pool=d.get("pool"),
            meta=d.get("meta", {}),
        )

    @classmethod
    def load(cls, path: str) -> StepTable:
        with open(path) as f:
            return cls.from_json(json.load(f))

    def save(self, path: str) -> None:
        with open(path, "w") as f:
            json.dump(self.to_json(), f, indent=2)


# -- the H200 roofline table -----------------------------------------------------------------
@dataclasses.dataclass(frozen=True, kw_only=True)
class Roofline:
    """Inputs of the H200 roofline table, each with where it comes from.

    Decode step = ``overhead + weight_bytes / hbm_bw + kv_bytes_read / attn_bw``, where
    ``hbm_bw`` is the measured device copy and ``overhead`` and ``attn_bw`` are solved from
    the two measured 8B decode steps (unrolled layers, ctx 1024): B=1 and B=32.
    """

    hbm_bw: float = 4245e9  # ANCHORS.md: device copy (read + write) on the H200
    anchor_ctx: int = 1024  # ANCHORS.md: the 8B decode steps were measured at ctx 1024
    anchor_b1_s: float = 4.33e-3  # ANCHORS.md: Llama-3.1-8B bf16 B=1, unrolled
    anchor_b32_s: float = 13.12e-3  # ANCHORS.md: same, B=32
    peak_flops: float = 989e12  # H200 SXM dense bf16 (NVIDIA spec sheet), not measured
    prefill_efficiency: float = 0.5  # assumed fraction of peak a bucketed prefill reaches
    link_bw: float = 400e9  # assumed NVLink 4 one-way bandwidth used by a KV hand-off
    link_latency: float = 50e-6  # assumed fixed cost of one hand-off (setup + insert)
    # measured XLA matmul times 1 x 4096 @ 4096 x 14336 (ANCHORS.md), per M: bf16, int8, int4
    matmul_m: tuple[int, ...] = (1, 16, 64, 256)
    matmul_bf16_us: tuple[float, ...] = (34.7, 36.0, 40.6, 52.0)
    matmul_int8_us: tuple[float, ...] = (51.0, 31.8, 41.4, 69.9)
    matmul_int4_us: tuple[float, ...] = (23.2, 22.1, 36.6, 67.3)

    def calibrate(self, weight_bytes: float, kv_bytes_per_seq: float) -> tuple[float, float]:
        """``(overhead_s, attn_bw)`` so that the model reproduces both anchors exactly."""
        w = weight_bytes / self.hbm_bw
        per_seq = (self.anchor_b32_s - self.anchor_b1_s) / 31  # seconds per sequence at ctx
        overhead = self.anchor_b1_s - w - per_seq
        if overhead <= 0 or per_seq <= 0:
            raise ValueError(
                f"anchors {self.anchor_b1_s=} {self.anchor_b32_s=} give {overhead=} {per_seq=}"
            )
        return overhead, kv_bytes_per_seq / per_seq


def model_bytes(model_cfg, quant_spec: Mapping | None) -> dict[str, float]:
    """Bytes one decode step reads of the weights (all but the embedding table, which is
    gathered), from the abstract tree of ``model_cfg`` (no allocation), plain or quantized
    with ``quant_spec`` (``train.launch.QUANT_DEFAULTS`` keys; RTN has the same bytes as AWQ).
    Also the per-linear byte split between int4 and int8 for the XLA-measured variant."""
    import jax
    import jax.numpy as jnp

    import sunjax
    from sunjax import quant

    abstract = jax.eval_shape(lambda k: sunjax.init_params(model_cfg, k), jax.random.key(0))
    embed = quant.tree_bytes(abstract["embed"])
    plain = quant.bytes_report(abstract)
    out = {
        "bf16_step_bytes": float(plain["bytes"] - embed),
        "linear_params": float(plain["linear_params"]),
        "linear_bf16_bytes": float(plain["linear_bytes"]),
    }
    if quant_spec is not None:
        int8 = tuple(quant_spec.get("int8") or ())
        tree = jax.eval_shape(
            lambda p: quant.quantize_tree(
                model_cfg,
                p,
                bits=int(quant_spec["bits"]),
                group_size=int(quant_spec["group_size"]),
                scale_dtype=jnp.dtype(quant_spec["scale_dtype"]),
                int8=int8,
            ),
            abstract,
        )
        q = quant.bytes_report(tree)
        out["qsun_step_bytes"] = float(q["bytes"] - embed)
        out["qsun_linear_bytes_per_param"] = float(q["linear_bytes_per_param"])
        # parameters of the linears kept int8 (the rest int4)
        d, f = model_cfg.d_model, model_cfg.ffn_dim
        kv = model_cfg.n_kv_heads * model_cfg.head_dim
        sizes = {
            "v_proj": d * kv,
            "k_proj": d * kv,
            "q_proj": d * model_cfg.n_heads * model_cfg.head_dim,
            "o_proj": d * model_cfg.n_heads * model_cfg.head_dim,
            "gate_proj": d * f,
            "up_proj": d * f,
            "down_proj": d * f,
        }
        per_layer = sum(sizes.values())
        out["int8_fraction"] = sum(sizes[n] for n in int8) / per_layer
    return out


def kv_bytes_per_token(model_cfg) -> int:
    import jax.numpy as jnp

    item = jnp.dtype(model_cfg.dtype).itemsize
    return 2 * model_cfg.n_layers * model_cfg.n_kv_heads * model_cfg.head_dim * item


def prefill_flops(model_cfg, tokens: int, linear_params: float) -> float:
    """Matmul FLOPs of one prompt: 2 x params x tokens for the linears and the LM head's last
    position, plus causal attention (QK^T and PV: 2 x 2 x T^2/2 x heads x head_dim per layer)."""
    attn = 2 * model_cfg.n_layers * tokens * tokens * model_cfg.n_heads * model_cfg.head_dim
    head = 2 * model_cfg.d_model * model_cfg.vocab_size
    return 2 * linear_params * tokens + attn + head


def roofline_h200(
    model_cfg,
    quant_spec: Mapping,
    *,
    roof: Roofline = Roofline(),
    batches: Sequence[int] = (1, 2, 4, 8, 16, 32, 64, 128, 256),
    ctxs: Sequence[int] = (128, 256, 512, 1024, 2048, 4096, 8192),
    prompts: Sequence[int] = (16, 64, 256, 1024, 2048, 4096, 8192),
    name: str = "llama-3.1-8b",
) -> StepTable:
    """The H200 roofline table for ``model_cfg`` (a model, labelled as such, not measured).

    Trees: ``sun`` (= ``conventional``: one bf16 tree per instance), ``qsun`` (the QSUN
    tree's bytes read at the same bandwidth: what a weight-only int4 kernel at the floor
    gives), ``qsun_xla`` is stored in ``meta`` (the bf16 weight term scaled by the measured
    XLA int4 / int8 matmul time ratios of ANCHORS.md: what plain XLA gives today).
    """
    mb = model_bytes(model_cfg, quant_spec)
    kv_tok = kv_bytes_per_token(model_cfg)
    overhead, attn_bw = roof.calibrate(mb["bf16_step_bytes"], kv_tok * roof.anchor_ctx)

    def step(weight_s: float, b: int, c: int) -> float:
        return overhead + weight_s + b * c * kv_tok / attn_bw

    def xla_ratio(b: int) -> float:
        """Measured XLA (int4 / int8 mix) over bf16 matmul time at M = b (interpolated)."""
        m = roof.matmul_m
        r4 = _interp(b, m, np.divide(roof.matmul_int4_us, roof.matmul_bf16_us))
        r8 = _interp(b, m, np.divide(roof.matmul_int8_us, roof.matmul_bf16_us))
        f8 = mb["int8_fraction"]
        return (1 - f8) * max(r4, 0.0) + f8 * max(r8, 0.0)

    w_bf16 = mb["bf16_step_bytes"] / roof.hbm_bw
    w_qsun = mb["qsun_step_bytes"] / roof.hbm_bw
    lin = mb["linear_bf16_bytes"] / roof.hbm_bw  # the part of w_bf16 that is linears

    def grid(weight_of_b) -> Grid:
        return Grid(
            batch=batches,
            ctx=ctxs,
            seconds=[[step(weight_of_b(b), b, c) for c in ctxs] for b in batches],
        )

    sun = grid(lambda b: w_bf16)
    qsun = grid(lambda b: w_qsun)
    qsun_xla = grid(lambda b: w_bf16 - lin + lin * xla_ratio(b))
    prefill = Curve(
        x=prompts,
        seconds=[
            overhead
            + prefill_flops(model_cfg, t, mb["linear_params"])
            / (roof.peak_flops * roof.prefill_efficiency)
            for t in prompts
        ],
    )
    kv_points = [t * kv_tok for t in prompts]
    handoff = Curve(x=kv_points, seconds=[roof.link_latency + b / roof.link_bw for b in kv_points])
    return StepTable(
        kind="roofline",
        label=f"H200 roofline for {name} (a model calibrated on ANCHORS.md, NOT measured)",
        decode={"sun": sun, "qsun": qsun, "conventional": sun},
        prefill=prefill,
        handoff=handoff,
        kv_bytes_per_token=kv_tok,
        meta={
            "roofline": dataclasses.asdict(roof),
            "calibrated_overhead_s": overhead,
            "calibrated_attn_bw": attn_bw,
            "bytes": mb,
            "quant": dict(quant_spec),
            "qsun_xla_decode": {
                "batch": list(qsun_xla.batch),
                "ctx": list(qsun_xla.ctx),
                "seconds": [list(r) for r in qsun_xla.seconds],
            },
            "formula": "decode = overhead + weight_bytes/hbm_bw + batch*ctx*kv_bytes_per_token"
            "/attn_bw; prefill = overhead + FLOPs/(peak_flops*prefill_efficiency); "
            "handoff = link_latency + kv_bytes/link_bw",
        },
    )


def qsun_xla_table(table: StepTable) -> StepTable:
    """The roofline table with ``qsun`` replaced by its XLA-measured variant."""
    g = table.meta["qsun_xla_decode"]
    return dataclasses.replace(
        table,
        label=table.label + " [qsun: XLA int4/int8 matmul ratios]",
        decode={**table.decode, "qsun": Grid(**g)},
    )


def log_spaced(lo: int, hi: int, n: int) -> list[int]:
    """About ``n`` distinct integers from lo to hi, evenly spaced in log."""
    return sorted({int(round(math.exp(v))) for v in np.linspace(math.log(lo), math.log(hi), n)})
