"""``lm_synthetic``: small synthetic text-classification tasks for the language-model quickstart, built in-process
from the seed (no file, no download), instruction-formatted like O-LoRA's tasks: an instruction naming the task,
the options (the task's label words), the input sentence and an answer prompt; the target is one label word.

Each task has three label words; a sentence is a few filler words shared by every task plus one or two keywords
of its label (every task has keywords of its own), so a model that reads the instruction and finds the keyword
answers right and chance is one in three. ``VOCABULARY`` is every word a sentence or instruction can hold: the
tiny language backbones' word-level tokenizer (clbench.model.lm) is built from it, so it works offline.
"""

from __future__ import annotations

import random
import re

from clbench.data.text import TextExample, TextStream, TextTask

# name, instruction, {label word: its keywords}
TASKS: tuple[tuple[str, str, dict[str, tuple[str, ...]]], ...] = (
    ("topic", "what is the topic of the sentence ?",
     {"sports": ("football", "tennis", "goal", "team", "match"),
      "music": ("guitar", "song", "concert", "piano", "melody"),
      "food": ("pizza", "bread", "soup", "cheese", "kitchen")}),
    ("sentiment", "is the review good , bad or mixed ?",
     {"good": ("wonderful", "excellent", "loved", "great", "perfect"),
      "bad": ("terrible", "awful", "hated", "boring", "broken"),
      "mixed": ("partly", "somewhat", "uneven", "average", "mediocre")}),
    ("weather", "what weather does the sentence describe ?",
     {"sunny": ("sunshine", "bright", "warm", "clear", "hot"),
      "rainy": ("umbrella", "drizzle", "wet", "puddle", "storm"),
      "snowy": ("snowflakes", "frozen", "icy", "sled", "blizzard")}),
    ("animal", "which animal is the sentence about ?",
     {"dog": ("bark", "puppy", "leash", "fetch", "wagging"),
      "cat": ("meow", "kitten", "purring", "whiskers", "litter"),
      "bird": ("feathers", "nest", "wings", "chirping", "beak")}),
)
FILLER = ("the", "a", "we", "saw", "some", "very", "this", "that", "was", "it", "and", "of", "today", "people",
          "really", "there", "my", "friend", "said", "about", "at", "home", "yesterday", "again", "with")
TEMPLATE = "{instruction} option : {options} . input : {sentence} . output :"
MAX_TASKS = len(TASKS)


def words(text: str) -> list[str]:
    """The word-level split the tiny tokenizer uses: lower-case words and single punctuation marks."""
    return re.findall(r"\w+|[^\w\s]", text.lower())


def _vocabulary() -> tuple[str, ...]:
    template = set(words(TEMPLATE.replace("{", " ").replace("}", " "))) - {"instruction", "options", "sentence"}
    vocab: set[str] = set(FILLER) | template | {","}
    for _, instruction, labels in TASKS:
        vocab |= set(words(instruction)) | set(labels)
        for keys in labels.values():
            vocab |= set(keys)
    return tuple(sorted(vocab))


VOCABULARY = _vocabulary()


def _sentence(rng: random.Random, keywords: tuple[str, ...]) -> str:
    body = [rng.choice(FILLER) for _ in range(rng.randint(4, 7))]
    for key in rng.sample(keywords, rng.randint(1, 2)):
        body.insert(rng.randint(0, len(body)), key)
    return " ".join(body)


def synthetic_text_stream(num_tasks: int = MAX_TASKS, per_class_train: int = 40, per_class_test: int = 20,
                          seed: int = 0) -> TextStream:
    """``num_tasks`` tasks (at most ``MAX_TASKS``) in a fixed order, ``per_class_*`` examples per label word; the
    sentences are drawn from ``seed``."""
    if not 1 <= num_tasks <= MAX_TASKS:
        from clbench.errors import ClbenchError

        raise ClbenchError(f"stream.num_tasks: lm_synthetic has {MAX_TASKS} tasks; choose 1..{MAX_TASKS}")
    rng = random.Random(seed * 7919 + 17)
    tasks = []
    for name, instruction, labels in TASKS[:num_tasks]:
        words_ = list(labels)
        options = " , ".join(words_)

        def example(label: int) -> TextExample:
            sentence = _sentence(rng, labels[words_[label]])  # noqa: B023 - used at once, in this iteration
            return TextExample(TEMPLATE.format(instruction=instruction, options=options, sentence=sentence), label)  # noqa: B023

        train = [example(c) for c in range(len(words_)) for _ in range(per_class_train)]
        test = [example(c) for c in range(len(words_)) for _ in range(per_class_test)]
        rng.shuffle(train)
        tasks.append(TextTask(name, words_, train, test))
    return TextStream("lm_synthetic", tasks, {"source": "clbench.data.lm_synthetic",
                                              "task_order": ",".join(t.name for t in tasks)})
