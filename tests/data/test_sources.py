import csv
import json

import pytest

from kdistill.data.sources import label_names, load_records
from kdistill.errors import ConfigError, DataError


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_csv(path, rows):
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


ROWS = [{"sentence": "a cat sat", "topic": "animals", "other": "x"},
        {"sentence": "stocks fell", "topic": "money", "other": "y"},
        {"sentence": "dogs bark", "topic": "animals", "other": "z"}]


def test_jsonl_with_custom_fields_and_limit(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", ROWS)
    records = load_records({"path": str(path), "text": "sentence", "label": "topic",
                            "text_pair": "other"})
    assert records[0] == {"text": "a cat sat", "label": "animals", "text_pair": "x"}
    assert len(records) == 3
    assert load_records({"path": str(path), "text": "sentence", "limit": 2}) == [
        {"text": "a cat sat"}, {"text": "stocks fell"}]


def test_jsonl_keeps_int_labels_and_skips_blank_lines(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "one", "label": 1}\n\n{"text": "two", "label": 10}\n')
    records = load_records({"path": str(path), "label": "label"})
    assert [r["label"] for r in records] == [1, 10]
    assert label_names(records + [{"text": "x", "label": 2}]) == ["1", "2", "10"]


def test_a_list_as_a_label_names_the_field_and_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"sentence": "a b", "y": 1}\n{"sentence": "c d", "y": [1, 2]}\n')
    with pytest.raises(DataError, match=r"'y' \(the label field\) at .*d.jsonl line 2 is a list; .*multi-label"):
        load_records({"path": str(path), "text": "sentence", "label": "y"})


def test_csv_with_custom_fields(tmp_path):
    path = write_csv(tmp_path / "d.csv", ROWS)
    records = load_records({"path": str(path), "text": "sentence", "label": "topic"})
    assert records == [{"text": r["sentence"], "label": r["topic"]} for r in ROWS]
    assert label_names(records) == ["animals", "money"]


def test_txt_one_record_per_non_empty_line(tmp_path):
    path = tmp_path / "d.txt"
    path.write_text("first line\n\n  \nsecond line\n")
    assert load_records({"path": str(path)}) == [{"text": "first line"}, {"text": "second line"}]
    with pytest.raises(ConfigError, match="no label"):
        load_records({"path": str(path), "label": "label"})


def test_builtin_source_with_split_and_limit():
    records = load_records({"source": "stdlib-docstrings", "limit": 5}, split_default="eval")
    assert len(records) == 5
    assert records == load_records({"source": "stdlib-docstrings", "split": "eval", "limit": 5})
    train = load_records({"source": "stdlib-docstrings", "limit": 5})
    assert {r["text"] for r in train}.isdisjoint(r["text"] for r in records)


def test_sample_draws_the_same_records_every_time_in_source_order():
    everything = load_records({"source": "stdlib-docstrings"})
    records = load_records({"source": "stdlib-docstrings", "sample": 40})
    assert records == load_records({"source": "stdlib-docstrings", "sample": 40})
    position = {r["text"]: i for i, r in enumerate(everything)}
    places = [position[r["text"]] for r in records]
    assert len(set(places)) == 40 and places == sorted(places)
    # drawn through the whole source, where limit takes its head
    assert places[-1] > len(everything) // 2 and places != list(range(40))
    # after limit: a sample of the first 100
    assert all(position[r["text"]] < 100 for r in load_records({"source": "stdlib-docstrings", "limit": 100,
                                                                 "sample": 10}))


def test_sample_larger_than_the_source_is_refused(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in ROWS))
    with pytest.raises(ConfigError, match=f"sample: 99 asks for more records than the source has \\({len(ROWS)}\\)"):
        load_records({"path": str(path), "text": "sentence", "sample": 99})


def test_saved_dataset_round_trip(tmp_path):
    datasets = pytest.importorskip("datasets")
    data = datasets.DatasetDict({
        "train": datasets.Dataset.from_list(ROWS),
        "eval": datasets.Dataset.from_list(ROWS[:1]),
    })
    data.save_to_disk(str(tmp_path / "saved"))
    spec = {"path": str(tmp_path / "saved"), "text": "sentence", "label": "topic"}
    assert len(load_records(spec)) == 3
    assert load_records(spec, split_default="eval") == [{"text": "a cat sat", "label": "animals"}]
    with pytest.raises(DataError, match="no split 'test'; splits there: train, eval"):
        load_records({**spec, "split": "test"})
    with pytest.raises(DataError, match=r"'title'.*columns there: sentence, topic, other"):
        load_records({**spec, "text": "title"})
    # a hub-style folder names its eval split `validation`: --split eval (eval's default) finds it
    datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS),
                          "validation": datasets.Dataset.from_list(ROWS[1:2])}).save_to_disk(str(tmp_path / "hub"))
    assert load_records({**spec, "path": str(tmp_path / "hub")}, split_default="eval") == [
        {"text": ROWS[1]["sentence"], "label": ROWS[1]["topic"]}]
    single = tmp_path / "single"
    datasets.Dataset.from_list(ROWS).save_to_disk(str(single))
    assert load_records({"path": str(single), "text": "sentence", "limit": 1}) == [
        {"text": "a cat sat"}]


