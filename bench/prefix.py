"""What the prefix cache saves: one-token requests with and without it, same run.

Usage: python bench/prefix.py [--requests 24] [--out bench/out/prefix.json]
Two prompt shapes, each sent one at a time: a completion prompt ("Write a story about X.", the
throughput benchmark's) and a chat request (the embedded model's template and system prompt,
then a different user message each time). A one-token request's latency is mostly its prefill;
medians skip the first four requests (the cache is empty then).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import urllib.request
from pathlib import Path
from typing import Any

from serving import REPO, free_port, start_textgen, stop, wait_ready

TOPICS = ["the sea", "a robot", "autumn", "a city", "bread", "a library", "mountains", "time"]
MODEL = "smollm2-135m-instruct"


def post(url: str, body: dict[str, Any]) -> tuple[float, dict[str, Any]]:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    started = time.perf_counter()
    with urllib.request.urlopen(request, timeout=120) as response:
        answer = json.load(response)
    return time.perf_counter() - started, answer


def body(kind: str, i: int) -> tuple[str, dict[str, Any]]:
    topic = TOPICS[i % len(TOPICS)]
    if kind == "chat":
        message = {"role": "user", "content": f"Write a story about {topic}, number {i}."}
        return "/v1/chat/completions", {"model": MODEL, "messages": [message]}
    return "/v1/completions", {"model": MODEL, "prompt": f"Write a story about {topic}."}


def measure(cache_tokens: int, requests: int) -> list[dict[str, Any]]:
    port = free_port()
    server = start_textgen(port, TEXTGEN_PREFIX_CACHE_TOKENS=str(cache_tokens))
    results = []
    try:
        wait_ready(f"http://127.0.0.1:{port}/health", server)
        for kind in ("completion", "chat"):
            seconds, prompt_tokens = [], 0
            for i in range(requests):
                path, request = body(kind, i)
                took, answer = post(
                    f"http://127.0.0.1:{port}{path}", {**request, "max_tokens": 1, "temperature": 0}
                )
                seconds.append(took)
                prompt_tokens = answer["usage"]["prompt_tokens"]
            results.append(
                {
                    "prefix_cache_tokens": cache_tokens,
                    "prompt": kind,
                    "prompt_tokens": prompt_tokens,
                    "one_token_request_median_ms": round(statistics.median(seconds[4:]) * 1000, 1),
                }
            )
            print(json.dumps(results[-1]), flush=True)
    finally:
        stop(server)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=24)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "out" / "prefix.json")
    args = parser.parse_args()
    results = measure(0, args.requests) + measure(1024, args.requests)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
