"""QSUN: int4 / int8 weight-only quantization of the shared decode tree (RTN or AWQ).

Letters: M calibration tokens (batch x length flattened), D model dim, F ffn dim,
K a linear layer's input dim, N its output dim, L layers.

Every linear kernel inside the layers (``attn/{q,k,v,o}_proj``, ``mlp/{gate,up,down}_proj``)
becomes a ``QuantizedWeight``; embeddings, norms and ``lm_head`` stay as they are. Mixed
precision: the linears named in ``int8`` (e.g. ``("down_proj",)``) are int8 in every layer and
the rest int4, as llama.cpp's Q4_K_M keeps ``ffn_down`` / ``attn_v`` at higher precision; AWQ's
searches then measure each linear's error at its own precision.

AWQ (Lin et al. 2023), per layer and per group of linears that read the same input:

* calibration: the unquantized model runs ``calib_tokens`` once; every ``Linear``'s input is
  recorded by intercepting ``Linear.__call__`` with ``flax.linen.intercept_methods`` (no change
  to the model, and the recorded inputs are exactly what the real forward feeds the matmul);
* search: for ``alpha`` on a grid over [0, 1], ``s = mean|x| ** alpha`` (normalised to
  geometric mean 1), the group's output error ``||X W - (X / s) Q(diag(s) W)||^2`` on the
  recorded inputs is measured and the best ``alpha`` kept (``alpha = 0`` is plain RTN, so AWQ
  is never worse than RTN on the calibration data);
* folding, exact before rounding: ``W <- diag(s) W`` and ``1/s`` goes into the op before:

  ========================  ==========================================================
  q / k / v (one ``s``)     ``input_norm.scale /= s``
  gate / up (one ``s``)     ``post_attn_norm.scale /= s``
  down                      ``up_proj`` output columns ``/= s`` (``silu(g) * u`` is linear
                            in ``u`` per channel)
  o                         explicit ``ScaledWeight.in_scale = 1/s`` applied to ``x``.
                            Folding into ``v_proj``'s output columns (exact with the scale
                            tied over each GQA group) would change the V cache, which in SUN
                            the decode tree shares with prefill trees that never saw ``s``.
  ========================  ==========================================================

Clipping (``clip=True``, after the scales are folded): for every linear but ``q_proj`` /
``k_proj`` (AWQ leaves those unclipped: the attention logits ``q . k`` are sensitive to their
outliers), every (group, output column) of the scaled kernel gets the ratio ``r`` in
``CLIP_RATIOS`` (1.0, 0.95, ..., 0.5) minimising that group's output error on the recorded
inputs, ``sum_m (x_g . (w_g - Q(clip_r(w_g))))^2`` (``x`` the input the scaled kernel sees,
``x / s``), and the kernel is replaced by its clipped version, so that the final
round-to-nearest lands on the searched grid. int4 clips to ``[r lo, r hi]`` (``lo``, ``hi``:
the group's min / max with 0 included, exactly the range the asymmetric quantizer spans),
int8 to ``[-r amax, r amax]`` (its symmetric per-column range). A column whose whole-layer
calibration error ``||x (w - Q(w'))||^2`` the clipping would not lower keeps ``w`` (the
per-group objective ignores cross-group terms), so clipping never raises it.

Not done: calibration through already-quantized layers.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import pathlib
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from kernels_pallas.quant_matmul import QuantizedWeight, dequantize, quantize
from sunjax.config import ModelConfig
from sunjax.linear import ScaledWeight
from sunjax.model import Linear, Transformer, check_tokens, forward
from sunjax.params import stack_layers, unstack_layers

LINEARS = (
    ("attn", "q_proj"),
    ("attn", "k_proj"),
    ("attn", "v_proj"),
    ("attn", "o_proj"),
    ("mlp", "gate_proj"),
    ("mlp", "up_proj"),
    ("mlp", "down_proj"),
)
LINEAR_NAMES = tuple(name for _, name in LINEARS)
METHODS = ("rtn", "awq")
CLIP_RATIOS = tuple(round(1.0 - 0.05 * i, 2) for i in range(11))  # 1.0, 0.95, ..., 0.5
DATA_DIR = pathlib.Path(__file__).parent / "data"


# -- text -----------------------------------------------------------------------------------
def read_text(name: str) -> str:
    """``sunjax/data/{name}.txt``: ``"heldout"`` (evaluation) or ``"calib"`` (AWQ calibration)."""
    path = DATA_DIR / f"{name}.txt"
    if not path.is_file():
        known = sorted(p.stem for p in DATA_DIR.glob("*.txt"))
        raise ValueError(f"no text named {name!r} in {DATA_DIR} (known: {known})")
    return path.read_text(encoding="utf-8")


def perplexity(cfg: ModelConfig, params, tokens: Int[Array, " T"], window: int) -> float:
    """exp(mean next-token NLL) over non-overlapping windows of ``window`` tokens.

    Each window is scored on its own (its first token is context only); a trailing partial
    window is dropped.
    """
    tokens = np.asarray(tokens)
    if tokens.ndim != 1:
        raise ValueError(f"tokens must be 1-D, got shape {tokens.shape}")
    if not 2 <= window <= cfg.max_position_embeddings:
        raise ValueError(f"{window=} must lie in [2, {cfg.max_position_embeddings}]")
    n = tokens.shape[0] // window
    if n == 0:
        raise ValueError(f"{tokens.shape[0]} tokens are fewer than one {window=}")
    batch = tokens[: n * window].reshape(n, window)
    logits = forward(cfg, params, batch)  # [n, window, V]
    return float(jnp.exp(_mean_nll(logits, jnp.asarray(batch, jnp.int32))))


@jax.jit
def _mean_nll(logits: Float[Array, "B T V"], tokens: Int[Array, "B T"]) -> jax.Array:
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)
    return jnp.mean(nll)


# -- size -----------------------------------------------------------------------------------
def tree_bytes(params) -> int:
    """Bytes of every array in the tree (quantized payload, scales and zeros included)."""
    return int(sum(x.size * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(params)))


def bytes_report(params) -> dict[str, float]:
    """Bytes and logical parameter counts: whole tree and the linear kernels of the layers.

    A quantized ``W[K, N]`` counts ``K * N`` parameters; an AWQ ``in_scale`` counts as bytes
    only. ``bytes_per_param`` of a bfloat16 tree is 2.0.
    """
    total_b = total_p = lin_b = lin_p = 0
    is_kernel = lambda x: isinstance(x, (QuantizedWeight, ScaledWeight))
    for path, leaf in jax.tree_util.tree_flatten_with_path(params, is_leaf=is_kernel)[0]:
        b = tree_bytes(leaf)
        inner = leaf.weight if isinstance(leaf, ScaledWeight) else leaf
        p = math.prod(inner.shape)
        total_b, total_p = total_b + b, total_p + p
        if str(getattr(path[-1], "key", "")) == "kernel" and "lm_head" not in jax.tree_util.keystr(
            path
        ):
            lin_b, lin_p = lin_b + b, lin_p + p
    return {
        "bytes": total_b,
        "params": total_p,
        "bytes_per_param": total_b / max(total_p, 1),
        "linear_bytes": lin_b,
        "linear_params": lin_p,
        "linear_bytes_per_param": lin_b / max(lin_p, 1),
    }


# -- quantization ---------------------------------------------------------------------------
def quantize_tree(
    cfg: ModelConfig,
    params,
    *,
    bits: int = 4,
    group_size: int = 128,
    method: str = "rtn",
    calib_tokens: Int[Array, "B T"] | None = None,
    scale_dtype=jnp.float32,
    grid: int = 20,
    clip: bool = True,
    int8: tuple[str, ...] = (),
):
    """The decode tree with every linear kernel of the layers quantized.

    ``method="rtn"``: round-to-nearest. ``method="awq"``: activation-aware scales searched on
    ``calib_tokens`` (``[B, T]`` or ``[T]`` token ids), folded as in the module docstring,
    then (``clip=True``) AWQ's weight-clipping search, then round-to-nearest. ``clip`` is
    ignored by ``method="rtn"``. ``int8``: names of ``LINEARS`` (``"down_proj"``, ...) quantized
    to int8 in every layer whatever ``bits`` says. Works on the unrolled and the scanned layer
    layout.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if method == "awq" and calib_tokens is None:
        raise ValueError("method='awq' needs calib_tokens, got None")
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got {bits!r}")
    _check_clip(clip)
    bits_of = _bits_of(bits, int8)
    restack, cfg, params = _unrolled(cfg, params)
    if method == "awq":
        params, _ = awq_scale(
            cfg,
            params,
            calib_tokens,
            bits=bits,
            group_size=group_size,
            grid=grid,
            clip=clip,
            int8=int8,
        )
    out = dict(params)
    for i in range(cfg.n_layers):
        layer = _copy(params[f"layers_{i}"])
        for mod, name in LINEARS:
            node = layer[mod][name]
            k = node["kernel"]
            b = bits_of(name)
            q = lambda w, b=b: quantize(w, bits=b, group_size=group_size, scale_dtype=scale_dtype)
            if isinstance(k, ScaledWeight):
                node["kernel"] = ScaledWeight(q(k.weight), k.in_scale)
            elif isinstance(k, QuantizedWeight):
                raise ValueError(f"layers_{i}/{mod}/{name} is already quantized")
            else:
                node["kernel"] = q(k)
        out[f"layers_{i}"] = layer
    return restack(out)


