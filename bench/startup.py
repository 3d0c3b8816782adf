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
import statistics
import tempfile
import time
from pathlib import Path

from serving import REPO, free_port, start_textgen, stop, wait_ready


def time_to_ready(cache: Path, timeout: float = 600) -> float:
    """Seconds from launching gunicorn until /health answers 200."""
    port = free_port()
    started = time.monotonic()
    process = start_textgen(port, TEXTGEN_MODEL_CACHE=str(cache))
    try:
        wait_ready(f"http://127.0.0.1:{port}/health", process, timeout, poll=0.1)
        return time.monotonic() - started
    finally:
        stop(process)


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
