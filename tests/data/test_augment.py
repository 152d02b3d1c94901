import os

import pytest

from kdistill.data import corpora
from kdistill.data.augment import WORD, augment_records, synonym_table
from kdistill.errors import ConfigError, DataError

WORDNET_INSTALLED = all(
    os.path.isfile(os.path.join(corpora.wordnet_dir(), f"data.{n}")) for n in corpora.WORDNET_FILES
)
needs_wordnet = pytest.mark.skipif(not WORDNET_INSTALLED, reason="apt-get install wordnet-base")

# A small hand-made table keeps the non-WordNet tests independent of the install.
TABLE = {"quick": ["fast", "speedy"], "dog": ["hound"], "big": ["large"], "car": ["automobile"]}
COMMON = "The quick dog saw a big car and a small house near the old river on a cold day."


@needs_wordnet
def test_synonym_table_known_pairs_and_shape():
    table = synonym_table()
    for a, b in [("car", "automobile"), ("big", "large"), ("quick", "speedy"), ("buy", "purchase")]:
        assert b in table[a] and a in table[b]
    # adjective markers stripped: "galore(ip)" shares a synset with "abounding"
    assert "galore" in table["abounding"] and not any("(" in w for w in table["galore"])
    for word, synonyms in table.items():
        assert WORD.fullmatch(word) and word.islower() and word not in synonyms
        assert synonyms == sorted(synonyms) and len(set(synonyms)) == len(synonyms)
        assert all("_" not in s and " " not in s for s in synonyms)
    # names and acronyms are not paraphrases: the pronoun "us" must not become "america"
    assert "us" not in table and "america" not in table.get("usa", [])
    assert synonym_table() is table  # cached


def test_missing_wordnet_files_name_the_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("KDISTILL_WORDNET_DIR", str(tmp_path))
    with pytest.raises(DataError, match="apt-get install wordnet-base"):
        synonym_table()
    with pytest.raises(DataError, match="data.noun"):
        augment_records([{"text": "a car"}])


def test_copies_order_labels_and_flag():
    records = [{"text": COMMON, "label": 3, "id": "a"}, {"text": "A big dog.", "label": 7}]
    out = augment_records(records, copies=3, table=TABLE)
    assert len(out) == 2 * (1 + 3)
    assert out[0] == records[0] and out[4] == records[1]  # originals first, untouched
    assert [r["label"] for r in out] == [3] * 4 + [7] * 4
    assert all(r["augmented"] is True for i, r in enumerate(out) if i % 4)
    assert all(r["id"] == "a" for r in out[:4])
    assert len(augment_records(records, copies=2, table=TABLE, keep_original=False)) == 4
    assert augment_records(records, copies=0, table=TABLE) == records
    assert "augmented" not in records[0]  # inputs are not mutated


def test_deterministic_per_seed_and_varies_between_seeds():
    records = [{"text": COMMON, "label": 0}] * 3
    a = augment_records(records, copies=4, replace_prob=0.5, seed=1, table=TABLE)
    assert a == augment_records(records, copies=4, replace_prob=0.5, seed=1, table=TABLE)
    assert a != augment_records(records, copies=4, replace_prob=0.5, seed=2, table=TABLE)
    texts = [r["text"] for r in a if r.get("augmented")]
    assert len(set(texts[:4])) > 1  # a record's copies each get their own stream
    assert texts[:4] != texts[4:8] != texts[8:]  # and so do records with the same text


def test_capitalisation_and_replacements_come_from_table():
    out = augment_records([{"text": "Quick dog"}], copies=5, replace_prob=1.0, table=TABLE,
                          keep_original=False)
    for r in out:
        first, second = r["text"].split(" ")
        assert first in {"Fast", "Speedy"} and second == "hound"


def test_replace_prob_zero_restores_text_exactly():
    text = "  Hello,\tworld!  It's a full-face (big) car...\n\n\"Quoted\" — 3 cars; o'clock?  "
    assert "".join(WORD.split(text)) == text
    out = augment_records([{"text": text}], copies=3, replace_prob=0.0, table=TABLE)
    assert all(r["text"] == text for r in out)


def test_punctuation_and_whitespace_survive_replacement():
    text = "Big, quick\tdog!\n(car)"
    out = augment_records([{"text": text}], copies=1, replace_prob=1.0, table=TABLE,
                          keep_original=False)
    assert out[0]["text"] in {"Large, fast\thound!\n(automobile)",
                              "Large, speedy\thound!\n(automobile)"}


def test_bad_arguments_are_errors():
    with pytest.raises(ConfigError, match="copies"):
        augment_records([{"text": "x"}], copies=-1, table=TABLE)
    with pytest.raises(ConfigError, match="replace_prob"):
        augment_records([{"text": "x"}], replace_prob=1.5, table=TABLE)
    with pytest.raises(DataError, match="record 0"):
        augment_records([{"label": 1}], table=TABLE)


@needs_wordnet
def test_wordnet_augmentation_changes_a_sentence_of_common_words():
    records = [{"text": COMMON, "label": 5}]
    out = augment_records(records, copies=4, replace_prob=0.4, seed=0)
    augmented = [r for r in out if r.get("augmented")]
    assert len(augmented) == 4 and all(r["label"] == 5 for r in augmented)
    assert all(r["text"] != COMMON for r in augmented)
    for r in augmented:  # one word in, one word out: the token layout is unchanged
        before, after = WORD.split(COMMON), WORD.split(r["text"])
        assert len(before) == len(after) and before[::2] == after[::2]
