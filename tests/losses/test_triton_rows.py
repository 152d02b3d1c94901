"""The Triton rows of the chunked loss (kdistill.losses.triton_rows) against the torch kernels.

Triton compiles for GPUs only; its interpreter runs the same kernel source on the CPU. The interpreter
is chosen when triton is imported (TRITON_INTERPRET=1), so the check runs in a fresh process. On a
machine with CUDA the same script runs the compiled kernels (python tests/losses/test_triton_rows.py cuda).
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton", minversion="3.4")  # the interpreter these tests use

CHECK = r"""
import sys
import torch
from torch.testing import assert_close
from kdistill.losses import triton_rows
from kdistill.losses.chunked import chunked_divergence, pick_kernel

launched = []  # the Triton rows' calls: a run that fell back to torch would compare torch with itself
real_rows_for = triton_rows.rows_for


def counted_rows_for(*args):
    rows = real_rows_for(*args)
    return None if rows is None else (lambda s, t: launched.append(1) or rows(s, t))


triton_rows.rows_for = counted_rows_for

device = torch.device(sys.argv[1] if len(sys.argv) > 1 else "cpu")
cases = [("kl", {}), ("reverse_kl", {}), ("soft_ce", {}), ("js", {}),
         ("generalized_jsd", {"beta": 0.0}), ("generalized_jsd", {"beta": 0.3}), ("generalized_jsd", {"beta": 1.0})]
gen = torch.Generator().manual_seed(0)
# a vocabulary that is not a power of two and spans two of the kernel's blocks, one that fits in one
for vocab, padded in ((4096 + 904, 5003), (37, 40)):
    for name, extra in cases:
        kernel = pick_kernel(name, extra.get("beta", 0.5), 0.1, device, "triton")
        assert kernel[2] is False, "the Triton rows take raw logits"
        h = (torch.randn(2, 6, 8, generator=gen)).to(device).requires_grad_()
        w = (torch.randn(padded, 8, generator=gen) * 0.8).to(device).requires_grad_()
        b = (torch.randn(padded, generator=gen) * 0.3).to(device).requires_grad_()
        th, tw = torch.randn(2, 6, 5, generator=gen).to(device), torch.randn(vocab, 5, generator=gen).to(device)
        mask = torch.tensor([[1, 1, 0, 1, 1, 1], [0, 1, 1, 0, 1, 1]], dtype=torch.bool, device=device)
        values = {}
        for kernels in ("torch", "triton"):
            before = len(launched)
            loss = chunked_divergence(h, w, th, tw, divergence=name, mask=mask, chunk_size=3, temperature=2.0,
                                      student_bias=b, vocab_size=vocab, kernels=kernels, **extra)
            values[kernels] = (loss, *torch.autograd.grad(loss, (h, w, b)))
            assert (len(launched) > before) == (kernels == "triton"), (kernels, len(launched) - before)
        for want, got in zip(values["torch"], values["triton"]):
            assert_close(got, want, atol=1e-5, rtol=1e-5)
        print("ok", name, extra, vocab)
# -inf logits (a token ruled out by a bias) take the definitions' fallback, as on the torch path
h = torch.randn(4, 8, generator=gen).to(device).requires_grad_()
w = torch.randn(40, 8, generator=gen).to(device)
bias = torch.zeros(40, device=device)
bias[3] = float("-inf")
th, tw = torch.randn(4, 8, generator=gen).to(device), torch.randn(40, 8, generator=gen).to(device)
for kernels in ("torch", "triton"):
    before = len(launched)
    loss = chunked_divergence(h, w, th, tw, divergence="reverse_kl", student_bias=bias, teacher_bias=bias,
                              kernels=kernels)
    values[kernels] = loss
    assert (len(launched) > before) == (kernels == "triton"), kernels
assert torch.isfinite(values["triton"]) and abs(values["triton"] - values["torch"]) < 1e-5
print("ok -inf fallback")
"""


def run_check(device: str) -> str:
    path = [str(Path(__file__).parents[2] / "src"), os.environ.get("PYTHONPATH", "")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, path))}
    if device == "cpu":
        env["TRITON_INTERPRET"] = "1"
    result = subprocess.run([sys.executable, "-c", CHECK, device], capture_output=True, text=True, env=env,
                            timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def test_triton_rows_equal_the_torch_kernels_values_and_gradients():
    out = run_check("cpu")
    assert out.count("ok ") == 15


def test_triton_is_refused_clearly_where_it_cannot_run():
    import torch

    from kdistill.losses.chunked import pick_kernel

    with pytest.raises(ValueError, match="no Triton kernel for 'tvd'"):
        pick_kernel("tvd", 0.5, 0.1, torch.device("cpu"), "triton")
    with pytest.raises(ValueError, match="kernels must be one of"):
        pick_kernel("kl", 0.5, 0.1, torch.device("cpu"), "fast")
    # without the interpreter a CPU tensor gets the torch kernels under "auto"
    if os.environ.get("TRITON_INTERPRET") != "1":
        assert pick_kernel("kl", 0.5, 0.1, torch.device("cpu"))[2] is True


if __name__ == "__main__":
    print(run_check(sys.argv[1] if len(sys.argv) > 1 else "cpu"))
