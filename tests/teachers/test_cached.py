"""Training from a teacher store: equal to the live teacher when the store is complete, refused when it
does not match the run, and usable for causal LMs without the teacher's weights."""
import json
from pathlib import Path

import pytest
import torch

from kdistill import distill
from kdistill.config import load_recipe
from kdistill.errors import CheckpointError, ConfigError, DataError, PairingError
from kdistill.models.loading import load_model
from kdistill.teachers.store_build import cache_teacher


@pytest.fixture
def classifier_recipe(tmp_path, make_classifier):
    teacher = make_classifier(tmp_path / "teacher")
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"text": f"a {w} thing number {i}", "y": w}) + "\n"
                            for i in range(8) for w in ("red", "green", "blue")))
    return {"name": "cls-kd", "teacher": {"model": teacher},
            "student": {"config": {"num_hidden_layers": 1}},
            "data": {"train": {"path": str(data), "label": "y"}, "eval": {"path": str(data), "label": "y"},
                     "max_length": 16},
            "losses": [{"type": "logit_kd", "temperature": 2.0, "alpha": 0.3}],
            "train": {"steps": 3, "batch_size": 4, "lr": 1e-3}, "output": str(tmp_path / "live")}


def cached(recipe, store, output):
    return {**recipe, "teacher": {"source": "cache", "path": str(store)}, "output": str(output)}


def test_complete_store_trains_exactly_like_the_live_teacher(classifier_recipe, tmp_path):
    live = distill(classifier_recipe, progress=False)
    store = cache_teacher(load_recipe(classifier_recipe), k=3, out=str(tmp_path / "store"), dtype="float32")
    manifest = json.loads((store / "manifest.json").read_text())
    assert manifest["k"] == 3 and manifest["temperature"] == 2.0  # the recipe's KD temperature
    from_store = distill(cached(classifier_recipe, store, tmp_path / "cached"), progress=False)
    a = load_model(str(live), "classification").model.state_dict()
    b = load_model(str(from_store), "classification").model.state_dict()
    assert all(torch.allclose(a[key], b[key], atol=1e-6) for key in a)


def test_store_for_other_data_or_corrupt_is_refused(classifier_recipe, tmp_path):
    store = cache_teacher(load_recipe(classifier_recipe), k=2, out=str(tmp_path / "store"))
    other = cached(classifier_recipe, store, tmp_path / "other")
    other["data"] = {**other["data"], "train": {**other["data"]["train"], "limit": 6}}
    with pytest.raises(CheckpointError, match=r"records fingerprint differs: .* \(the training records: another file, "
                                              r"split, limit") as refused:
        distill(other, progress=False)
    assert "data fingerprint" not in str(refused.value) and "data cut" not in str(refused.value)
    longer = cached(classifier_recipe, store, tmp_path / "longer")
    longer["data"] = {**longer["data"], "max_length": 48}
    with pytest.raises(CheckpointError, match=r"data cut differs: store has 16, run has 48 \(how the records are cut: "
                                              r"data.max_length") as refused:
        distill(longer, progress=False)
    assert "records fingerprint" not in str(refused.value)
    hotter = cached(classifier_recipe, store, tmp_path / "hot")
    hotter["losses"] = [{"type": "logit_kd", "temperature": 4.0}]
    with pytest.raises(CheckpointError, match="temperature"):
        distill(hotter, progress=False)
    shard = sorted(Path(store).glob("shard-*.safetensors"))[0]
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="shard-00000"):
        distill(cached(classifier_recipe, store, tmp_path / "corrupt"), progress=False)
    copying = cached(classifier_recipe, store, tmp_path / "copy")
    copying["student"] = {"from_teacher": {"layers": [1]}}
    with pytest.raises(ConfigError, match="store does not hold"):
        distill(copying, progress=False)


def lm_recipe(teacher_dir, text_file, tmp_path, limit=12, max_length=24, steps=1, **fields):
    """A tiny causal-LM recipe over the docstrings file: the teacher's logits, a 1-layer student."""
    return {"name": "lm", "teacher": {"model": teacher_dir}, "student": {"config": {"n_layer": 1}},
            "data": {"train": {"path": text_file, "text": "sentence", "limit": limit}, "max_length": max_length},
            "losses": [{"type": "logit_kd", "temperature": 1.0}], "train": {"steps": steps, "batch_size": 4},
            "output": str(tmp_path / "run"), **fields}


