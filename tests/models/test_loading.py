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


def test_hub_id_goes_to_the_hub_and_fails_clearly_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert resolve_model_path("sentence-transformers/all-MiniLM-L12-v2") == "sentence-transformers/all-MiniLM-L12-v2"
    with pytest.raises(DataError, match="all-MiniLM-L12-v2"):
        load_model("sentence-transformers/all-MiniLM-L12-v2")


def test_task_detection(tiny_bert_dir, tiny_gpt2_dir):
    assert load_model(tiny_bert_dir).task == "embedding"
    loaded = load_model(tiny_gpt2_dir)
    assert loaded.task == "causal-lm" and loaded.tokenizer is not None

    class C:
        architectures = ["BertForSequenceClassification"]

    assert detect_task(C()) == "classification"