def check_int8(int8) -> tuple[str, ...]:
    """The ``int8`` linear names, checked (ValueError naming a bad value), sorted, unique."""
    if isinstance(int8, str) or not all(isinstance(n, str) and n in LINEAR_NAMES for n in int8):
        raise ValueError(f"int8 must list linear names from {list(LINEAR_NAMES)}, got {int8!r}")
    return tuple(sorted(set(int8)))


def _bits_of(bits: int, int8) -> Callable[[str], int]:
    """``name -> bits`` of a linear (``LINEAR_NAMES``) given the ``int8`` names."""
    int8 = check_int8(int8)
    return lambda name: 8 if name in int8 else bits


def _check_clip(clip) -> None:
    if not isinstance(clip, (bool, np.bool_)):
        raise ValueError(f"clip must be True or False, got {clip!r}")


def _copy(tree):
    """Copy of the nested dicts (leaves shared)."""
    return {k: _copy(v) if isinstance(v, dict) else v for k, v in tree.items()}


def collect_inputs(cfg: ModelConfig, params, tokens: Int[Array, "B T"]) -> dict:
    """``{"layers_i/attn/q_proj": x [M, K], ...}``: every Linear's input on ``tokens`` (float32).

    Recorded by intercepting ``Linear.__call__`` while the unrolled model runs once.
    """
    tokens = np.asarray(tokens)
    if tokens.ndim == 1:
        tokens = tokens[None]
    check_tokens(cfg, tokens, max_len=cfg.max_position_embeddings)
    _, cfg, params = _unrolled(cfg, params)
    return _collect(cfg, params, jnp.asarray(tokens, jnp.int32))


