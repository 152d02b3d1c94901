from pathlib import Path

import pytest

from kdistill.errors import ConfigError, DataError
from kdistill.models.loading import detect_task, load_model, read_pooling, resolve_model_path


def test_packaged_teacher_resolves_to_its_directory(minilm_dir):
    assert resolve_model_path("packaged:all-MiniLM-L6-v2") == minilm_dir
    assert read_pooling(minilm_dir) == "mean"
    with pytest.raises(ConfigError, match="all-MiniLM-L6-v2"):
        resolve_model_path("packaged:all-MiniLM-L12")


def test_local_directories(tmp_path, tiny_bert_dir):
    assert resolve_model_path(tiny_bert_dir) == tiny_bert_dir
    with pytest.raises(DataError, match="no config.json"):
        resolve_model_path(str(tmp_path))
    with pytest.raises(DataError, match="does not exist"):
        resolve_model_path("./missing/model")
    run = tmp_path / "run"
    (run / "student").mkdir(parents=True)
    (run / "student" / "config.json").write_text("{}")
    with pytest.raises(DataError, match="it is a kdistill run: its model is .*run/student"):
        resolve_model_path(str(run))
    unfinished = tmp_path / "unfinished"
    step = unfinished / "checkpoints" / "main" / "step-0000002"
    step.mkdir(parents=True)
    (step / "manifest.json").write_text("{}")
    with pytest.raises(DataError, match=r"training checkpoint of the run .*unfinished: resume that run \(`kdistill run "
                                        r"RECIPE --output .*unfinished --resume`\)"):
        resolve_model_path(str(step))
    with pytest.raises(DataError, match=r"an unfinished kdistill run: resume it"):
        resolve_model_path(str(unfinished))


def test_hub_id_goes_to_the_hub_and_fails_clearly_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert resolve_model_path("sentence-transformers/all-MiniLM-L12-v2") == "sentence-transformers/all-MiniLM-L12-v2"
    with pytest.raises(DataError, match="all-MiniLM-L12-v2"):
        load_model("sentence-transformers/all-MiniLM-L12-v2")


def test_uncached_hub_id_without_a_network_fails_at_once_naming_the_fix(monkeypatch, tmp_path):
    import socket

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    for proxy in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(proxy, raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))  # nothing cached
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)

    attempts = []

    def unreachable(*args, **kwargs):
        attempts.append(args)
        raise socket.gaierror(-2, "Name or service not known")

    monkeypatch.setattr(socket, "create_connection", unreachable)
    with pytest.raises(DataError, match=r"'some-org/some-model' is not a local folder nor in the Hugging Face cache, "
                                        r"and huggingface.co cannot be reached .*huggingface-cli download some-org/some-model"):
        load_model("some-org/some-model")
    assert len(attempts) == 1  # one look, not the hub client's ~30 s of retries
    from kdistill.models.loading import check_hub_reachable

    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.example:3128")  # behind a proxy a direct probe proves nothing
    check_hub_reachable("some-org/some-model")
    monkeypatch.delenv("HTTPS_PROXY")
    probed = []
    monkeypatch.setattr(socket, "create_connection", lambda address, timeout: probed.append(address) or unreachable())
    monkeypatch.setattr("huggingface_hub.constants.ENDPOINT", "http://mirror.example:8765")  # a mirror, plain http
    with pytest.raises(DataError, match="mirror.example cannot be reached"):
        check_hub_reachable("some-org/some-model")
    assert probed == [("mirror.example", 8765)]


def test_task_detection(tiny_bert_dir, tiny_gpt2_dir):
    assert load_model(tiny_bert_dir).task == "embedding"
    loaded = load_model(tiny_gpt2_dir)
    assert loaded.task == "causal-lm" and loaded.tokenizer is not None

    class C:
        architectures = ["BertForSequenceClassification"]

    assert detect_task(C()) == "classification"


def test_blueprint_is_a_seeded_random_model_saved_once(tmp_path, monkeypatch):
    import torch

    from kdistill.models.blueprints import BLUEPRINTS

    monkeypatch.setenv("KDISTILL_HOME", str(tmp_path))
    if "tiny-test" not in BLUEPRINTS.names():
        BLUEPRINTS.register("tiny-test")({
            "model_type": "gpt2", "task": "causal-lm", "tokenizer": "packaged:all-MiniLM-L6-v2",
            "config": {"n_layer": 1, "n_embd": 16, "n_head": 2, "n_positions": 32, "eos_token_id": 102}})
    torch.manual_seed(5)
    loaded = load_model("blueprint:tiny-test")  # the first use makes it
    # from the RNG as the run left it: the run that made the blueprint draws what every later run draws
    after = torch.rand(3)
    torch.manual_seed(5)
    assert torch.equal(after, torch.rand(3))
    assert loaded.task == "causal-lm" and loaded.model.config.vocab_size == len(loaded.tokenizer)
    assert resolve_model_path("blueprint:tiny-test") == str(tmp_path / "blueprints" / "tiny-test")
    again = load_model("blueprint:tiny-test").model
    assert all(torch.equal(a, b) for a, b in zip(loaded.model.parameters(), again.parameters()))
    with pytest.raises(ConfigError, match="gpt2-6x384"):
        resolve_model_path("blueprint:gpt3")


