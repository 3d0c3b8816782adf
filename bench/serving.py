"""What the benchmarks share: starting textgen under gunicorn, waiting for it, stopping it."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_textgen(port: int, **env: str) -> subprocess.Popen[bytes]:
    """gunicorn serving textgen on ``port``, with only the given TEXTGEN_* settings (and the
    caller's TEXTGEN_MODEL_CACHE, where the models are prepared)."""
    clean = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("TEXTGEN_") or k == "TEXTGEN_MODEL_CACHE"
    }
    clean.update(env, TEXTGEN_BIND=f"127.0.0.1:{port}")
    return subprocess.Popen(
        [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", "wsgi:app"],
        cwd=REPO,
        env=clean,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def wait_ready(
    url: str, process: subprocess.Popen[bytes], timeout: float = 900, poll: float = 0.5
) -> None:
    """Until ``url`` answers 200; fails if the server exits or the time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(poll)
    raise TimeoutError(url)


def stop(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM to the process group (llama.cpp's script starts children), else the process."""
    try:
        os.killpg(process.pid, signal.SIGTERM)
    except (ProcessLookupError, PermissionError):
        process.send_signal(signal.SIGTERM)
    process.wait(timeout=60)
