"""The shortest completion of a JSON prefix (pure)."""

from __future__ import annotations

import json

import pytest

from textgen.engine.jsonclose import closing_suffix


@pytest.mark.parametrize(
    ("prefix", "suffix"),
    [
        ("", "0"),
        ("{", "}"),
        ('{"na', '":0}'),
        ('{"name"', ":0}"),
        ('{"name":', "0}"),
        ('{"name":"Fe', '"}'),
        ('{"a":1,', '"":0}'),
        ('{"a":[1,{"b":"x', '"}]}'),
        ('{"a":"say \\', 'n"}'),
        ('{"a":"}]"', "}"),
        ("[", "]"),
        ("[1,", "0]"),
        ('{"a":12', "}"),
        ('{"a":{}', "}"),
    ],
)
def test_closing_suffix(prefix: str, suffix: str) -> None:
    assert closing_suffix(prefix) == suffix


@pytest.mark.parametrize("prefix", ['{"k":[{"x":"ab', '{"a":[[[', '{"a":"b","c":[1,2', "[{"])
def test_completion_parses(prefix: str) -> None:
    json.loads(prefix + closing_suffix(prefix))
