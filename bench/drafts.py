"""What drafts (prompt lookup, TEXTGEN_DRAFT_TOKENS) change for one client, same run.

Usage: python bench/drafts.py [--rounds 2] [--dtype int8] [--out bench/out/drafts.json]
One client sends the throughput benchmark's prompts ("Write a story about X.", greedy, 128 new
tokens, EOS ignored) one at a time, each to a server with drafts on (the default, 3) and then to
one with them off (0), both running, ``rounds`` times over: the pair of timings sees the same
load on a noisy machine. Reports tokens/s each way, how many guessed tokens
were checked and kept (the engine's /info counters), tokens per decode step, and how many of the
outputs are the same text both ways (drafts check several positions in one call, which rounds
differently from one at a time, so a near tie can go the other way).
"""

from __future__ import annotations

import argparse
import json
import time
import urllib.request
from pathlib import Path
from typing import Any

from serving import REPO, free_port, start_textgen, stop, wait_ready

TOPICS = ["the sea", "a robot", "autumn", "a city", "bread", "a library", "mountains", "time"]
MODEL = "smollm2-135m-instruct"
NEW_TOKENS = 128


def get(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(url, timeout=30) as response:
        return json.load(response)


def generate(url: str, prompt: str) -> str:
    body = {"prompt": prompt, "strategy": "greedy", "max_new_tokens": NEW_TOKENS}
    request = urllib.request.Request(
        url,
        data=json.dumps({**body, "ignore_eos": True}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=600) as response:
        return str(json.load(response)["results"][0]["outputs"][0]["text"])


def start(draft_tokens: int, dtype: str | None) -> tuple[Any, str]:
    port = free_port()
    env = {"TEXTGEN_DRAFT_TOKENS": str(draft_tokens)}
    if dtype:
        env["TEXTGEN_MODELS"] = f"{MODEL}#{dtype}"
    server = start_textgen(port, **env)
    base = f"http://127.0.0.1:{port}"
    wait_ready(f"{base}/health", server)
    generate(f"{base}/generate", "Hello")  # warm-up
    return server, base


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dtype", help="weight format (default: the embedded model's)")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "out" / "drafts.json")
    args = parser.parse_args()
    servers = {setting: start(setting, args.dtype) for setting in (3, 0)}
    try:
        before = {s: get(f"{base}/info")["engines"][MODEL] for s, (_, base) in servers.items()}
        seconds = {setting: 0.0 for setting in servers}
        texts: dict[int, list[str]] = {setting: [] for setting in servers}
        for _ in range(args.rounds):
            for topic in TOPICS:
                for setting, (_, base) in servers.items():
                    started = time.perf_counter()
                    texts[setting].append(
                        generate(f"{base}/generate", f"Write a story about {topic}.")
                    )
                    seconds[setting] += time.perf_counter() - started
        after = {s: get(f"{base}/info")["engines"][MODEL] for s, (_, base) in servers.items()}
    finally:
        for server, _ in servers.values():
            stop(server)
    tokens = args.rounds * len(TOPICS) * NEW_TOKENS
    counted = {
        setting: {
            k: after[setting][k] - before[setting][k]
            for k in ("draft_tokens", "draft_tokens_accepted", "steps")
        }
        for setting in servers
    }
    on, off = texts[3][: len(TOPICS)], texts[0][: len(TOPICS)]
    summary = {
        "rounds": args.rounds,
        "tok_s_drafts_on": round(tokens / seconds[3], 1),
        "tok_s_drafts_off": round(tokens / seconds[0], 1),
        "speedup": round(seconds[0] / seconds[3], 3),
        "drafted_tokens": counted[3]["draft_tokens"],
        "accepted_tokens": counted[3]["draft_tokens_accepted"],
        "tokens_per_step_on": round(tokens / counted[3]["steps"], 3),
        "tokens_per_step_off": round(tokens / counted[0]["steps"], 3),
        "outputs_equal_both_ways": f"{sum(map(str.__eq__, on, off))} of {len(on)}",
        "repeatable": all(texts[s] == texts[s][: len(TOPICS)] * args.rounds for s in servers),
    }
    print(json.dumps(summary), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"summary": summary, "outputs": texts}, indent=2) + "\n")


if __name__ == "__main__":
    main()
