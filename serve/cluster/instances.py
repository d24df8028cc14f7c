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
    """A decode instance, or (with ``group``) the leader process of one that spans several
    processes (``serve.cluster.group``): the pool then covers every process's devices and
    each step, mask change and insert is also sent, in order, to the followers."""

    role = "decode"

    def __init__(
        self, config: ClusterConfig, spec: DecodeSpec, *, warm: bool = True, group: bool = False
    ):
        super().__init__(config, spec)
        if spec.model is None or spec.model == BASE:
            tree = self.decode_tree  # SUN: the shared decode tree
        else:  # conventional: the model's own full tree
            tree = load_prefill(config.export, spec.model, self.decode_tree)
        if spec.processes > 1 or spec.devices > 1:
            from serve.cluster.group import instance_devices

            devices = instance_devices(spec.devices)
            workers = len(devices)
            self.engine_config = dataclasses.replace(
                self.engine_config, workers=workers, slots_per_worker=-(-config.slots // workers)
            )
        else:
            devices = None
        self.pool = DecodePool(self.cfg, self.engine_config, decode_params=tree, devices=devices)
        self.me = jax.process_index()
        self.puller = wire.Puller(self.server, self.cfg)
        n = self.pool.slots
        self.slots: list[_Slot | None] = [None] * n
        self.active = np.zeros(n, bool)
        self.pulls: dict[int, _Pull] = {}  # slot -> the pull (this process's) that will fill it
        self.remote: dict[int, _Pull] = {}  # leader: slot -> a pull a follower makes
        self.landed = [0] * jax.process_count()  # requests each process pulled and inserted
        self.group = None  # serve.cluster.group.Group: this instance spans processes
        if group:  # every process of the instance, in the same order: pool, group, warm-up
            from serve.cluster.group import Group

            self.group = Group(spec, config)
        if warm:
            from serve.loop import warm_up

            sync = None if self.group is None else lambda: self.group.barrier(spec.name + "/warm")
            warm_up(self.pool, tree, before_step=sync)  # inserts on this process's workers
            self.pool.step_logprobs()

    def announce(self) -> dict:
        out = {
            **super().announce(),
            "model": self.spec.model,
            "slots": len(self.slots),
            "running": int(self.active.sum()),
        }
        if self.group is not None:
            out |= {"processes": self.group.n, "landed": list(self.landed)}
        return out

    def beat(self) -> None:
        if self.group is not None and time.monotonic() >= self._next_beat:
            self.group.send_all({"op": "beat"})  # the stream is never silent while alive
        super().beat()

    def serve(self) -> None:
        if self.group is None:
            return super().serve()
        self.group.watch()
        try:
            super().serve()
        except BaseException as e:  # a failed collective: a peer died
            from serve.cluster.group import exit_now

            exit_now(1, f"decode {self.spec.name}: {type(e).__name__}: {e}")
        self.group.send_all({"op": "stop"})
        time.sleep(0.2)
        from serve.cluster.group import exit_now

        exit_now(0, f"decode {self.spec.name}: stopped")

    def wait(self) -> float:
        if self.active.any():
            return 0.0
        return 0.001 if self.pulls or self.remote else self.config.heartbeat_s / 2

    # -- the ordered stream: every process runs these in the same order -----------------------
    def _issue(self, msg: dict) -> None:
        if self.group is not None:
            self.group.send_all(msg)

    def _set_active(self) -> None:
        self._issue({"op": "active", "mask": self.active.astype(int).tolist()})
        self.pool.set_active(self.active)

    def _step(self, logprobs: bool):
        self._issue({"op": "step", "logprobs": logprobs})
        if logprobs:
            return self.pool.step_logprobs()
        return self.pool.step(), None

    def _where(self, slot: int) -> tuple[int, int, int]:
        """Global slot -> (worker, its local slot, the process that owns the worker)."""
        worker, local = divmod(slot, self.pool.config.slots_per_worker)
        return worker, local, self.pool.owner(worker)

    def handle(self, msg: dict) -> None:
        op = msg["op"]
        if op == "decode":
            try:
                self.take(msg)
            except (ValueError, jax.errors.JaxRuntimeError) as e:  # bad shapes, unreachable
                self.channel.send({"op": "failed", "id": msg["id"], "error": str(e)})
        elif op == "cancel":
            freed = False
            for i, s in enumerate(self.slots):
                if s is not None and s.id == msg["id"]:
                    self.free(i)
                    freed = True
            if freed:
                self._set_active()
            for i, pull in list(self.pulls.items()):
                if pull.msg["id"] == msg["id"]:
                    del self.pulls[i]
            for i, pull in list(self.remote.items()):
                if pull.msg["id"] == msg["id"]:
                    del self.remote[i]
                    self.group.send(self._where(i)[2], {"op": "drop", "slot": i, "id": msg["id"]})
        else:
            log.warning("decode %s: unknown op %r", self.spec.name, op)

    def take(self, msg: dict) -> None:
        """Reserve a slot and start pulling ``msg``'s prefix (``land`` inserts it); with
        several workers, on the one with the fewest busy slots. A slot of another process's
        worker: that process pulls (``group``)."""
        busy = set(np.flatnonzero(self.active).tolist()) | set(self.pulls) | set(self.remote)
        free = [s for s in range(len(self.slots)) if s not in busy]
        if not free:
            raise ValueError(f"decode instance {self.spec.name!r} has no free slot")
        if int(msg["max_tokens"]) < 1:
            raise ValueError(f"max_tokens={msg['max_tokens']} must be >= 1")
        per = self.pool.config.slots_per_worker
        load = [sum(1 for b in busy if b // per == w) for w in range(self.pool.config.workers)]
        slot = min(free, key=lambda s: (load[s // per], s))
        worker, _, owner = self._where(slot)
        start = time.perf_counter()
        if owner != self.me:
            fields = ("id", "transfer", "uuid", "bucket", "leaves")
            self.group.send(owner, {"op": "pull", "slot": slot, **{k: msg[k] for k in fields}})
            # the owner answers by its own pull_timeout_s
            deadline = time.monotonic() + self.config.pull_timeout_s + self.config.group_timeout_s
            self.remote[slot] = _Pull(msg, None, start, deadline)
            return
        self.pulls[slot] = self._pull(msg, slot)

    def _pull(self, msg: dict, slot: int) -> _Pull:
        """Start pulling ``msg``'s prefix onto the device of ``slot``'s worker (this
        process's), with its ``pull_timeout_s`` deadline."""
        start = time.perf_counter()
        prefix = self.puller.pull(
            msg["transfer"],
            int(msg["uuid"]),
            int(msg["bucket"]),
            msg["leaves"],
            device=self.pool.devices[self._where(slot)[0]],
        )
        return _Pull(msg, prefix, start, time.monotonic() + self.config.pull_timeout_s)

    def _ended_pulls(self):
        """Take every pull that has ended off ``self.pulls``: ``(slot, pull, failed)``, where
        ``failed`` is the message to send (empty when the arrays arrived)."""
        for slot, pull in list(self.pulls.items()):
            failed = self._pull_failed(slot, pull)
            if failed is not None:
                del self.pulls[slot]
                yield slot, pull, failed

    def _pull_failed(self, slot: int, pull: _Pull) -> dict | None:
        """Poll one of this process's pulls: None while arriving; else ``{"op": "failed"}``
        or ``{}`` (ready: arrived intact)."""
        msg = pull.msg
        if not wire.ready(pull.prefix):
            if time.monotonic() <= pull.deadline:
                return None
            self.puller.forget(msg["transfer"])
            error = (
                f"KV pull from {msg['transfer']} (offer {msg['uuid']}) did not arrive "
                f"in pull_timeout_s={self.config.pull_timeout_s}: the prefill "
                "instance died or the offer expired"
            )
            log.warning("decode %s: %s", self.spec.name, error)
            return {"op": "failed", "id": msg["id"], "error": error, "retry": True}
        try:
            jax.block_until_ready(pull.prefix)  # ready: raises if the transfer failed
        except jax.errors.JaxRuntimeError as e:  # e.g. the offering process died
            self.puller.forget(msg["transfer"])
            return {"op": "failed", "id": msg["id"], "error": f"KV pull: {e}", "retry": True}
        return {}

    def _insert(self, slot: int, prefix) -> None:
        worker, local, _ = self._where(slot)
        self.pool.insert(prefix, worker, local)
        jax.block_until_ready(self.pool.state.tokens)
        self.landed[self.me] += 1

    def _start(self, slot: int, msg: dict, pull_s: float) -> None:
        self.slots[slot] = _Slot(
            id=msg["id"],
            left=int(msg["max_tokens"]),
            eos=frozenset() if msg.get("ignore_eos") else frozenset(msg.get("eos", ())),
            logprobs=bool(msg.get("logprobs")),
        )
        self.active[slot] = True
        self.channel.send({"op": "started", "id": msg["id"], "pull_s": pull_s})

    def land(self) -> None:
        """Insert every pull whose leaves have all arrived; fail those past their deadline."""
        for slot, pull, failed in self._ended_pulls():
            if failed:
                self.channel.send(failed)
                continue
            self._insert(slot, pull.prefix)
            self._start(slot, pull.msg, time.perf_counter() - pull.start)

    def hear(self) -> None:
        """Leader: the followers' answers (their pulls); the one late pull is given up."""
        for p, msg in self.group.recv(0):
            op, slot = msg["op"], msg.get("slot")
            pull = self.remote.get(slot)
            if op in ("ready", "failed") and (pull is None or pull.msg["id"] != msg["id"]):
                if op == "ready":  # cancelled meanwhile: the owner drops what it holds
                    self.group.send(p, {"op": "drop", "slot": slot, "id": msg["id"]})
                continue
            if op == "ready":
                del self.remote[slot]
                self._issue({"op": "insert", "slot": slot, "id": msg["id"]})
                self.landed[p] += 1
                self._start(slot, pull.msg, float(msg["pull_s"]))
            elif op == "failed":
                del self.remote[slot]
                self.channel.send({k: msg[k] for k in ("op", "id", "error", "retry") if k in msg})
        now = time.monotonic()
        for slot, pull in list(self.remote.items()):
            if now > pull.deadline:
                del self.remote[slot]
                self.group.send(
                    self._where(slot)[2], {"op": "drop", "slot": slot, "id": pull.msg["id"]}
                )
                owner = self._where(slot)[2]
                error = f"process {owner} of {self.spec.name!r} never answered its KV pull"
                self.channel.send(
                    {"op": "failed", "id": pull.msg["id"], "error": error, "retry": True}
                )

    def free(self, slot: int) -> None:
        self.slots[slot], self.active[slot] = None, False

    def work(self) -> None:
        if self.group is not None:
            self.hear()
        if self.pulls:
            self.land()
        if not self.active.any():
            return
        live = [int(s) for s in np.flatnonzero(self.active)]
        start = time.perf_counter()
        tokens, lp = self._step(any(self.slots[s].logprobs for s in live))
        step_s = time.perf_counter() - start
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
            self._set_active()
        self.channel.send({"op": "tokens", "items": items, "done": done, "step_s": step_s})


class FollowerInstance(DecodeInstance):
    """A process other than 0 of a multi-process decode instance: no frontend channel; it
    runs the leader's command stream (``serve.cluster.group``) and pulls its own slots."""

    def __init__(self, config: ClusterConfig, spec: DecodeSpec, *, warm: bool = True):
        self.held: dict[int, _Pull] = {}  # arrived, waiting for the leader's insert
        super().__init__(config, spec, warm=warm, group=True)

    def serve(self) -> None:
        from serve.cluster.group import exit_now

        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: setattr(self, "_stop", True))
        self.group.watch()
        log.info("decode %s: process %d follows", self.spec.name, self.me)
        next_ack = 0.0
        try:
            while not self._stop:
                wait = 0.001 if self.pulls else self.config.heartbeat_s / 2
                for _, msg in self.group.recv(wait):
                    if msg["op"] == "stop":
                        self._stop = True
                        break
                    self.execute(msg)
                for slot, pull, failed in self._ended_pulls():
                    if failed:
                        self.group.send_leader({**failed, "slot": slot})
                    else:
                        self.held[slot] = pull
                        pull_s = time.perf_counter() - pull.start
                        ready = {"op": "ready", "slot": slot, "id": pull.msg["id"]}
                        self.group.send_leader(ready | {"pull_s": pull_s})
                now = time.monotonic()
                if now >= next_ack:
                    self.group.send_leader({"op": "ack"})
                    next_ack = now + self.config.heartbeat_s
        except BaseException as e:  # a failed collective: a peer died
            exit_now(1, f"decode {self.spec.name} process {self.me}: {type(e).__name__}: {e}")
        exit_now(0, f"decode {self.spec.name} process {self.me}: stopped")

    def execute(self, msg: dict) -> None:
        op = msg["op"]
        if op == "step":
            self.pool.step_logprobs() if msg["logprobs"] else self.pool.step()
        elif op == "active":
            self.pool.set_active(np.asarray(msg["mask"], bool))
        elif op == "insert":
            if self._where(msg["slot"])[2] != self.me:
                return  # another process's worker
            pull = self.held.pop(msg["slot"], None)
            if pull is None or pull.msg["id"] != msg["id"]:
                raise RuntimeError(f"insert of {msg} without its arrived prefix")
            self._insert(msg["slot"], pull.prefix)
        elif op == "pull":
            slot = int(msg["slot"])
            try:
                self.pulls[slot] = self._pull(msg, slot)
            except (ValueError, jax.errors.JaxRuntimeError) as e:
                failed = {"op": "failed", "slot": slot, "id": msg["id"], "error": str(e)}
                self.group.send_leader(failed)
        elif op == "drop":
            for table in (self.pulls, self.held):
                pull = table.get(msg["slot"])
                if pull is not None and pull.msg["id"] == msg["id"]:
                    del table[msg["slot"]]
        elif op != "beat":
            log.warning("decode %s process %d: unknown op %r", self.spec.name, self.me, op)
