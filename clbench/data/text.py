"""Text streams for the language-model track: each task is a set of (input text, label) examples whose target is
one of the task's label words, as O-LoRA's continual benchmarks (an instruction, the sentence, the label words
to choose from; the model generates the label word). ``TextStream`` is what the loop trains on when the backbone is
a language model; builders (the O-LoRA benchmark reader, the offline synthetic tasks) return one.
Nothing here knows methods, models or MLflow.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class TextExample:
    text: str  # the model's whole input: the task's instruction, the sentence and the answer prompt
    label: int  # index into the task's label words


@dataclass
class TextTask:
    name: str  # the dataset's name (dbpedia, amazon, ...)
    labels: list[str]  # the label words; an example's target text is labels[example.label]
    train: list[TextExample]
    test: list[TextExample]

    def target(self, example: TextExample) -> str:
        return self.labels[example.label]


@dataclass
class TextStream:
    name: str
    tasks: list[TextTask]
    meta: dict = field(default_factory=dict)  # strings worth a tag: task order, task-list sha256, source, ...
