"""A decode instance over several processes that form one JAX mesh (``jax.distributed``).

Process 0, the **leader**, is the instance: it alone talks to the frontend, picks slots,
tracks EOS and budgets and sends tokens. The other processes, **followers**, run the same
``DecodePool`` over the same global devices and execute the leader's ordered command stream
(ZeroMQ, JSON: ``step``, ``active``, ``insert``, ...) so that every process calls every
multi-process program in the same order (a process that skips one deadlocks the rest).

A slot belongs to one worker, one device, one process: that process pulls the slot's prefix
(its own transfer server, the frontend's ``transfer``/``uuid``), polls readiness, and says
``ready`` to the leader; the leader then puts ``insert`` in the stream (the insert activates
the slot, so it must sit at one place in the step order) and tells the frontend ``started``.

Failure: a dead peer makes the next collective fail (gloo: connection reset) and the
``jax.distributed`` coordinator stops the survivors after ``heartbeat_timeout_seconds``;
besides, each process watches its peers (the leader: the followers' acks; a follower: the
leader's stream, which carries a ``beat`` when idle) and exits when one is silent past
``group_timeout_s``. The frontend then loses the instance (``lost_after_s``) as any other.

Messages (leader -> follower, in order):
    pull {slot, id, transfer, uuid, bucket, leaves}   drop {slot, id}   insert {slot, id}
    step {logprobs}   active {mask}   beat {}   stop {}
Messages (follower -> leader):
    hello {process}   ack {}   ready {slot, id, pull_s}   failed {slot, id, error, retry}
"""

from __future__ import annotations

import inspect
import logging
import os
import threading
import time

import jax
import zmq

from serve.cluster import wire
from serve.cluster.config import ClusterConfig, DecodeSpec

log = logging.getLogger("sunjax.cluster")


def join(
    config: ClusterConfig, spec: DecodeSpec, process_id: int | None, coordinator_port: int = 0
) -> None:
    """Before JAX touches a device: this process's devices, and for ``processes > 1``
    ``jax.distributed.initialize`` as process ``process_id`` of the instance."""
    from serve.pool import ensure_cpu_devices

    if spec.processes > 1 or spec.devices > 1:
        ensure_cpu_devices(spec.devices)
    if spec.processes == 1:
        return
    if process_id is None or not 0 <= process_id < spec.processes:
        raise ValueError(
            f"decode instance {spec.name!r} spans processes={spec.processes}: "
            f"--process-id={process_id} must be in [0, {spec.processes - 1}]"
        )
    port = spec.coordinator_port or coordinator_port
    if not port:
        raise ValueError(
            f"decode instance {spec.name!r}: set coordinator_port in the cluster config "
            "(or --coordinator-port) so its processes find process 0"
        )
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    host = spec.coordinator_host or spec.host or config.host
    kwargs = dict(
        coordinator_address=f"{host}:{port}",
        num_processes=spec.processes,
        process_id=process_id,
        coordinator_bind_address=f"{spec.host or config.host}:{port}",
        heartbeat_timeout_seconds=max(int(config.group_timeout_s), 2),
        initialization_timeout=300,
    )
    known = inspect.signature(jax.distributed.initialize).parameters
    jax.distributed.initialize(**{k: v for k, v in kwargs.items() if k in known})


STARTUP_TIMEOUT_MS = 600_000  # loading and compiling on a busy host can take minutes


def _client():
    """``jax.distributed``'s client (its key-value store and barriers: JAX exposes no public
    API for them; they exist in JAX 0.4.x to 0.11)."""
    from jax._src import distributed

    client = distributed.global_state.client
    if client is None:
        raise RuntimeError("jax.distributed.initialize was not called")
    return client


def instance_devices(per_process: int) -> list[jax.Device]:
    """The first ``per_process`` devices of every process, in process order."""
    out = []
    for p in range(jax.process_count()):
        mine = [d for d in jax.devices() if d.process_index == p][:per_process]
        if len(mine) < per_process:
            raise ValueError(f"process {p} has {len(mine)} devices; devices={per_process}")
        out += mine
    return out


def exit_now(code: int, why: str) -> None:
    """Leave without ``jax.distributed``'s shutdown barrier (a peer is gone: it would hang)."""
    log.error("%s; exiting", why)
    logging.shutdown()
    os._exit(code)


