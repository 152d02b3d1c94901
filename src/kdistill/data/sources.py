"""Turn a recipe's data source block into a list of records {"text", ["label"], ["text_pair"]}
(or, for images, {"image" | "image_path", "label", "id"}).

A source is exactly one of `source: NAME` (a built-in corpus), `path: FILE` (.jsonl, .csv, .txt,
or a folder written by `datasets`' `save_to_disk`) or `dataset: NAME` (the Hugging Face hub).
"""
from __future__ import annotations

import csv
import itertools
import json
import os
import random
from typing import Any, Iterable, Iterator

from kdistill.data.corpora import load_corpus
from kdistill.errors import ConfigError, DataError

SOURCE_KINDS = ("source", "path", "dataset")
ENCODING = "utf-8-sig"  # UTF-8 that skips a leading byte-order mark (Excel's "CSV UTF-8" writes one)
FILE_KINDS = ".jsonl, .csv, .txt, a folder saved with datasets' save_to_disk, or a folder of class folders of images"


def load_records(spec: dict, split_default: str = "train") -> list[dict]:
    """Records for one data source block; `limit: N` keeps the first N after the split, `sample: N` then N of
    those drawn at random with a fixed seed (the same N every run), in their order."""
    kinds = [k for k in SOURCE_KINDS if spec.get(k) is not None]
    if len(kinds) != 1:
        raise ConfigError(f"a data source needs exactly one of {', '.join(SOURCE_KINDS)}; "
                          f"got {', '.join(kinds) or 'none'} in {spec!r}")
    limit = spec.get("limit")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ConfigError(f"limit must be a positive integer, got {limit!r}")
    split = spec.get("split") or split_default
    fields = {"text": spec.get("text") or "text", "label": spec.get("label"),
              "text_pair": spec.get("text_pair")}
    if spec.get("image") is not None:  # an image record carries no text
        fields = {"image": spec["image"], "label": spec.get("label")}

    if kinds[0] == "source":
        records = load_corpus(spec["source"], split)
        if limit is not None:
            records = records[:limit]
        empty = f"corpus {spec['source']!r} has no records for split {split!r}"
    elif kinds[0] == "path":
        records, empty = _load_path(str(spec["path"]), fields, split, limit)
    else:
        records, empty = _load_hub(spec["dataset"], spec.get("config"), split, fields, limit)

    if not records:  # `empty` is the message each loader wrote for its own kind of emptiness
        raise DataError(empty)
    return _sample(records, spec.get("sample"))


def _sample(records: list[dict], n) -> list[dict]:
    """N records drawn without replacement, seeded by a constant: built-in corpora come in file order, grouped by
    topic (wordnet-supersense's first 1,000 glosses are 95% one class), so `limit` is a biased subset and this
    one is not."""
    if n is None:
        return records
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ConfigError(f"sample must be a positive integer, got {n!r}")
    if n > len(records):
        raise ConfigError(f"sample: {n} asks for more records than the source has ({len(records):,}); "
                          f"lower it, or leave sample out to take them all")
    return [records[i] for i in sorted(random.Random(0).sample(range(len(records)), n))]


