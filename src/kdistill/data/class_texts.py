"""Text descriptions of classes, the teacher side of GPT4Image-style distillation: a language model (here,
WordNet and a person) describes each class; a text encoder embeds the descriptions; a vision student
aligns its features to its class's embeddings.

A set is built in (`digits`) or read from a JSON file `{"label": ["description", ...], ...}`.
"""
from __future__ import annotations

import json
import os

from kdistill.errors import ConfigError, DataError
from kdistill.registry import Registry

CLASS_TEXTS: Registry = Registry("class text set")

NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

# What each handwritten digit looks like, written for this project (GPT4Image asks a language model for
# such descriptions; none runs offline here, so a person wrote them).
DIGIT_SHAPES = {
    "0": ["a handwritten zero: one closed oval loop, taller than it is wide, with an empty middle"],
    "1": ["a handwritten one: a single upright stroke, sometimes with a short flag at the top and a base"],
    "2": ["a handwritten two: a curved hook at the top, a diagonal stroke down to the left and a flat base line"],
    "3": ["a handwritten three: two bumps open to the left, stacked one above the other"],
    "4": ["a handwritten four: a vertical stroke crossed by a horizontal bar, with a slanted stroke meeting it"],
    "5": ["a handwritten five: a flat top bar, a short vertical stroke, and a round belly open to the left"],
    "6": ["a handwritten six: a curved stroke coming down from the top into a closed loop at the bottom"],
    "7": ["a handwritten seven: a horizontal bar at the top and a long diagonal stroke going down to the left"],
    "8": ["a handwritten eight: two closed loops stacked on top of each other, crossing in the middle"],
    "9": ["a handwritten nine: a closed loop at the top with a straight or curved tail going down"],
}


@CLASS_TEXTS.register("digits")
def digit_texts() -> dict[str, list[str]]:
    """For each digit: WordNet's gloss of its number word (noun.quantity) and a description of its shape."""
    from kdistill.data.corpora import _wordnet_records, wordnet_dir

    glosses = {}
    for record in _wordnet_records(wordnet_dir()):
        if record["pos"] == "n" and record["label"] == "noun.quantity" and record["lemma"] in NUMBER_WORDS:
            glosses.setdefault(record["lemma"], record["text"].split('; "')[0])
    return {str(i): [f"{word}: {glosses[word]}" if word in glosses else word, *DIGIT_SHAPES[str(i)]]
            for i, word in enumerate(NUMBER_WORDS)}


def class_texts(name_or_path: str, labels: list[str], where: str) -> list[list[str]]:
    """The descriptions of each class in `labels` order; every class needs at least one."""
    if os.path.isfile(name_or_path):
        try:
            table = json.loads(open(name_or_path, encoding="utf-8").read())
        except json.JSONDecodeError as err:
            raise DataError(f"{where}: {name_or_path} is not valid JSON ({err.msg}); expected "
                            '{"label": ["description", ...]}') from None
    elif name_or_path in CLASS_TEXTS:
        table = CLASS_TEXTS.get(name_or_path, where)()
    else:
        raise ConfigError(f"{where}: {name_or_path!r} is neither a file nor a built-in set "
                          f"({', '.join(CLASS_TEXTS.names())})")
    missing = [label for label in labels if not table.get(label)]
    if missing:
        raise DataError(f"{where}: no descriptions for classes {', '.join(missing[:10])} in {name_or_path}")
    return [list(table[label]) for label in labels]