def test_a_store_written_to_its_default_place_inside_the_run_folder_lets_the_run_start(tiny_gpt2_dir, text_file,
                                                                                        tmp_path):
    recipe = lm_recipe(tiny_gpt2_dir, text_file, tmp_path)
    store = cache_teacher(load_recipe(recipe))  # OUTPUT/teacher-store
    assert store == tmp_path / "run" / "teacher-store"
    with_eval = cached(recipe, store, tmp_path / "run")
    with_eval["data"] = {**recipe["data"], "eval": {"path": text_file, "text": "sentence", "limit": 4}}
    student = distill(with_eval, progress=False)
    # the store holds no teacher outputs for the eval records: no eval loss is reported, rather than a loss of 0
    assert json.loads((student / "kdistill.json").read_text())["metrics"]["eval"] == {}
    assert '"kind": "eval"' not in (tmp_path / "run" / "logs" / "main.jsonl").read_text()
    # a recipe whose teacher already reads a store built from a named model: cache-teacher runs that model
    auto = {**recipe, "teacher": {"model": tiny_gpt2_dir, "source": "cache", "top_k": 8}, "output": str(tmp_path / "a")}
    assert cache_teacher(load_recipe(auto), k=4).name == "teacher-store"
    with pytest.raises(ConfigError, match="this stage's teacher is a store .* with no teacher.model"):
        cache_teacher(load_recipe(cached(recipe, store, tmp_path / "b")))


def test_cache_teacher_refuses_what_would_make_a_useless_store(tiny_gpt2_dir, text_file, tmp_path):
    recipe = lm_recipe(tiny_gpt2_dir, text_file, tmp_path)
    with pytest.raises(ConfigError, match="--temperature 0: a temperature divides the logits"):
        cache_teacher(load_recipe(recipe), temperature=0, out=str(tmp_path / "s"))
    with pytest.raises(ConfigError, match="sample_head=40000: the teacher has 30,522 tokens"):
        cache_teacher(load_recipe(recipe), sample=4, sample_head=40000, out=str(tmp_path / "s"))
    with pytest.raises(ConfigError, match=r"--k 100000: the teacher has 30,522 tokens, and the next token has a "
                                          r"column of its own, so at most 30,521 fit"):
        cache_teacher(load_recipe(recipe), k=100000, out=str(tmp_path / "s"))  # was cut to 30,521 with a note
    random_teacher = {**recipe, "teacher": {"model": "blueprint:gpt2-6x384", "task": "causal-lm"}}
    with pytest.raises(PairingError, match="is a random init \\(a blueprint\\): a store of it would hold untrained"):
        cache_teacher(load_recipe(random_teacher), out=str(tmp_path / "s"))
    assert not (tmp_path / "s").exists()
    from kdistill.errors import CheckpointError

    with pytest.raises(CheckpointError, match=r"teacher.path: .*nowhere does not exist; build a store there with "
                                              r"`kdistill cache-teacher RECIPE --out"):
        distill(cached(recipe, tmp_path / "nowhere", tmp_path / "run"), progress=False)
    store = cache_teacher(load_recipe(recipe), k=4, out=str(tmp_path / "store"))
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        (store / "teacher" / name).unlink(missing_ok=True)
    with pytest.raises(CheckpointError, match="is damaged: teacher/ has lost the teacher's tokenizer"):
        distill(cached(recipe, store, tmp_path / "run"), progress=False)


