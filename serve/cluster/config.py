"""One YAML file describes a whole cluster: the frontend, the prefill and decode instances.

    policy: sun                  # or conventional: each decode instance names its model
    export: runs/tiny            # the export every instance loads (one decode tree)
    host: 127.0.0.1              # where every port binds unless an instance says otherwise
    frontend: {port: 8000, control_port: 5555}
    prefill:
      - {name: p0, tasks: [math, code]}
    decode:
      - {name: d0}               # conventional: {name: d0, model: math}
      - {name: d1}

``reprefill_lost: true`` (``--reprefill-lost``) re-runs the requests of a lost instance on the
survivors instead of failing them (see ``frontend``).

``allow_model_management: true`` with ``export_root: DIR`` turns on ``POST /v1/models/load``
and ``/unload`` (SUN only): a prefill instance loads the module, from a path it can read.

``sunjax cluster --config FILE`` starts every role on this host; ``--role decode --name d1``
starts one instance (another host, or a restart). Instances connect to the frontend's
control port; each also binds a transfer server (``transfer_port``, 0 = any free port).

A decode instance may span several processes that form one JAX mesh (``jax.distributed``)::

    decode:
      - {name: d0, processes: 2, devices: 2}   # 2 processes x 2 devices = 4 workers

``devices`` is how many devices each process uses (on the CPU: how many host devices it
makes); the instance's ``slots`` are spread over all of them. Process 0 (the leader) talks to
the frontend and drives the others; it also hosts the ``jax.distributed`` coordinator on
``coordinator_host:coordinator_port`` (default: the instance's host, and a free port the
launcher picks; across hosts set both). ``group_timeout_s``: a process of such an instance
whose peers are silent this long exits (the frontend then loses the instance).
"""

from __future__ import annotations

import dataclasses
import os
import re

import yaml

POLICIES = ("sun", "conventional")
_NAME = re.compile(r"[A-Za-z0-9_.-]+")


@dataclasses.dataclass(frozen=True, kw_only=True)
class PrefillSpec:
    name: str
    tasks: tuple[str, ...]
    host: str | None = None  # transfer server bind address (default: the cluster's host)
    transfer_port: int = 0


@dataclasses.dataclass(frozen=True, kw_only=True)
class DecodeSpec:
    name: str
    model: str | None = None  # conventional: the one model this instance decodes
    host: str | None = None
    transfer_port: int = 0
    processes: int = 1  # > 1: one JAX mesh over this many processes (jax.distributed)
    devices: int = 1  # devices each process uses (CPU: host devices it makes)
    coordinator_host: str | None = None  # process 0's address (default: host)
    coordinator_port: int = 0  # jax.distributed coordinator; 0: the launcher picks one
    group_port: int = 0  # the leader's command stream to the other processes; 0: any free


