"""Time from `gunicorn` launch to /health 200: first start (empty cache) vs later starts.

Usage: python bench/startup.py [--warm-runs N] [--out bench/out/startup.json]
The first start converts the embedded GGUF into a fresh cache; later starts load the cached
safetensors. Absolute seconds depend on the machine; the ratio is the number to compare.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def time_to_ready(cache: Path, timeout: float = 600) -> float:
    """Seconds from launching gunicorn until /health answers 200."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("TEXTGEN_")}
    env.update(TEXTGEN_BIND=f"127.0.0.1:{port}", TEXTGEN_MODEL_CACHE=str(cache))
    started = time.monotonic()
    process = subprocess.Popen(
        [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", "wsgi:app"],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        while time.monotonic() - started < timeout:
            if process.poll() is not None:
                raise RuntimeError(f"gunicorn exited with {process.returncode}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=10) as r:
                    if r.status == 200:
                        return time.monotonic() - started
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.1)
        raise TimeoutError("not ready in time")
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--warm-runs", type=int, default=3)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "out" / "startup.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="textgen-bench-cache-") as tmp:
        cache = Path(tmp)
        cold = time_to_ready(cache)
        warm = [time_to_ready(cache) for _ in range(args.warm_runs)]
    result = {
        "machine": f"{platform.machine()}, {len(os.sched_getaffinity(0))} cores",
        "python": platform.python_version(),
        "cold_start_s": round(cold, 2),
        "warm_start_s": [round(w, 2) for w in warm],
        "warm_start_median_s": round(statistics.median(warm), 2),
        "cold_over_warm": round(cold / statistics.median(warm), 2),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
