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

# Special tokens of the MiniLM WordPiece vocabulary, reused as a causal LM's BOS/EOS/PAD.
_WORDPIECE_LM = {"bos_token_id": 101, "eos_token_id": 102, "pad_token_id": 0}

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


def blueprint_dir(name: str) -> str:
    """The directory of blueprint `name`, created (seed 0) on first use."""
    from kdistill.teachers.recipe_runs import kdistill_home

    spec = BLUEPRINTS.get(name, "model")
    out = kdistill_home() / "blueprints" / name
    if not (out / "config.json").exists():
        materialise(spec, out)
    return str(out)


def materialise(spec: dict, out: Path) -> None:
    import torch
    from transformers import AutoConfig

    from kdistill.models.loading import load_tokenizer, model_class, resolve_model_path

    tokenizer = load_tokenizer(resolve_model_path(spec["tokenizer"]))
    config = AutoConfig.for_model(spec["model_type"], vocab_size=len(tokenizer), **spec["config"])
    torch.manual_seed(0)
    model = model_class(spec["task"]).from_config(config)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    out.parent.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
