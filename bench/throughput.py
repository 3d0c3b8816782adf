"""Closed-loop throughput and latency: textgen against llama.cpp's server, same run.

Workload (as in shared/ANCHORS.md): greedy decoding of 128 new tokens per request with EOS
ignored, short prompts, C concurrent streaming clients, C in 1, 4, 16. Reports output tokens/s,
requests/s, time to first token p50/p95 and inter-token latency p50/p95 per server and C, and
an in-process `model.generate()` run (the design before the engine) as the C=1 "before" anchor.
At C=1 each server also gets its bandwidth ceiling: the weight bytes one token reads (textgen's
/models, llama.cpp's GGUF size) divided into the memory read speed measured in the same run.

Usage: python bench/throughput.py [--levels 1,4,16] [--requests-per-client 2] [--no-llama]
       [--dtypes float32,bfloat16,int8]
       [--fused]  (also TEXTGEN_DETERMINISTIC=false: fused, not batch-invariant, attention)
       [--bits8]  (also TEXTGEN_ACTIVATION_BITS=8: activations at llama.cpp's 8 bits)
       python bench/throughput.py --source DIR --gguf FILE [--dtypes int8]  (a model of
       bench/shapes.py: textgen serves DIR, llama.cpp FILE, drafts off, no generate() anchor)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from serving import REPO, free_port, start_textgen, stop, wait_ready

ANCHOR = REPO.parent / "shared" / "anchors" / "llama-server.sh"
NEW_TOKENS = 128
TOPICS = ["the sea", "a robot", "autumn", "a city", "bread", "a library", "mountains", "time"]


def stream_request(url: str, body: dict[str, Any]) -> tuple[float, list[float], int]:
    """POST a streaming request; (time to first text, gaps between text events, tokens)."""
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    started = time.perf_counter()
    stamps: list[float] = []
    tokens = 0
    with urllib.request.urlopen(request, timeout=600) as response:
        for raw in response:
            line = raw.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            text = event.get("text")
            if text is None and event.get("choices"):
                text = event["choices"][0].get("text")
            if text:
                stamps.append(time.perf_counter())
            tokens = event.get("completion_tokens") or tokens
            usage = event.get("usage") or {}
            tokens = usage.get("completion_tokens") or tokens
    gaps = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
    return (stamps[0] - started if stamps else float("nan")), gaps, tokens or NEW_TOKENS


def run_level(
    make: Callable[[int], tuple[str, dict[str, Any]]], clients: int, per_client: int
) -> dict[str, Any]:
    """C clients in a closed loop, each sending ``per_client`` requests back to back."""
    ttfts: list[float] = []
    gaps: list[float] = []
    tokens = [0]
    lock = threading.Lock()

    def client(number: int) -> None:
        for i in range(per_client):
            url, body = make(number * per_client + i)
            first, between, count = stream_request(url, body)
            with lock:
                ttfts.append(first)
                gaps.extend(between)
                tokens[0] += count

    threads = [threading.Thread(target=client, args=(n,)) for n in range(clients)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - started
    return {
        "clients": clients,
        "requests": clients * per_client,
        "output_tokens_per_s": round(tokens[0] / elapsed, 1),
        "requests_per_s": round(clients * per_client / elapsed, 3),
        "ttft_p50_s": round(quantile(ttfts, 0.5), 3),
        "ttft_p95_s": round(quantile(ttfts, 0.95), 3),
        "itl_p50_ms": round(1000 * quantile(gaps, 0.5), 1),
        "itl_p95_ms": round(1000 * quantile(gaps, 0.95), 1),
    }


def quantile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def prompt(i: int) -> str:
    return f"Write a story about {TOPICS[i % len(TOPICS)]}."


def textgen_body(i: int) -> dict[str, Any]:
    return {
        "prompt": prompt(i),
        "strategy": "greedy",
        "max_new_tokens": NEW_TOKENS,
        "ignore_eos": True,
        "stream": True,
    }


def llama_body(i: int) -> dict[str, Any]:
    return {
        "prompt": prompt(i),
        "max_tokens": NEW_TOKENS,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
    }


def measure(
    name: str, url: str, body: Callable[[int], dict[str, Any]], levels: list[int], per: int
) -> list[dict[str, Any]]:
    stream_request(url, body(0))  # warm-up
    results = []
    for clients in levels:
        result = {"server": name, **run_level(lambda i: (url, body(i)), clients, per)}
        print(json.dumps(result), flush=True)
        results.append(result)
    return results


def generate_baseline() -> dict[str, Any]:
    """The design before the engine: one model.generate() per request, in process, C=1."""
    code = f"""
import json, time, torch
from textgen.config import load_settings
from textgen.models.cache import ModelCache
from textgen.models.loading import load_model
from textgen.models.specs import make_spec
settings = load_settings({{}})
spec = make_spec("smollm2-135m-instruct", dtype="float32")  # the seeds' design: fp32
loaded = load_model(spec, ModelCache(settings.model_cache))
enc = loaded.tokenizer("Write a story about the sea.", return_tensors="pt")
kwargs = dict(do_sample=False, max_new_tokens={NEW_TOKENS}, min_new_tokens={NEW_TOKENS},
              pad_token_id=loaded.pad_token_id)
with torch.inference_mode():
    loaded.model.generate(**enc, **kwargs)
    started = time.perf_counter()
    for _ in range(2):
        loaded.model.generate(**enc, **kwargs)
