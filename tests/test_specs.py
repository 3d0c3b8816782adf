"""Parsing TEXTGEN_MODELS."""

from __future__ import annotations

import pytest

from textgen.models.specs import SpecError, parse_model_specs


def test_compact_form_with_names_and_revisions() -> None:
    specs = parse_model_specs("smollm2-135m-instruct, small=distilgpt2@abc123, /srv/m, ./x.gguf")
    assert [(s.name, s.kind, s.revision) for s in specs] == [
        ("smollm2-135m-instruct", "embedded", None),
        ("small", "hub", "abc123"),
        ("m", "local_dir", None),
        ("x", "gguf", None),
    ]
    assert specs[1].source == "distilgpt2"


def test_json_form() -> None:
    specs = parse_model_specs(
        [{"name": "phi", "source": "microsoft/phi-2", "trust_remote_code": True}, "gpt2"]
    )
    assert specs[0].trust_remote_code and specs[0].kind == "hub"
    assert specs[1].name == "gpt2"


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        ("", "no models"),
        ("gpt2,gpt2", "duplicate"),
        ("/srv/model@v1", "revision only applies"),
        ("embedded:nope", "unknown embedded"),
        ("bad name=gpt2", "model name"),
        ("not a valid id!", "neither"),
        ([{"source": "gpt2", "colour": "red"}], "unknown model key"),
        ([{"name": "x"}], "needs a string 'source'"),
        ([{"source": "gpt2", "trust_remote_code": "yes"}], "true or false"),
        (42, "comma-separated"),
    ],
)
def test_bad_entries_are_explained(value: object, fragment: str) -> None:
    with pytest.raises(SpecError, match=fragment):
        parse_model_specs(value)