class Group:
    """One process's link to the rest of its instance (the leader: a ROUTER every follower
    connects to; a follower: a DEALER), and a watchdog that ends the process when a peer is
    silent past ``timeout_s``."""

    def __init__(self, spec: DecodeSpec, config: ClusterConfig):
        self.n, self.me = jax.process_count(), jax.process_index()
        self.leader = self.me == 0
        self.timeout_s = config.group_timeout_s
        self.ctx = zmq.Context.instance()
        if self.leader:
            self.sock = self.ctx.socket(zmq.ROUTER)
            self.sock.setsockopt(zmq.LINGER, 0)
            bind = f"tcp://{spec.host or config.host}"
            if spec.group_port:
                self.sock.bind(f"{bind}:{spec.group_port}")
                port = spec.group_port
            else:
                port = self.sock.bind_to_random_port(bind)
        else:
            self.sock = self.ctx.socket(zmq.DEALER)
            self.sock.setsockopt(zmq.IDENTITY, str(self.me).encode())
            self.sock.setsockopt(zmq.LINGER, 0)
            port = 0
        # the leader's port to everyone, through jax.distributed's key-value store (not a gloo
        # collective: those give up after 30 s when the processes arrive that far apart)
        key = f"sunjax/{spec.name}/group_port"
        if self.leader:
            _client().key_value_set(key, str(port))
        else:
            port = int(_client().blocking_key_value_get(key, STARTUP_TIMEOUT_MS))
        if not self.leader:
            host = spec.coordinator_host or spec.host or config.host
            self.sock.connect(f"tcp://{host}:{port}")
            self.send_leader({"op": "hello", "process": self.me})
        self.heard = {p: time.monotonic() for p in self.peers}
        if self.leader:  # a ROUTER drops messages to peers it has not heard from yet
            deadline = time.monotonic() + STARTUP_TIMEOUT_MS / 1000
            waiting = set(self.peers)
            while waiting:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"processes {sorted(waiting)} never connected")
                for p, _ in self.recv(0.1):
                    waiting.discard(p)
        self._watching = False

    def barrier(self, name: str) -> None:
        """Wait until every process of the instance is here (before the first run of a
        multi-process program: gloo gives up when the processes are 30 s apart)."""
        _client().wait_at_barrier(f"sunjax/{name}", STARTUP_TIMEOUT_MS)

    @property
    def peers(self) -> list[int]:
        return [p for p in range(self.n) if p != self.me] if self.leader else [0]

    def watch(self) -> None:
        """Start the watchdog (after warm-up: compiling is not silence)."""
        now = time.monotonic()
        self.heard = {p: now for p in self.peers}
        if not self._watching:
            self._watching = True
            threading.Thread(target=self._watchdog, daemon=True, name="group-watchdog").start()

    def _watchdog(self) -> None:
        while True:
            time.sleep(min(0.2, self.timeout_s / 4))
            now = time.monotonic()
            for p, t in list(self.heard.items()):
                if now - t > self.timeout_s:
                    exit_now(3, f"process {p} of this decode instance silent for {now - t:.1f}s")

    def send(self, process: int, msg: dict) -> None:
        self.sock.send_multipart([str(process).encode(), wire.encode(msg)])

    def send_all(self, msg: dict) -> None:
        for p in self.peers:
            self.send(p, msg)

    def send_leader(self, msg: dict) -> None:
        self.sock.send(wire.encode(msg))

    def recv(self, timeout_s: float) -> list[tuple[int, dict]]:
        """Every message waiting, as ``(process, message)``, after waiting up to
        ``timeout_s`` for the first."""
        out = []
        if self.sock.poll(int(timeout_s * 1000)):
            while True:
                try:
                    if self.leader:
                        ident, data = self.sock.recv_multipart(zmq.NOBLOCK)
                        p = int(ident)
                    else:
                        data, p = self.sock.recv(zmq.NOBLOCK), 0
                except zmq.Again:
                    break
                self.heard[p] = time.monotonic()
                out.append((p, wire.decode(data)))
        return out

    def close(self) -> None:
        self.sock.close(0)