rate = 2 * {NEW_TOKENS} / (time.perf_counter() - started)
print(json.dumps({{"output_tokens_per_s": round(rate, 1)}}))
"""
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True
    )
    return {
        "server": "model.generate() per request, fp32 (before the engine)",
        "clients": 1,
        **json.loads(out.stdout.strip().splitlines()[-1]),
    }


def memory_read_bandwidth() -> float:
    """Bytes/s this machine streams from memory: the best of 5 sums over 1 GiB of float32, on
    every core (a decode step at one row must read every weight once, so weight bytes per token
    divided into this is a ceiling on tokens/s)."""
    code = """
import time, torch
x = torch.ones(2**28)
best = min((lambda t: (x.sum(), time.perf_counter() - t)[1])(time.perf_counter()) for _ in range(5))
print(x.nbytes / best)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip())


def with_weight_bytes(results: list[dict[str, Any]], weight_bytes: int) -> list[dict[str, Any]]:
    return [{**r, "weights_read_per_token_mb": round(weight_bytes / 1e6, 1)} for r in results]


def served_weight_bytes(port: int) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/models", timeout=30) as response:
        return int(json.load(response)["models"][0]["decode_weight_bytes"])


def embedded_gguf_path() -> Path:
    from textgen.models.sources import embedded_gguf
    from textgen.models.specs import make_spec

    return embedded_gguf(make_spec("smollm2-135m-instruct"))


def start_llama(
    port: int, gguf: Path, flags: tuple[str, ...] = ("-np", "16", "-c", "16384")
) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        ["bash", str(ANCHOR), str(gguf), str(port), *flags],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


def served(source: Path | None, dtype: str | None) -> dict[str, str]:
    """textgen's settings for a weight format of the embedded model or of ``source`` (whose
    random weights make drafts meaningless: off)."""
    if source is None:
        return {} if dtype is None else {"TEXTGEN_MODELS": f"smollm2-135m-instruct#{dtype}"}
    entry = {"name": source.name, "source": str(source.resolve()), "dtype": dtype or "int8"}
    return {"TEXTGEN_MODELS": json.dumps([entry]), "TEXTGEN_DRAFT_TOKENS": "0"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--levels", default="1,4,16")
    parser.add_argument("--requests-per-client", type=int, default=2)
    parser.add_argument("--no-llama", action="store_true")
    parser.add_argument("--dtypes", help="weight formats to compare, e.g. float32,bfloat16,int8")
    parser.add_argument(
        "--stock-worker",
        action="store_true",
        help="also measure gunicorn's own gthread worker (the request path before textgen's)",
    )
    parser.add_argument(
        "--fused",
        action="store_true",
        help="also measure PyTorch's fused attention (TEXTGEN_DETERMINISTIC=false)",
    )
    parser.add_argument(
        "--bits8",
        action="store_true",
        help="also measure 8-bit activations in textgen's kernels (TEXTGEN_ACTIVATION_BITS=8)",
    )
    parser.add_argument("--source", type=Path, help="a model directory (bench/shapes.py)")
    parser.add_argument("--gguf", type=Path, help="llama.cpp's weights for --source")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "out" / "throughput.json")
    args = parser.parse_args()
    levels = [int(x) for x in args.levels.split(",")]
    results = [] if args.source else [generate_baseline()]
    if results:
        print(json.dumps(results[0]), flush=True)
    gguf = args.gguf or embedded_gguf_path()

    # Without --dtypes: the default weight format; with it, one server per format.
    variants = [
        (
            "textgen" if dtype is None else f"textgen {dtype}",
            served(args.source, dtype),
        )
        for dtype in (args.dtypes.split(",") if args.dtypes else [None])
    ]
    if args.fused:
        fused = {**variants[0][1], "TEXTGEN_DETERMINISTIC": "false"}
        variants.append((f"{variants[0][0]}, fused attention", fused))
    if args.bits8:
        bits8 = {**variants[0][1], "TEXTGEN_ACTIVATION_BITS": "8"}
        variants.append((f"{variants[0][0]}, 8-bit activations", bits8))
    if args.stock_worker:
        variants.append(("textgen, stock gthread worker", {"GUNICORN_CMD_ARGS": "-k gthread"}))
    for name, env in variants:
        port = free_port()
        server = start_textgen(port, **env)
        try:
            wait_ready(f"http://127.0.0.1:{port}/health", server)
            url = f"http://127.0.0.1:{port}/generate"
            measured = measure(name, url, textgen_body, levels, args.requests_per_client)
            results += with_weight_bytes(measured, served_weight_bytes(port))
        finally:
            stop(server)

    if not args.no_llama and ANCHOR.exists():
        port = free_port()
        anchor = start_llama(port, gguf)
        try:
            wait_ready(f"http://127.0.0.1:{port}/health", anchor)
            url = f"http://127.0.0.1:{port}/v1/completions"
            measured = measure(
                "llama.cpp llama-server", url, llama_body, levels, args.requests_per_client
            )
            # Its GGUF holds every weight once (the output layer is the tied embedding).
            results += with_weight_bytes(measured, gguf.stat().st_size)
        finally:
            stop(anchor)

    bandwidth = memory_read_bandwidth()
    for result in results:
        if result.get("clients") == 1 and "weights_read_per_token_mb" in result:
            limit = bandwidth / (result["weights_read_per_token_mb"] * 1e6)
            result["bandwidth_limit_tok_s"] = round(limit, 1)
            print(json.dumps(result), flush=True)
    report = {
        "machine": f"{platform.machine()}, {len(os.sched_getaffinity(0))} cores",
        "model": str(args.source or "smollm2-135m-instruct"),
        "memory_read_gb_s": round(bandwidth / 1e9, 2),
        "python": platform.python_version(),
        "workload": f"greedy, {NEW_TOKENS} new tokens, EOS ignored, streaming, closed loop",
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
