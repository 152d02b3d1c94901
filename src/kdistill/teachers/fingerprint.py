"""sha256 fingerprints that a teacher store records and a training run compares before using it.

The caller decides what identifies its teacher, tokenizer and data; these helpers only make the
hashing uniform, so the same inputs give the same string on every machine.
"""
from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping

import torch

Tensor = torch.Tensor


def fingerprint_tensors(tensors: Mapping[str, Tensor] | Iterable[Tensor]) -> str:
    """sha256 over names, dtypes, shapes and bytes, e.g. of a teacher's ``state_dict()``."""
    items = sorted(tensors.items()) if isinstance(tensors, Mapping) else enumerate(tensors)
    digest = hashlib.sha256()
    for name, tensor in items:
        flat = tensor.detach().to("cpu").contiguous().reshape(-1)
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(flat.view(torch.uint8).numpy().tobytes())  # raw bytes: works for bfloat16 too
    return digest.hexdigest()


def fingerprint_text(*parts: str) -> str:
    """sha256 over text parts (tokenizer JSON, data file list + options, ...), length-prefixed
    so that ("ab", "c") and ("a", "bc") differ."""
    digest = hashlib.sha256()
    for part in parts:
        data = part.encode()
        digest.update(f"{len(data)}:".encode() + data)
    return digest.hexdigest()
