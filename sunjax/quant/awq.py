"""AWQ for the shared decode tree: activation-aware scales and clipping, searched on
calibration tokens, folded into the tree (still unquantized; ``quantize_tree`` rounds it).

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

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from kernels_pallas.quant_matmul import dequantize, quantize
from sunjax.config import ModelConfig
from sunjax.linear import ScaledWeight
from sunjax.model import Linear, check_tokens
from sunjax.quant.layout import bits_of, check_clip, copy_tree, unrolled
from sunjax.steps import run

CLIP_RATIOS = tuple(round(1.0 - 0.05 * i, 2) for i in range(11))  # 1.0, 0.95, ..., 0.5


def collect_inputs(cfg: ModelConfig, params, tokens: Int[Array, "B T"]) -> dict:
    """``{"layers_i/attn/q_proj": x [M, K], ...}``: every Linear's input on ``tokens`` (float32).

    Recorded by intercepting ``Linear.__call__`` while the unrolled model runs once.
    """
    tokens = np.asarray(tokens)
    if tokens.ndim == 1:
        tokens = tokens[None]
    check_tokens(cfg, tokens, max_len=cfg.max_position_embeddings)
    _, cfg, params = unrolled(cfg, params)
    return _collect(cfg, params, jnp.asarray(tokens, jnp.int32))


@functools.partial(jax.jit, static_argnums=0)
def _collect(cfg: ModelConfig, params, tokens):
    B, T = tokens.shape
    seen: dict[str, jax.Array] = {}

    def record(next_fun, args, kwargs, context):
        if isinstance(context.module, Linear) and context.method_name == "__call__":
            x = args[0]
            seen["/".join(context.module.path)] = x.reshape(-1, x.shape[-1]).astype(jnp.float32)
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(record):
        run(cfg, params, tokens, cfg.init_cache(B, T), jnp.full((B,), T, jnp.int32))
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
    check_clip(clip)
    bits_of_ = bits_of(bits, int8)
    restack, cfg, params = unrolled(cfg, params)
    xs = collect_inputs(cfg, params, calib_tokens)
    alphas_grid = jnp.linspace(0.0, 1.0, grid) if grid > 1 else jnp.zeros((1,))
    ratios = jnp.asarray(CLIP_RATIOS, jnp.float32)

    def search(x, kernels: dict):  # one scale for the linears reading x: {name: kernel}
        ws = tuple(w.astype(jnp.float32) for w in kernels.values())
        b = tuple(bits_of_(n) for n in kernels)
        return _search(alphas_grid, x, ws, bits=b, group_size=group_size)

    def clipped(x, w, name):  # x: the input the (scaled) kernel w sees
        c, _ = _clip_search(
            ratios, x, w.astype(jnp.float32), bits=bits_of_(name), group_size=group_size
        )
        return c.astype(w.dtype)

    out = dict(params)
    alphas = []
    for i in range(cfg.n_layers):
        p = copy_tree(params[f"layers_{i}"])
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
        alphas.append(chosen)  # 0-d arrays (traceable: spec.abstract_decode)
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
