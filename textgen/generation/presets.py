"""Prompt presets for base models, from the GPT-2 project textgen grew from: a model that only
continues text answers better when the prompt looks like the start of an answer."""

from __future__ import annotations

from dataclasses import dataclass

PLACE = "{prompt}"


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    template: str  # {prompt} marks where the request's text goes
    models: str  # for which models it is meant
    stop: tuple[str, ...] = ()  # stop strings it brings, unless the request gives its own

    def apply(self, text: str) -> str:
        # Replaced, not str.format: braces in the request's text stay as they are.
        return self.template.replace(PLACE, text)


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset(
            "assistant",
            "A system-style prefix that frames the text as a question to a helpful expert, and "
            "the start of the answer.",
            "The following is a conversation with a helpful, accurate and concise expert.\n\n"
            "Question: {prompt}\nExpert answer:",
            "base models (gpt2, distilgpt2, phi-2); chat models have their template instead",
            stop=("\nQuestion:",),
        ),
        Preset(
            "qa",
            "Few-shot questions and answers: two worked examples, then the question.",
            "Q: What is the capital of Italy?\nA: Rome.\n\n"
            "Q: How many legs does a spider have?\nA: Eight.\n\n"
            "Q: {prompt}\nA:",
            "base models (gpt2, distilgpt2, phi-2)",
            stop=("\nQ:", "\n\n"),
        ),
        Preset(
            "story",
            "The opening of a short story, for free continuation.",
            "Here is a short story.\n\n{prompt}",
            "any model",
        ),
    )
}


def describe_presets() -> list[dict[str, object]]:
    return [
        {
            "name": p.name,
            "description": p.description,
            "template": p.template,
            "models": p.models,
            "stop": list(p.stop),
        }
        for p in PRESETS.values()
    ]
