"""The OpenAI-compatible teacher server over the tiny GPT-2, spoken to over real HTTP."""
from __future__ import annotations

import logging
import socket

import httpx
import pytest
import torch

from kdistill.api.server import TeacherServer
from kdistill.errors import ConfigError, KdistillError


@pytest.fixture(scope="module")
def teacher(tiny_gpt2_dir):
    server = TeacherServer(tiny_gpt2_dir, port=0).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def http(teacher):
    with httpx.Client(base_url=teacher.url, timeout=30) as client:
        yield client


def completion(http, **body):
    response = http.post("/completions", json={"prompt": "the cat sat on the", "max_tokens": 6, **body})
    assert response.status_code == 200, response.text
    return response.json()


def test_models_lists_the_served_model(teacher, http):
    listing = http.get("/models").json()
    assert listing["object"] == "list" and [m["id"] for m in listing["data"]] == [teacher.model_name]
    assert teacher.url.startswith("http://127.0.0.1:") and teacher.url.endswith("/v1")


def test_completion_logprobs_are_the_models_own_log_softmax(teacher, http):
    answer = completion(http, temperature=0, logprobs=5)
    choice = answer["choices"][0]
    logprobs = choice["logprobs"]
    tokens = logprobs["tokens"]
    assert 0 < len(tokens) == len(logprobs["token_logprobs"]) == len(logprobs["top_logprobs"]) <= 6
    assert all(len(top) == 5 for top in logprobs["top_logprobs"])
    assert answer["usage"]["completion_tokens"] == len(tokens)

    # recompute with one forward pass over prompt + completion, as the test's own reference
    tokenizer, model = teacher.tokenizer, teacher.model
    prompt_ids = tokenizer("the cat sat on the")["input_ids"][:-1]  # the server drops WordPiece's final [SEP]
    assert answer["usage"]["prompt_tokens"] == len(prompt_ids)
    completion_ids = tokenizer.convert_tokens_to_ids(tokens)  # token strings map back to ids exactly
    with torch.no_grad():
        logits = model(torch.tensor([prompt_ids + completion_ids])).logits[0]
    reference = logits.float().log_softmax(-1)[len(prompt_ids) - 1: len(prompt_ids) - 1 + len(tokens)]
    expected = reference[torch.arange(len(tokens)), torch.tensor(completion_ids)]
    assert torch.allclose(torch.tensor(logprobs["token_logprobs"]), expected, atol=1e-4)
    for position, top in enumerate(logprobs["top_logprobs"]):
        values, ids = reference[position].topk(5)
        assert list(top) == tokenizer.convert_ids_to_tokens(ids.tolist())
        assert torch.allclose(torch.tensor(list(top.values())), values, atol=1e-4)
        assert tokens[position] == next(iter(top))  # greedy picks the most likely token


def test_echo_scores_a_token_id_prompt_as_the_model_does(teacher, http):
    tokenizer, model = teacher.tokenizer, teacher.model
    ids = tokenizer("the cat sat on the mat")["input_ids"]  # as token ids: used exactly, final [SEP] included
    answer = completion(http, prompt=ids, echo=True, max_tokens=0, logprobs=3)
    logprobs = answer["choices"][0]["logprobs"]
    assert tokenizer.convert_tokens_to_ids(logprobs["tokens"]) == ids
    assert logprobs["token_logprobs"][0] is None and logprobs["top_logprobs"][0] is None  # as OpenAI's echo
    assert answer["usage"]["prompt_tokens"] == len(ids) and answer["usage"]["completion_tokens"] == 0
    with torch.no_grad():
        reference = model(torch.tensor([ids])).logits[0].float().log_softmax(-1)
    for position in range(1, len(ids)):
        assert abs(logprobs["token_logprobs"][position] - reference[position - 1, ids[position]]) < 1e-4
        values, top_ids = reference[position - 1].topk(3)
        top = logprobs["top_logprobs"][position]
        assert list(top) == tokenizer.convert_ids_to_tokens(top_ids.tolist())
        assert torch.allclose(torch.tensor(list(top.values())), values, atol=1e-4)


def test_echo_with_a_continuation_is_the_prompt_then_the_completion(http):
    plain = completion(http, temperature=0, logprobs=2, max_tokens=3)
    echoed = completion(http, temperature=0, logprobs=2, max_tokens=3, echo=True)
    new, both = plain["choices"][0], echoed["choices"][0]
    assert both["text"].endswith(new["text"]) and both["text"].startswith("[CLS] the cat")
    prompt_tokens = echoed["usage"]["prompt_tokens"]
    assert len(both["logprobs"]["tokens"]) == prompt_tokens + len(new["logprobs"]["tokens"])
    assert both["logprobs"]["tokens"][prompt_tokens:] == new["logprobs"]["tokens"]
    assert both["logprobs"]["token_logprobs"][prompt_tokens:] == pytest.approx(new["logprobs"]["token_logprobs"])


def test_greedy_is_deterministic_and_seeded_sampling_repeats(http):
    greedy = [completion(http, temperature=0, n=2) for _ in range(2)]
    texts = [c["text"] for answer in greedy for c in answer["choices"]]
    assert len(set(texts)) == 1
    sampled = [completion(http, temperature=1.0, seed=seed, max_tokens=12)["choices"][0]["text"] for seed in (7, 7, 8)]
    assert sampled[0] == sampled[1] != sampled[2]
    for edge in (-2 ** 63, 2 ** 64 - 1):  # torch.manual_seed's whole range is served; one past it is a 400 (above)
        assert completion(http, temperature=1.0, seed=edge, max_tokens=2)["choices"][0]["text"] is not None