def _unrolled(cfg: ModelConfig, params):
    """``(restack, cfg, params)`` in the unrolled layout; ``restack`` puts a tree in the layout
    ``params`` came in."""
    if not cfg.scan_layers:
        return (lambda tree: tree), cfg, params
    return (
        functools.partial(stack_layers, cfg),
        dataclasses.replace(cfg, scan_layers=False),
        unstack_layers(cfg, params),
    )


@functools.partial(jax.jit, static_argnums=0)
def _collect(cfg: ModelConfig, params, tokens):
    B, T = tokens.shape
    seen: dict[str, jax.Array] = {}

    def record(next_fun, args, kwargs, context):
        if isinstance(context.module, Linear) and context.method_name == "__call__":
            x = args[0]
            seen["/".join(context.module.path)] = x.reshape(-1, x.shape[-1]).astype(jnp.float32)
        return next_fun(*args, **kwargs)

    cache = cfg.init_cache(B, T)
    positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    with nn.intercept_methods(record):
        Transformer(cfg).apply(
            {"params": params}, tokens, positions, cache.k, cache.v, cache.lengths
        )
    return seen


def awq_scale(
    cfg: ModelConfig,
    params,
    calib_tokens: Int[Array, "B T"],
    *,
    bits: int = 4,
    group_size: int = 128,
    grid: int = 20,
    clip: bool = False,
    int8: tuple[str, ...] = (),
):
    """AWQ scales searched and folded; returns ``(params, alphas)``, still unquantized.

    Either layer layout (the result has the layout of ``params``). With ``clip=False`` the
    returned tree computes the same function as ``params`` up to float rounding (``o_proj``
    kernels become ``ScaledWeight``). ``clip=True`` then also clips the scaled kernels (all
    but ``q_proj`` / ``k_proj``) as searched by AWQ's clipping search (module docstring): no
    longer the same function, but the one whose round-to-nearest is the searched grid.
    ``alphas[i]`` maps each group (``"qkv"``, ``"o"``, ``"gate_up"``, ``"down"``) of layer
    ``i`` to the chosen exponent. Each linear's error is measured at its precision: int8 for
    those named in ``int8``, ``bits`` for the rest (as ``quantize_tree`` will quantize them).
    """
    if grid < 1:
        raise ValueError(f"{grid=} must be >= 1")
    _check_clip(clip)
    bits_of = _bits_of(bits, int8)
    restack, cfg, params = _unrolled(cfg, params)
    xs = collect_inputs(cfg, params, calib_tokens)
    alphas_grid = jnp.linspace(0.0, 1.0, grid) if grid > 1 else jnp.zeros((1,))
    ratios = jnp.asarray(CLIP_RATIOS, jnp.float32)

    def search(x, kernels: dict):  # one scale for the linears reading x: {name: kernel}
        ws = tuple(w.astype(jnp.float32) for w in kernels.values())
        b = tuple(bits_of(n) for n in kernels)
        return _search(alphas_grid, x, ws, bits=b, group_size=group_size)

    def clipped(x, w, name):  # x: the input the (scaled) kernel w sees
        c, _ = _clip_search(
            ratios, x, w.astype(jnp.float32), bits=bits_of(name), group_size=group_size
        )
        return c.astype(w.dtype)

    out = dict(params)
    alphas = []
    for i in range(cfg.n_layers):
        p = _copy(params[f"layers_{i}"])
        a, m = p["attn"], p["mlp"]
        x = lambda name, i=i: xs[f"layers_{i}/{name}"]
        chosen = {}

        xs_eff = {}  # what each scaled kernel sees: the recorded input / s

        # q / k / v  <-  input_norm
        qkv = ("q_proj", "k_proj", "v_proj")
        s, chosen["qkv"] = search(x("attn/q_proj"), {n: a[n]["kernel"] for n in qkv})
        for n in qkv:
            a[n]["kernel"] = _scale_rows(a[n]["kernel"], s)
        p["input_norm"]["scale"] = _div(p["input_norm"]["scale"], s)
        xs_eff["attn/v_proj"] = x("attn/q_proj") / s

        # o  <-  explicit in_scale
        s, chosen["o"] = search(x("attn/o_proj"), {"o_proj": a["o_proj"]["kernel"]})
        a["o_proj"]["kernel"] = ScaledWeight(_scale_rows(a["o_proj"]["kernel"], s), 1.0 / s)
        xs_eff["attn/o_proj"] = x("attn/o_proj") / s

        # gate / up  <-  post_attn_norm
        s, chosen["gate_up"] = search(
            x("mlp/gate_proj"), {n: m[n]["kernel"] for n in ("gate_proj", "up_proj")}
        )
        for n in ("gate_proj", "up_proj"):
            m[n]["kernel"] = _scale_rows(m[n]["kernel"], s)
        p["post_attn_norm"]["scale"] = _div(p["post_attn_norm"]["scale"], s)
        xs_eff["mlp/gate_proj"] = xs_eff["mlp/up_proj"] = x("mlp/gate_proj") / s

        # down  <-  up_proj output columns
        s, chosen["down"] = search(x("mlp/down_proj"), {"down_proj": m["down_proj"]["kernel"]})
        m["down_proj"]["kernel"] = _scale_rows(m["down_proj"]["kernel"], s)
        up = m["up_proj"]["kernel"]
        m["up_proj"]["kernel"] = (up.astype(jnp.float32) / s[None, :]).astype(up.dtype)
        if "bias" in m["up_proj"]:
            raise ValueError("awq_scale does not handle an up_proj bias")
        xs_eff["mlp/down_proj"] = x("mlp/down_proj") / s

        # clipping, on the final scaled kernels (up_proj after down's fold). q_proj and k_proj
        # are left unclipped, as in AWQ: the attention scores are sensitive to their outliers.
        if clip:
            for name, xe in xs_eff.items():
                mod, lin = name.split("/")
                node = p[mod][lin]
                k = node["kernel"]
                if isinstance(k, ScaledWeight):
                    node["kernel"] = ScaledWeight(clipped(xe, k.weight, lin), k.in_scale)
                else:
                    node["kernel"] = clipped(xe, k, lin)

        out[f"layers_{i}"] = p
        alphas.append({k: float(v) for k, v in chosen.items()})
    return restack(out), alphas


