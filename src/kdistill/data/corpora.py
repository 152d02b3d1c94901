"""Built-in offline corpora, registered by the name a recipe uses (`data.train.source`).

Each corpus is a function `(split) -> list[dict]` with records `{"text": ..., ...}`. Splits are
assigned by a SHA-1 of a stable record key (never Python's salted `hash()`), so every machine and
every run sees the same ~90/5/5 train/eval/test partition.
"""
from __future__ import annotations

import ast
import functools
import hashlib
import inspect
import os
import sysconfig
from typing import Callable

from kdistill.errors import ConfigError, DataError
from kdistill.registry import Registry

CORPORA: Registry[Callable[[str], list[dict]]] = Registry("corpus")

SPLITS = ("train", "eval", "test")


def split_of(key: str, train: int = 90, eval_: int = 5) -> str:
    """The split a record key falls in by a SHA-1 of it: buckets 0-89 train, 90-94 eval, 95-99 test (by default)."""
    bucket = int(hashlib.sha1(key.encode("utf-8")).hexdigest()[:8], 16) % 100
    return "train" if bucket < train else "eval" if bucket < train + eval_ else "test"


def check_split(split: str, where: str = "split") -> str:
    """A known split name; `dev` is accepted as the usual name of the held-out tuning split (= eval)."""
    if split == "dev":
        return "eval"
    if split not in SPLITS:
        raise ConfigError(f"unknown split {split!r} at {where}; valid: {', '.join(SPLITS)} (dev = eval)")
    return split


def _copies(records: tuple[dict, ...]) -> list[dict]:
    # The cache holds the only parsed copy; callers get fresh dicts so mutating them is harmless.
    return [dict(r) for r in records]


# ---------------------------------------------------------------- stdlib docstrings

# Tests, GUI and packaging helpers are either not prose about the library or not on every install.
STDLIB_SKIP_DIRS = frozenset(
    {"test", "tests", "idle_test", "idlelib", "tkinter", "turtledemo", "lib2to3",
     "site-packages", "dist-packages", "ensurepip", "__pycache__"}
)
MIN_DOCSTRING_CHARS = 30
MAX_DOCSTRING_CHARS = 1000


def _stdlib_files(root: str) -> list[tuple[str, str]]:
    """(module name, path) of stdlib modules, in sorted order so the corpus is stable.

    Private modules stay in: _pydecimal, _pyio and _collections_abc hold the only Python-level
    docs of decimal, io and collections.abc; their own private names are still skipped below.
    """
    found = []
    for directory, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in STDLIB_SKIP_DIRS and d.isidentifier()
                         and not d.startswith("_"))
        rel = os.path.relpath(directory, root)
        package = [] if rel == "." else rel.split(os.sep)
        if package and not os.path.exists(os.path.join(directory, "__init__.py")):
            continue  # plain data folders (config-3.x, lib-dynload) hold no importable modules
        for name in sorted(files):
            stem = name[:-3]
            if not name.endswith(".py") or not stem.isidentifier():
                continue
            if stem.startswith("__") and stem != "__init__":
                continue  # __main__, __hello__ and friends are entry points, not library prose
            parts = package if stem == "__init__" else package + [stem]
            if parts:
                found.append((".".join(parts), os.path.join(directory, name)))
    return found


def _shorten(doc: str) -> str:
    """Keep whole leading paragraphs up to MAX_DOCSTRING_CHARS.

    Truncating (rather than splitting into one record per paragraph) keeps each record
    self-contained, led by the summary line, and stops fragments of one docstring from landing in
    both train and eval, which per-paragraph hashing would do.
    """
    if len(doc) <= MAX_DOCSTRING_CHARS:
        return doc
    head = doc[:MAX_DOCSTRING_CHARS]
    cut = head.rfind("\n\n")
    if cut < MIN_DOCSTRING_CHARS:
        cut = head.rfind(" ")
    return head[:cut].rstrip() if cut > 0 else head


def _docstrings(tree: ast.Module, module: str):
    """(qualified name, docstring) for the module and its public classes, functions and methods."""
    doc = ast.get_docstring(tree, clean=False)
    if doc:
        yield module, doc
    stack = [(module, tree.body)]
    while stack:
        prefix, body = stack.pop(0)
        for node in body:
            if not isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            if node.name.startswith("_"):
                continue
            name = f"{prefix}.{node.name}"
            doc = ast.get_docstring(node, clean=False)
            if doc:
                yield name, doc
            if isinstance(node, ast.ClassDef):
                stack.append((name, node.body))