@pytest.mark.skipif(not __import__("os").path.isdir("/usr/share/common-licenses"), reason="no Debian license texts")
def test_trained_bpe_tokenizer_round_trips_and_wraps_texts(tmp_path):
    from kdistill.models.blueprints import train_bpe

    tok = train_bpe(vocab_size=400, sources=["license-texts"])
    a = tok("Permission is hereby granted")["input_ids"]
    assert a[0] == tok.bos_token_id == 1 and a[-1] == tok.eos_token_id == 2 and tok.pad_token_id == 0
    assert tok.decode(a, skip_special_tokens=True) == "Permission is hereby granted"
    assert train_bpe(vocab_size=400, sources=["license-texts"]).get_vocab() == tok.get_vocab()  # deterministic
    tok.save_pretrained(tmp_path)
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(tmp_path)("Permission")["input_ids"] == tok("Permission")["input_ids"]


def test_truncated_weights_are_named_not_a_safetensors_traceback(tmp_path, tiny_bert_dir):
    import shutil

    damaged = tmp_path / "damaged"
    shutil.copytree(tiny_bert_dir, damaged)
    weights = damaged / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(DataError, match=f"weights in {damaged} are damaged or truncated"):
        load_model(str(damaged))


def test_an_unreadable_tokenizer_is_named_not_reported_missing(tmp_path, tiny_bert_dir):
    import shutil

    from kdistill.models.loading import load_tokenizer

    damaged = tmp_path / "damaged"
    shutil.copytree(tiny_bert_dir, damaged)
    (damaged / "tokenizer.json").write_text("{not json")
    with pytest.raises(DataError, match=r"tokenizer in .*damaged \(tokenizer.json.*cannot be read"):
        load_tokenizer(str(damaged))


def test_a_head_of_another_size_is_named_not_a_torch_traceback(make_classifier, tmp_path):
    from transformers import AutoModelForSequenceClassification, BertConfig

    from kdistill.errors import PairingError
    from kdistill.models.loading import load_model

    three = make_classifier(tmp_path / "three")
    config = BertConfig.from_pretrained(three)
    config.num_labels = 5
    five = tmp_path / "five"
    AutoModelForSequenceClassification.from_config(config).save_pretrained(five)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        if (Path(three) / name).exists():
            (five / name).write_bytes((Path(three) / name).read_bytes())
    labels = {0: "blue", 1: "green", 2: "red"}
    with pytest.raises(PairingError, match="has 5 output classes, and 3 were asked for"):
        load_model(str(five), "classification", num_labels=3, id2label=labels,
                   label2id={v: k for k, v in labels.items()})


def test_a_student_with_the_teachers_classes_in_another_order_is_refused(make_classifier, tmp_path):
    import json

    from kdistill import distill
    from kdistill.errors import PairingError

    teacher = make_classifier(tmp_path / "teacher")
    permuted = Path(make_classifier(tmp_path / "permuted"))
    config = json.loads((permuted / "config.json").read_text())
    config["id2label"] = {"0": "red", "1": "green", "2": "blue"}
    config["label2id"] = {"red": 0, "green": 1, "blue": 2}
    (permuted / "config.json").write_text(json.dumps(config))
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"text": f"{w} thing", "y": w}) + "\n" for w in ("red", "green", "blue")))
    recipe = {"name": "perm", "teacher": {"model": teacher}, "student": {"model": str(permuted)},
              "data": {"train": {"path": str(data), "label": "y"}, "max_length": 16},
              "losses": [{"type": "logit_kd"}], "train": {"steps": 1, "batch_size": 3}, "output": str(tmp_path / "out")}
    with pytest.raises(PairingError, match="has the teacher's classes in another order .red, green, blue against "
                                           "the teacher's blue, green, red."):
        distill(recipe, progress=False)
    same = {**recipe, "student": {"model": teacher}, "output": str(tmp_path / "same")}
    assert (distill(same, progress=False) / "config.json").exists()


def test_a_teacher_without_tokenizer_files_is_refused_naming_them(tmp_path, tiny_bert_dir, tiny_recipe):
    """transformers 5 would build a 5-token tokenizer from the config alone, so every word trained as [UNK]."""
    import shutil

    from kdistill import distill
    from kdistill.models.loading import load_tokenizer

    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(Path(tiny_bert_dir) / name, bare / name)
    assert load_tokenizer(str(bare)) is None
    from kdistill.models.loading import has_tokenizer_files

    for name in ("spm.model", "merges.txt", "prophetnet.tokenizer", "sentencepiece.bpe.model"):  # other names
        (tmp_path / name).mkdir()
        (tmp_path / name / name).write_text("x")
        assert has_tokenizer_files(tmp_path / name)
    assert len(load_tokenizer(tiny_bert_dir)) > 1000
    tiny_recipe["teacher"]["model"] = str(bare)
    with pytest.raises(DataError, match=r"teacher.model: .*bare has no tokenizer \(none of tokenizer.json.*copy"):
        distill(tiny_recipe, progress=False)
