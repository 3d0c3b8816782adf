"""Memory per worker: RSS and PSS of each gunicorn worker after loading and serving.

Usage: python bench/memory.py [--workers 2] [--dtypes int4,int8,float32] [--out ...]
Starts gunicorn with N workers (one torch thread each), sends requests until every worker has
generated (so its weights are paged in), then reads /proc/<pid>/smaps_rollup of each worker.
PSS divides shared pages among the processes mapping them: with the weights mapped from the
model cache, N workers' PSS sum stays near one copy of the weights, where RSS counts N.
"""

from __future__ import annotations

import argparse
import json
import time
import urllib.request
from pathlib import Path
from typing import Any

from serving import REPO, free_port, start_textgen, stop

from textgen.models.memory import process_memory


def call(url: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data, {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        return dict(json.loads(response.read()))


def measure(workers: int, dtype: str) -> dict[str, Any]:
    port = free_port()
    server = start_textgen(
        port,
        TEXTGEN_MODELS=f"smollm2-135m-instruct#{dtype}",
        GUNICORN_WORKERS=str(workers),
        TEXTGEN_TORCH_THREADS="1",
    )
    base = f"http://127.0.0.1:{port}"
    try:
        served: set[int] = set()
        deadline = time.monotonic() + 600
        while len(served) < workers and time.monotonic() < deadline:
            try:
                call(f"{base}/generate", {"prompt": "Hello", "max_new_tokens": 8})
                served.add(int(call(f"{base}/info")["pid"]))
            except OSError:
                time.sleep(0.2)
        if len(served) < workers:
            raise RuntimeError(f"only {len(served)} of {workers} workers answered")
        per_worker = {pid: process_memory(pid) for pid in sorted(served)}
        return {
            "dtype": dtype,
            "workers": workers,
            "per_worker": list(per_worker.values()),
            "sum_rss_mib": round(sum(w["rss_mib"] for w in per_worker.values()), 1),
            "sum_pss_mib": round(sum(w["pss_mib"] for w in per_worker.values()), 1),
        }
    finally:
        stop(server)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--dtypes", default="int4,int8,float32")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "out" / "memory.json")
    args = parser.parse_args()
    results = []
    for dtype in args.dtypes.split(","):
        for workers in (1, args.workers):
            result = measure(workers, dtype)
            print(json.dumps(result), flush=True)
            results.append(result)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
