"""Long prompts: time to first token at 128, 1,000 and 4,000 prompt tokens, and the running
streams' inter-token latency while a 4,000-token prompt is prefilled; textgen against
llama.cpp's server on the same weights, same run.

Prompts are token ids (random, from the model's ordinary vocabulary; both servers take ids on
/v1/completions), so both see exactly the same lengths; each request has new ids, so neither
server's prompt cache helps. Time to first token is that of a streamed one-token completion,
median of ``--repeats``. The stream test runs three greedy streams (EOS ignored), then sends
the 4,000-token prompt and records the streams' gaps between tokens until it is answered.

Usage: python bench/prefill.py [--lengths 128,1000,4000] [--repeats 3] [--no-llama]
       [--source DIR --gguf FILE]  (a model of bench/shapes.py; default: the embedded model)
"""

from __future__ import annotations

import argparse
import json
import random
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

from serving import REPO, free_port, start_textgen, stop, wait_ready
from throughput import embedded_gguf_path, quantile, served, start_llama

STREAM_TOKENS = 400


def completion(url: str, body: dict[str, Any]) -> tuple[float, list[float]]:
    """A streamed completion: (time to its first token, times of each token event)."""
    request = urllib.request.Request(
        url, data=json.dumps({**body, "stream": True}).encode(),
        headers={"Content-Type": "application/json"},
    )  # fmt: skip
    started = time.perf_counter()
    stamps = []
    with urllib.request.urlopen(request, timeout=900) as response:
        for raw in response:
            line = raw.decode().strip()
            if line.startswith("data: {") and '"text"' in line:
                stamps.append(time.perf_counter())
    return (stamps[0] - started if stamps else float("nan")), stamps


def prompt_ids(rng: random.Random, length: int) -> list[int]:
    # Ordinary pieces in every seed's tokenizer: above the special tokens, below 40,000.
    return [rng.randrange(200, 40_000) for _ in range(length)]


def measure(name: str, url: str, model: str, lengths: list[int], repeats: int) -> dict[str, Any]:
    rng = random.Random(0)
    base = {"model": model, "temperature": 0, "max_tokens": 1}
    ttft: dict[str, float] = {}
    for length in lengths:
        times = [
            completion(url, {**base, "prompt": prompt_ids(rng, length)})[0] for _ in range(repeats)
        ]
        ttft[str(length)] = round(quantile(times, 0.5), 3)
        print(json.dumps({"server": name, "prompt_tokens": length, "ttft_s": times}), flush=True)
    # Three streams, then a long prompt among them.
    streams: list[list[float]] = [[] for _ in range(3)]
    stream_body = {**base, "max_tokens": STREAM_TOKENS, "ignore_eos": True}

    def stream(number: int) -> None:
        body = {**stream_body, "prompt": prompt_ids(rng, 16)}
        streams[number] = completion(url, body)[1]

    threads = [threading.Thread(target=stream, args=(n,)) for n in range(3)]
    for thread in threads:
        thread.start()
    time.sleep(2.0)
    long_prompt = {**base, "prompt": prompt_ids(rng, max(lengths))}
    sent = time.perf_counter()
    long_ttft = completion(url, long_prompt)[0]
    answered = sent + long_ttft
    for thread in threads:
        thread.join()
    gaps = [
        b - a
        for stamps in streams
        for a, b in zip(stamps, stamps[1:], strict=False)
        if b > sent and a < answered
    ]
    result = {
        "server": name,
        "ttft_s": ttft,
        "long_prompt_among_streams_ttft_s": round(long_ttft, 3),
        "stream_gaps_during_prefill": len(gaps),
        "stream_itl_p50_ms_during_prefill": round(1000 * quantile(gaps, 0.5), 1),
        "stream_itl_p95_ms_during_prefill": round(1000 * quantile(gaps, 0.95), 1),
        "stream_itl_max_ms_during_prefill": round(1000 * max(gaps, default=float("nan")), 1),
    }
    print(json.dumps(result), flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--lengths", default="128,1000,4000")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-llama", action="store_true")
    parser.add_argument("--source", type=Path, help="a model directory (bench/shapes.py)")
    parser.add_argument("--gguf", type=Path, help="llama.cpp's weights for --source")
    parser.add_argument("--dtype", help="textgen's weight format for --source")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "out" / "prefill.json")
    args = parser.parse_args()
    lengths = [int(x) for x in args.lengths.split(",")]
    results = []
    port = free_port()
    server = start_textgen(port, **served(args.source, args.dtype))
    try:
        wait_ready(f"http://127.0.0.1:{port}/health", server)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/models", timeout=30) as response:
            model = json.load(response)["models"][0]["name"]
        url = f"http://127.0.0.1:{port}/v1/completions"
        results.append(measure("textgen", url, model, lengths, args.repeats))
    finally:
        stop(server)
    if not args.no_llama:
        gguf = args.gguf or embedded_gguf_path()
        port = free_port()
        # Four slots of 8,192 tokens: three streams and the long prompt.
        anchor = start_llama(port, gguf, ("-np", "4", "-c", "32768"))
        try:
            wait_ready(f"http://127.0.0.1:{port}/health", anchor)
            url = f"http://127.0.0.1:{port}/v1/completions"
            results.append(measure("llama.cpp llama-server", url, model, lengths, args.repeats))
        finally:
            stop(anchor)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"lengths": lengths, "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