def test_hub_dataset_is_loaded_with_name_config_split(monkeypatch):
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr("kdistill.models.loading.hub_unreachable", lambda: None)
    calls = []

    def fake_load(name, config=None, split=None):
        calls.append((name, config, split))
        return datasets.Dataset.from_list([{"sentence": "hi", "label": 0}])

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    records = load_records({"dataset": "glue", "config": "sst2", "text": "sentence",
                            "label": "label"}, split_default="validation")
    assert calls == [("glue", "sst2", "validation")] and records == [{"text": "hi", "label": 0}]


def test_hub_failure_is_a_data_error_naming_the_dataset(monkeypatch):
    datasets = pytest.importorskip("datasets")

    def offline(name, config=None, split=None):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    monkeypatch.setattr("kdistill.models.loading.hub_unreachable", lambda: None)
    with pytest.raises(DataError, match="'someone/corpus'.*no network"):
        load_records({"dataset": "someone/corpus"})


def test_without_the_hub_a_dataset_comes_from_the_cache_at_once_or_is_named(monkeypatch):
    """The datasets client retried an unreachable hub for about 25 s, printing each retry, before its own error."""
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr("kdistill.models.loading.hub_unreachable", lambda: "huggingface.co cannot be reached (DNS)")
    cached = {"someone/cached": datasets.Dataset.from_list([{"text": "kept"}])}
    offline_when_asked = []

    def load(name, config=None, split=None):
        offline_when_asked.append(datasets.config.HF_HUB_OFFLINE)
        if name not in cached:
            raise ConnectionError("Couldn't reach it on the Hub (OfflineModeIsEnabled)")
        return cached[name]

    monkeypatch.setattr(datasets, "load_dataset", load)
    before = datasets.config.HF_HUB_OFFLINE
    assert load_records({"dataset": "someone/cached"}) == [{"text": "kept"}]
    with pytest.raises(DataError, match=r"dataset 'someone/corpus' is not in the datasets cache, and huggingface.co "
                                        r"cannot be reached \(DNS\): pass a local file"):
        load_records({"dataset": "someone/corpus"})
    assert offline_when_asked == [True, True] and datasets.config.HF_HUB_OFFLINE == before  # and put back


def test_missing_file_names_the_path(tmp_path):
    with pytest.raises(DataError, match="not found: .*nope.jsonl"):
        load_records({"path": str(tmp_path / "nope.jsonl")})


def test_unknown_extension_names_path_and_kinds(tmp_path):
    path = tmp_path / "d.parquet"
    path.write_text("x")
    with pytest.raises(ConfigError, match=r"d.parquet.*'.parquet'.*\.jsonl, \.csv, \.txt"):
        load_records({"path": str(path)})


def test_missing_field_names_field_file_line_and_fields(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"sentence": "ok", "topic": "a"}\n\n{"sentence": "no topic"}\n')
    with pytest.raises(DataError) as err:
        load_records({"path": str(path), "text": "sentence", "label": "topic"})
    message = str(err.value)
    assert "'topic'" in message and "d.jsonl line 3" in message and "fields there: sentence" in message
    csv_path = write_csv(tmp_path / "d.csv", ROWS)
    with pytest.raises(DataError, match=r"'text'.*d.csv line 2.*sentence, topic, other"):
        load_records({"path": str(csv_path)})


