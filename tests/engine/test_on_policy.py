"""GKD's on-policy batches: the student's own continuations, the loss on generated tokens, resumable."""
import json

import torch

from kdistill import distill
from kdistill.config import OnPolicyConfig
from kdistill.engine.on_policy import OnPolicy
from kdistill.models.loading import load_model


def test_sample_marks_the_positions_that_predict_generated_tokens(tiny_gpt2_dir):
    loaded = load_model(tiny_gpt2_dir, "causal-lm")
    policy = OnPolicy(OnPolicyConfig(fraction=1.0, max_new_tokens=4), loaded.tokenizer, 102, seed=0)
    records = [{"text": "word: cat (noun)\ndefinition: a small animal", "prompt": "word: cat (noun)\ndefinition:"},
               {"text": "return the sum of the numbers in a list of numbers"}]
    batch = policy.sample(loaded.model, records, 32, step=0, micro=0, rank=0)
    prompt = policy.prompt_ids(records[0], 32)
    row = batch["input_ids"][0].tolist()
    assert row[: len(prompt)] == prompt
    generated = int(batch["loss_mask"][0].sum())
    assert 1 <= generated <= 4
    # position p is scored when token p + 1 was generated
    assert batch["loss_mask"][0].nonzero().flatten().tolist() == list(range(len(prompt) - 1, len(prompt) - 1 + generated))
    assert batch["attention_mask"][0].sum() == len(prompt) + generated
    again = policy.sample(loaded.model, records, 32, step=0, micro=0, rank=0)
    assert torch.equal(again["input_ids"], batch["input_ids"])  # seeded by step and micro-batch
    assert policy.wants(3, 0, 0) and not OnPolicy(OnPolicyConfig(fraction=0.0), loaded.tokenizer, 102, 0).wants(3, 0, 0)


def test_generated_batches_stay_inside_the_models_positions(tiny_gpt2_dir, text_file, tmp_path):
    import pytest

    from kdistill.errors import ConfigError

    loaded = load_model(tiny_gpt2_dir, "causal-lm")  # 128 positions
    policy = OnPolicy(OnPolicyConfig(fraction=1.0, max_new_tokens=120), loaded.tokenizer, 102, seed=0, positions=128)
    long_text = {"text": " ".join(["many words here"] * 60)}
    assert len(policy.prompt_ids(long_text, 64)) > 8  # half of 64 tokens, more than the room left
    batch = policy.sample(loaded.model, [long_text], 64, step=0, micro=0, rank=0)  # prompt cut to 8: 8 + 120 fit
    assert batch["input_ids"].shape[1] <= 128
    recipe = {"name": "long", "teacher": {"model": tiny_gpt2_dir}, "student": {"config": {"n_layer": 1}},
              "data": {"train": {"path": text_file, "text": "sentence", "limit": 8}, "max_length": 24},
              "losses": [{"type": "logit_kd"}], "on_policy": {"fraction": 0.5, "max_new_tokens": 128},
              "train": {"steps": 1, "batch_size": 4}, "output": str(tmp_path / "run")}
    with pytest.raises(ConfigError, match="on_policy.max_new_tokens is 128 but the student has 128 positions"):
        distill(recipe, progress=False)


def test_a_run_samples_exactly_the_micro_batches_the_fraction_draws(tiny_gpt2_dir, text_file, tmp_path, monkeypatch):
    asked, sampled = [], []
    wants, sample = OnPolicy.wants, OnPolicy.sample

    def counting_wants(self, step, micro, rank):
        asked.append(((step, micro), wants(self, step, micro, rank)))
        return asked[-1][1]

    def counting_sample(self, student, records, max_length, step, micro, rank, **kw):
        sampled.append((step, micro))
        return sample(self, student, records, max_length, step, micro, rank, **kw)

    monkeypatch.setattr(OnPolicy, "wants", counting_wants)
    monkeypatch.setattr(OnPolicy, "sample", counting_sample)
    recipe = {"name": "gkd", "teacher": {"model": tiny_gpt2_dir}, "student": {"config": {"n_layer": 1}},
              "data": {"train": {"path": text_file, "text": "sentence", "limit": 16}, "max_length": 24},
              "losses": [{"type": "logit_kd", "temperature": 1.0}],
              "on_policy": {"fraction": 0.5, "max_new_tokens": 6},
              "train": {"steps": 4, "batch_size": 4, "grad_accum": 2}, "output": str(tmp_path / "run")}
    distill(recipe, progress=False)
    assert len(asked) == 8  # every micro-batch of 4 steps x 2
    assert sampled == [key for key, drawn in asked if drawn]  # the student writes exactly the drawn ones ...
    assert 0 < len(sampled) < 8  # ... and at fraction 0.5 some are its own and some the data's


