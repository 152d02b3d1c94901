"""TinyBERT-style data augmentation by word replacement, offline, from WordNet synonyms.

TinyBERT (Jiao et al. 2020) distils its task stage on augmented task data: each word is, with
probability p, replaced by a candidate; single-piece words get candidates from a BERT masked-LM,
multi-piece words get GloVe nearest neighbours. This module is that word-replacement half only,
and it draws candidates for *every* word from WordNet synonyms (words sharing a synset),
because our teacher, all-MiniLM-L6-v2, is a sentence encoder with no MLM head and no embedding
table ships with the project. Candidates therefore ignore context (a synonym of any sense and
part of speech may be picked) and inflected forms ("cars") are left alone.

    table = synonym_table()                       # {"car": ["auto", "automobile", ...], ...}
    train = augment_records(train, copies=4, replace_prob=0.4, seed=0)
"""
from __future__ import annotations

import functools
import hashlib
import random
import re

from kdistill.data.corpora import wordnet_dir, wordnet_files
from kdistill.errors import ConfigError, DataError

# A word may carry inner hyphens/apostrophes ("full-face", "o'clock"), as WordNet lemmas do.
# The capturing group makes re.split return words at odd indices and the exact text between them
# at even ones, so "".join(parts) always restores the original.
WORD = re.compile(r"([A-Za-z]+(?:['-][A-Za-z]+)*)")

# WordNet lists function words under unrelated senses ("in" = inch, "be" = beryllium's verb twin,
# "will" = testament), so swapping them garbles sentences; an MLM would never propose those.
STOP_WORDS = frozenset(
    "a an the and or but nor if then than so as of in on at to by for from with without into onto "
    "over under about after before up down out off i me my we us our you your he him his she her "
    "it its they them their this that these those who whom whose which what is am are was were be "
    "been being have has had do does did will would shall should can could may might must not no "
    "all any some each one there here".split()
)


def _lemmas(line: str) -> list[str]:
    """Single-word, lower-case lemmas of one synset line (see wndb(5WN))."""
    fields = line.partition(" | ")[0].split()
    w_cnt = int(fields[3], 16)
    out = []
    for word in fields[4 : 4 + 2 * w_cnt : 2]:
        if word.endswith(")") and "(" in word:
            word = word[: word.index("(")]  # adjective syntax markers: galore(ip), elect(p)
        # Only lemmas shaped like one of our word tokens: multi-word ones ("_") and abbreviations
        # ("no.", "8vo") would inject punctuation, and capitalised ones are names and acronyms
        # (US -> America, IT -> information technology), not paraphrases of a common word.
        if word.islower() and WORD.fullmatch(word):
            out.append(word)
    return out


@functools.lru_cache(maxsize=None)
def _synonym_table(directory: str) -> dict[str, list[str]]:
    paths = wordnet_files(directory)
    groups: dict[str, set[str]] = {}
    for path in paths:
        with open(path, encoding="utf-8", errors="replace") as f:
            for number, line in enumerate(f, 1):
                if line.startswith("  ") or not line.strip():
                    continue  # license header
                try:
                    lemmas = _lemmas(line)
                except (IndexError, ValueError) as exc:
                    raise DataError(f"{path} line {number} is not a WordNet synset line ({exc}); "
                                    "reinstall it with `apt-get install --reinstall wordnet-base`")
                for lemma in lemmas:
                    groups.setdefault(lemma, set()).update(lemmas)
    table = {w: sorted(s - {w}) for w, s in groups.items()}
    return {w: s for w, s in table.items() if s}


def synonym_table(directory: str | None = None) -> dict[str, list[str]]:
    """Map each lower-case single-word WordNet lemma to the sorted other single-word lemmas
    that share a synset with it (all senses and parts of speech pooled; words with none omitted).

    `directory` defaults to `wordnet_dir()` (KDISTILL_WORDNET_DIR or /usr/share/wordnet). The
    result is cached per directory and shared between callers: treat it as read-only.
    """
    return _synonym_table(directory or wordnet_dir())


def _rng(seed: int, index: int, copy: int) -> random.Random:
    # Python's hash() is salted per process; a digest gives every machine the same augmentations.
    digest = hashlib.sha256(f"augment:{seed}:{index}:{copy}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def _replace(text: str, table: dict[str, list[str]], prob: float, rng: random.Random) -> str:
    parts = WORD.split(text)
    for i in range(1, len(parts), 2):
        word = parts[i]
        key = word.lower()
        choices = table.get(key) if key not in STOP_WORDS else None
        if choices and rng.random() < prob:
            new = rng.choice(choices)
            parts[i] = new[:1].upper() + new[1:] if word[:1].isupper() else new
    return "".join(parts)


def augment_records(records, copies: int = 4, replace_prob: float = 0.4, seed: int = 0,
                    table: dict[str, list[str]] | None = None,
                    keep_original: bool = True) -> list[dict]:
    """`copies` augmented versions of each record's "text", each word (not a stop word) that has
    synonyms replaced with probability `replace_prob` by one of them, chosen uniformly.

    Other fields (label, id, ...) are copied; augmented records get "augmented": True. A copy may
    equal its original when no word was drawn. Output order: per record, the original first
    (if `keep_original`) then its copies. Deterministic in (seed, record index, copy index).
    """
    if isinstance(copies, bool) or not isinstance(copies, int) or copies < 0:
        raise ConfigError(f"augment copies must be an integer >= 0, got {copies!r}")
    if not 0.0 <= replace_prob <= 1.0:
        raise ConfigError(f"augment replace_prob must be in [0, 1], got {replace_prob!r}")
    table = synonym_table() if table is None else table
    out = []
    for index, record in enumerate(records):
        text = record.get("text")
        if not isinstance(text, str):
            raise DataError(f"record {index} has no string 'text' field to augment: "
                            f"{record!r:.200}")
        if keep_original:
            out.append(dict(record))
        for copy in range(copies):
            new = _replace(text, table, replace_prob, _rng(seed, index, copy))
            out.append({**record, "text": new, "augmented": True})
    return out