def test_stop_strings_cut_the_text(http):
    full = completion(http, temperature=0, max_tokens=8)["choices"][0]["text"]
    stop = full.split()[1]
    cut = completion(http, temperature=0, max_tokens=8, stop=[stop])["choices"][0]
    assert cut["text"] == full[: full.index(stop)] and cut["finish_reason"] == "stop"


def test_chat_answers_with_chat_logprobs(http):
    response = http.post("/chat/completions", json={
        "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "name a colour"}],
        "max_tokens": 5, "temperature": 0, "logprobs": True, "top_logprobs": 3})
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["object"] == "chat.completion"
    choice = answer["choices"][0]
    assert choice["message"]["role"] == "assistant" and isinstance(choice["message"]["content"], str)
    content = choice["logprobs"]["content"]
    assert len(content) == answer["usage"]["completion_tokens"] and 0 < len(content) <= 5
    for entry in content:
        assert set(entry) == {"token", "logprob", "bytes", "top_logprobs"} and len(entry["top_logprobs"]) == 3
        assert entry["logprob"] == entry["top_logprobs"][0]["logprob"]  # greedy
    plain = http.post("/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3})
    assert plain.json()["choices"][0]["logprobs"] is None


@pytest.mark.parametrize("body, param", [
    ({"prompt": "x", "temperature": 5}, "temperature"),
    ({"prompt": "x", "logprobs": 21}, "logprobs"),
    ({"prompt": "x", "max_tokens": 0}, "max_tokens"),
    ({"prompt": "x", "max_tokens": 500}, "max_tokens"),
    ({"prompt": "x", "n": 0}, "n"),
    ({"prompt": "x", "stop": [1]}, "stop"),
    ({"prompt": "x", "frequency_penality": 1}, "frequency_penality"),
    ({"prompt": "x", "stream": True}, "stream"),
    ({"max_tokens": 3}, "prompt"),
    ({"prompt": [101, 10 ** 9]}, "prompt"),
    ({"prompt": [[101], []]}, "prompt"),
    ({"prompt": "x", "echo": "yes"}, "echo"),
    ({"prompt": "x", "seed": 2 ** 64}, "seed"),  # past torch.manual_seed's range: a 500 before
    ({"prompt": "x", "seed": -2 ** 63 - 1}, "seed"),
])
def test_bad_completion_requests_get_400_with_an_openai_error(http, body, param):
    response = http.post("/completions", json=body)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param and error["message"]


def test_other_bad_requests(http):
    not_json = http.post("/completions", content=b"{not json", headers={"Content-Type": "application/json"})
    assert not_json.status_code == 400 and "not valid JSON" in not_json.json()["error"]["message"]
    chat = http.post("/chat/completions", json={"messages": [{"role": "user"}]})
    assert chat.status_code == 400 and chat.json()["error"]["param"] == "messages"
    wrong_model = http.post("/completions", json={"prompt": "x", "model": "gpt-9"})
    assert wrong_model.status_code == 404 and "gpt-9" in wrong_model.json()["error"]["message"]
    assert http.get("/nothing").status_code == 404


def test_one_log_line_per_request_without_the_authorization_header(http, caplog):
    with caplog.at_level(logging.DEBUG):
        http.post("/completions", json={"prompt": "x", "max_tokens": 2},
                  headers={"Authorization": "Bearer sk-never-log-me"})
    lines = [r.getMessage() for r in caplog.records if r.name == "kdistill.api.server"]
    assert len(lines) == 1 and lines[0].endswith("POST /v1/completions 200")
    assert "sk-never-log-me" not in caplog.text


def test_it_refuses_a_public_address_and_a_busy_port(tiny_gpt2_dir, teacher):
    with pytest.raises(ConfigError, match="allow_remote"):
        TeacherServer(tiny_gpt2_dir, host="0.0.0.0", port=0)
    with pytest.raises(KdistillError, match="--port"):
        TeacherServer(tiny_gpt2_dir, port=teacher.port).start()
    # a host that is no address of this machine is not a busy port
    for host in ("nosuchhost.invalid", "192.0.2.1"):  # a name that does not resolve; a documentation-only address
        with pytest.raises(KdistillError, match="--host must be an address of this machine") as err:
            TeacherServer(tiny_gpt2_dir, host=host, port=0, allow_remote=True).start()
        assert "--port" not in str(err.value)


def test_a_file_given_as_the_model_is_named_as_a_file(tmp_path):
    from kdistill.errors import DataError

    (tmp_path / "data.csv").write_text("a,b\n")
    with pytest.raises(DataError, match=r"data.csv is a file; a model is a folder \(config.json and weights\)"):
        TeacherServer(str(tmp_path / "data.csv"), port=0)


def test_stop_then_start_serves_again_on_the_same_port(tiny_gpt2_dir):
    server = TeacherServer(tiny_gpt2_dir, port=0).start()
    port = server.port
    server.stop()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=1)
    server.start()
    try:
        assert server.port == port and httpx.get(server.url + "/models").status_code == 200
    finally:
        server.stop()


def test_an_encoder_is_not_served_with_a_random_lm_head(tiny_bert_dir):
    with pytest.raises(ConfigError, match="needs a causal LM"):
        TeacherServer(tiny_bert_dir, port=0)
