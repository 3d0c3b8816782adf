"""The reliability issue's probes, rerun against gunicorn on the embedded model with default
settings: 200 concurrent streams, 40 slow clients, and peak worker RSS under echoed logprobs,
large JSON schemas and 500 varied requests. Prints one JSON object (bench/RESULTS.md quotes it).

    .venv/bin/python bench/reliability_probe.py [--cache DIR] [--probes streams,slow,...]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import requests

REPO = Path(__file__).resolve().parent.parent


def start(cache: str, port: int) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TEXTGEN_", "GUNICORN_"))}
    env |= {"TEXTGEN_MODEL_CACHE": cache, "TEXTGEN_BIND": f"127.0.0.1:{port}"}
    process = subprocess.Popen(
        [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", "wsgi:app"],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    for _ in range(1200):
        try:
            if requests.get(f"{url}/health", timeout=5).status_code == 200:
                return process
        except requests.RequestException:
            pass
        time.sleep(0.5)
    raise SystemExit("the server did not become ready")


def rss(pid: int) -> dict[str, float]:
    fields = dict(
        line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
    )
    mib = {k: int(fields[k].split()[0]) / 1024 for k in ("VmRSS", "VmHWM")}
    return {"rss_mib": round(mib["VmRSS"], 1), "peak_mib": round(mib["VmHWM"], 1)}


def streams(url: str, count: int) -> dict[str, Any]:
    """``count`` concurrent streams: statuses and each one's time to first byte.

    One asyncio loop drives every connection (raw HTTP/1.1): client threads would share the
    GIL and the two cores with the server, and their own scheduling would be counted as the
    server's time to first byte."""
    return asyncio.run(concurrent_streams(url, count))


async def concurrent_streams(url: str, count: int) -> dict[str, Any]:
    host, port = url.removeprefix("http://").split(":")
    payload = json.dumps(
        {"prompt": "Tell me a story.", "chat": True, "max_new_tokens": 32, "stream": True}
    ).encode()
    request = (
        b"POST /generate HTTP/1.1\r\nHost: p\r\nContent-Type: application/json\r\n"
        + f"Connection: close\r\nContent-Length: {len(payload)}\r\n\r\n".encode()
        + payload
    )
    connections = [await asyncio.open_connection(host, int(port)) for _ in range(count)]

    async def one(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> tuple[int, float]:
        started = time.monotonic()
        writer.write(request)
        await writer.drain()
        first = await reader.read(1)
        ttfb = time.monotonic() - started
        rest = await reader.read()
        writer.close()
        status = int((first + rest).split(b" ", 2)[1]) if first else 0
        return status, ttfb

    results = await asyncio.gather(*(one(r, w) for r, w in connections))
    by_status: dict[int, list[float]] = {}
    for status, ttfb in results:
        by_status.setdefault(status, []).append(ttfb)
    return {
        str(s): {
            "count": len(v),
            "ttfb_p50_s": round(statistics.median(v), 3),
            "ttfb_max_s": round(max(v), 3),
        }
        for s, v in sorted(by_status.items())
    }


def slow_clients(url: str, count: int = 40) -> dict[str, Any]:
    """``count`` clients trickling headers or a body while /health and a small generation run."""
    host, port = url.removeprefix("http://").split(":")
    socks = []
    for n in range(count):
        sock = socket.create_connection((host, int(port)))
        if n % 2:
            sock.sendall(b"POST /generate HTTP/1.1\r\nHost: p\r\nContent-Length: 100000\r\n\r\n{")
        else:
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: p\r\n")
        socks.append(sock)
    stop = threading.Event()

    def trickle() -> None:
        while not stop.wait(2):
            for sock in socks:
                try:
                    sock.send(b"a")
                except OSError:
                    pass

    threading.Thread(target=trickle, daemon=True).start()
    health, small = [], []
    try:
        for _ in range(10):
            t = time.monotonic()
            health.append(
                (requests.get(f"{url}/health", timeout=60).status_code, time.monotonic() - t)
            )
            t = time.monotonic()
            r = requests.post(
                f"{url}/generate", json={"prompt": "Hi", "max_new_tokens": 4}, timeout=60
            )
            small.append((r.status_code, time.monotonic() - t))
    finally:
        stop.set()
        for sock in socks:
            sock.close()
    return {
        "health_statuses": sorted({s for s, _ in health}),
        "health_max_s": round(max(t for _, t in health), 3),
        "generate_statuses": sorted({s for s, _ in small}),
        "generate_max_s": round(max(t for _, t in small), 3),
    }


def echo_probe(url: str, pid: int) -> dict[str, Any]:
    before = rss(pid)
    prompt = " ".join(f"word{i}" for i in range(800))  # about 2,400 tokens
    body = {
        "model": "smollm2-135m-instruct",
        "prompt": prompt,
        "echo": True,
        "logprobs": 1,
        "max_tokens": 1,
    }
    r = requests.post(f"{url}/v1/completions", json=body, timeout=600)
    tokens = r.json()["usage"]["prompt_tokens"] if r.status_code == 200 else None
    return {"status": r.status_code, "prompt_tokens": tokens, "before": before, "after": rss(pid)}


def schema_probe(url: str, pid: int) -> dict[str, Any]:
    before = rss(pid)
    statuses = []
    for k in range(5):
        values = [f"v{k}-{i}" for i in range(15000)]
        fmt = {
            "type": "json_schema",
            "json_schema": {"name": "e", "schema": {"type": "string", "enum": values}},
        }
        body = {
            "messages": [{"role": "user", "content": "pick"}],
            "max_tokens": 4,
            "response_format": fmt,
        }
        r = requests.post(f"{url}/v1/chat/completions", json=body, timeout=600)
        statuses.append(r.status_code)
    return {"statuses": statuses, "before": before, "after": rss(pid)}


def varied_probe(url: str, pid: int, count: int = 500) -> dict[str, Any]:
    before = rss(pid)
    rng = random.Random(0)
    statuses: dict[int, int] = {}
    for _ in range(count):
        words = " ".join(
            rng.choice(["cat", "sea", "red", "run", "sky"]) for _ in range(rng.randint(1, 60))
        )
        body = {
            "prompt": words,
            "max_new_tokens": rng.randint(1, 8),
            "strategy": rng.choice(["greedy", "sampling", "top_k"]),
            "seed": rng.randint(0, 9),
        }
        r = requests.post(f"{url}/generate", json=body, timeout=600)
        statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
    return {"statuses": statuses, "before": before, "after": rss(pid)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cache", default=str(REPO / ".cache" / "test-models"))
    parser.add_argument("--port", type=int, default=8950)
    parser.add_argument("--probes", default="streams,slow,echo,schema,varied")
    args = parser.parse_args()
    chosen = args.probes.split(",")
    process = start(args.cache, args.port)
    url = f"http://127.0.0.1:{args.port}"
    try:
        pid = requests.get(f"{url}/info", timeout=10).json()["pid"]
        probes: dict[str, Any] = {
            "streams": ("streams_200", lambda: streams(url, 200)),
            "slow": ("slow_clients_40", lambda: slow_clients(url)),
            "echo": ("echo", lambda: echo_probe(url, pid)),
            "schema": ("schema", lambda: schema_probe(url, pid)),
            "varied": ("varied_500", lambda: varied_probe(url, pid)),
        }
        cpu = next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
        out: dict[str, Any] = {"cpu": cpu}
        for name in chosen:
            key, probe = probes[name]
            out[key] = probe()
        print(json.dumps(out, indent=2))
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=120)


if __name__ == "__main__":
    main()
