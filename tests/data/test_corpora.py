import os

import pytest

from kdistill.data import corpora
from kdistill.data.corpora import CORPORA, WORDNET_SUPERSENSES, load_corpus, split_of
from kdistill.errors import ConfigError, DataError

WORDNET_INSTALLED = all(
    os.path.isfile(os.path.join(corpora.wordnet_dir(), f"data.{n}")) for n in corpora.WORDNET_FILES
)
needs_wordnet = pytest.mark.skipif(not WORDNET_INSTALLED, reason="apt-get install wordnet-base")


def all_splits(name):
    return {s: load_corpus(name, s) for s in ("train", "eval", "test")}


def test_builtin_names_registered():
    assert {"stdlib-docstrings", "wordnet-glosses"} <= set(CORPORA.names())


def test_split_of_is_a_stable_sha1_bucketing():
    # Fixed values: a change here would silently reshuffle every user's train/eval split.
    golden = {"n00001740": "train", "b": "test", "key6": "eval", "key12": "eval", "key10": "test"}
    assert {k: split_of(k) for k in golden} == golden
    counts = {"train": 0, "eval": 0, "test": 0}
    for i in range(10000):
        counts[split_of(f"key{i}")] += 1
    assert 8800 < counts["train"] < 9200 and 400 < counts["eval"] < 600 and 400 < counts["test"] < 600


def test_unknown_corpus_and_split_are_config_errors():
    with pytest.raises(ConfigError, match="did you mean 'wordnet-glosses'"):
        load_corpus("wordnet-gloss")
    with pytest.raises(ConfigError, match="'validation'.*train, eval, test"):
        load_corpus("stdlib-docstrings", "validation")


def test_stdlib_docstrings_splits():
    splits = all_splits("stdlib-docstrings")
    sizes = {s: len(r) for s, r in splits.items()}
    assert sizes["train"] > 2500 and sizes["eval"] > 100 and sizes["test"] > 100, sizes
    texts = {s: {r["text"] for r in recs} for s, recs in splits.items()}
    assert not texts["train"] & texts["eval"] and not texts["train"] & texts["test"]
    assert not texts["eval"] & texts["test"]
    for r in splits["train"][:500]:
        assert 30 <= len(r["text"]) <= 1000 and r["text"] == r["text"].strip()
        assert "label" not in r
    names = {r["name"].split(".")[0] for r in splits["train"]}
    assert "json" in names and not names & {"test", "idlelib", "tkinter", "lib2to3"}


def test_corpora_are_cached_and_return_fresh_copies():
    first = load_corpus("stdlib-docstrings", "eval")
    first[0]["text"] = "changed"
    again = load_corpus("stdlib-docstrings", "eval")
    assert again[0]["text"] != "changed"
    assert [r["text"] for r in again[1:]] == [r["text"] for r in first[1:]]


@needs_wordnet
def test_wordnet_glosses_splits_and_labels():
    splits = all_splits("wordnet-glosses")
    sizes = {s: len(r) for s, r in splits.items()}
    assert sum(sizes.values()) > 115000  # 117,659 in WordNet 3.0
    assert sizes["train"] > 100000 and 5000 < sizes["eval"] < 7000 and 5000 < sizes["test"] < 7000
    ids = {s: {r["id"] for r in recs} for s, recs in splits.items()}
    assert not ids["train"] & ids["eval"] and not ids["train"] & ids["test"]
    assert not ids["eval"] & ids["test"]
    labels = {r["label"] for recs in splits.values() for r in recs}
    assert labels == set(WORDNET_SUPERSENSES) and len(WORDNET_SUPERSENSES) == 45
    entity = next(r for r in splits["train"] + splits["eval"] + splits["test"] if r["id"] == "n00001740")
    assert entity["label"] == "noun.Tops" and entity["lemma"] == "entity" and entity["pos"] == "n"
    assert entity["text"].startswith("that which is perceived")
    assert {r["pos"] for r in splits["train"]} == {"n", "v", "a", "s", "r"}


SYNTHETIC = """\
  1 This software and database is being provided to you, the LICENSEE, by  
  2 Princeton University under the following license.  
00001740 03 n 01 entity 0 000 | that which is perceived or known  
00002000 05 n 02 big_cat 0 cat 1 000 | a large feline; "lions are big cats"  
"""


def write_wordnet(folder, noun=SYNTHETIC):
    folder.mkdir(exist_ok=True)
    (folder / "data.noun").write_text(noun)
    (folder / "data.verb").write_text("00000001 29 v 01 breathe 0 000 | draw air into the lungs  \n")
    (folder / "data.adj").write_text("00000002 00 s 01 galore(ip) 0 000 | in great numbers  \n")
    (folder / "data.adv").write_text("")


def test_wordnet_parses_synthetic_files(tmp_path, monkeypatch):
    write_wordnet(tmp_path)
    monkeypatch.setenv("KDISTILL_WORDNET_DIR", str(tmp_path))
    records = corpora._wordnet_records(str(tmp_path))
    assert [r["id"] for r in records] == ["n00001740", "n00002000", "v00000001", "s00000002"]
    cat = records[1]
    assert cat == {"text": 'a large feline; "lions are big cats"', "label": "noun.animal",
                   "lemma": "big cat", "pos": "n", "id": "n00002000"}
    assert records[2]["label"] == "verb.body" and records[3]["lemma"] == "galore"
    everything = sum((corpora.wordnet_glosses(s) for s in ("train", "eval", "test")), [])
    assert sorted(r["id"] for r in everything) == sorted(r["id"] for r in records)


def test_wordnet_missing_files_say_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setenv("KDISTILL_WORDNET_DIR", str(tmp_path / "nowhere"))
    with pytest.raises(DataError, match="apt-get install wordnet-base") as err:
        load_corpus("wordnet-glosses", "train")
    assert "data.noun" in str(err.value)


def test_wordnet_corrupt_line_names_file_and_line(tmp_path):
    write_wordnet(tmp_path, noun="00001740 xx n 01 entity 0 000 | gloss\n")
    with pytest.raises(DataError, match=r"data.noun line 1"):
        corpora._wordnet_records(str(tmp_path))


@pytest.mark.skipif(not os.path.isdir("/usr/share/common-licenses"), reason="no Debian license texts")
def test_license_texts_are_deduplicated_prose_with_disjoint_splits():
    train, eval_, test = (load_corpus("license-texts", s) for s in ("train", "eval", "test"))
    texts = [r["text"] for r in train + eval_ + test]
    assert len(texts) == len(set(texts)) > 300
    assert {r["text"] for r in train}.isdisjoint({r["text"] for r in test})
    assert all(len(t) >= 30 for t in texts)


@needs_wordnet
def test_wordnet_definitions_prompt_reference_and_split():
    from kdistill.data.corpora import wordnet_definitions

    train, test = wordnet_definitions("train"), wordnet_definitions("test")
    assert not {r["id"] for r in train} & {r["id"] for r in test}
    r = test[0]
    assert r["text"] == f"{r['prompt']} {r['reference']}" and r["prompt"].endswith("\ndefinition:")
    assert r["prompt"].startswith("word: ") and '"' not in r["reference"]  # usage examples are cut off
