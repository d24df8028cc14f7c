"""``sunjax serve`` as a subprocess on a free localhost port: the server tests, the soak
script and ``sunjax bench http`` drive it the way users do, over HTTP.

>>> with RemoteServer(["--export", root, "--api-key", "k"], api_key="k") as server:
...     server.client().models.list()
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

import httpx

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RemoteServer:
    def __init__(
        self,
        args: list[str],
        *,
        api_key: str | None = None,
        env: dict[str, str] | None = None,
        compile_cache: str | None = None,
        startup_timeout: float = 300.0,
    ):
        """``compile_cache``: a JAX persistent compilation cache directory, so a second
        server with the same shapes starts without compiling."""
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.api_key = api_key
        self.log = tempfile.NamedTemporaryFile("w+", prefix="sunjax-serve-", suffix=".log")
        full_env = {**os.environ, "PYTHONPATH": REPO, **(env or {})}
        if compile_cache:
            full_env |= {
                "JAX_COMPILATION_CACHE_DIR": compile_cache,
                "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
                "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
            }
        cmd = [sys.executable, "-m", "sunjax.cli", "serve", "--port", str(self.port), *args]
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=full_env)
        self.startup_timeout = startup_timeout

    def wait_ready(self) -> RemoteServer:
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.output()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise TimeoutError(f"server not ready in {self.startup_timeout} s:\n{self.output()}")

    def output(self) -> str:
        self.log.flush()
        with open(self.log.name) as f:
            return f.read()

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def client(self, **kwargs):
        import openai

        return openai.OpenAI(
            base_url=f"{self.url}/v1", api_key=self.api_key or "none", max_retries=0, **kwargs
        )

    def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        """``{(sample name, sorted labels): value}`` from ``/metrics``."""
        from prometheus_client.parser import text_string_to_metric_families

        text = httpx.get(f"{self.url}/metrics", timeout=10).text
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }

    def gauge_sum(self, name: str) -> float:
        return sum(v for (n, _), v in self.metrics().items() if n == name)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def __enter__(self) -> RemoteServer:
        return self.wait_ready()

    def __exit__(self, *exc) -> None:
        self.stop()
        self.log.close()
