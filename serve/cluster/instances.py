"""The two worker roles, each one process with its own JAX device(s).

* ``PrefillInstance``: holds task prefill modules. ``prefill`` -> ``Engine.prefill`` ->
  offer the prefix (``wire.Offers``) -> ``prefilled`` with the first token and the offer's
  id and shapes. ``release`` drops an offer; an unreleased one expires.
* ``DecodeInstance``: holds the shared decode tree (SUN) or one model's full tree
  (conventional) in a one-worker ``DecodePool``. ``decode`` -> reserve a free slot and start
  pulling the prefix; the running slots keep decoding while it arrives; once every pulled leaf
  is ready, insert it -> ``started``; then continuous batching: one ``tokens`` message per
  decode step, slots freed on EOS, on the request's token budget, or on ``cancel``.
  A pull is bounded: ``transfer``'s ``pull`` returns at once with arrays still arriving. When
  the offer expired or never existed they never become ready (on JAX 0.10.2 waiting on them
  blocks forever); when the offering process died they fail. So the instance polls
  ``is_ready``, answers ``failed`` on an error or after ``pull_timeout_s``, and frees the
  slot. Nothing waits on an unready array, and the pool state never depends on one.

Both send a ``heartbeat`` every ``heartbeat_s``; it also announces the instance (a
restarted process carries a new ``epoch``), so the frontend needs no registration step.
"""

from __future__ import annotations

import dataclasses
import logging
import secrets
import signal
import time

import jax
import numpy as np

from serve.cluster import wire
from serve.cluster.config import ClusterConfig, DecodeSpec, PrefillSpec
from serve.engine import Engine, EngineConfig, sampling_params
from serve.pool import DecodePool
from serve.server.models import check_task
from sunjax.export import load_decode, load_prefill

log = logging.getLogger("sunjax.cluster")
BASE = "base"  # the decode tree itself, served as its own prefill module


class _Role:
    role = ""

    def __init__(self, config: ClusterConfig, spec: PrefillSpec | DecodeSpec):
        self.config, self.spec = config, spec
        self.epoch = secrets.token_hex(8)
        self.cfg, self.decode_tree, self.manifest = load_decode(config.export)
        self.engine_config = EngineConfig(
            workers=1,
            slots_per_worker=config.slots,
            max_len=config.max_len,
            min_bucket=min(config.min_bucket, config.max_len),
        )
        self.server = wire.start_transfer_server(spec.host or config.host, spec.transfer_port)
        self.channel: wire.Channel | None = None
        self._stop = False
        self._next_beat = 0.0

    def announce(self) -> dict:
        return {
            "op": "heartbeat",
            "role": self.role,
            "name": self.spec.name,
            "epoch": self.epoch,
            "transfer": self.server.address(),
            "fingerprint": self.manifest["decode_fingerprint"],
        }

    def beat(self) -> None:
        now = time.monotonic()
        if now >= self._next_beat:
            self.channel.send(self.announce())
            self._next_beat = now + self.config.heartbeat_s

    def serve(self) -> None:
        """Connect to the frontend and run until SIGTERM / SIGINT."""
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: setattr(self, "_stop", True))
        self.channel = wire.Channel(self.config.control_address, self.spec.name)
        log.info("%s %s up, transfer server %s", self.role, self.spec.name, self.server.address())
        try:
            while not self._stop:
                self.beat()
                for msg in self.channel.recv(self.wait()):
                    self.handle(msg)
                self.work()
        finally:
            self.channel.close()

    def wait(self) -> float:
        return self.config.heartbeat_s / 2

    def handle(self, msg: dict) -> None:
        raise NotImplementedError

    def work(self) -> None:
        pass


