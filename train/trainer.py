"""Pure training functions: ``init_state``, ``train_step``, ``eval_step``, and the loop.

Modes (one code path, ``sunjax.sun.sun_loss``):

* ``sun``  — the trainable tree is the task's prefill module; the decode tree is a constant
  argument of the loss (frozen, shared) and never enters the optimizer state.
* ``full`` — conventional fine-tuning: the trainable tree serves as prefill and decode module.

The optimizer is AdamW with warmup + cosine decay, global-norm clipping and optional gradient
accumulation (``optax.MultiSteps``). Parameters stay in their stored dtype (float32 master
weights); ``compute_dtype="bfloat16"`` runs the model in bf16 on top of them.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

from sunjax.config import ModelConfig
from sunjax.sun import Batch, sun_loss

MODES = ("sun", "full")


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainConfig:
    mode: str = "sun"
    steps: int = 200
    batch_size: int = 16
    learning_rate: float = 1e-3
    warmup_steps: int = 20
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    grad_accum: int = 1
    compute_dtype: str | None = None
    seed: int = 0
    eval_every: int = 0
    eval_at: tuple[int, ...] = ()
    checkpoint_every: int = 0

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"mode={self.mode!r} is not one of {MODES}")
        for name in ("steps", "batch_size", "grad_accum"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if self.learning_rate <= 0:
            raise ValueError(f"learning_rate={self.learning_rate} must be > 0")
        bad = [s for s in self.eval_at if not 1 <= s <= self.steps]
        if bad:
            raise ValueError(f"eval_at steps {bad} are outside 1..steps={self.steps}")

    def evaluates_at(self, step: int) -> bool:
        """Whether ``eval_fn`` runs after optimizer step ``step`` (1-based)."""
        return step in self.eval_at or bool(self.eval_every and step % self.eval_every == 0)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TrainState:
    step: jax.Array  # int32 scalar: optimizer updates applied
    params: dict  # the trainable tree (prefill module in "sun" mode)
    opt_state: optax.OptState


def optimizer(tc: TrainConfig) -> optax.GradientTransformation:
    warmup = min(tc.warmup_steps, tc.steps - 1)  # a run shorter than its warmup still decays
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, tc.learning_rate, warmup, max(tc.steps, warmup + 1), end_value=tc.learning_rate * 0.1
    )
    tx = optax.chain(
        optax.clip_by_global_norm(tc.grad_clip),
        optax.adamw(schedule, weight_decay=tc.weight_decay),
    )
    return optax.MultiSteps(tx, tc.grad_accum) if tc.grad_accum > 1 else tx


def init_state(tc: TrainConfig, params: dict) -> TrainState:
    """A fresh state over ``params`` (copied, so the caller's tree is never donated)."""
    params = jax.tree.map(jnp.array, params)
    return TrainState(step=jnp.int32(0), params=params, opt_state=optimizer(tc).init(params))


def _loss(cfg: ModelConfig, tc: TrainConfig, params, decode_params, batch: Batch):
    if tc.compute_dtype:
        cfg = cfg.replace(dtype=tc.compute_dtype)
    return sun_loss(cfg, params, params if tc.mode == "full" else decode_params, batch)


@functools.partial(jax.jit, static_argnums=(0, 1), donate_argnames="state")
def train_step(cfg: ModelConfig, tc: TrainConfig, state: TrainState, decode_params, batch: Batch):
    """One optimizer (micro-)step. ``decode_params`` is ignored in ``full`` mode."""
    (_, metrics), grads = jax.value_and_grad(_loss, argnums=2, has_aux=True)(
        cfg, tc, state.params, decode_params, batch
    )
    updates, opt_state = optimizer(tc).update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {**metrics, "grad_norm": optax.global_norm(grads)}
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics


@functools.partial(jax.jit, static_argnums=(0, 1))
def eval_step(cfg: ModelConfig, tc: TrainConfig, params, decode_params, batch: Batch):
    """Loss metrics of ``params`` on a batch, no update."""
    return _loss(cfg, tc, params, decode_params, batch)[1]


def batch_indices(n: int, batch_size: int, step: int, seed: int) -> np.ndarray:
    """Example indices of batch ``step``: a fresh permutation each epoch, a pure function of
    (step, seed), so a resumed run sees exactly the batches an uninterrupted one would."""
    start = step * batch_size
    epoch, offset = divmod(start, n)
    out = []
    while len(out) < batch_size:
        perm = np.random.default_rng([seed, epoch]).permutation(n)
        out.extend(perm[offset : offset + batch_size - len(out)].tolist())
        epoch, offset = epoch + 1, 0
    return np.asarray(out)


def train(
    cfg: ModelConfig,
    tc: TrainConfig,
    params: dict,
    make_batch: Callable[[np.ndarray], Batch],
    n_examples: int,
    *,
    decode_params: dict | None = None,
    checkpoint_dir: str | None = None,
    eval_fn: Callable[[dict, int], dict] | None = None,
    desc: str = "train",
    progress: bool = True,
) -> tuple[dict, list[dict]]:
    """Run ``tc.steps`` steps; resumes from the latest checkpoint in ``checkpoint_dir``.

    ``make_batch(indices)`` builds a ``Batch`` from example indices. Every ``tc.eval_every``
    steps and after each step in ``tc.eval_at``, ``eval_fn(params, step)`` runs on the params
    after that step and its metrics join that step's as ``eval_<name>``. Returns
    the trained tree and one metrics dict per step run in this call.
    """
    if tc.mode == "sun" and decode_params is None:
        raise ValueError("mode='sun' needs decode_params (the frozen shared decode tree)")
    state = init_state(tc, params)
    manager = None
    if checkpoint_dir:
        from train.checkpoint import restore_latest, state_manager

        manager = state_manager(checkpoint_dir, tc.checkpoint_every or tc.steps)
        state = restore_latest(manager, state)
    history = []
    start = int(state.step)
    bar = tqdm(
        range(start, tc.steps),
        desc=desc,
        disable=not progress,
        mininterval=5,
        initial=start,
        total=tc.steps,
    )
    t0, tokens = time.perf_counter(), 0.0
    for step in bar:
        batch = make_batch(batch_indices(n_examples, tc.batch_size, step, tc.seed))
        state, metrics = train_step(cfg, tc, state, decode_params, batch)
        metrics = {k: float(v) for k, v in metrics.items()}
        metrics["step"] = step + 1
        tokens += metrics["tokens"]
        if eval_fn and tc.evaluates_at(step + 1):
            metrics.update({f"eval_{k}": v for k, v in eval_fn(state.params, step + 1).items()})
        history.append(metrics)
        bar.set_postfix(
            refresh=False,
            loss=f"{metrics['loss']:.3f}",
            tok_s=f"{tokens / (time.perf_counter() - t0):.0f}",
        )
        if manager is not None:
            manager.save(step + 1, args=_save_args(state))
    if manager is not None:
        manager.wait_until_finished()
        manager.close()
    return state.params, history


def _save_args(state: TrainState):
    import orbax.checkpoint as ocp

    return ocp.args.StandardSave(state)