def test_gkd_run_resumes_exactly(tiny_gpt2_dir, text_file, tmp_path, killed_run):
    recipe = {"name": "gkd", "teacher": {"model": tiny_gpt2_dir}, "student": {"config": {"n_layer": 1}},
              "data": {"train": {"path": text_file, "text": "sentence", "limit": 16}, "max_length": 24},
              "losses": [{"type": "logit_kd", "temperature": 1.0, "divergence": "generalized_jsd", "beta": 0.5}],
              "on_policy": {"fraction": 0.5, "max_new_tokens": 6},
              "train": {"steps": 6, "batch_size": 4, "grad_accum": 2, "save_every": 2, "lr": 1e-3, "log_every": 1}}
    straight = distill({**recipe, "output": str(tmp_path / "straight")}, progress=False)
    killed = {**recipe, "output": str(tmp_path / "killed")}
    killed_run(killed, step=3)
    resumed = distill(killed, resume=True, progress=False)
    a, b = (load_model(str(d), "causal-lm").model.state_dict() for d in (straight, resumed))
    assert all(torch.equal(a[k], b[k]) for k in a)
    logs = [json.loads(line) for line in (tmp_path / "straight" / "logs" / "main.jsonl").read_text().splitlines()]
    assert all(r["parts"]["logit_kd"] >= 0 for r in logs if r["kind"] == "train")


def test_seqkd_batches_are_the_teachers_greedy_continuations(tiny_gpt2_dir):
    from kdistill.eval.generation import generate
    from kdistill.losses.logits import hard_label_count, hard_label_loss

    teacher = load_model(tiny_gpt2_dir, "causal-lm")
    student = load_model(tiny_gpt2_dir, "causal-lm").model
    with torch.no_grad():
        for param in student.parameters():
            param.mul_(0.5)  # a different model: the text must come from the teacher
    cfg = OnPolicyConfig(fraction=1.0, max_new_tokens=5, generator="teacher", greedy=True)
    policy = OnPolicy(cfg, teacher.tokenizer, 102, seed=0)
    record = {"text": "x", "prompt": "word: dog (noun)\ndefinition:"}
    batch = policy.sample(student, [record], 32, 0, 0, 0, teacher=teacher.model)
    written = batch["input_ids"][0][batch["attention_mask"][0].bool()][len(policy.prompt_ids(record, 32)):]
    expected = generate(teacher.model, teacher.tokenizer, [record["prompt"]], max_new_tokens=5)[0]
    assert teacher.tokenizer.decode(written.tolist(), skip_special_tokens=True).strip() == expected
    assert hard_label_count(batch, "causal-lm") == int(batch["loss_mask"].sum())
    logits = torch.randn(1, batch["input_ids"].shape[1], teacher.model.config.vocab_size)
    keep = batch["loss_mask"][0, :-1]
    manual = torch.nn.functional.cross_entropy(logits[0, :-1][keep], batch["input_ids"][0, 1:][keep])
    assert torch.allclose(hard_label_loss(logits, batch, "causal-lm"), manual)