def _scale_rows(w: Float[Array, "K N"], s: Float[Array, " K"]) -> jax.Array:
    return (w.astype(jnp.float32) * s[:, None]).astype(w.dtype)


def _div(scale: Float[Array, " K"], s: Float[Array, " K"]) -> jax.Array:
    return (scale.astype(jnp.float32) / s).astype(scale.dtype)


@functools.partial(jax.jit, static_argnames=("bits", "group_size"))
def _search(alphas, x: Float[Array, "M K"], ws: tuple, *, bits: tuple, group_size):
    """Best ``s = mean|x|**alpha`` over the grid by ``sum_l ||x w_l - (x/s) Q_l(diag(s) w_l)||^2``
    over the kernels ``ws`` (``[K, N_l]`` each) that read ``x``, ``Q_l`` at ``bits[l]``."""
    hi = jax.lax.Precision.HIGHEST
    ys = [jnp.dot(x, w, precision=hi) for w in ws]  # [M, N_l]
    mean_abs = jnp.maximum(jnp.mean(jnp.abs(x), axis=0), 1e-8)  # [K]

    def scales(alpha):
        s = mean_abs**alpha
        s = s / jnp.sqrt(jnp.max(s) * jnp.min(s))
        return jnp.maximum(s, 1e-4)

    def error(alpha):
        s = scales(alpha)
        err = 0.0
        for w, b, y in zip(ws, bits, ys, strict=True):
            wq = dequantize(quantize(w * s[:, None], bits=b, group_size=group_size))
            err += jnp.sum(jnp.square(jnp.dot(x / s, wq, precision=hi) - y))
        return err

    errors = jax.lax.map(error, alphas)
    best = alphas[jnp.argmin(errors)]
    return scales(best), best


