"""A real 1-bit export: binary weights packed 8 per byte with one scale per row.

`model.packed.safetensors` holds, for every binary linear layer, `<name>.weight.bits` (uint8, the signs
packed along the input dimension), `<name>.weight.scale` (float32, one per output row) and the same
for `weight_split` after BinaryBERT's splitting; every other tensor (embeddings, LayerNorms, biases,
the classifier, quantizer parameters) is kept as it was. Loading unpacks scale * sign into the same
QuantLinear structure, so the outputs equal the fake-quantized model's.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import torch

from kdistill.engine.disk import WRITE_ERRORS, raise_if_disk_full, replace_folder
from kdistill.errors import CheckpointError, ConfigError, OutputError
from kdistill.quant.linear import QuantLinear, packed_rows

PACKED_FILE = "model.packed.safetensors"
FORMAT = "kdistill-packed-1bit"
COPIED = ("kdistill.json", "tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json",
          "modules.json", "config_sentence_transformers.json", "sentence_bert_config.json")


def _latents(model) -> list[tuple[str, QuantLinear, str, torch.Tensor]]:
    out = []
    for name, mod in model.named_modules():
        if isinstance(mod, QuantLinear):
            out.append((name, mod, "weight", mod.weight))
            if mod.weight_split is not None:
                out.append((name, mod, "weight_split", mod.weight_split))
    return out


def pack_state(model) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors to save, sizes) for a model whose quantized layers are all binary."""
    not_binary = sorted({f"{n} (W{m.weight_bits})" for n, m, _, _ in _latents(model) if m.weight_bits != 1})
    if not _latents(model) or not_binary:
        raise ConfigError(f"--packed needs a student with 1-bit weights; these layers are not binary: "
                          f"{', '.join(not_binary[:4]) or 'no quantized layers at all'}")
    packed_keys, tensors = set(), {}
    fp32_bytes = packed_bytes = 0
    for name, mod, attr, w in _latents(model):
        bits, scale = packed_rows(w.detach().float().cpu())
        tensors[f"{name}.{attr}.bits"] = torch.from_numpy(np.packbits(bits.numpy(), axis=-1))
        tensors[f"{name}.{attr}.scale"] = scale.contiguous()
        packed_keys.add(f"{name}.{attr}")
        fp32_bytes += w.numel() * 4 * (1 if attr == "weight" else 0)  # the FP model has one matrix per layer
        packed_bytes += tensors[f"{name}.{attr}.bits"].numel() + scale.numel() * 4
    for key, value in model.state_dict().items():
        if key not in packed_keys:
            tensors[key] = value.detach().cpu().contiguous()
    return tensors, {"quantized_linear_fp32_bytes": fp32_bytes, "quantized_linear_packed_bytes": packed_bytes}


def export_packed(model_dir: str, out_dir: str) -> dict:
    """Write the packed 1-bit model of a quantized student directory; returns the size report."""
    from kdistill.models.loading import load_model

    out = Path(out_dir).expanduser().resolve()  # a link to an earlier export: that export is replaced, not the link
    check_export_target(Path(model_dir), out)
    loaded = load_model(model_dir)
    if not getattr(loaded.model.config, "kdistill_quant", None):
        raise ConfigError(f"{model_dir} is not a quantized student (its config has no kdistill_quant); "
                          f"train it with a recipe that has `quant: {{weights: 1}}`")
    tensors, sizes = pack_state(loaded.model)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
    except OSError as err:
        raise OutputError(f"cannot write the export beside {out} ({err.strerror or err}); pick a writable folder") from None
    try:
        report = write_packed(tmp, tensors, sizes, loaded.model.config, Path(model_dir))
    except WRITE_ERRORS as err:
        raise_if_disk_full(err, out, tmp, error=OutputError, what="the packed export",  # tmp removed either way
                           fix="Free some space and run the same export again")
        raise
    replace_folder(tmp, out)  # an earlier export there was checked above
    return report


