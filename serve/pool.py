"""The decode pool: W decode workers on a mesh axis ``"workers"``, one SPMD step for all.

Letters: W workers, B slots per worker (W * B slots in all, sharded over ``"workers"``).

* **SUN**: ``DecodePool(cfg, config, decode_params=theta)``: the one shared decode tree is
  replicated (``P()``); any worker can decode any task's request.
* **Conventional**: ``DecodePool(cfg, config, worker_params=[tree_0, ..., tree_{W-1}])``: each
  worker holds its own model's full fine-tuned tree, stacked on a leading axis sharded over
  ``"workers"``. The step code is the same; only the parameter layout differs.

The step is ``Engine.generate`` inside ``shard_map``. KV hand-off: ``insert``
puts the prefix on the target worker's device (``jax.device_put``) and runs ``Engine.insert``
on that worker's shard of the decode state alone.

Paged (``EngineConfig.page_size``): every worker owns its own page pool (``engine.init_cache``
lays the pools along the first axis, sharded like the slots); the scheduler keeps one host
``PageAllocator`` per worker, pushes the page table with ``set_page_table`` and swaps a
preempted sequence out with ``read_prefix``.

Several processes (``jax.distributed``): ``devices`` may be global devices of which this
process addresses only some. Then every process builds the same pool and must call ``step`` /
``step_logprobs`` / ``set_active`` / ``set_page_table`` in the same order (the step is one
multi-process program); the step's tokens and logprobs come back replicated (an all-gather
XLA inserts) so every process reads them on its host; ``insert`` / ``read_prefix`` /
``read_pages`` of a worker run on the process that owns its device alone.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from serve.engine import DecodeState, Engine, EngineConfig, Logprobs, Params, Prefix
from serve.engine import init_decode_state as _init_state
from sunjax.cache import KVCache
from sunjax.config import ModelConfig

AXIS = "workers"


def shard_map(f, *, mesh: Mesh, in_specs, out_specs):
    """``jax.shard_map`` (JAX >= 0.7) or ``jax.experimental.shard_map.shard_map`` (older)."""
    if hasattr(jax, "shard_map"):
        return jax.shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)
    from jax.experimental.shard_map import shard_map as legacy

    return legacy(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_rep=False)


def ensure_cpu_devices(n: int) -> None:
    """Ask for ``n`` host devices when running on the CPU (before JAX starts its backend)."""
    try:
        jax.config.update("jax_num_cpu_devices", max(n, 1))
    except RuntimeError:  # backend already initialised: keep what it has
        pass


def put_global(tree, sharding: NamedSharding):
    """``jax.device_put(tree, sharding)``; when ``sharding`` spans devices of other processes,
    each process places only its own shards (every process passes the same values)."""
    if sharding.is_fully_addressable:
        return jax.device_put(tree, sharding)

    def put(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return x
        x = x if isinstance(x, jax.Array) else np.asarray(x)
        index = sharding.addressable_devices_indices_map(x.shape)
        rows = [jax.device_put(x[i], d) for d, i in index.items()]
        return jax.make_array_from_single_device_arrays(x.shape, sharding, rows)

    return jax.tree.map(put, tree)


class DecodePool:
    """W decode workers advanced by one ``shard_map`` dispatch per step."""

    def __init__(
        self,
        cfg: ModelConfig,
        config: EngineConfig,
        *,
        decode_params: Params | None = None,
        worker_params: Sequence[Params] | None = None,
        devices: Sequence[jax.Device] | None = None,
    ):
        if (decode_params is None) == (worker_params is None):
            raise ValueError("give exactly one of decode_params (SUN) or worker_params")
        W = config.workers
        devices = list(jax.devices() if devices is None else devices)
        if len(devices) < W:
            raise ValueError(
                f"workers={W} needs {W} devices, found {len(devices)} (on the CPU set "
                f"XLA_FLAGS=--xla_force_host_platform_device_count={W})"
            )
        if worker_params is not None and len(worker_params) != W:
            raise ValueError(f"worker_params has {len(worker_params)} trees for workers={W}")
        self.cfg, self.config = cfg, config
        self.engine = Engine(cfg, config)  # checks max_len against the model
        self.devices = devices[:W]
        self.mesh = Mesh(np.array(self.devices), (AXIS,))
        self.sharded = NamedSharding(self.mesh, P(AXIS))
        self.shared = worker_params is None
        self.replicated = NamedSharding(self.mesh, P())
        self.local = self.sharded.is_fully_addressable  # False: the mesh spans processes
        if self.shared:
            self.params = put_global(decode_params, self.replicated)
            param_spec = P()
        else:
            self.params = jax.tree.map(self._stack, *worker_params)
            param_spec = P(AXIS)
        state = _init_state(cfg, config)
        self.state: DecodeState = put_global(state, self.sharded)

        shared, engine = self.shared, self.engine

        def local(step):  # step: an Engine method (params, state) -> (state, out), jitted
            def local_step(params, state):  # params: replicated or [1, ...]; state: B slots
                if not shared:
                    params = jax.tree.map(lambda x: x[0], params)
                return step(params, state)  # the engine's step, traced per worker

            spmd = shard_map(
                local_step, mesh=self.mesh, in_specs=(param_spec, P(AXIS)), out_specs=P(AXIS)
            )
            if self.local:
                return jax.jit(spmd, donate_argnums=1)
            # several processes: the outputs replicated, so every host can read them
            return jax.jit(spmd, donate_argnums=1, out_shardings=(self.sharded, self.replicated))

        self._step = local(engine.generate)
        self._step_logprobs = local(engine.generate_logprobs)
        if not self.local:  # compiled now: a process must not compile while the others wait
            self._step = self._step.lower(self.params, self.state).compile()
            self._step_logprobs = self._step_logprobs.lower(self.params, self.state).compile()

    def _stack(self, *leaves: jax.Array) -> jax.Array:
        """One leaf per worker -> one [W, ...] array whose row w lives on worker w."""
        rows = [
            jax.device_put(jnp.asarray(x)[None], d)
            for x, d in zip(leaves, self.devices, strict=True)
            if d.process_index == jax.process_index()
        ]
        shape = (len(leaves),) + rows[0].shape[1:]
        return jax.make_array_from_single_device_arrays(shape, self.sharded, rows)

    @property
    def slots(self) -> int:
        return self.config.slots

    def slot_index(self, worker: int, slot: int) -> int:
        return worker * self.config.slots_per_worker + slot

    def owner(self, worker: int) -> int:
        """The process whose device runs ``worker`` (``insert`` on it runs there alone)."""
        return self.devices[worker].process_index

    def step(self) -> np.ndarray:
        """One decode step of every worker; returns each slot's new token [W * B] (host)."""
        self.state, tokens = self._step(self.params, self.state)
        return np.asarray(tokens)

    def step_logprobs(self) -> tuple[np.ndarray, Logprobs]:
        """``step`` that also returns the new tokens' log-probabilities (host arrays)."""
        self.state, out = self._step_logprobs(self.params, self.state)
        return jax.device_get(out)

    def _local(self, worker: int) -> tuple[DecodeState, list[dict]]:
        """Worker ``worker``'s shard of the decode state, and every leaf's shards by device."""
        leaves, treedef = jax.tree.flatten(self.state)
        shards = [{s.device: s.data for s in a.addressable_shards} for a in leaves]
        device = self.devices[worker]
        return treedef.unflatten([parts[device] for parts in shards]), shards

    def insert(
        self,
        prefix: Prefix,
        worker: int,
        slot: int,
        page_row: np.ndarray | None = None,
        shared: int = 0,
    ) -> None:
        """Hand ``prefix`` to ``worker`` and put it in that worker's local slot ``slot``
        (paged: onto that worker's pages ``page_row``, the first ``shared`` of them
        prefix-cache pages that are pointed at, not written)."""
        device = self.devices[worker]
        prefix = jax.device_put(dataclasses.replace(prefix, logprobs=None), device)
        row = None if page_row is None else jax.device_put(np.asarray(page_row, np.int32), device)
        local, shards = self._local(worker)
        local = self.engine.insert(prefix, local, slot, row, shared)  # this shard only
        leaves, treedef = jax.tree.flatten(self.state)
        rebuilt = []
        for a, parts, new in zip(leaves, shards, jax.tree.leaves(local), strict=True):
            parts[device] = new
            arrays = [parts[d] for d in a.sharding.addressable_devices]
            rebuilt.append(jax.make_array_from_single_device_arrays(a.shape, a.sharding, arrays))
        self.state = treedef.unflatten(rebuilt)

    def read_prefix(self, worker: int, slot: int, page_row: np.ndarray, length: int) -> KVCache:
        """The ``length`` cached tokens of ``worker``'s local slot ``slot`` (its pages
        ``page_row``), copied to host memory as a batch-1 dense cache (preemption)."""
        local, _ = self._local(worker)
        return jax.device_get(self.engine.read_prefix(local, slot, page_row, length))

    def read_pages(self, worker: int, page_row: np.ndarray, length: int, size: int) -> KVCache:
        """The ``length`` tokens on ``worker``'s pages ``page_row`` as a batch-1 dense cache
        of ``size`` positions, left on that worker's device (prefix-cache hits)."""
        local, _ = self._local(worker)
        return self.engine.read_pages(local, page_row, length, size)

    def set_page_table(self, table: np.ndarray) -> None:
        """Replace the page table [W * B, M] (the host allocators are its source of truth)."""
        rows = put_global(np.asarray(table, np.int32), self.sharded)
        cache = dataclasses.replace(self.state.cache, page_table=rows)
        self.state = dataclasses.replace(self.state, cache=cache)

    def set_active(self, active: np.ndarray) -> None:
        """Replace the active mask [W * B] (host is the source of truth for freed slots)."""
        mask = put_global(np.asarray(active, bool), self.sharded)
        self.state = dataclasses.replace(self.state, active=mask)

    def lengths(self) -> np.ndarray:
        if self.local:
            return np.asarray(self.state.cache.lengths)
        from jax.experimental import multihost_utils  # a collective: every process calls it

        return np.asarray(multihost_utils.process_allgather(self.state.cache.lengths, tiled=True))
