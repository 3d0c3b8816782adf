"""Client libraries nobody here wrote, unchanged, against a live server: LangChain, lm-eval."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import torch
from flask import Flask

from tests.test_tools import WEATHER, tools_url  # noqa: F401 (a fixture)


@pytest.fixture
def tools_base(tools_url: str) -> Iterator[str]:  # noqa: F811
    yield f"{tools_url}/v1"


def test_langchain_chat_openai_bind_tools(tools_base: str) -> None:
    from langchain_openai import ChatOpenAI

    chat = ChatOpenAI(
        model="tiny-llama", base_url=tools_base, api_key="unused", temperature=0, max_tokens=120
    )
    bound = chat.bind_tools([WEATHER.openai()], tool_choice="get_weather")
    message = bound.invoke("What is the weather in Paris?")
    assert len(message.tool_calls) == 1
    call = message.tool_calls[0]
    assert call["name"] == "get_weather"
    jsonschema.validate(call["args"], WEATHER.parameters)
    # The conversation goes on with the tool's result.
    from langchain_core.messages import HumanMessage, ToolMessage

    reply = chat.invoke(
        [
            HumanMessage("What is the weather in Paris?"),
            message,
            ToolMessage("18 C and sunny", tool_call_id=call["id"]),
        ]
    )
    assert isinstance(reply.content, str)


def test_langchain_openai_completions_class(live: str) -> None:
    # It sends "seed": null, "logprobs": null and more on every call.
    from langchain_openai import OpenAI

    llm = OpenAI(
        model="tiny-llama", base_url=f"{live}/v1", api_key="unused", temperature=0, max_tokens=5
    )
    text = llm.invoke("Hello")
    assert isinstance(text, str)
    assert [len(chunk) >= 0 for chunk in llm.stream("Hello")]


# --- lm-evaluation-harness, offline, on a task this test ships ------------------------------
QUESTIONS = [
    # lm-eval puts its target delimiter, a space, between the question and each choice.
    {"question": "The capital of France is", "choices": ["Paris", "cat", "seven"], "answer": 0},
    {"question": "Once upon a", "choices": ["time", "world", "number"], "answer": 0},
    {"question": "Hello", "choices": ["world", "small", "punctuation"], "answer": 0},
]
TASK = """task: textgen_tiny_choice
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
"""


def loglikelihood(app: Flask, context: str, continuation: str) -> float:
    """The model's own log-probability of the continuation, computed directly from the tokens
    lm-eval makes: the whole text encoded, the context's tokens split off its front (no
    special tokens)."""
    loaded = app.extensions["textgen.registry"].engine("tiny-llama").runner.loaded
    tokenizer = loaded.tokenizer
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    start = len(tokenizer(context, add_special_tokens=False)["input_ids"])
    with torch.no_grad():
        logits = loaded.model(torch.tensor([whole])).logits[0].float()
    logprobs = torch.log_softmax(logits, dim=-1)
    return float(sum(logprobs[i - 1, whole[i]] for i in range(start, len(whole))))


def test_lm_eval_harness_runs_offline(
    live: str, app: Flask, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    import lm_eval
    from lm_eval.tasks import TaskManager

    data = tmp_path / "questions.jsonl"
    data.write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "textgen_tiny_choice.yaml").write_text(TASK.format(data=data))
    results: Any = lm_eval.simple_evaluate(
        model="local-completions",
        # The default tokenizer backend: it finds /tokenizer_info and tokenizes remotely.
        model_args=f"model=tiny-llama,base_url={live}/v1/completions,num_concurrent=1,"
        "max_retries=1,max_length=256",
        tasks=["textgen_tiny_choice"],
        task_manager=TaskManager(include_path=str(tasks)),
        log_samples=True,
        batch_size=1,
    )
    samples = results["samples"]["textgen_tiny_choice"]
    assert len(samples) == len(QUESTIONS)
    for sample in samples:
        doc = sample["doc"]
        for choice, response in zip(doc["choices"], sample["resps"], strict=True):
            server_logprob = response[0][0]
            direct = loglikelihood(app, doc["question"], " " + choice)
            assert math.isclose(server_logprob, direct, rel_tol=1e-3, abs_tol=1e-3), (
                doc["question"],
                choice,
            )
    assert 0.0 <= results["results"]["textgen_tiny_choice"]["acc,none"] <= 1.0


def test_instructor_tools_mode(tools_base: str) -> None:
    import instructor
    import openai
    from pydantic import BaseModel, Field

    class Weather(BaseModel):
        city: str = Field(max_length=20)
        unit: str = Field(pattern="^(celsius|fahrenheit)$")

    client = instructor.from_openai(
        openai.OpenAI(base_url=tools_base, api_key="unused", max_retries=0),
        mode=instructor.Mode.TOOLS,
    )
    weather = client.chat.completions.create(
        model="tiny-llama",
        response_model=Weather,
        messages=[{"role": "user", "content": "The weather in Paris, in celsius?"}],
        max_tokens=120,
        temperature=0,
        max_retries=0,
    )
    assert isinstance(weather, Weather) and weather.unit in ("celsius", "fahrenheit")