@dataclasses.dataclass(frozen=True, kw_only=True)
class ClusterConfig:
    policy: str = "sun"
    export: str
    host: str = "127.0.0.1"
    port: int = 8000  # the OpenAI-compatible HTTP API
    control_port: int = 5555  # ZeroMQ: instances connect here
    frontend_host: str | None = None  # where instances find the frontend (default: host)
    prefill: tuple[PrefillSpec, ...]
    decode: tuple[DecodeSpec, ...]
    slots: int = 8  # decode slots per decode instance
    max_len: int = 512
    min_bucket: int = 16
    max_queue: int = 256
    heartbeat_s: float = 0.2  # every instance says it is alive this often
    lost_after_s: float = 2.0  # silent this long: lost, its in-flight requests fail
    offer_timeout_s: float = 30.0  # an offered prefix nobody confirmed is freed after this
    pull_timeout_s: float = 10.0  # a decode instance gives up a KV pull after this
    group_timeout_s: float = 10.0  # multi-process decode: a peer silent this long ends it
    reprefill_lost: bool = False  # re-run a lost instance's requests instead of failing them
    log_level: str = "warning"
    allow_model_management: bool = False  # POST /v1/models/load|unload (SUN only)
    export_root: str | None = None  # where /v1/models/load may read exports from

    def __post_init__(self):
        if self.policy not in POLICIES:
            raise ValueError(f"policy={self.policy!r} must be one of {POLICIES}")
        if not self.prefill:
            raise ValueError("the cluster needs at least one prefill instance")
        if not self.decode:
            raise ValueError("the cluster needs at least one decode instance")
        names = [s.name for s in (*self.prefill, *self.decode)]
        for name in names:
            if not _NAME.fullmatch(name):
                raise ValueError(f"instance name {name!r} must match {_NAME.pattern}")
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"instance names must be unique; repeated: {dup}")
        for s in self.prefill:
            if not s.tasks:
                raise ValueError(f"prefill instance {s.name!r} holds no tasks")
        for name in ("slots", "max_len", "min_bucket"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if self.min_bucket > self.max_len:
            raise ValueError(f"min_bucket={self.min_bucket} exceeds max_len={self.max_len}")
        if not 0 < self.heartbeat_s < self.lost_after_s:
            raise ValueError(
                f"need 0 < heartbeat_s={self.heartbeat_s} < lost_after_s={self.lost_after_s}"
            )
        for name in ("offer_timeout_s", "pull_timeout_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}={getattr(self, name)} must be > 0")
        if self.group_timeout_s <= self.heartbeat_s:
            raise ValueError(
                f"group_timeout_s={self.group_timeout_s} must exceed heartbeat_s={self.heartbeat_s}"
            )
        for s in self.decode:
            for name in ("processes", "devices"):
                value = getattr(s, name)
                if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                    raise ValueError(f"decode instance {s.name!r}: {name}={value!r} must be >= 1")
            for name in ("transfer_port", "coordinator_port", "group_port"):
                value = getattr(s, name)
                if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 65536:
                    raise ValueError(
                        f"decode instance {s.name!r}: {name}={value!r} must be a port in "
                        "[0, 65535] (0: any free port)"
                    )
        tasks = self.tasks
        models = [s.model for s in self.decode]
        if self.policy == "sun" and any(m is not None for m in models):
            raise ValueError(f"policy sun: decode instances share one tree; drop model={models}")
        if self.policy == "conventional":
            for s in self.decode:
                if s.model not in tasks:
                    raise ValueError(
                        f"conventional decode instance {s.name!r} has model={s.model!r}; "
                        f"it must be one of the prefill tasks {sorted(tasks)}"
                    )
            orphans = sorted(set(tasks) - set(models))
            if orphans:
                raise ValueError(f"conventional: no decode instance decodes {orphans}")

    @property
    def tasks(self) -> tuple[str, ...]:
        """Every task some prefill instance serves, in order of first mention."""
        return tuple(dict.fromkeys(t for s in self.prefill for t in s.tasks))

    @property
    def control_address(self) -> str:
        return f"tcp://{self.frontend_host or self.host}:{self.control_port}"

    def instance(self, name: str) -> PrefillSpec | DecodeSpec:
        for s in (*self.prefill, *self.decode):
            if s.name == name:
                return s
        known = [s.name for s in (*self.prefill, *self.decode)]
        raise ValueError(f"no instance named {name!r} in the cluster config; it has {known}")


def _spec(cls, raw, where: str):
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: each entry must be a mapping, got {raw!r}")
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - fields)
    if unknown:
        raise ValueError(f"{where}: unknown keys {unknown}; allowed: {sorted(fields)}")
    if "tasks" in raw:
        raw = {**raw, "tasks": tuple(raw["tasks"])}
    return cls(**raw)


def cluster_config(raw: dict, base_dir: str = ".") -> ClusterConfig:
    """A ``ClusterConfig`` from a parsed YAML mapping; ``export`` is resolved against
    ``base_dir`` when relative."""
    raw = dict(raw)
    front = raw.pop("frontend", {}) or {}
    for key in ("port", "control_port", "host"):
        if key in front:
            raw["frontend_host" if key == "host" else key] = front[key]
    fields = {f.name for f in dataclasses.fields(ClusterConfig)}
    unknown = sorted(set(raw) - fields)
    if unknown:
        raise ValueError(f"unknown cluster config keys {unknown}; allowed: {sorted(fields)}")
    if "export" not in raw:
        raise ValueError("the cluster config needs export: <export directory>")
    raw["export"] = os.path.normpath(os.path.join(base_dir, str(raw["export"])))
    raw["prefill"] = tuple(
        _spec(PrefillSpec, s, f"prefill[{i}]") for i, s in enumerate(raw.get("prefill") or ())
    )
    raw["decode"] = tuple(
        _spec(DecodeSpec, s, f"decode[{i}]") for i, s in enumerate(raw.get("decode") or ())
    )
    return ClusterConfig(**raw)


def load_cluster_config(path: str, **overrides) -> ClusterConfig:
    """Read ``path`` (YAML); ``overrides`` replace top-level keys (e.g. ``export``)."""
    with open(path) as f:
        raw = yaml.safe_load(f) or {}
    raw.update({k: v for k, v in overrides.items() if v is not None})
    return cluster_config(raw, os.getcwd())
