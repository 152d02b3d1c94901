"""Blueprints: randomly initialised models of a named architecture, for teachers trained from scratch.

No pretrained causal LM installs on an offline machine, so `blueprint:NAME` makes one: the
architecture's config with the vocabulary of a packaged tokenizer, initialised with a fixed seed and
saved once as a standard Hugging Face directory under $KDISTILL_HOME/blueprints. A recipe uses it
like any model reference (e.g. the teacher a from-scratch `lm-teacher` run copies); with a network,
a hub id takes its place.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

from kdistill.registry import Registry

BLUEPRINTS: Registry[dict] = Registry("blueprint")
PREFIX = "blueprint:"


def is_blueprint(ref) -> bool:
    """A `blueprint:NAME` reference: an architecture with a fresh random init, never trained weights."""
    return str(ref or "").startswith(PREFIX)

# Special tokens of the MiniLM WordPiece vocabulary, reused as a causal LM's BOS/EOS/PAD.
_WORDPIECE_LM = {"bos_token_id": 101, "eos_token_id": 102, "pad_token_id": 0}

# A byte-level BPE vocabulary trained here on the blueprints' own corpora: a quarter of WordPiece's
# 30,522 entries, so the LM head (the largest matmul of a small LM on a CPU) costs a quarter as much.
BPE_8K = {"train_bpe": {"vocab_size": 8192, "sources": ["wordnet-definitions", "stdlib-docstrings"]}}
_BPE_LM = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}

BLUEPRINTS.register("gpt2-6x384-bpe8k")({
    "model_type": "gpt2", "task": "causal-lm", "tokenizer": BPE_8K,
    "config": {"n_layer": 6, "n_embd": 384, "n_head": 6, "n_positions": 256, **_BPE_LM},
})
BLUEPRINTS.register("gpt2-6x384")({
    "model_type": "gpt2", "task": "causal-lm", "tokenizer": "packaged:all-MiniLM-L6-v2",
    "config": {"n_layer": 6, "n_embd": 384, "n_head": 6, "n_positions": 256, **_WORDPIECE_LM},
})
BLUEPRINTS.register("llama-6x384")({
    "model_type": "llama", "task": "causal-lm", "tokenizer": "packaged:all-MiniLM-L6-v2",
    "config": {"num_hidden_layers": 6, "hidden_size": 384, "intermediate_size": 1024, "num_attention_heads": 6,
               "num_key_value_heads": 2, "max_position_embeddings": 256, "tie_word_embeddings": True,
               **_WORDPIECE_LM},
})


# Vision: 16×16 grey images (the 8×8 digits, upsampled), 4×4 patches = 16 patch tokens. Saved without
# a head: a recipe's classes give the head. The teacher ViT is 6×192; the students 3×96 run ~8× fewer FLOPs.
_VIT_16 = {"image_size": 16, "patch_size": 4, "num_channels": 1}
BLUEPRINTS.register("vit-6x192-p4")({
    "model_type": "vit", "task": "embedding", "image": True,
    "config": {**_VIT_16, "hidden_size": 192, "num_hidden_layers": 6, "num_attention_heads": 3, "intermediate_size": 768},
})
BLUEPRINTS.register("vit-3x96-p4")({
    "model_type": "vit", "task": "embedding", "image": True,
    "config": {**_VIT_16, "hidden_size": 96, "num_hidden_layers": 3, "num_attention_heads": 3, "intermediate_size": 384},
})
# DeiT's student: a class token and a distillation token, each with its own head (inference averages them).
BLUEPRINTS.register("deit-3x96-p4")({
    "model_type": "deit", "task": "image-classification", "image": True,
    "architecture": "DeiTForImageClassificationWithTeacher",
    "config": {**_VIT_16, "hidden_size": 96, "num_hidden_layers": 3, "num_attention_heads": 3, "intermediate_size": 384},
})
# The convolutional teacher: a small ResNet (basic blocks), for DeiT's "a convnet teaches a ViT better".
BLUEPRINTS.register("resnet-small")({
    "model_type": "resnet", "task": "embedding", "image": True,
    "config": {"num_channels": 1, "embedding_size": 32, "hidden_sizes": [32, 64, 128], "depths": [2, 2, 2],
               "layer_type": "basic", "image_size": 16},
})


def blueprint_dir(name: str) -> str:
    """The directory of blueprint `name`, created (seed 0) on first use."""
    from kdistill.teachers.recipe_runs import kdistill_home

    from kdistill.models.loading import check_model_name

    check_model_name(f"blueprint:{name}")
    spec = BLUEPRINTS.get(name)
    out = kdistill_home() / "blueprints" / name
    if not (out / "config.json").exists():
        materialise(spec, out)
    return str(out)


def materialise(spec: dict, out: Path) -> None:
    import torch
    from transformers import AutoConfig

    from kdistill.models.loading import load_tokenizer, model_class, resolve_model_path

    if spec.get("image"):
        tokenizer, config = image_processor(spec["config"]), AutoConfig.for_model(spec["model_type"], **spec["config"])
    else:
        if isinstance(spec["tokenizer"], dict):
            tokenizer = train_bpe(**spec["tokenizer"]["train_bpe"])
        else:
            tokenizer = load_tokenizer(resolve_model_path(spec["tokenizer"]))
        config = AutoConfig.for_model(spec["model_type"], vocab_size=len(tokenizer), **spec["config"])
    # seeded for a fixed blueprint, on a forked RNG: the run that first makes it must draw what later runs draw
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        if spec.get("architecture"):
            import transformers

            model = getattr(transformers, spec["architecture"])(config)
        else:
            model = model_class(spec["task"]).from_config(config)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    out.parent.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)


def image_processor(config: dict):
    from kdistill.data.images import image_processor as processor

    return processor(config.get("image_size", 32), config.get("num_channels", 3))


def train_bpe(vocab_size: int, sources: list[str]):
    """A byte-level BPE tokenizer trained (deterministically) on the train split of built-in corpora,
    with <pad>, <s>, </s> as ids 0, 1, 2; every text is wrapped as <s> text </s>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from kdistill.data import load_records

    texts = [r["text"] for name in sources for r in load_records({"source": name, "split": "train"})]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    specials = ["<pad>", "<s>", "</s>"]
    bpe.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                       show_progress=False))
    bpe.post_processor = processors.TemplateProcessing(single="<s> $A </s>", special_tokens=[("<s>", 1), ("</s>", 2)])
    return PreTrainedTokenizerFast(tokenizer_object=bpe, pad_token="<pad>", bos_token="<s>", eos_token="</s>")