def test_bad_json_and_empty_sources(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{not json\n')
    with pytest.raises(DataError, match="bad.jsonl line 2 is not valid JSON"):
        load_records({"path": str(bad)})
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    with pytest.raises(DataError, match="empty.txt has no records"):
        load_records({"path": str(empty)})


def test_empty_split_of_a_corpus(monkeypatch):
    from kdistill.data import corpora

    monkeypatch.setitem(corpora.CORPORA._items, "stdlib-docstrings", lambda split: [])
    with pytest.raises(DataError, match="has no records for split 'eval'"):
        load_records({"source": "stdlib-docstrings", "split": "eval"})


def test_spec_needs_exactly_one_kind_and_a_valid_limit(tmp_path):
    with pytest.raises(ConfigError, match="exactly one of source, path, dataset"):
        load_records({"source": "stdlib-docstrings", "path": "x.jsonl"})
    with pytest.raises(ConfigError, match="exactly one"):
        load_records({})
    with pytest.raises(ConfigError, match="limit"):
        load_records({"source": "stdlib-docstrings", "limit": 0})
    with pytest.raises(ConfigError, match="did you mean 'stdlib-docstrings'"):
        load_records({"source": "stdlib-docstring"})


def test_compare_scores_the_whole_test_split_of_a_sampled_source():
    from kdistill.compare import test_records
    from kdistill.config import load_recipe

    recipe = load_recipe({"name": "s", "teacher": {"model": "/nowhere"}, "student": {"config": {"n_layer": 1}},
                          "data": {"train": {"source": "stdlib-docstrings", "sample": 20},
                                   "eval": {"source": "stdlib-docstrings", "split": "eval", "sample": 5, "limit": 9}},
                          "losses": [{"type": "cross_entropy"}], "train": {"steps": 1}})
    assert test_records(recipe) == load_records({"source": "stdlib-docstrings", "split": "test"})


def test_files_that_are_not_plain_utf8_get_named(tmp_path):
    bom = tmp_path / "excel.csv"
    bom.write_bytes("text,label\ncaf\u00e9 au lait,drink\n".encode("utf-8-sig"))
    assert load_records({"path": str(bom), "label": "label"}) == [{"text": "caf\u00e9 au lait", "label": "drink"}]
    latin = tmp_path / "latin.csv"
    latin.write_bytes("text,label\ncaf\u00e9,drink\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin.csv is not UTF-8 text .*save it as UTF-8"):
        load_records({"path": str(latin), "label": "label"})
    # far into a file, named by line and byte in that line (the decoder counts from its read buffer)
    far = tmp_path / "far.txt"
    far.write_bytes(b"plain ascii line\n" * 999 + "caf\u00e9 au lait\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"far.txt is not UTF-8 text \(line 1000, byte 4 cannot be read as UTF-8: "
                                        r"b'\\xe9 au'\)"):
        load_records({"path": str(far)})
    unclosed = tmp_path / "unclosed.jsonl"
    unclosed.write_text('{"text": "first"}\n{"text": "second line"\n')
    with pytest.raises(DataError, match=r"line 2 is not valid JSON: Expecting ',' delimiter at column 23"):
        load_records({"path": str(unclosed)})
    ragged = tmp_path / "ragged.csv"
    ragged.write_text("text,label\ncats, dogs and birds,animals\n")
    with pytest.raises(DataError, match=r"ragged.csv line 2 has 3 fields but the header names 2; .*double quotes"):
        load_records({"path": str(ragged), "label": "label"})
    control = tmp_path / "control.jsonl"
    control.write_text('{"text": "a\tb"}\n')
    with pytest.raises(DataError, match=r"line 1 is not valid JSON: Invalid control character at column 12"):
        load_records({"path": str(control)})


def test_a_csv_quote_left_open_is_named_at_its_line_not_swallowing_the_rest(tmp_path):
    rows = ["sentence,label"] + [f"text number {i},red" for i in range(100)]
    rows[3] = '"he said hi,red'
    path = tmp_path / "quote.csv"
    path.write_text("\n".join(rows) + "\n")
    with pytest.raises(DataError, match=r"quote.csv: the row starting at line 4 is not valid CSV \(unexpected end"):
        load_records({"path": str(path), "text": "sentence"})
    rows[3] = '"he said ""hi"", and a line\nbreak",red'  # quotes doubled and a line break: valid, one record
    path.write_text("\n".join(rows) + "\n")
    records = load_records({"path": str(path), "text": "sentence"})
    assert len(records) == 100 and records[2]["text"] == 'he said "hi", and a line\nbreak'
    rows[3] = '"he said hi,red'
    path.write_text("\n".join(rows[:3] + [""] + rows[3:]) + "\n")  # a blank line before it: still its own line
    with pytest.raises(DataError, match=r"the row starting at line 5 is not valid CSV"):
        load_records({"path": str(path), "text": "sentence"})
    long = "word " * 40000  # one long document, as pandas writes it: valid, past the csv module's 128 kB cap
    path.write_text(f'sentence,label\nshort,red\n"{long}",blue\n')
    assert [len(r["text"]) for r in load_records({"path": str(path), "text": "sentence"})] == [5, len(long)]


def test_a_label_written_as_a_number_in_one_file_and_text_in_another_is_one_class():
    """A CSV's "1" and a JSON file's 1 made two classes both named "1", one of each never trained (batches look
    labels up by their text); true/false beside other values is refused, not merged into 1 and 0."""
    from kdistill.data.sources import label_names

    records = [{"label": "0"}, {"label": "1"}, {"label": 0}, {"label": 1}, {"label": 10}, {"label": 2}]
    assert label_names(records) == ["0", "1", "2", "10"]
    assert label_names([{"label": "b"}, {"label": 3}, {"label": "a"}]) == ["3", "a", "b"]
    assert label_names([{"label": True}, {"label": False}]) == ["False", "True"]
    with pytest.raises(DataError, match=r"mix true/false \(True\) with other values \(0, 1\)"):
        label_names([{"label": True}, {"label": 0}, {"label": 1}])


def test_a_missing_field_names_the_fields_there_and_how_to_choose_one(tmp_path):
    rows = tmp_path / "rows.csv"
    rows.write_text("sentence,label\na cat,animal\n")
    with pytest.raises(DataError, match=r"field 'text' \(the text field: text: FIELD in a data source, --text FIELD "
                                        r"for kdistill eval\) is missing at .*rows.csv line 2; fields there: sentence, "
                                        r"label"):
        load_records({"path": str(rows)})
    nulls = tmp_path / "nulls.jsonl"
    nulls.write_text('{"text": "a", "label": null}\n')
    with pytest.raises(DataError, match=r"field 'label' \(the label field: .*--label FIELD .*\) is null at"):
        load_records({"path": str(nulls), "label": "label"})
