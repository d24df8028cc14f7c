"""``sunjax cluster`` as subprocesses on free localhost ports: the cluster tests and the cluster
benchmark drive it over HTTP, kill instances and restart them.

>>> with LocalCluster(export_root, policy="sun", prefill={"p0": ["math"]}, decode=["d0"]) as c:
...     c.client().completions.create(model="math", prompt="Hi", max_tokens=4)
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time

import httpx
import psutil
import yaml

from apps.remote_server import REPO, RemoteServer, free_port


class LocalCluster(RemoteServer):
    """A launcher subprocess (frontend + every instance) from a YAML this class writes."""

    def __init__(
        self,
        export: str,
        *,
        policy: str = "sun",
        prefill: dict[str, list[str]],
        decode: list[str] | dict[str, str],
        decode_options: dict[str, dict] | None = None,
        compile_cache: str | None = None,
        startup_timeout: float = 300.0,
        **settings,
    ):
        """``decode``: names (SUN) or ``{name: model}`` (conventional); ``decode_options``:
        more keys of some decode instances (``{"d0": {"processes": 2}}``); ``settings``: any
        other top-level key of the cluster config (slots, max_len, lost_after_s, ...)."""
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.api_key = None
        self.startup_timeout = startup_timeout
        conventional = isinstance(decode, dict)
        config = {
            "policy": policy,
            "export": export,
            "frontend": {"port": self.port, "control_port": free_port()},
            "prefill": [{"name": n, "tasks": list(t)} for n, t in prefill.items()],
            "decode": [
                {"name": n} | ({"model": m} if m else {}) | (decode_options or {}).get(n, {})
                for n, m in (decode.items() if conventional else ((n, None) for n in decode))
            ],
            **settings,
        }
        self.dir = tempfile.TemporaryDirectory(prefix="sunjax-cluster-")
        self.config_path = os.path.join(self.dir.name, "cluster.yaml")
        with open(self.config_path, "w") as f:
            yaml.safe_dump(config, f)
        self.env = {**os.environ, "PYTHONPATH": REPO}
        if compile_cache:
            self.env |= {
                "JAX_COMPILATION_CACHE_DIR": compile_cache,
                "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
                "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
            }
        self.log = open(os.path.join(self.dir.name, "cluster.log"), "w+")
        self.proc = subprocess.Popen(
            self.command(), stdout=self.log, stderr=subprocess.STDOUT, env=self.env
        )
        self.extra: list[subprocess.Popen] = []  # restarted instances
        self.decode_names = [d["name"] for d in config["decode"]]

    def command(self, *role: str) -> list[str]:
        return [sys.executable, "-m", "sunjax.cli", "cluster", "--config", self.config_path, *role]

    def health(self) -> dict:
        return httpx.get(f"{self.url}/health", timeout=10).json()

    def wait_up(self, names: list[str] | None = None, timeout: float | None = None) -> dict:
        """Wait until ``names`` (default: every instance) heartbeat; returns ``/health``."""
        deadline = time.monotonic() + (timeout or self.startup_timeout)
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"cluster exited with {self.proc.returncode}:\n{self.output()}")
            try:
                h = self.health()
                if "instances" in h and not set(names or h["instances"]) & set(h["down"]):
                    return h
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise TimeoutError(f"instances not up in time:\n{self.output()[-5000:]}")

    def wait_ready(self) -> LocalCluster:
        self.wait_up()
        return self

    def process(self, name: str, process_id: int | None = None) -> psutil.Process:
        """The process running instance ``name`` (of a decode instance over several
        processes: its process ``process_id``)."""
        for p in psutil.Process(self.proc.pid).children(recursive=True) + [
            psutil.Process(e.pid) for e in self.extra if e.poll() is None
        ]:
            try:
                cmd = p.cmdline()
            except psutil.NoSuchProcess:
                continue
            if "--name" not in cmd or cmd[cmd.index("--name") + 1] != name:
                continue
            pid = cmd[cmd.index("--process-id") + 1] if "--process-id" in cmd else None
            if process_id is None or pid == str(process_id):
                return p
        raise LookupError(f"no live process for instance {name!r} (process {process_id})")

    def processes(self) -> list[psutil.Process]:
        return psutil.Process(self.proc.pid).children(recursive=True)

    def kill(self, name: str, sig: int = signal.SIGKILL, process_id: int | None = None) -> None:
        p = self.process(name, process_id)
        p.send_signal(sig)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # gone, or a zombie its parent has not reaped
            try:
                if p.status() == psutil.STATUS_ZOMBIE:
                    return
            except psutil.NoSuchProcess:
                return
            time.sleep(0.01)
        raise TimeoutError(f"instance {name!r} (pid {p.pid}) outlived signal {sig}")

    def restart(self, name: str) -> None:
        """Start instance ``name`` again (as another host would: one role, same YAML)."""
        role = "decode" if name in self.decode_names else "prefill"
        self.extra.append(
            subprocess.Popen(
                self.command("--role", role, "--name", name),
                stdout=self.log,
                stderr=subprocess.STDOUT,
                env=self.env,
            )
        )

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int:
        for p in self.extra:
            if p.poll() is None:
                p.terminate()
        rc = super().stop(sig, timeout)
        for p in self.extra:
            try:
                p.wait(timeout)
            except subprocess.TimeoutExpired:
                p.kill()
        return rc

    def __exit__(self, *exc) -> None:
        self.stop()
        self.log.close()
        self.dir.cleanup()
