"""The two channels between processes: JSON control messages over ZeroMQ, and the prefix
pytree over ``jax.experimental.transfer``.

**Control** (``Channel``): the frontend binds one ROUTER socket; every instance connects a
DEALER whose identity is its name. Messages are JSON objects with an ``op``; tensors never
travel here (no pickle).

**KV hand-off** (offer / pull / confirm): the prefill instance offers a request's ``Prefix``
under an integer id (``TransferServer.await_pull``) and keeps it; the frontend tells the
chosen decode instance the offer's address, id and leaf shapes (``leaf_specs``); the decode
instance ``pull``s into arrays it lays out itself (``prefix_template``), inserts into a slot
it already reserved, and says ``started``; the frontend then sends ``release`` so the prefill
instance drops the prefix. An offer nobody confirms is dropped after ``offer_timeout_s``.

Messages (instance -> frontend):
    heartbeat {role, name, epoch, transfer, tasks | model, slots, running}
    prefilled {id, uuid, bucket, token, logprob, top, leaves, kv_bytes, prefill_s}
    started {id, pull_s}        tokens {items: [[id, token, logprob, top], ...], done: [[id, why]],
                                        step_s (the decode step's seconds, for phase timing)}
    failed {id, error[, retry]} (prefill or decode could not take the request; retry: the
                                 KV pull failed, a re-run elsewhere may succeed)
Messages (frontend -> instance):
    prefill {id, model, prompt, sampling, logprobs}     release {uuid}
    decode {id, transfer, uuid, bucket, leaves, max_tokens, eos, ignore_eos, logprobs}   cancel {id}
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
import zmq
from jax.experimental import transfer
from jax.sharding import SingleDeviceSharding

from serve.engine import Prefix
from sunjax.config import ModelConfig
from sunjax.sampling import SamplingParams


def encode(msg: dict) -> bytes:
    return json.dumps(msg, separators=(",", ":")).encode()


def decode(data: bytes) -> dict:
    msg = json.loads(data)
    if not isinstance(msg, dict) or "op" not in msg:
        raise ValueError(f"control message without an op: {data[:200]!r}")
    return msg


class Channel:
    """An instance's DEALER socket to the frontend (identity = the instance's name)."""

    def __init__(self, address: str, name: str):
        self.ctx = zmq.Context.instance()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.IDENTITY, name.encode())
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(address)

    def send(self, msg: dict) -> None:
        self.sock.send(encode(msg))

    def recv(self, timeout_s: float) -> list[dict]:
        """Every message waiting, after waiting up to ``timeout_s`` for the first."""
        out = []
        if self.sock.poll(int(timeout_s * 1000)):
            while True:
                try:
                    out.append(decode(self.sock.recv(zmq.NOBLOCK)))
                except zmq.Again:
                    break
        return out

    def close(self) -> None:
        self.sock.close(0)


class Hub:
    """The frontend's ROUTER socket: messages are ``(instance name, dict)``."""

    def __init__(self, address: str):
        self.ctx = zmq.Context.instance()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.ROUTER_HANDOVER, 1)  # a restarted instance takes its name back
        self.sock.bind(address)

    def send(self, name: str, msg: dict) -> None:
        self.sock.send_multipart([name.encode(), encode(msg)])

    def recv(self, timeout_s: float) -> list[tuple[str, dict]]:
        out = []
        if self.sock.poll(int(timeout_s * 1000)):
            while True:
                try:
                    ident, data = self.sock.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                out.append((ident.decode(), decode(data)))
        return out

    def close(self) -> None:
        self.sock.close(0)


# -- the KV hand-off -------------------------------------------------------------------------
def start_transfer_server(host: str, port: int = 0):
    """A transfer server on this process's first device, bound to ``host``."""
    client = jax.local_devices()[0].client
    return transfer.start_transfer_server(client, f"{host}:{port}", [f"{host}:0"])


def offered(prefix: Prefix) -> list[jax.Array]:
    """The leaves a prefill instance offers: the prefix without its logprobs (those travel as
    metadata with the first token)."""
    return jax.tree.leaves(dataclasses.replace(prefix, logprobs=None, model=""))


def leaf_specs(leaves: list[jax.Array]) -> list[list]:
    """``[[shape, dtype], ...]``: what the receiver checks its layout against."""
    return [[list(x.shape), str(x.dtype)] for x in leaves]


def kv_bytes(leaves: list[jax.Array]) -> int:
    return int(sum(x.size * x.dtype.itemsize for x in leaves))


def prefix_template(cfg: ModelConfig, length: int) -> Prefix:
    """The abstract ``Prefix`` of a prompt bucketed to ``length`` (no logprobs)."""
    return jax.eval_shape(
        lambda: Prefix(
            cache=cfg.init_cache(1, length),
            token=jnp.zeros((), jnp.int32),
            length=jnp.zeros((), jnp.int32),
            sampling=SamplingParams.create(1),
        )
    )


class Offers:
    """A prefill instance's offered prefixes, kept until released or timed out."""

    def __init__(self, server, timeout_s: float):
        self.server, self.timeout_s = server, timeout_s
        self.held: dict[int, tuple[float, list[jax.Array]]] = {}

    def offer(self, uuid: int, leaves: list[jax.Array]) -> None:
        deadline = datetime.datetime.now() + datetime.timedelta(seconds=self.timeout_s)
        try:  # JAX 0.10+: the transfer server drops an offer nobody pulled by then
            self.server.await_pull(uuid, leaves, timeout=deadline)
        except TypeError:
            self.server.await_pull(uuid, leaves)
        self.held[uuid] = (time.monotonic() + self.timeout_s, leaves)

    def release(self, uuid: int) -> bool:
        return self.held.pop(uuid, None) is not None

    def expire(self) -> list[int]:
        now = time.monotonic()
        gone = [u for u, (deadline, _) in self.held.items() if deadline < now]
        for u in gone:
            del self.held[u]
        return gone


class Puller:
    """A decode instance's side: one connection per prefill transfer server. ``pull``
    returns at once with arrays still arriving: poll ``ready`` before using them."""

    def __init__(self, server, cfg: ModelConfig):
        self.server, self.cfg = server, cfg
        self.conns: dict[str, object] = {}
        self.device = jax.local_devices()[0]

    def pull(self, address: str, uuid: int, length: int, leaves: list[list], device=None) -> Prefix:
        """The offered prefix of a prompt bucketed to ``length``, laid out on ``device`` (one
        of this process's; default: its first); ValueError when the offered leaves are not
        such a prefix of this model."""
        template = prefix_template(self.cfg, length)
        flat, treedef = jax.tree.flatten(template)
        want = leaf_specs(flat)
        if want != [[list(s), str(np.dtype(d))] for s, d in leaves]:
            raise ValueError(f"offered leaves {leaves} do not match this decode model's {want}")
        sharding = SingleDeviceSharding(self.device if device is None else device)
        specs = [jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding) for x in flat]
        if address not in self.conns:
            self.conns[address] = self.server.connect(address)
        arrays = self.conns[address].pull(uuid, specs)
        return treedef.unflatten(arrays)

    def forget(self, address: str) -> None:
        """Drop the connection to ``address`` (its server died?): the next pull reconnects."""
        self.conns.pop(address, None)


def ready(tree) -> bool:
    """Whether every leaf of ``tree`` has arrived, without waiting. A pulled array whose
    offer is gone never becomes ready, and ``block_until_ready`` on it never returns."""
    return all(x.is_ready() for x in jax.tree.leaves(tree))