@functools.lru_cache(maxsize=None)
def _stdlib_records(root: str) -> tuple[dict, ...]:
    records, seen = [], set()
    for module, path in _stdlib_files(root):
        try:
            with open(path, "rb") as f:
                tree = ast.parse(f.read(), filename=path)
        except (SyntaxError, ValueError, OSError):
            continue  # a stray file for another Python version must not break the corpus
        for name, raw in _docstrings(tree, module):
            text = _shorten(inspect.cleandoc(raw).strip())
            if len(text) < MIN_DOCSTRING_CHARS or text in seen:
                continue
            seen.add(text)
            records.append({"text": text, "name": name})
    if not records:
        raise DataError(f"found no docstrings under the Python standard library at {root}")
    return tuple(records)


@functools.lru_cache(maxsize=None)
def _stdlib_split(root: str, split: str) -> tuple[dict, ...]:
    return tuple(r for r in _stdlib_records(root) if split_of(r["text"]) == split)


@CORPORA.register("stdlib-docstrings")
def stdlib_docstrings(split: str = "train") -> list[dict]:
    """Docstrings of the installed standard library: records {"text", "name"}; unlabeled."""
    return _copies(_stdlib_split(sysconfig.get_paths()["stdlib"], check_split(split)))


# ---------------------------------------------------------------- WordNet glosses

# WordNet's lexicographer files (lexnames(5WN)); the index is lex_filenum on each synset line.
WORDNET_SUPERSENSES = (
    "adj.all", "adj.pert", "adv.all", "noun.Tops", "noun.act", "noun.animal", "noun.artifact",
    "noun.attribute", "noun.body", "noun.cognition", "noun.communication", "noun.event",
    "noun.feeling", "noun.food", "noun.group", "noun.location", "noun.motive", "noun.object",
    "noun.person", "noun.phenomenon", "noun.plant", "noun.possession", "noun.process",
    "noun.quantity", "noun.relation", "noun.shape", "noun.state", "noun.substance", "noun.time",
    "verb.body", "verb.change", "verb.cognition", "verb.communication", "verb.competition",
    "verb.consumption", "verb.contact", "verb.creation", "verb.emotion", "verb.motion",
    "verb.perception", "verb.possession", "verb.social", "verb.stative", "verb.weather", "adj.ppl",
)
WORDNET_FILES = ("noun", "verb", "adj", "adv")


def wordnet_dir() -> str:
    # An override lets users point at another WordNet 3.x install (and tests at a broken one).
    return os.environ.get("KDISTILL_WORDNET_DIR", "/usr/share/wordnet")


def _lemma(word: str, pos: str) -> str:
    if pos in "as" and word.endswith(")") and "(" in word:
        word = word[: word.index("(")]  # adjective syntax markers: galore(ip), elect(p)
    return word.replace("_", " ")


def _parse_wordnet_file(path: str) -> list[dict]:
    records = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, 1):
            if line.startswith("  ") or not line.strip():
                continue  # license header
            head, sep, gloss = line.partition(" | ")
            fields = head.split()
            try:
                offset, lex, pos, w_cnt = fields[0], int(fields[1]), fields[2], int(fields[3], 16)
                lemma = _lemma(fields[4], pos)
                label = WORDNET_SUPERSENSES[lex]
            except (IndexError, ValueError) as exc:
                raise DataError(f"{path} line {number} is not a WordNet synset line ({exc}); "
                                "reinstall it with `apt-get install --reinstall wordnet-base`")
            gloss = gloss.strip()
            if not sep or not gloss or w_cnt < 1:
                continue
            records.append({"text": gloss, "label": label, "lemma": lemma, "pos": pos,
                            "id": f"{pos}{offset}"})
    return records


def wordnet_files(directory: str) -> list[str]:
    """The four data.* files of a WordNet install; a clear error naming the fix when any is missing."""
    paths = [os.path.join(directory, f"data.{name}") for name in WORDNET_FILES]
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise DataError(
            f"WordNet data files are missing: {', '.join(missing)}. Install them with "
            "`apt-get install wordnet-base` (or `make install`), or set KDISTILL_WORDNET_DIR "
            "to a folder holding data.noun, data.verb, data.adj and data.adv"
        )
    return paths


@functools.lru_cache(maxsize=None)
def _wordnet_records(directory: str) -> tuple[dict, ...]:
    paths = wordnet_files(directory)
    records = []
    for path in paths:
        records.extend(_parse_wordnet_file(path))
    return tuple(records)


@functools.lru_cache(maxsize=None)
def _wordnet_split(directory: str, split: str) -> tuple[dict, ...]:
    return tuple(r for r in _wordnet_records(directory) if split_of(r["id"]) == split)


@CORPORA.register("wordnet-glosses")
def wordnet_glosses(split: str = "train") -> list[dict]:
    """WordNet 3.0 glosses labeled with their supersense (45 classes), split by synset."""
    return _copies(_wordnet_split(wordnet_dir(), check_split(split)))


@CORPORA.register("wordnet-supersense")
def wordnet_supersense(split: str = "train") -> list[dict]:
    """The supersense classification task: gloss -> one of the 45 lexicographer classes
    (WORDNET_SUPERSENSES), train/dev/test split by synset so no synset is in two splits."""
    return wordnet_glosses(split)


