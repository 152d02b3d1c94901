"""Comparing two trained student folders tensor by tensor (shared by the run and resume tests)."""
from pathlib import Path

import torch
from safetensors.torch import load_file


def weights(student_dir):
    return load_file(str(Path(student_dir) / "model.safetensors"))


def assert_same_weights(a, b, atol=0.0):
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], atol=atol, rtol=0.0 if atol == 0 else 1e-5, msg=key)