class PrefillInstance(_Role):
    role = "prefill"

    def __init__(self, config: ClusterConfig, spec: PrefillSpec, *, warm: bool = True):
        super().__init__(config, spec)
        self.params = {
            t: self.decode_tree if t == BASE else load_prefill(config.export, t, self.decode_tree)
            for t in spec.tasks
        }
        self.engine = Engine(self.cfg, self.engine_config)
        self.offers = wire.Offers(self.server, config.offer_timeout_s)
        if warm:  # compile every prompt bucket before announcing the instance
            for n in sorted({self.engine.bucket(n) for n in range(1, config.max_len + 1)}):
                prefix = self.engine.prefill(self.params[spec.tasks[0]], [0] * n, sampling_params())
                jax.block_until_ready(prefix)

    def announce(self) -> dict:
        return {
            **super().announce(),
            "tasks": list(self.params),
            "offers": len(self.offers.held),
        }

    def handle(self, msg: dict) -> None:
        op = msg["op"]
        if op == "release":
            self.offers.release(int(msg["uuid"]))
        elif op == "prefill":
            try:
                self.channel.send(self.prefill(msg))
            except ValueError as e:
                self.channel.send({"op": "failed", "id": msg["id"], "error": str(e)})
        elif op == "load":  # /v1/models/load on the frontend
            task, root = msg["task"], msg["root"]
            try:
                check_task(root, task, self.manifest["decode_fingerprint"])
                self.params[task] = load_prefill(root, task, self.decode_tree)
            except (OSError, ValueError) as e:
                self.channel.send({"op": "load_failed", "task": task, "error": str(e)})
                return
            self.channel.send({"op": "loaded", "task": task})
        elif op == "unload":
            self.params.pop(msg["task"], None)
        else:
            log.warning("prefill %s: unknown op %r", self.spec.name, op)

    def prefill(self, msg: dict) -> dict:
        model = msg["model"]
        if model not in self.params:
            raise ValueError(
                f"prefill instance {self.spec.name!r} does not hold task {model!r}; "
                f"it holds {sorted(self.params)}"
            )
        start = time.perf_counter()
        prompt = [int(t) for t in msg["prompt"]]
        self.engine.check_prompt(prompt, int(msg.get("max_tokens", 1)))
        prefix = self.engine.prefill(self.params[model], prompt, sampling_params(**msg["sampling"]))
        leaves = wire.offered(prefix)
        jax.block_until_ready(leaves)
        out = {
            "op": "prefilled",
            "id": msg["id"],
            "token": int(prefix.token),
            "bucket": self.engine.bucket(len(prompt)),
            "leaves": wire.leaf_specs(leaves),
            "kv_bytes": wire.kv_bytes(leaves),
            "prefill_s": time.perf_counter() - start,
        }
        if msg.get("logprobs"):
            lp = jax.device_get(prefix.logprobs)
            out["logprob"] = float(lp.logprob[0])
            out["top"] = [lp.top_ids[0].tolist(), lp.top_logprobs[0].tolist()]
        out["uuid"] = uuid = secrets.randbits(62)
        self.offers.offer(uuid, leaves)
        return out

    def work(self) -> None:
        for uuid in self.offers.expire():
            log.warning("prefill %s: offer %d was never confirmed; freed", self.spec.name, uuid)


@dataclasses.dataclass
class _Pull:
    msg: dict  # the decode message
    prefix: object  # serve.engine.Prefix whose leaves are still arriving
    start: float  # perf_counter at the pull
    deadline: float  # monotonic


@dataclasses.dataclass
class _Slot:
    id: str
    left: int  # tokens still to generate
    eos: frozenset[int]
    logprobs: bool