POS_NAMES = {"n": "noun", "v": "verb", "a": "adjective", "s": "adjective", "r": "adverb"}


@CORPORA.register("wordnet-definitions")
def wordnet_definitions(split: str = "train") -> list[dict]:
    """Definition generation for causal LMs: `word: <lemma> (<pos>)\ndefinition: <gloss>`, split by synset.

    `prompt` is everything up to "definition:", `reference` the definition alone (the gloss without its
    quoted usage examples), for ROUGE-L of generated definitions."""
    out = []
    for r in _wordnet_split(wordnet_dir(), check_split(split)):
        definition = r["text"].split('; "')[0].strip()
        prompt = f"word: {r['lemma']} ({POS_NAMES[r['pos']]})\ndefinition:"
        out.append({"text": f"{prompt} {definition}", "prompt": prompt, "reference": definition, "id": r["id"]})
    return out


# ---------------------------------------------------------------- license texts

LICENSES_DIR = "/usr/share/common-licenses"


@functools.lru_cache(maxsize=None)
def _license_records(directory: str) -> tuple[dict, ...]:
    if not os.path.isdir(directory):
        raise DataError(f"{directory} is missing: the license-texts corpus reads Debian's base-files licenses")
    seen, records = set(), []
    for name in sorted(os.listdir(directory)):
        path = os.path.join(directory, name)
        if os.path.islink(path) or not os.path.isfile(path):
            continue  # GPL -> GPL-3 and friends: each text once
        with open(path, encoding="utf-8", errors="replace") as f:
            paragraphs = f.read().split("\n\n")
        for para in paragraphs:
            text = " ".join(para.split())
            if len(text) >= MIN_DOCSTRING_CHARS and text not in seen and any(c.isalpha() for c in text):
                seen.add(text)
                records.append({"text": text[:MAX_DOCSTRING_CHARS], "license": name})
    return tuple(records)


@CORPORA.register("license-texts")
def license_texts(split: str = "train") -> list[dict]:
    """Paragraphs of the free-software licenses Debian ships (legal English): a domain far from
    docstrings and glosses, used to check that a student generalises beyond its training text."""
    split = check_split(split)
    return _copies(tuple(r for r in _license_records(LICENSES_DIR) if split_of(r["text"]) == split))


# ---------------------------------------------------------------- images


@CORPORA.register("digits")
def digits(split: str = "train") -> list[dict]:
    """scikit-learn's bundled 1,797 handwritten digits (8×8 grey, 10 classes), split 70/10/20 by image: a small
    dataset needs a bigger test split than the text corpora's 5%."""
    import numpy as np

    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise DataError("the digits corpus needs scikit-learn: pip install scikit-learn") from None
    split = check_split(split)
    data = load_digits()
    images = (data.images / 16.0).astype(np.float32)  # pixel values are 0..16
    return [{"image": images[i][None], "label": str(int(data.target[i])), "id": f"digits-{i}"}
            for i in range(len(images)) if split_of(f"digits-{i}", 70, 10) == split]


# Sources whose class list is known ahead: a new head gets every class even when `limit` or a split leaves some out
# (the supersense test split has 44 of the 45)
CORPUS_CLASSES = {"wordnet-supersense": WORDNET_SUPERSENSES, "wordnet-glosses": WORDNET_SUPERSENSES,
                  "digits": tuple(str(i) for i in range(10))}


# ---------------------------------------------------------------- arithmetic word problems (synthetic)


@CORPORA.register("arithmetic-problems")
def arithmetic_problems(split: str = "train") -> list[dict]:
    """SYNTHETIC arithmetic word problems made from templates with a fixed seed (kdistill.api.word_problems),
    for Program-aided Distillation: `text` is `problem: ...\nprogram:\n<program>`, `prompt` the part up to
    the program, `reference` the program; plus `problem`, `answer` (an integer), `program`, `template`, `id`.
    Split by id (about 3,600 train / 200 eval / 200 test)."""
    from kdistill.api.word_problems import problem_records

    return problem_records(check_split(split), "program")


@CORPORA.register("arithmetic-answers")
def arithmetic_answers(split: str = "train") -> list[dict]:
    """The same SYNTHETIC problems as arithmetic-problems, answered directly: `text` is
    `problem: ...\nanswer: <answer>` (the direct-answer baseline of PaD)."""
    from kdistill.api.word_problems import problem_records

    return problem_records(check_split(split), "answer")


def load_corpus(name: str, split: str = "train", where: str = "source") -> list[dict]:
    """Records of the built-in corpus `name`; unknown names get the closest match in the error."""
    split = check_split(split, where=f"{where}.split" if where else "split")
    return CORPORA.get(name, where)(split)
