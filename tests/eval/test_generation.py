"""ROUGE-L against hand-computed values; generation on a tiny random causal LM."""
import pytest

from kdistill.eval.generation import definition_scores, generate, lcs_length, rouge_l
from kdistill.models.loading import load_model


def test_lcs_and_rouge_l_by_hand():
    assert lcs_length("a b c d e".split(), "a c e f".split()) == 3
    # candidate 4 words, reference 5, LCS "the cat sat" = 3: P = 3/4, R = 3/5, F = 2PR/(P+R) = 2/3
    assert rouge_l("The cat sat down", "the cat quickly sat there") == pytest.approx(2 / 3)
    assert rouge_l("", "anything") == 0.0 and rouge_l("x y", "a b") == 0.0
    assert rouge_l("Same, words!", "same words") == pytest.approx(1.0)


def test_generate_continues_each_prompt_and_stops(tiny_gpt2_dir):
    loaded = load_model(tiny_gpt2_dir, "causal-lm")
    prompts = ["word: cat (noun)\\ndefinition:", "a much longer prompt about some other word entirely"]
    out = generate(loaded.model, loaded.tokenizer, prompts, max_new_tokens=5, batch_size=2)
    alone = generate(loaded.model, loaded.tokenizer, prompts[:1], max_new_tokens=5)
    assert len(out) == 2 and out[0] == alone[0]  # left padding does not change a row's continuation
    sampled = generate(loaded.model, loaded.tokenizer, prompts, max_new_tokens=5, temperature=1.0, seed=3)
    assert sampled == generate(loaded.model, loaded.tokenizer, prompts, max_new_tokens=5, temperature=1.0, seed=3)
    records = [{"prompt": p, "reference": "a small animal"} for p in prompts]
    scores = definition_scores(loaded.model, loaded.tokenizer, records, limit=2, max_new_tokens=5)
    assert 0.0 <= scores["rouge_l"] <= 1.0 and len(scores["examples"]) == 2