@functools.partial(jax.jit, static_argnames=("bits", "group_size"))
def _clip_search(ratios, x: Float[Array, "M K"], w: Float[Array, "K N"], *, bits, group_size):
    """AWQ's clipping search: ``(w clipped, ratio [G, N])`` (module docstring).

    Per (group ``g``, column ``n``) the ratio in ``ratios`` minimising
    ``sum_m (x[m, g] . (w[g, n] - Q(clip_r(w[g, n]))))^2``, measured through the group's Gram
    matrix ``x_g^T x_g`` (``[G, gs, gs]``, so memory does not grow with ``M``). A column
    whose whole-layer error ``||x (w - Q(w'))||^2`` the chosen ratios do not lower keeps
    ``w`` (ratio 1). ``ratios`` should hold 1.0 (no clipping), first: ties keep the first.
    """
    hi = jax.lax.Precision.HIGHEST
    k, n = w.shape
    gs = group_size if bits == 4 else k  # int8: one symmetric group per column
    g = -(-k // gs)
    kp = g * gs
    pad = lambda a, v: jnp.concatenate([a, jnp.broadcast_to(v, (kp - k, *a.shape[1:]))], 0)
    # pad rows copy the last row (as ``quantize`` pads, so the ranges match); x pads with 0
    wg = (pad(w, w[-1:]) if kp > k else w).reshape(g, gs, n)  # [G, gs, N]
    xg = (pad(x.T, 0.0).T if kp > k else x).reshape(x.shape[0], g, gs)  # [M, G, gs]
    gram = jnp.einsum("mgk,mgl->gkl", xg, xg, precision=hi)  # [G, gs, gs]
    if bits == 4:  # the asymmetric quantizer spans [min(w, 0), max(w, 0)] per group
        lo, up = jnp.minimum(wg.min(axis=1), 0.0), jnp.maximum(wg.max(axis=1), 0.0)  # [G, N]
    else:  # the symmetric one spans [-amax, amax] per column
        up = jnp.max(jnp.abs(wg), axis=1)
        lo = -up

    def clip_to(r):  # r: scalar or [G, N]  ->  [K, N]
        c = jnp.clip(wg, (r * lo)[:, None, :], (r * up)[:, None, :])
        return c.reshape(kp, n)[:k]

    def err_q(wc):  # w - Q(wc)  [K, N]
        return w - dequantize(quantize(wc, bits=bits, group_size=group_size))

    def group_error(r):  # [G, N]
        d = err_q(clip_to(r))
        dg = (pad(d, 0.0) if kp > k else d).reshape(g, gs, n)
        return jnp.sum(dg * jnp.einsum("gkl,gln->gkn", gram, dg, precision=hi), axis=1)

    errors = jax.lax.map(group_error, ratios)  # [R, G, N]
    best = ratios[jnp.argmin(errors, axis=0)]  # [G, N]
    wc = clip_to(best)
    col_error = lambda v: jnp.sum(jnp.square(jnp.dot(x, err_q(v), precision=hi)), axis=0)
    keep = col_error(wc) < col_error(w)  # [N]
    return jnp.where(keep[None, :], wc, w), jnp.where(keep[None, :], best, 1.0)