def test_data_loss_on_completion_trains_on_the_tokens_after_the_prompt(tiny_gpt2_dir, tiny_bert_dir, tmp_path):
    import pytest

    from kdistill.errors import ConfigError

    rows = [{"prompt": f"word: {w} (noun)\ndefinition:", "text": f"word: {w} (noun)\ndefinition: {d}"}
            for w, d in [("cat", "a small animal"), ("dog", "a domestic animal that barks"),
                         ("oak", "a tree"), ("sea", "a large body of salt water")]]
    data = tmp_path / "defs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = {"name": "sft", "teacher": {"model": tiny_gpt2_dir}, "student": {"model": tiny_gpt2_dir},
              "data": {"train": {"path": str(data)}, "max_length": 32, "loss_on": "completion"},
              "losses": [{"type": "cross_entropy"}], "output": str(tmp_path / "run"),
              "train": {"steps": 1, "batch_size": 4, "log_every": 1, "lr": 1e-3}}
    distill(recipe, progress=False)
    logged = [json.loads(line) for line in (tmp_path / "run" / "logs" / "main.jsonl").read_text().splitlines()]
    first = next(r for r in logged if r["kind"] == "train")["loss"]
    loaded = load_model(tiny_gpt2_dir, "causal-lm")  # the student before its one step
    total, n = 0.0, 0
    with torch.no_grad():
        for r in rows:
            ids = loaded.tokenizer(r["text"])["input_ids"]
            start = len(loaded.tokenizer(r["prompt"])["input_ids"]) - 1  # the prompt without its [SEP]
            logits = loaded.model(input_ids=torch.tensor([ids])).logits[0]
            for i in range(start - 1, len(ids) - 1):  # the tokens after the prompt, the text's [SEP] included
                total -= torch.log_softmax(logits[i], -1)[ids[i + 1]].item()
                n += 1
    assert first == pytest.approx(total / n, rel=1e-5)
    with pytest.raises(ConfigError, match=r"data\.loss_on: completion is for causal-LM students"):
        distill({**recipe, "teacher": {"model": tiny_bert_dir}, "student": {"from_teacher": {"layers": [1]}},
                 "output": str(tmp_path / "bert")}, progress=False)
    # a prompt/completion table read as text: completion would train on completions without their prompts
    table = tmp_path / "pc.jsonl"
    table.write_text("".join(json.dumps({"prompt": r["prompt"], "completion": r["text"][len(r["prompt"]):]}) + "\n"
                             for r in rows))
    from kdistill.errors import DataError

    split = {**recipe, "data": {**recipe["data"], "train": {"path": str(table), "text": "completion"}},
             "output": str(tmp_path / "pc")}
    with pytest.raises(DataError, match=r"data.train: data.loss_on: completion needs each record's text to start "
                                        r"with its prompt, and one does not \(prompt 'word: cat"):
        distill(split, progress=False)


def test_the_trl_benchmark_hands_trl_the_positions_and_prompts_kdistill_uses(tiny_gpt2_dir):
    """benchmarks/gkd_trl.py: TRL's GKDTrainer scores position i where labels[i + 1] != -100, and samples from
    left-padded `prompts`; both must be what kdistill's completion-only batches and on-policy prompts are."""
    import importlib.util
    from pathlib import Path

    from kdistill.data.collate import TextCollator

    path = Path(__file__).parents[2] / "benchmarks" / "gkd_trl.py"
    spec = importlib.util.spec_from_file_location("gkd_trl", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    loaded = load_model(tiny_gpt2_dir, "causal-lm")
    collator = TextCollator(loaded.tokenizer, 32, completion_only=True, token_types=False)
    policy = OnPolicy(OnPolicyConfig(fraction=0.5), loaded.tokenizer, 102, seed=0)
    records = [{"text": "word: cat (noun)\ndefinition: a small animal", "prompt": "word: cat (noun)\ndefinition:",
                "reference": "a small animal"},
               {"text": "return the sum of the numbers in a list of numbers", "prompt": None, "reference": None}]
    batch = bench.TRLBatches(collator, policy, 32, pad=0)(records)
    ours = collator([{k: v for k, v in r.items() if v is not None} for r in records])
    assert torch.equal(batch["labels"][:, 1:] != -100, ours["loss_mask"][:, :-1])
    assert (batch["labels"][:, 0] == -100).all() and torch.equal(batch["input_ids"], ours["input_ids"])
    for row, record in enumerate(records):
        prompt = batch["prompts"][row][batch["prompt_attention_mask"][row].bool()].tolist()
        assert prompt == policy.prompt_ids({k: v for k, v in record.items() if v is not None}, 32)
    assert batch["prompt_attention_mask"][:, -1].all()  # left-padded: every prompt ends at the last column
