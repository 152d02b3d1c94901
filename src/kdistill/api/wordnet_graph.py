"""WordNet's synset graph, for writing new definition instructions near given ones (Lion's offline writer).

Each synset of `/usr/share/wordnet/data.*` lists pointers to related synsets; we keep the ones that make
a "neighbourhood" of a word: hypernyms (incl. instance-of), hyponyms (incl. instances), similar-to
(adjective clusters) and also-see, plus siblings (the other hyponyms of its hypernyms), and its
lexicographer file (noun.animal, verb.motion, ...) as the wider neighbourhood. Ids are the corpus ids of
`wordnet-definitions` (`<ss_type><offset>`, e.g. `n02084071`), so a neighbour is a corpus record.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass

POINTERS = {"@": "hypernym", "@i": "hypernym", "~": "hyponym", "~i": "hyponym", "&": "similar", "^": "also"}
RELATIONS = ("hypernym", "hyponym", "sibling", "similar", "also")


@dataclass(frozen=True)
class Synset:
    lexfile: str
    links: dict[str, tuple[str, ...]]  # relation -> synset ids


@functools.lru_cache(maxsize=None)
def wordnet_graph(directory: str) -> dict[str, Synset]:
    from kdistill.data.corpora import WORDNET_SUPERSENSES, wordnet_files
    from kdistill.errors import DataError

    graph = {}
    for path in wordnet_files(directory):
        with open(path, encoding="utf-8", errors="replace") as f:
            for number, line in enumerate(f, 1):
                if line.startswith("  ") or not line.strip():
                    continue  # license header
                fields = line.partition(" | ")[0].split()
                try:
                    words = int(fields[3], 16)
                    count = int(fields[4 + 2 * words])
                    start = 5 + 2 * words
                    links: dict[str, list[str]] = {}
                    for i in range(count):
                        symbol, offset, pos = fields[start + 4 * i: start + 4 * i + 3]
                        if symbol in POINTERS:
                            links.setdefault(POINTERS[symbol], []).append(f"{pos}{offset}")
                    graph[f"{fields[2]}{fields[0]}"] = Synset(WORDNET_SUPERSENSES[int(fields[1])],
                                                              {k: tuple(v) for k, v in links.items()})
                except (IndexError, ValueError) as exc:
                    raise DataError(f"{path} line {number} is not a WordNet synset line ({exc}); reinstall it "
                                    "with `apt-get install --reinstall wordnet-base`") from None
    return graph


def neighbours(graph: dict[str, Synset], synset_id: str, relations=RELATIONS) -> list[str]:
    """Related synsets in a fixed order (direct relations first, then siblings), without repeats or itself."""
    node = graph.get(synset_id)
    if node is None:
        return []
    found = [n for r in relations if r != "sibling" for n in node.links.get(r, ())]
    if "sibling" in relations:
        found += [s for parent in node.links.get("hypernym", ()) if parent in graph
                  for s in graph[parent].links.get("hyponym", ())]
    return [n for n in dict.fromkeys(found) if n != synset_id]


def default_directory() -> str:
    from kdistill.data.corpora import wordnet_dir

    return os.path.abspath(wordnet_dir())
