"""Post-processing on crafted texts: each option alone, together, and delta by delta (a stream
comes out as the whole text does)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from flask.testing import FlaskClient
from hypothesis import given
from hypothesis import strategies as st

from textgen.generation.postprocess import PostProcessing, TextFilter, processed

ECHO = PostProcessing(strip_prompt=True)
LINES = PostProcessing(drop_repeated_lines=True)


def test_an_echoed_prompt_is_stripped() -> None:
    assert processed(ECHO, "The sky is", " The sky is blue.") == (" blue.", ["strip_prompt"])
    assert processed(ECHO, "The sky is", " Blue, mostly.") == (" Blue, mostly.", [])
    assert processed(ECHO, "The sky is", " The sky") == (" The sky", [])  # never finished it


def test_repeated_lines_are_dropped_blank_ones_kept() -> None:
    text = "a cat\nsat down\n\na cat\n\nsat down\nthe end"
    out, changed = processed(LINES, "", text)
    assert out == "a cat\nsat down\n\n\nthe end"
    assert changed == ["drop_repeated_lines"]
    assert processed(LINES, "", "one\ntwo\none") == ("one\ntwo\n", ["drop_repeated_lines"])
    assert processed(LINES, "", "one\ntwo") == ("one\ntwo", [])


def test_words_are_capped_at_a_word_end() -> None:
    capped = PostProcessing(max_words=3)
    assert processed(capped, "", " one two  three four five") == (" one two  three", ["max_words"])
    assert processed(capped, "", "one two") == ("one two", [])


def test_options_compose_in_order() -> None:
    every = PostProcessing(strip_prompt=True, drop_repeated_lines=True, max_words=4)
    out, changed = processed(every, "Q", "Q\nx y\nx y\nz w v")
    assert out == "\nx y\nz w"
    assert changed == ["strip_prompt", "drop_repeated_lines", "max_words"]


def test_a_stream_holds_back_only_what_is_undecided() -> None:
    flt = TextFilter(PostProcessing(strip_prompt=True, drop_repeated_lines=True), "Hello")
    assert flt.push(" Hel") == ""  # may still be the prompt
    assert flt.push("lo there") == ""  # the echo is stripped; the line has not ended
    assert flt.push("\nagain\n") == " there\nagain\n"
    assert flt.push(" there\nnew") == ""  # a repeat, dropped; "new" waits for its end
    assert flt.finish() == "new"
    assert flt.changed == ["strip_prompt", "drop_repeated_lines"]


@given(
    text=st.text(alphabet="ab \n", max_size=60),
    cuts=st.lists(st.integers(min_value=0, max_value=60), max_size=8),
    prompt=st.sampled_from(["", "a", "ab a", " b"]),
    strip=st.booleans(),
    lines=st.booleans(),
    words=st.sampled_from([None, 1, 3]),
)
def test_deltas_give_the_whole_texts_result(
    text: str, cuts: list[int], prompt: str, strip: bool, lines: bool, words: int | None
) -> None:
    options = PostProcessing(strip, lines, words)
    whole = processed(options, prompt, text)
    flt = TextFilter(options, prompt)
    points = sorted({min(c, len(text)) for c in cuts})
    pieces = [text[a:b] for a, b in zip([0, *points], [*points, len(text)], strict=True)]
    streamed = "".join(flt.push(piece) for piece in pieces) + flt.finish()
    assert (streamed, flt.changed) == whole


@pytest.mark.parametrize("options", [PostProcessing(), PostProcessing(max_words=100)])
def test_inactive_or_unreached_options_change_nothing(options: PostProcessing) -> None:
    assert processed(options, "x", "x and more") == ("x and more", [])


# --- over HTTP, on the tiny models ----------------------------------------------------------
def events(client: FlaskClient, body: dict[str, Any]) -> list[dict[str, Any]]:
    raw = client.post("/generate", json={**body, "stream": True}).get_data(as_text=True)
    chunks = [c.removeprefix("data: ") for c in raw.split("\n\n") if c.startswith("data: ")]
    return [json.loads(c) for c in chunks if c != "[DONE]"]


def streamed_text(client: FlaskClient, body: dict[str, Any]) -> tuple[str, list[str]]:
    found = events(client, body)
    text = "".join(e.get("text", "") for e in found if "prompt_index" in e)
    finish = next(e for e in found if "finish_reason" in e)
    return text, finish.get("postprocessed", [])


def whole(client: FlaskClient, body: dict[str, Any]) -> dict[str, Any]:
    response = client.post("/generate", json=body)
    assert response.status_code == 200, response.get_json()
    return dict(response.get_json()["results"][0]["outputs"][0])


@pytest.mark.parametrize(
    "postprocess",
    [{"max_words": 2}, {"drop_repeated_lines": True}, {"strip_prompt": True},
     {"max_words": 5, "drop_repeated_lines": True, "strip_prompt": True}],
)  # fmt: skip
def test_each_option_is_applied_and_reported_whole_and_streamed(
    client: FlaskClient, postprocess: dict[str, Any]
) -> None:
    base = {"prompt": "Once upon a time", "max_new_tokens": 40, "ignore_eos": True}
    plain = whole(client, base)["text"]
    options = PostProcessing(**postprocess)
    expected, changed = processed(options, "Once upon a time", plain)
    out = whole(client, {**base, "postprocess": postprocess})
    assert out["text"] == expected
    assert out.get("postprocessed", []) == changed
    assert streamed_text(client, {**base, "postprocess": postprocess}) == (expected, changed)
    if "max_words" in postprocess and len(plain.split()) > postprocess["max_words"]:
        assert "max_words" in changed  # the tiny model says more than 2 words in 40 tokens


def test_repetition_stop_ends_generation_early(client: FlaskClient) -> None:
    base = {"prompt": "Hi", "max_new_tokens": 250, "ignore_eos": True}
    free = whole(client, base)
    looped = whole(client, {**base, "repetition_stop": 3})
    # The tiny random model falls into a loop; the engine stops it there, untrimmed.
    assert free["finish_reason"] == "length" and free["completion_tokens"] == 250
    assert looped["finish_reason"] == "repetition"
    assert looped["completion_tokens"] < 250
    assert free["text"].startswith(looped["text"])
    assert client.post("/generate", json={**base, "repetition_stop": 1}).status_code == 400
    beam = client.post("/generate", json={**base, "strategy": "beam", "repetition_stop": 3})
    assert beam.get_json()["error"]["param"] == "repetition_stop"


def test_presets_are_listed_and_applied(client: FlaskClient) -> None:
    listed = client.get("/presets").get_json()["presets"]
    qa = next(p for p in listed if p["name"] == "qa")
    assert "{prompt}" in qa["template"] and qa["stop"]
    body = {"prompt": "Why is the sky blue?", "max_new_tokens": 4, "preset": "qa"}
    response = client.post("/generate", json=body).get_json()
    assert response["preset"] == "qa"
    written = qa["template"].replace("{prompt}", body["prompt"])
    tokens = client.post("/tokenize", json={"prompt": written}).get_json()["count"]
    assert response["usage"]["prompt_tokens"] == tokens
    assert response["results"][0]["parameters"]["stop"] == qa["stop"]
    own_stop = client.post("/generate", json={**body, "stop": ["x"]}).get_json()
    assert own_stop["results"][0]["parameters"]["stop"] == ["x"]
    chat = client.post("/generate", json={**body, "chat": True})
    assert chat.status_code == 400 and chat.get_json()["error"]["param"] == "preset"
    unknown = client.post("/generate", json={**body, "preset": "nope"})
    assert unknown.status_code == 400