def test_causal_lm_from_a_top_k_store(tiny_gpt2_dir, text_file, tmp_path):
    recipe = lm_recipe(tiny_gpt2_dir, text_file, tmp_path, steps=2)
    store = cache_teacher(load_recipe(recipe), k=8, out=str(tmp_path / "store"))
    student = distill(cached(recipe, store, tmp_path / "from-store"), progress=False)
    meta = json.loads((student / "kdistill.json").read_text())
    assert meta["teacher"].startswith("cache:") and meta["steps"] == 2

    # each position keeps the 8 best other tokens, then the one that follows it in the text
    from transformers import AutoTokenizer

    from kdistill.data import load_records
    from kdistill.teachers.cached import record_key
    from kdistill.teachers.store import TeacherStore

    opened = TeacherStore.open(store)
    assert (opened.k, opened.columns, opened.next_token) == (8, 9, True)
    text = load_records({"path": text_file, "text": "sentence", "limit": 12}, "train")[0]["text"]
    ids = AutoTokenizer.from_pretrained(tiny_gpt2_dir)(text, truncation=True, max_length=24)["input_ids"]
    entry = opened[record_key({"text": text})]
    assert entry.topk_indices.shape == (len(ids), 9) and entry.topk_indices[:-1, -1].tolist() == ids[1:]
    plain = TeacherStore.open(cache_teacher(load_recipe(recipe), k=8, out=str(tmp_path / "plain"), next_token=False))
    assert (plain.columns, plain.next_token) == (8, False)

    # a sampled store trains forward KL, and refuses the divergences it would bias
    with pytest.raises(ConfigError, match="sample_head=4 keeps the teacher's top tokens"):  # not a silent top-k store
        cache_teacher(load_recipe(recipe), sample_head=4, out=str(tmp_path / "headless"))
    assert not (tmp_path / "headless").exists()
    sampled = cache_teacher(load_recipe(recipe), sample=16, out=str(tmp_path / "sampled"))
    assert TeacherStore.open(sampled).sampled
    assert distill(cached(recipe, sampled, tmp_path / "from-sampled"), progress=False).exists()
    reverse = cached(recipe, sampled, tmp_path / "reverse")
    reverse["losses"] = [{"type": "logit_kd", "temperature": 1.0, "divergence": "reverse_kl"}]
    with pytest.raises(PairingError, match="sampled teacher store"):
        distill(reverse, progress=False)


def test_automatic_sampled_store_from_the_recipe(tiny_gpt2_dir, text_file, tmp_path, monkeypatch):
    """`teacher: {source: cache, sample: N}`: the store a run builds for itself holds draws, not a top k, and
    lives apart from the top-k store of the same teacher and data."""
    from kdistill.teachers.store import TeacherStore

    monkeypatch.setenv("KDISTILL_HOME", str(tmp_path / "home"))
    recipe = {"name": "lm", "teacher": {"model": tiny_gpt2_dir, "source": "cache", "sample": 8},
              "student": {"config": {"n_layer": 1}},
              "data": {"train": {"path": text_file, "text": "sentence", "limit": 12}, "max_length": 24},
              "losses": [{"type": "logit_kd", "temperature": 1.0}], "train": {"steps": 2, "batch_size": 4},
              "output": str(tmp_path / "sampled")}
    distill(recipe, progress=False)
    top_k = {**recipe, "teacher": {"model": tiny_gpt2_dir, "source": "cache", "top_k": 8},
             "output": str(tmp_path / "top-k")}
    distill(top_k, progress=False)
    stores = sorted((tmp_path / "home" / "stores").iterdir())
    assert len(stores) == 2
    assert sorted(TeacherStore.open(s).sampled for s in stores) == [False, True]
    with pytest.raises(ConfigError, match="sample: says how the automatic teacher store"):
        load_recipe({**recipe, "teacher": {"model": tiny_gpt2_dir, "sample": 8}})
    # a store at a path keeps its own k: a top_k beside it was silently the store's k
    with pytest.raises(ConfigError, match=r"top_k: says how the automatic teacher store is built.*--from-store"):
        load_recipe({**recipe, "teacher": {"source": "cache", "path": str(stores[0]), "top_k": 4}})
    # a head of exact tokens makes a third store, with head + draws columns
    headed = {**recipe, "teacher": {**recipe["teacher"], "sample_head": 4}, "output": str(tmp_path / "headed")}
    distill(headed, progress=False)
    new = set((tmp_path / "home" / "stores").iterdir()) - set(stores)
    assert len(new) == 1 and TeacherStore.open(new.pop()).columns == 12
    with pytest.raises(ConfigError, match="sample_head: keeps the top H"):
        load_recipe({**recipe, "teacher": {"model": tiny_gpt2_dir, "source": "cache", "sample_head": 4}})


@pytest.mark.parametrize("term", [{"type": "taid"}, {"type": "dkd"}, {"type": "hidden_mse"},
                                  {"type": "logit_kd", "chunk_size": 4}, {"type": "logit_kd", "divergence": "mse"}])
def test_terms_that_need_the_live_teacher_are_refused_on_a_store_by_name(tiny_gpt2_dir, text_file, tmp_path, term):
    recipe = lm_recipe(tiny_gpt2_dir, text_file, tmp_path)
    store = cache_teacher(load_recipe(recipe), k=8, out=str(tmp_path / "store"))
    bad = {**cached(recipe, store, tmp_path / "bad"), "losses": [{"type": "logit_kd", "temperature": 1.0}, term]}
    with pytest.raises(PairingError, match=rf"losses\[1\]: {term['type']}.* needs the live teacher .*which a teacher "
                                           r"store does not hold.*teacher.source: live"):
        distill(bad, progress=False)
    assert not (tmp_path / "bad" / "student").exists()


