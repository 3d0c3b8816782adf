"""How often the embedded model calls a tool under tool_choice "auto", on a fixed prompt set.

Greedy decoding (temperature 0), the generic tool prompt (SmolLM2's template does not render
tools), two tools. Prompts that ask for what a tool gives should get a call; chit-chat should
not. Reports each group's call rate and whether every call validated against its schema.

Usage: python bench/tools.py [--model-cache DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Get the current weather in a city",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "convert_currency",
            "description": "Convert an amount of money from one currency to another",
            "parameters": {
                "type": "object",
                "properties": {
                    "amount": {"type": "number"},
                    "source": {"type": "string"},
                    "target": {"type": "string"},
                },
                "required": ["amount", "source", "target"],
            },
        },
    },
]
NEEDS_TOOL = [
    "What is the weather in Paris right now?",
    "Is it raining in London today?",
    "How warm is it in Tokyo?",
    "Tell me the current weather in Berlin.",
    "What's the temperature in New York?",
    "Convert 100 US dollars to euros.",
    "How many yen is 50 euros?",
    "Change 20 pounds into dollars.",
    "I need 300 Swiss francs in euros, how much is that?",
    "What is 75 Canadian dollars in US dollars?",
]
NO_TOOL = [
    "Hi! How are you?",
    "Write a haiku about the sea.",
    "What is the capital of Italy?",
    "Tell me a joke.",
    "What does CPU stand for?",
]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model-cache", default=str(REPO / ".cache" / "test-models"))
    args = parser.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import jsonschema

    from textgen import create_app

    app = create_app(
        {"MODELS": "smollm2-135m-instruct", "MODEL_CACHE": args.model_cache, "LOAD_MODE": "sync"}
    )
    client = app.test_client()
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
    results = {}
    for group, prompts in (("needs a tool", NEEDS_TOOL), ("no tool", NO_TOOL)):
        calls = valid = 0
        for prompt in prompts:
            body = {
                "messages": [{"role": "user", "content": prompt}],
                "tools": TOOLS,
                "temperature": 0,
                "max_tokens": 80,
            }
            out = client.post("/v1/chat/completions", json=body).get_json()
            message = out["choices"][0]["message"]
            if message.get("tool_calls"):
                calls += 1
                call = message["tool_calls"][0]["function"]
                try:
                    jsonschema.validate(json.loads(call["arguments"]), schemas[call["name"]])
                    valid += 1
                except jsonschema.ValidationError:
                    pass
        results[group] = {"prompts": len(prompts), "calls": calls, "valid_calls": valid}
        print(json.dumps({"group": group, **results[group]}), flush=True)
    app.extensions["textgen.registry"].close()


if __name__ == "__main__":
    main()
