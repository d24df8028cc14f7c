"""Runs untrusted Python (model completions plus hidden tests) in a throwaway subprocess.

The program runs as `python -I -S` in a fresh temporary directory (its working directory) with a
minimal environment, no stdin, and stdout/stderr discarded, under address-space, file-size and
CPU-time limits. On timeout the whole process group is killed. This guards the caller against
hangs, crashes, huge output and stray files; it is not a security boundary against hostile code.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

DEFAULT_TIMEOUT_S = 5.0
_MEMORY_LIMIT_BYTES = 2 << 30
_FILE_SIZE_LIMIT_BYTES = 16 << 20

# Sets the limits, then runs program.py as __main__. The program is compiled on its own, so a
# `from __future__` import at its top still works.
_LAUNCHER = """\
import resource
resource.setrlimit(resource.RLIMIT_AS, ({mem}, {mem}))
resource.setrlimit(resource.RLIMIT_FSIZE, ({fsize}, {fsize}))
resource.setrlimit(resource.RLIMIT_CPU, ({cpu}, {cpu}))
with open("program.py", encoding="utf-8") as f:
    code = compile(f.read(), "program.py", "exec")
exec(code, {{"__name__": "__main__", "__builtins__": __builtins__}})
"""

_FENCE = re.compile(r"```[ \t]*([\w+-]*)[^\n]*\n(.*?)(?:```|\Z)", re.DOTALL)


def extract_code(completion: str) -> str:
    """The code in a completion: its first ```python (or unlabelled) fenced block if it has one,
    else its first fenced block of any language, else the whole text. An unclosed fence runs to
    the end of the text."""
    blocks = _FENCE.findall(completion)
    if not blocks:
        return completion
    for lang, body in blocks:
        if lang.lower() in ("", "python", "py", "python3"):
            return body
    return blocks[0][1]


def run_python(source: str, *, timeout_s: float = DEFAULT_TIMEOUT_S) -> bool:
    """True if `source` runs to completion with exit status 0 within `timeout_s` seconds."""
    if timeout_s <= 0:
        raise ValueError(f"{timeout_s=} must be positive")
    launcher = _LAUNCHER.format(
        mem=_MEMORY_LIMIT_BYTES, fsize=_FILE_SIZE_LIMIT_BYTES, cpu=int(timeout_s) + 1
    )
    with tempfile.TemporaryDirectory(prefix="sunjax-sandbox-") as tmp:
        try:
            Path(tmp, "program.py").write_text(source, encoding="utf-8")
        except UnicodeEncodeError:
            return False
        proc = subprocess.Popen(
            [sys.executable, "-I", "-S", "-c", launcher],
            cwd=tmp,
            env={"PATH": os.defpath, "LANG": "C.UTF-8", "HOME": tmp},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        try:
            return proc.wait(timeout=timeout_s) == 0
        except subprocess.TimeoutExpired:
            return False
        finally:
            if proc.returncode is None:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait()
