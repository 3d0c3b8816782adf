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


def test_hub_models_and_gguf_files_default_to_the_fastest_format(monkeypatch) -> None:
    from textgen.models import specs

    hub, local, gguf, pinned = parse_model_specs("gpt2, /srv/m, ./x.gguf, tinyllama#float32")
    assert (hub.dtype, local.dtype, gguf.dtype, pinned.dtype) == (
        "auto", "float32", "auto", "float32"
    )  # fmt: skip
    gpt2 = {"model_type": "gpt2", "n_embd": 768, "n_head": 12, "n_layer": 12}
    neox = {"model_type": "gpt_neox"}
    monkeypatch.setattr(specs, "compiler_available", lambda: True)
    monkeypatch.setattr(specs, "cpu_flags", lambda: "avx2 avx512bw avx512dq avx512f avx512vl")
    assert specs.resolved_dtype("auto", gpt2, compile=True) == "int4"
    assert specs.resolved_dtype("auto", {**gpt2, "n_embd": 96}, compile=True) == "int8"
    assert specs.resolved_dtype("auto", neox, compile=True) == "float32"  # no compiled decoder
    assert specs.resolved_dtype("auto", gpt2, compile=False) == "float32"
    assert specs.resolved_dtype("bfloat16", gpt2, compile=True) == "bfloat16"
    monkeypatch.setattr(specs, "cpu_flags", lambda: "avx avx2 f16c fma")  # textgen's kernels
    assert specs.resolved_dtype("auto", gpt2, compile=True) == "int4"
    monkeypatch.setattr(specs, "cpu_flags", lambda: "avx avx2")  # neither they nor the template
    assert specs.resolved_dtype("auto", gpt2, compile=True) == "int8"
    monkeypatch.setattr(specs, "compiler_available", lambda: False)
    assert specs.resolved_dtype("auto", gpt2, compile=True) == "float32"