def test_an_automatic_store_is_not_built_for_a_recipe_it_cannot_feed(tiny_gpt2_dir, text_file, tmp_path, monkeypatch):
    monkeypatch.setenv("KDISTILL_HOME", str(tmp_path / "home"))
    recipe = lm_recipe(tiny_gpt2_dir, text_file, tmp_path, losses=[{"type": "logit_kd"}, {"type": "hidden_mse"}],
                       teacher={"model": tiny_gpt2_dir, "source": "cache", "top_k": 8})
    with pytest.raises(PairingError, match=r"losses\[1\]: hidden_mse needs the live teacher"):
        distill(recipe, progress=False)
    assert not (tmp_path / "home" / "stores").exists()  # refused before a pass of the teacher over the data
    # the same for a divergence a sampled store cannot estimate, automatic or at a path
    sampled = {**recipe, "teacher": {"model": tiny_gpt2_dir, "source": "cache", "sample": 4},
               "losses": [{"type": "logit_kd", "divergence": "js"}]}
    with pytest.raises(PairingError, match=r"losses\[0\]: a sampled teacher store estimates forward KL without bias, "
                                           r"not js"):
        distill(sampled, progress=False)
    assert not (tmp_path / "home" / "stores").exists()
    store = cache_teacher(load_recipe(recipe), sample=4, out=str(tmp_path / "drawn"))
    at_path = {**sampled, "teacher": {"source": "cache", "path": str(store)}, "student": {"config": {"n_layer": 1}}}
    from kdistill.engine.build import build_stage

    with pytest.raises(PairingError, match="not js"):  # what validate --full builds
        build_stage(load_recipe(at_path).stages[0])


