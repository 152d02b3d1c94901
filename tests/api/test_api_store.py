"""An API teacher's log-probabilities in a sparse teacher store: the real TeacherServer over the tiny GPT-2,
scored over HTTP, stored, compared with the model's own log-softmax, and trained from."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from kdistill import distill
from kdistill.api.api_store import (ScoringFailed, api_teacher_fingerprint, cache_api_teacher, score_request,
                                    stored_topk)
from kdistill.api.client import TeacherAPI
from kdistill.api.server import TeacherServer
from kdistill.errors import PairingError
from kdistill.teachers.cached import record_key
from kdistill.teachers.store import TeacherStore

K = 5


@pytest.fixture(scope="module")
def server(tiny_gpt2_dir):
    with TeacherServer(tiny_gpt2_dir, port=0, model_name="tiny-teacher") as running:
        yield running


@pytest.fixture
def recipe(text_file, tmp_path):
    return {
        "name": "api-kd",
        "teacher": {"source": "cache", "path": str(tmp_path / "store"), "task": "causal-lm"},
        "student": {"config": {"n_layer": 1}},
        "data": {"train": {"path": text_file, "text": "sentence", "limit": 12}, "max_length": 24},
        "losses": [{"type": "logit_kd", "temperature": 1.0, "divergence": "kl"}],
        "train": {"steps": 3, "batch_size": 4, "lr": 1e-3, "warmup": 0.0, "log_every": 1},
        "output": str(tmp_path / "run"),
    }


def test_the_store_holds_the_models_own_top_k_and_a_student_trains_from_it(server, recipe, tiny_gpt2_dir, tmp_path):
    client = TeacherAPI(server.url, server.model_name, cache_path=str(tmp_path / "answers.sqlite"))
    store_dir = cache_api_teacher(recipe, client, vocabulary=tiny_gpt2_dir, k=K, dtype="float32", progress=False)
    assert store_dir == tmp_path / "store" and client.requests_sent > 1  # /models, then one request per text
    store = TeacherStore.open(store_dir, verify=True)
    assert store.k == K and store.temperature == 1.0 and len(store) == 12
    assert store.fingerprints["teacher"] == api_teacher_fingerprint("tiny-teacher")

    from kdistill.data import load_records

    model, tokenizer = server.model, server.tokenizer
    for record in load_records({"path": recipe["data"]["train"]["path"], "text": "sentence", "limit": 12}):
        ids = tokenizer(record["text"], truncation=True, max_length=24)["input_ids"]
        with torch.no_grad():
            reference = model(torch.tensor([ids])).logits[0].float().log_softmax(-1)
        values, indices = reference.topk(K, dim=-1)
        entry = store[record_key(record)]
        assert entry.topk_logprobs.shape == (len(ids), K)  # every position, the last one (after the text) too
        assert torch.allclose(entry.topk_logprobs.float(), values, atol=1e-4)
        assert torch.equal(entry.topk_indices.long(), indices)
        tail = torch.log1p(-values.double().exp().sum(-1)).float()
        assert torch.allclose(entry.tail_logmass, tail, atol=1e-4)

    student = distill(recipe, progress=False)  # teacher: {source: cache, path: STORE} with a logit_kd loss
    assert (student / "model.safetensors").exists()
    logged = (tmp_path / "run" / "logs" / "main.jsonl").read_text()
    assert '"logit_kd"' in logged

    again = TeacherAPI(server.url, server.model_name, cache_path=str(tmp_path / "answers.sqlite"))
    cache_api_teacher(recipe, again, vocabulary=tiny_gpt2_dir, k=K, dtype="float32", progress=False)
    assert again.requests_sent == 1  # the check only: every text's answer came from the cache

    from kdistill.errors import CheckpointError

    recipe["losses"][0]["temperature"] = 2.0  # refused, with the fix for an API store (not `cache-teacher`)
    recipe["output"] = str(tmp_path / "run-t2")
    with pytest.raises(CheckpointError, match=r"temperature differs: store has 1.0, run has 2.0; a service's "
                                              r"log-probabilities are at temperature 1: set temperature: 1.0 on the "
                                              r"loss$"):  # a rebuild would write temperature 1 again
        distill(recipe, progress=False)
    recipe["data"]["max_length"] = 16  # other data as well: that part a rebuild does fix
    with pytest.raises(CheckpointError, match=r"data cut differs: store has 24, run has 16 \(how the records are cut: "
                                              r"data.max_length.*set temperature: 1.0 on the loss; rebuild it "
                                              r"with `kdistill cache-api-teacher`"):
        distill(recipe, progress=False)


def test_a_store_path_that_is_taken_is_refused_before_the_service_is_asked(recipe, tiny_gpt2_dir, tmp_path):
    from kdistill.errors import CheckpointError

    taken = tmp_path / "notes.jsonl"
    taken.write_text("mine\n")
    dead = {"base_url": "http://127.0.0.1:9", "model": "m"}  # asked first, it would say the service is down
    with pytest.raises(CheckpointError, match=r"notes.jsonl exists and is a file; a store replaces only"):
        cache_api_teacher(recipe, dead, vocabulary=tiny_gpt2_dir, out=taken, progress=False)
    assert taken.read_text() == "mine\n" and not (tmp_path / "notes.jsonl.teacher.sqlite").exists()


def payload(tokens, tops):
    """An echoed answer as the client parses it (the first prompt token's log-probability is null)."""
    from kdistill.api.client import _completion

    raw = {"choices": [{"text": "", "logprobs": {"tokens": tokens, "token_logprobs": [None] + [-1.0] * (len(tokens) - 1),
                                                 "top_logprobs": [None] + tops}}]}
    return _completion("key", "/completions", raw, cached=False)


VOCAB = {"a": 0, "b": 1, "c": 2, "d": 3}


def test_an_answer_becomes_top_k_indices_in_the_students_vocabulary_and_a_tail():
    top = {"c": math.log(0.5), "a": math.log(0.25), "d": math.log(0.125)}
    values, indices, tail = stored_topk(payload(["a", "b", "a"], [top, top]), [0, 1], 2, VOCAB, "record r")
    assert indices.tolist() == [[2, 0], [2, 0]]
    assert torch.allclose(values, torch.log(torch.tensor([[0.5, 0.25]] * 2)))
    assert torch.allclose(tail, torch.log(torch.tensor([0.25, 0.25])))
    assert score_request([5, 6], 3) == {"prompt": [5, 6, 5], "echo": True, "max_tokens": 0, "logprobs": 3,
                                        "temperature": 0}


def test_a_teacher_with_another_tokenizer_is_refused_by_name():
    top = {"c": -0.5, "zebra": -1.0}
    with pytest.raises(PairingError, match="'zebra', which the student's tokenizer does not have"):
        stored_topk(payload(["a", "b", "a"], [top, top]), [0, 1], 2, VOCAB, "record r")
    with pytest.raises(PairingError, match="reads token id 1 as 'c'.*another tokenizer"):
        stored_topk(payload(["a", "c", "a"], [top, top]), [0, 1], 2, VOCAB, "record r")
    with pytest.raises(ScoringFailed, match="fewer than k = 3"):
        stored_topk(payload(["a", "b", "a"], [{"a": -1.0, "b": -2.0}] * 2), [0, 1], 3, VOCAB, "record r")


def test_an_answer_without_echoed_logprobs_fails_its_text_and_is_asked_again_next_time(tmp_path):
    from kdistill.api.api_store import echoed_scores
    from kdistill.api.client import Choice, Completion
    from kdistill.api.response_cache import ResponseCache

    class Service:  # answers from its cache, as TeacherAPI.map does; the first answer lacks the echo
        cache = ResponseCache(tmp_path / "answers.sqlite")

        def map(self, requests, progress=True):
            self.cache.put("k1", "/completions", requests[0], {"choices": [{"text": ""}]})
            return [Completion("k1", [Choice("", None)])]

    service = Service()
    (answer,) = echoed_scores(service, [score_request([5, 6], 2)], progress=False)
    assert not answer.ok and "no echoed logprobs" in answer.error
    assert "k1" not in service.cache  # not kept: the next run asks the service again


def test_bad_settings_are_refused_before_the_service_is_asked(recipe):
    from kdistill.errors import ConfigError

    for settings, message in (({"k": 0}, "^k must be at least 1 \\(got 0\\)$"),
                              ({"dtype": "bfloat8"}, "^dtype must be float16 or float32 \\(got 'bfloat8'\\)$"),
                              ({"max_tokens": -1}, "^max_tokens must be at least 0 \\(got -1\\)$")):
        with pytest.raises(ConfigError, match=message):  # the bad one alone, not every setting
            cache_api_teacher(recipe, {"base_url": "http://127.0.0.1:9", "model": "m"}, "unused", **settings)


def test_a_key_pasted_for_its_variables_name_is_refused_without_repeating_it(recipe):
    from kdistill.errors import ConfigError

    key = "sk-abc123xyz987"
    with pytest.raises(ConfigError) as err:
        cache_api_teacher(recipe, {"base_url": "http://127.0.0.1:9", "model": "m", "api_key_env": key}, "unused")
    assert "teacher.api.api_key_env takes the NAME of the environment variable" in str(err.value)
    assert key not in str(err.value) and "abc123" not in str(err.value)


def test_a_vocabulary_that_is_not_a_causal_lm_is_refused_before_the_service_is_asked(recipe):
    from kdistill.errors import ConfigError

    with pytest.raises(ConfigError, match=r"holds a causal LM's next-token scores.*'packaged:all-MiniLM-L6-v2' \(the "
                                          r"vocabulary\) is an embedding model"):
        cache_api_teacher(recipe, {"base_url": "http://127.0.0.1:9", "model": "m"}, "packaged:all-MiniLM-L6-v2")


def test_a_service_that_refuses_every_request_is_not_asked_again(server, recipe, tiny_gpt2_dir, tmp_path):
    # the real server caps logprobs at 20: every text is refused the same way, so "run again" would not help (with
    # 8 texts or more the client stops first, saying the same)
    recipe["data"]["train"]["limit"] = 5
    with pytest.raises(ScoringFailed, match=r"the service refused every request \(HTTP 400: .*logprobs.*\): asking "
                                            r"again will not help; change what is asked \(k is 50"):
        cache_api_teacher(recipe, {"base_url": server.url, "model": server.model_name}, tiny_gpt2_dir, k=50,
                          out=tmp_path / "store", progress=False)
    assert not (tmp_path / "store").exists()


def test_a_service_with_another_tokenizer_is_named_after_one_text_not_all(server, recipe, tmp_path, tiny_gpt2_dir):
    """A vocabulary other than the served model's: its token ids run past the model's vocabulary (HTTP 400) or
    spell other tokens. Either way the first text says so, before the other eleven are asked (and paid) for."""
    import shutil

    from kdistill.api.api_store import check_pairing
    from kdistill.api.responses import Failure
    from kdistill.models.loading import resolve_model_path

    other = tmp_path / "other-tokenizer"  # the same words at other ids: the vocabulary reversed
    packaged = Path(resolve_model_path("packaged:all-MiniLM-L6-v2"))
    other.mkdir()
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        if (packaged / name).exists():
            shutil.copy(packaged / name, other / name)
    shutil.copy(Path(tiny_gpt2_dir) / "config.json", other / "config.json")  # a causal LM's, with BERT's words
    words = (packaged / "vocab.txt").read_text().splitlines()
    (other / "vocab.txt").write_text("\n".join(reversed(words)) + "\n")
    client = TeacherAPI(server.url, server.model_name, cache_path=str(tmp_path / "answers.sqlite"))
    with pytest.raises(PairingError, match=r"another tokenizer.*\(--vocabulary, or vocabulary= in Python\)"):
        cache_api_teacher(recipe, client, vocabulary=str(other), k=K, progress=False)
    assert client.requests_sent <= 2  # /models and the first text
    assert not (tmp_path / "store").exists()
    refused = Failure("key", "HTTP 400: prompt must be a list of token ids in [0, 8192)", 400)
    with pytest.raises(PairingError, match=r"refused the token ids of 'big''s tokenizer .*another tokenizer"):
        check_pairing(refused, [1, 2], K, {}, "big")
    vllm = Failure("key", "HTTP 400: Token id 30000 is out of vocabulary", 400)  # another service's words
    with pytest.raises(PairingError, match="another tokenizer"):
        check_pairing(vllm, [1, 2], K, {}, "big")
    check_pairing(Failure("key", "HTTP 503: busy", 503), [1, 2], K, {}, "big")  # may come back: asked with the rest


def test_a_dead_service_leaves_no_empty_answer_cache_beside_the_store(recipe, tiny_gpt2_dir, tmp_path):
    from kdistill.api.client import TeacherUnavailable

    dead = {"base_url": "http://127.0.0.1:9", "model": "m", "max_retries": 0}  # one try: refused at once
    with pytest.raises(TeacherUnavailable):
        cache_api_teacher(recipe, dead, vocabulary=tiny_gpt2_dir, out=tmp_path / "store", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no store.teacher.sqlite (-wal, -shm) made for nothing