def write_packed(tmp: Path, tensors: dict, sizes: dict, config, model_dir: Path) -> dict:
    from safetensors.torch import save_file

    save_file(tensors, tmp / PACKED_FILE, metadata={"format": FORMAT})
    config.save_pretrained(tmp)
    for name in COPIED:
        if (model_dir / name).exists():
            shutil.copy2(model_dir / name, tmp / name)
    for sub in ("1_Pooling", "2_Normalize"):
        if (model_dir / sub).is_dir():
            shutil.copytree(model_dir / sub, tmp / sub)
    source = model_dir / "model.safetensors"
    report = {**sizes, "packed_file_bytes": (tmp / PACKED_FILE).stat().st_size,
              "source_file_bytes": source.stat().st_size if source.exists() else None}
    report["quantized_linear_ratio"] = sizes["quantized_linear_packed_bytes"] / sizes["quantized_linear_fp32_bytes"]
    (tmp / "packed.json").write_text(json.dumps(report, indent=2))
    return report


def is_packed_export(path: Path) -> bool:
    return path.is_dir() and (path / PACKED_FILE).is_file() and (path / "packed.json").is_file()


def check_export_target(source: Path, out: Path) -> None:
    """The export replaces only an earlier export or an empty folder, never the student it reads or a user's files."""
    if not source.exists():
        raise ConfigError(f"{source} does not exist: give a finished student directory or a run directory")
    src, dst = source.resolve(), out.resolve()
    if dst == src or dst in src.parents or src in dst.parents:
        raise ConfigError(f"the export folder {out} is the student {source}, inside it, or holds it (it would be "
                          f"replaced by its own export): pick an output path outside both")
    if out.is_file():
        raise ConfigError(f"{out} is a file: pick a folder path for the export")
    if out.is_dir() and any(out.iterdir()) and not is_packed_export(out):
        raise ConfigError(f"{out} is a non-empty folder that is not an earlier packed export; an export replaces only "
                          f"its own output: pick another path, or move that folder away")


def packed_entries(state: dict, key: str, mod, file: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """One layer's packed signs ([out, ceil(in / 8)] uint8) and row scales ([out] float), checked: a wrong shape
    would otherwise be broadcast or zero-padded into wrong weights without a word."""
    if f"{key}.bits" not in state or f"{key}.scale" not in state:
        raise CheckpointError(f"{file} has no packed weights for {key} (.bits and .scale): export the student again")
    bits, scale = state.pop(f"{key}.bits"), state.pop(f"{key}.scale")
    rows, width = mod.out_features, (mod.in_features + 7) // 8
    if bits.dtype != torch.uint8 or tuple(bits.shape) != (rows, width):
        raise CheckpointError(f"{file}: {key}.bits is {str(bits.dtype).removeprefix('torch.')} "
                              f"{list(bits.shape)}, not uint8 {[rows, width]} for its {mod.in_features}-input, "
                              f"{rows}-row layer: the file is damaged or not this config's; export the student again")
    if not scale.is_floating_point() or tuple(scale.shape) != (rows,):
        raise CheckpointError(f"{file}: {key}.scale is {str(scale.dtype).removeprefix('torch.')} {list(scale.shape)}, "
                              f"not one float per row ({rows}): the file is damaged or not this config's; "
                              f"export the student again")
    return bits, scale


def unpack_into(model, path: str) -> None:
    """Load a packed file into a model rebuilt with the same quantized structure."""
    from safetensors import safe_open

    file = Path(path) / PACKED_FILE
    with safe_open(str(file), framework="pt") as f:
        if (f.metadata() or {}).get("format") != FORMAT:
            raise CheckpointError(f"{file} is not a {FORMAT} file")
        state = {k: f.get_tensor(k) for k in f.keys()}
    latents = {f"{n}.{a}": (m, a) for n, m, a, _ in _latents(model)}
    with torch.no_grad():
        for key, (mod, attr) in latents.items():
            packed, scale = packed_entries(state, key, mod, file)
            bits = np.unpackbits(packed.numpy(), axis=-1, count=mod.in_features)
            signs = torch.from_numpy(bits.astype(np.float32) * 2 - 1)
            getattr(mod, attr).copy_(scale[:, None] * signs)
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as err:  # a tensor whose shape is not its config's (an edited config.json, a damaged file)
        raise CheckpointError(f"{file} does not match its config: {str(err).splitlines()[-1].strip()}") from None
    missing = [k for k in missing if k not in latents and k not in set(getattr(model, "_tied_weights_keys", None) or [])]
    if missing or unexpected:
        raise CheckpointError(f"{file} does not match its config (missing {missing[:3]}, unexpected {unexpected[:3]})")