def spread(records: list[dict], limit: int | None) -> list[dict]:
    """`limit` records taken evenly through the list: corpora are ordered (e.g. nouns before verbs), so
    the first N would measure one part of the task only."""
    if limit is None or len(records) <= limit:
        return records
    return [records[i * len(records) // limit] for i in range(limit)]


def label_names(records: Iterable[dict]) -> list[str]:
    """Sorted unique labels as strings: the class index is their position in this list. One class per string
    form, as batches look them up (a CSV's "1" and a JSON file's 1 are one class, not two with one name)."""
    kinds: dict[str, set[type]] = {}
    for r in records:
        if r.get("label") is not None:
            kinds.setdefault(str(r["label"]), set()).add(type(r["label"]))
    truth = sorted(text for text, types in kinds.items() if bool in types)
    if truth and len(truth) < len(kinds):  # Python counts True as 1: the classes would silently merge or split
        others = sorted(set(kinds) - set(truth))[:5]
        raise DataError(f"the labels mix true/false ({', '.join(truth)}) with other values ({', '.join(others)}); "
                        f"give every record a label of one kind")
    # Integer labels sort numerically so class ids match them ("2" before "10").
    return sorted(kinds, key=lambda text: (0, int(text), "") if int in kinds[text] else (1, 0, text))


# ---------------------------------------------------------------- local files


def require_path(path: str, where: str = "") -> None:
    """A `path:` source that does not exist, named with the folder relative paths start from, or a file of a kind
    no reader takes (plain `validate` checks both without reading the file)."""
    if not os.path.exists(path):
        raise DataError(f"{where + ': ' if where else ''}data file not found: {path} (paths are relative to the working "
                        f"directory {os.getcwd()})")
    ext = os.path.splitext(path)[1].lower()
    if os.path.isfile(path) and ext not in FILE_READERS:
        raise ConfigError(f"{where + ': ' if where else ''}cannot read {path}: unsupported file kind "
                          f"{ext or '(no extension)'!r}; supported: {FILE_KINDS}")


def has_splits(spec) -> bool:
    """Whether a data source holds splits besides its training records: a built-in corpus, a hub dataset, a saved
    dataset folder or a folder of split folders does; a plain file or a folder of class folders is one split, the
    same records whatever split is asked of it."""
    path = spec.path if hasattr(spec, "path") else spec.get("path")
    if path is None or not os.path.exists(path):
        return True
    if os.path.isfile(path):
        return False
    from kdistill.data.images import SPLIT_FOLDERS, is_image_folder

    if is_image_folder(path):
        return any(os.path.isdir(os.path.join(path, name)) for names in SPLIT_FOLDERS.values() for name in names)
    if os.path.exists(os.path.join(path, "state.json")):  # one Dataset saved with save_to_disk, not a DatasetDict
        return os.path.exists(os.path.join(path, "dataset_dict.json"))
    return True


def _load_path(path: str, fields: dict, split: str, limit: int | None):
    # A plain file is one split already (the recipe names one file per split); only a saved
    # DatasetDict folder has splits to choose from.
    require_path(path)
    if os.path.isdir(path):
        from kdistill.data.images import image_folder, is_image_folder

        if is_image_folder(path):  # path/CLASS/*.png (or path/SPLIT/CLASS/*.png)
            return image_folder(path, split)[:limit], f"{path} has no images"
        _refuse_flat_image_folder(path)
        return _load_saved_dataset(path, fields, split, limit)
    ext = os.path.splitext(path)[1].lower()
    if ext == ".txt" and (fields["label"] or fields.get("text_pair") or fields.get("image")):
        raise ConfigError(f"{path} is a .txt file (one text per line); it has no label, text_pair or "
                          "image fields: use .jsonl or .csv for those")
    rows = itertools.islice(FILE_READERS[ext](path), limit)
    folder = os.path.dirname(os.path.abspath(path))
    try:
        return [_pick(row, fields, f"{path} {where}", folder) for where, row in rows], f"{path} has no records"
    except UnicodeDecodeError:
        raise DataError(f"{path} is not UTF-8 text ({first_bad_utf8(path)}); save it as UTF-8 (with or without a "
                        f"byte-order mark) and try again") from None


def first_bad_utf8(path: str) -> str:
    """Where a file stops being UTF-8, as a person finds it: the line and the byte in that line (the decoder's own
    offset counts from the start of a read buffer)."""
    with open(path, "rb") as f:
        for number, line in enumerate(f, 1):
            try:
                line.decode(ENCODING if number == 1 else "utf-8")
            except UnicodeDecodeError as err:
                return (f"line {number}, byte {err.start + 1} cannot be read as UTF-8: "
                        f"{line[err.start:err.start + 4]!r}")
    return "a character split across lines cannot be read as UTF-8"


def _refuse_flat_image_folder(path: str) -> None:
    from kdistill.data.images import IMAGE_EXTENSIONS

    images = [f for f in os.listdir(path) if os.path.splitext(f)[1].lower() in IMAGE_EXTENSIONS]
    if images:  # the class is where a folder of images keeps it: in the name of the folder each image is in
        raise DataError(f"{path} holds {len(images):,} image files but no class folders: put each class's images "
                        f"in {path}/CLASS/, or list them in a .csv with `image:` and `label:` fields")


def _jsonl_rows(path: str) -> Iterator[tuple[str, dict]]:
    with open(path, encoding=ENCODING) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line.rstrip("\r\n"))  # the column of an error at the end is the line's own
            except json.JSONDecodeError as exc:
                raise DataError(f"{path} line {number} is not valid JSON: {exc.msg.removesuffix(' at')} at column "
                                f"{exc.colno}") from None
            if not isinstance(row, dict):
                raise DataError(f"{path} line {number} is a JSON {type(row).__name__}, "
                                "expected an object such as {\"text\": ...}")
            yield f"line {number}", row


def _csv_rows(path: str) -> Iterator[tuple[str, dict]]:
    # a long document in one field is valid CSV (pandas writes it); the csv module's default cap is 128 kB
    csv.field_size_limit(max(csv.field_size_limit(), 2**31 - 1))
    with open(path, encoding=ENCODING, newline="") as f:
        # strict: a quote left open otherwise swallows every later line into one text, silently
        reader = csv.reader(f, strict=True)
        header, start = None, 1  # start: the physical line the next row begins on, as an editor numbers them
        while True:
            try:
                row = next(reader)
            except StopIteration:
                return
            except csv.Error as err:
                raise DataError(f"{path}: the row starting at line {start} is not valid CSV ({err}){_csv_fix(err)}") \
                    from None
            start = reader.line_num + 1
            if not row:  # a blank line
                continue
            if header is None:
                header = row
                continue
            if len(row) > len(header):
                raise DataError(f"{path} line {reader.line_num} has {len(row)} fields but the header names "
                                f"{len(header)}; a text with a comma in it must be in double quotes")
            yield f"line {reader.line_num}", {name: row[i] if i < len(row) else None for i, name in enumerate(header)}


def _csv_fix(err: csv.Error) -> str:
    if "unexpected end of data" in str(err) or "expected after" in str(err):
        return (": a double quote opened there is not closed, or text follows a closing quote; a text with a double "
                "quote in it is written in quotes with the quote doubled (\"say \"\"hi\"\"\")")
    return ""


def _txt_rows(path: str) -> Iterator[tuple[str, dict]]:
    with open(path, encoding=ENCODING) as f:
        for number, line in enumerate(f, 1):
            if line.strip():
                yield f"line {number}", {"text": line.rstrip("\r\n")}


FILE_READERS = {".jsonl": _jsonl_rows, ".csv": _csv_rows, ".txt": _txt_rows}  # the file kinds a `path:` takes


def _pick(row: dict, fields: dict, where: str, folder: str | None = None) -> dict:
    """Rename the user's field names to the fixed record keys, with errors that point at the row; an image
    field's relative paths are taken from `folder` (the data file's)."""
    record: dict[str, Any] = {}
    for key, field in fields.items():
        if field is None:
            continue
        if field not in row or row[field] is None:
            state = "is missing" if field not in row else "is null"
            raise DataError(f"field {field!r} (the {key} field: {key}: FIELD in a data source, --{key} FIELD for "
                            f"kdistill eval) {state} at {where}; "
                            f"fields there: {', '.join(map(str, row)) or 'none'}{_image_hint(row, key)}")
        value = row[field]
        if key == "image":
            record.update(_image_record(value, field, where, folder))
            continue
        if key != "label" and not isinstance(value, str):
            raise DataError(f"field {field!r} at {where} is {type(value).__name__}, "
                            f"expected a string")
        if key == "label" and isinstance(value, (list, dict)):
            raise DataError(f"field {field!r} (the label field) at {where} is a {type(value).__name__}; a label is one "
                            "class name or number (one class per record: multi-label data is not supported)")
        record[key] = value
    for key in GENERATION_FIELDS:  # kept as they are: a causal LM is scored on prompt -> reference
        if isinstance(row.get(key), str):
            record[key] = row[key]
    return record


GENERATION_FIELDS = ("prompt", "reference")


def _image_hint(row: dict, key: str) -> str:
    from kdistill.data.images import IMAGE_EXTENSIONS

    paths = [name for name, v in row.items()
             if isinstance(v, str) and os.path.splitext(v)[1].lower() in IMAGE_EXTENSIONS]
    if key != "text" or not paths:
        return ""
    return f"; {paths[0]!r} holds image files: give `image: {paths[0]}` for image records"


def _image_record(value, field: str, where: str, folder: str | None) -> dict:
    """An image path (a file's row) or a decoded image (a dataset's image column) as an image record."""
    if isinstance(value, str):
        path = value if os.path.isabs(value) or folder is None else os.path.join(folder, value)
        if not os.path.isfile(path):
            raise DataError(f"field {field!r} at {where}: image file not found: {path}")
        return {"image_path": path, "id": value}
    if hasattr(value, "convert"):  # a PIL image, as `datasets` decodes an Image column
        from kdistill.data.images import image_array

        return {"image": image_array(value), "id": where}
    raise DataError(f"field {field!r} at {where} is {type(value).__name__}, expected an image file's path or an image")


# ---------------------------------------------------------------- Hugging Face datasets


def _import_datasets(why: str):
    try:
        import datasets
    except ImportError:
        raise DataError(f"{why} needs the `datasets` package: pip install 'kdistill[data]'")
    return datasets


def _load_saved_dataset(path: str, fields: dict, split: str, limit: int | None):
    datasets = _import_datasets(f"reading the saved dataset folder {path}")
    try:
        data = datasets.load_from_disk(path)
    except Exception as exc:  # noqa: BLE001 - any failure means the folder is not usable
        raise DataError(f"cannot load {path} as a dataset saved with save_to_disk "
                        f"({type(exc).__name__}: {exc}); supported: {FILE_KINDS}")
    what, empty = path, f"{path} has no records"
    if isinstance(data, datasets.DatasetDict):
        from kdistill.data.images import SPLIT_FOLDERS

        # the names datasets give an eval split (validation, dev, ...), as for folders of split folders
        split = next((name for name in (split, *SPLIT_FOLDERS.get(split, ())) if name in data), split)
        if split not in data:
            raise DataError(f"{path} has no split {split!r}; splits there: {', '.join(data)}")
        data, what = data[split], f"{path} split {split!r}"
        empty = f"{path} has no records for split {split!r}"
    return _dataset_records(data, fields, what, limit), empty


def _load_hub(name: str, config: str | None, split: str, fields: dict, limit: int | None):
    from kdistill.models.loading import hub_unreachable

    datasets = _import_datasets(f"dataset {name!r}")
    why = hub_unreachable()
    offline = datasets.config.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = offline or bool(why)  # the cache answers at once, not after ~25 s of retries
    try:
        data = datasets.load_dataset(name, config, split=split)
    except Exception as exc:  # noqa: BLE001 - network, auth and naming errors all land here
        if why:
            raise DataError(f"dataset {name!r} is not in the datasets cache, and {why}: pass a local file or a folder "
                            f"saved with save_to_disk, or load it once where there is a network") from None
        raise DataError(f"cannot load dataset {name!r}" + (f" config {config!r}" if config else "")
                        + f" split {split!r}: {type(exc).__name__}: {exc}")
    finally:
        datasets.config.HF_HUB_OFFLINE = offline
    records = _dataset_records(data, fields, f"dataset {name!r} split {split!r}", limit)
    return records, f"dataset {name!r} has no records for split {split!r}"


def _dataset_records(data, fields: dict, what: str, limit: int | None) -> list[dict]:
    columns = list(getattr(data, "column_names", None) or [])
    for key, field in fields.items():
        # Checking columns once up front is much cheaper than per row, and says the same thing.
        if field is not None and columns and field not in columns:
            raise DataError(f"field {field!r} (the {key} field: {key}: FIELD in a data source, --{key} FIELD for "
                            f"kdistill eval) is missing in {what}; "
                            f"columns there: {', '.join(columns)}")
    if limit is not None:
        data = data.select(range(min(limit, len(data))))
    return [_pick(row, fields, f"{what} row {i}") for i, row in enumerate(data)]