def test_a_student_with_another_tokenizer_is_refused(tiny_gpt2_dir, text_file, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    # a word-level tokenizer of ten words: not the teacher's WordPiece
    words = {w: i for i, w in enumerate("[UNK] the a of to in is for on with".split())}
    raw = Tokenizer(models.WordLevel(words, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    other = PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="[UNK]")
    student_dir = tmp_path / "student-other-tokenizer"
    config = GPT2Config(vocab_size=30522, n_embd=32, n_layer=1, n_head=4, n_positions=128)
    GPT2LMHeadModel(config).save_pretrained(student_dir)
    other.save_pretrained(student_dir)
    recipe = lm_recipe(tiny_gpt2_dir, text_file, tmp_path, student={"model": str(student_dir)},
                       losses=[{"type": "logit_kd", "temperature": 1.0, "chunk_size": 4}])
    with pytest.raises(PairingError, match=r"student.model: .*'s tokenizer is not the teacher's: 305\d\d of the "
                                           r"teacher's 30522 tokens have another id or none"):
        distill(recipe, progress=False)
    # the teacher's own tokenizer with one more special token (the student's own): accepted
    teachers = AutoTokenizer.from_pretrained(tiny_gpt2_dir)
    teachers.add_special_tokens({"additional_special_tokens": ["<|student-only|>"]})
    teachers.save_pretrained(student_dir)
    assert distill(recipe, progress=False).exists()


def test_a_store_named_beside_another_teacher_model_is_refused(tiny_gpt2_dir, text_file, tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    recipe = lm_recipe(tiny_gpt2_dir, text_file, tmp_path)
    store = cache_teacher(load_recipe(recipe), k=8, out=str(tmp_path / "store"))
    other = tmp_path / "other-teacher"  # a deeper GPT-2 with the same tokenizer
    GPT2LMHeadModel(GPT2Config(**{**load_model(tiny_gpt2_dir).model.config.to_dict(), "n_layer": 3})).save_pretrained(other)
    load_model(tiny_gpt2_dir).tokenizer.save_pretrained(other)
    named = {**cached(recipe, store, tmp_path / "named"), "teacher": {"model": str(other), "source": "cache",
                                                                      "path": str(store)}}
    with pytest.raises(PairingError, match=r"teacher: the store at teacher.path was built from another model than "
                                           r"teacher.model .*: its n_layer is 2, the model's 3"):
        distill(named, progress=False)
    named["teacher"]["model"] = tiny_gpt2_dir  # the model it came from: accepted
    assert distill(named, progress=False).exists()


def test_a_full_vocabulary_store_trains_a_causal_lm_like_the_live_teacher(tiny_gpt2_dir, text_file, tmp_path):
    recipe = lm_recipe(tiny_gpt2_dir, text_file, tmp_path, limit=8, max_length=16, output=str(tmp_path / "live"),
                       losses=[{"type": "logit_kd", "temperature": 2.0}], train={"steps": 2, "batch_size": 4, "lr": 1e-3})
    live = distill(recipe, progress=False)
    vocab = load_model(tiny_gpt2_dir).model.config.vocab_size
    store = cache_teacher(load_recipe(recipe), k=vocab, out=str(tmp_path / "store"), dtype="float32", next_token=False)
    from_store = distill(cached(recipe, store, tmp_path / "from-store"), progress=False)
    a = load_model(str(live), "causal-lm").model.state_dict()
    b = load_model(str(from_store), "causal-lm").model.state_dict()
    # float32 rounding of log-softmax against the buckets: ~3e-6 after two AdamW steps (a flipped update is 2e-3)
    assert all(torch.allclose(a[key], b[key], atol=2e-5, rtol=0) for key in a)


def test_a_store_of_a_classifier_without_a_trained_head_is_refused(classifier_recipe, tiny_bert_dir, tmp_path):
    headless = {**classifier_recipe, "teacher": {"model": tiny_bert_dir, "task": "classification"}}
    with pytest.raises(PairingError, match="has no trained classification head .*BertModel.*random head's outputs"):
        cache_teacher(load_recipe(headless), k=3, out=str(tmp_path / "store"))
    assert not (tmp_path / "store").exists()


def test_an_image_file_is_keyed_by_its_content_not_its_name(tmp_path):
    import os

    import pytest

    from kdistill.errors import DataError
    from kdistill.teachers.cached import record_key

    a, b = tmp_path / "a.png", tmp_path / "copy" / "a.png"
    b.parent.mkdir()
    a.write_bytes(b"pixels one")
    b.write_bytes(b"pixels one")
    before = record_key({"image_path": str(a)})
    assert record_key({"image_path": str(b)}) == before  # the same image in another folder: the same teacher output
    a.write_bytes(b"pixels two")  # overwritten in place: a store made before must not match it
    os.utime(a, ns=(1, 1))
    assert record_key({"image_path": str(a)}) != before
    with pytest.raises(DataError, match="cannot read image"):
        record_key({"image_path": str(tmp_path / "missing.png")})


def test_cache_teacher_of_a_stage_whose_teacher_is_an_earlier_stages_student(classifier_recipe, tmp_path):
    """`teacher: {model: stage:a}` went to the hub as a repo id; it is the run folder's stage-a student."""
    recipe = {**classifier_recipe, "stages": [{"name": "a"}, {"name": "b", "teacher": {"model": "stage:a"}}]}
    with pytest.raises(ConfigError, match=r"--stage 1: its teacher is stage:a, a student not trained yet .*run "
                                          r"`kdistill run` on the recipe first"):
        cache_teacher(load_recipe(recipe), stage_index=1, k=3, out=str(tmp_path / "store"))
    assert not (tmp_path / "store").exists()
    distill(recipe, progress=False)
    store = cache_teacher(load_recipe(recipe), stage_index=1, k=3, out=str(tmp_path / "store"), dtype="float32")
    assert json.loads((store / "manifest.json").read_text())["k"] == 3


def test_a_second_process_waits_for_the_automatic_store_another_is_building(tiny_gpt2_dir, text_file, tmp_path,
                                                                            monkeypatch):
    """The ranks of a distributed launch (or two commands) each built it and replaced the other's while that one
    might already read it: one builds under a file lock, the other waits for it and then builds nothing."""
    import threading

    from filelock import FileLock

    from kdistill.teachers import store_build

    monkeypatch.setenv("KDISTILL_HOME", str(tmp_path / "home"))
    recipe = lm_recipe(tiny_gpt2_dir, text_file, tmp_path, losses=[{"type": "logit_kd"}],
                       teacher={"model": tiny_gpt2_dir, "source": "cache", "top_k": 8})
    stage = load_recipe(recipe).stages[0]
    built = []
    monkeypatch.setattr(store_build, "cache_stage", lambda *a, **k: built.append(True))
    stores = tmp_path / "home" / "stores"
    stores.mkdir(parents=True)
    real = store_build.automatic_store
    name = []

    def probe_name():  # the store's folder name, found by letting a first call build into a throwaway home
        monkeypatch.setenv("KDISTILL_HOME", str(tmp_path / "probe"))
        name.append(real(stage).name)
        monkeypatch.setenv("KDISTILL_HOME", str(tmp_path / "home"))
        built.clear()

    probe_name()
    out = stores / name[0]
    (tmp_path / "home" / "locks").mkdir()
    builder = FileLock(str(tmp_path / "home" / "locks" / f"store-{out.name}.lock"))
    builder.acquire()  # another process is building it
    result = []
    waiter = threading.Thread(target=lambda: result.append(real(stage)))
    waiter.start()
    waiter.join(timeout=1.0)
    assert waiter.is_alive() and not built  # waiting, not building
    out.mkdir()
    (out / "manifest.json").write_text("{}")  # the other process finished
    builder.release()
    waiter.join(timeout=30)
    assert result == [out] and not built


def test_without_progress_bars_neither_the_store_nor_transformers_draws_one(tiny_gpt2_dir, text_file, tmp_path,
                                                                            monkeypatch, capfd):
    from transformers.utils import logging as hf_logging

    monkeypatch.setenv("KDISTILL_HOME", str(tmp_path / "home"))
    recipe = lm_recipe(tiny_gpt2_dir, text_file, tmp_path, losses=[{"type": "logit_kd"}],
                       teacher={"model": tiny_gpt2_dir, "source": "cache", "top_k": 8})
    distill(recipe, progress=False)
    out, err = capfd.readouterr()
    assert "building the teacher store" in " ".join(out.split())
    assert "teacher over the training data" not in out + err and "Loading weights" not in out + err
    assert hf_logging.is_progress_bar_enabled()  # as it was, for the caller's own loading after the run


def test_cache_teacher_names_what_a_synthesizing_recipes_stages_hold(tmp_path):
    """pad: stage 0 writes programs and has no teacher (an AttributeError), stage 1 trains on them (named as a
    missing file 'stage:synthesize')."""
    recipe = load_recipe("pad", output=str(tmp_path / "run"))
    with pytest.raises(ConfigError, match=r"--stage 0: that stage makes training data and has no teacher to store; "
                                          r"the stages with one: 1 \(--stage N\)"):
        cache_teacher(recipe, out=str(tmp_path / "s"))
    with pytest.raises(DataError, match=r"--stage 1: its training data is made by an earlier stage of the recipe "
                                        r"\(`kdistill run` makes it\): .*stage:synthesize has not finished"):
        cache_teacher(recipe, stage_index=1, out=str(tmp_path / "s"))


def test_cache_teacher_refuses_an_unwritable_output_before_running_the_teacher(tmp_path, monkeypatch):
    """A file on the output's path gave a FileExistsError traceback from the store writer."""
    import kdistill.teachers.store_build as store_build
    from kdistill.errors import OutputError

    (tmp_path / "afile").write_text("mine")
    monkeypatch.setattr(store_build, "cache_stage", lambda *a, **k: pytest.fail("the teacher ran"))
    with pytest.raises(OutputError, match=r"afile/sub: a teacher store cannot be written there \(a file stands where "
                                          r"a folder on its path would be\); choose another output folder"):
        cache_teacher(load_recipe("supersense-kd"), out=str(tmp_path / "afile" / "sub"))
    assert (tmp_path / "afile").read_text() == "mine" and sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


def test_an_automatic_store_is_built_again_when_its_data_file_is_edited(tiny_gpt2_dir, tmp_path, monkeypatch):
    import os

    monkeypatch.setenv("KDISTILL_HOME", str(tmp_path / "home"))
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"text": f"the number {i} is small"}) + "\n" for i in range(12)))
    recipe = {"name": "auto", "teacher": {"model": tiny_gpt2_dir, "source": "cache", "top_k": 4},
              "student": {"config": {"n_layer": 1}}, "data": {"train": {"path": str(data)}, "max_length": 16},
              "losses": [{"type": "logit_kd", "temperature": 1.0}], "train": {"steps": 2, "batch_size": 4},
              "output": str(tmp_path / "one")}
    distill(recipe, progress=False)
    data.write_text(data.read_text().replace("number 3", "number three"))
    os.utime(data, ns=(data.stat().st_atime_ns, data.stat().st_mtime_ns + 10 ** 9))
    # before: this store's records fingerprint differed, and the error named a path the recipe did not have
    distill({**recipe, "output": str(tmp_path / "two")}, progress=False)
    assert len(list((tmp_path / "home" / "stores").iterdir())) == 2