class DecodeInstance(_Role):
    role = "decode"

    def __init__(self, config: ClusterConfig, spec: DecodeSpec, *, warm: bool = True):
        super().__init__(config, spec)
        if spec.model is None or spec.model == BASE:
            tree = self.decode_tree  # SUN: the shared decode tree
        else:  # conventional: the model's own full tree
            tree = load_prefill(config.export, spec.model, self.decode_tree)
        self.pool = DecodePool(self.cfg, self.engine_config, decode_params=tree)
        self.puller = wire.Puller(self.server, self.cfg)
        self.slots: list[_Slot | None] = [None] * config.slots
        self.active = np.zeros(config.slots, bool)
        self.pulls: dict[int, _Pull] = {}  # slot -> the pull that will fill it
        if warm:
            from serve.loop import warm_up

            warm_up(self.pool, tree)
            self.pool.step_logprobs()

    def announce(self) -> dict:
        return {
            **super().announce(),
            "model": self.spec.model,
            "slots": len(self.slots),
            "running": int(self.active.sum()),
        }

    def wait(self) -> float:
        if self.active.any():
            return 0.0
        return 0.001 if self.pulls else self.config.heartbeat_s / 2

    def handle(self, msg: dict) -> None:
        op = msg["op"]
        if op == "decode":
            try:
                self.take(msg)
            except (ValueError, jax.errors.JaxRuntimeError) as e:  # bad shapes, unreachable
                self.channel.send({"op": "failed", "id": msg["id"], "error": str(e)})
        elif op == "cancel":
            for i, s in enumerate(self.slots):
                if s is not None and s.id == msg["id"]:
                    self.free(i)
                    self.pool.set_active(self.active)
            for i, pull in list(self.pulls.items()):
                if pull.msg["id"] == msg["id"]:
                    del self.pulls[i]
        else:
            log.warning("decode %s: unknown op %r", self.spec.name, op)

    def take(self, msg: dict) -> None:
        """Reserve a slot and start pulling ``msg``'s prefix (``land`` inserts it)."""
        free = [s for s in np.flatnonzero(~self.active).tolist() if s not in self.pulls]
        if not free:
            raise ValueError(f"decode instance {self.spec.name!r} has no free slot")
        if int(msg["max_tokens"]) < 1:
            raise ValueError(f"max_tokens={msg['max_tokens']} must be >= 1")
        start = time.perf_counter()
        prefix = self.puller.pull(
            msg["transfer"], int(msg["uuid"]), int(msg["bucket"]), msg["leaves"]
        )
        deadline = time.monotonic() + self.config.pull_timeout_s
        self.pulls[free[0]] = _Pull(msg, prefix, start, deadline)

    def land(self) -> None:
        """Insert every pull whose leaves have all arrived; fail those past their deadline."""
        for slot, pull in list(self.pulls.items()):
            msg = pull.msg
            if not wire.ready(pull.prefix):
                if time.monotonic() > pull.deadline:
                    del self.pulls[slot]
                    self.puller.forget(msg["transfer"])
                    error = (
                        f"KV pull from {msg['transfer']} (offer {msg['uuid']}) did not arrive "
                        f"in pull_timeout_s={self.config.pull_timeout_s}: the prefill "
                        "instance died or the offer expired"
                    )
                    log.warning("decode %s: %s", self.spec.name, error)
                    self.channel.send(
                        {"op": "failed", "id": msg["id"], "error": error, "retry": True}
                    )
                continue
            del self.pulls[slot]
            try:
                jax.block_until_ready(pull.prefix)  # ready: raises if the transfer failed
            except jax.errors.JaxRuntimeError as e:  # e.g. the offering process died
                self.puller.forget(msg["transfer"])
                failed = {"op": "failed", "id": msg["id"], "error": f"KV pull: {e}", "retry": True}
                self.channel.send(failed)
                continue
            self.pool.insert(pull.prefix, 0, slot)
            jax.block_until_ready(self.pool.state.tokens)
            self.slots[slot] = _Slot(
                id=msg["id"],
                left=int(msg["max_tokens"]),
                eos=frozenset() if msg.get("ignore_eos") else frozenset(msg.get("eos", ())),
                logprobs=bool(msg.get("logprobs")),
            )
            self.active[slot] = True
            pull_s = time.perf_counter() - pull.start
            self.channel.send({"op": "started", "id": msg["id"], "pull_s": pull_s})

    def free(self, slot: int) -> None:
        self.slots[slot], self.active[slot] = None, False

    def work(self) -> None:
        if self.pulls:
            self.land()
        if not self.active.any():
            return
        live = [int(s) for s in np.flatnonzero(self.active)]
        if any(self.slots[s].logprobs for s in live):
            tokens, lp = self.pool.step_logprobs()
        else:
            tokens, lp = self.pool.step(), None
        items, done = [], []
        for s in live:
            slot, token = self.slots[s], int(tokens[s])
            item = [slot.id, token]
            if slot.logprobs and lp is not None:
                item += [
                    float(lp.logprob[s]),
                    [lp.top_ids[s].tolist(), lp.top_logprobs[s].tolist()],
                ]
            items.append(item)
            slot.left -= 1
            if token in slot.eos or slot.left <= 0:
                done.append(slot.id)
                self.free(s)
        if done:
            self.pool.set_active(self.active)
        self.channel.send({"op": "tokens", "items": items, "done": done})
