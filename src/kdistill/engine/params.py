"""Which of a stage's parameters train and at what rate: AdamW's groups (no decay on biases and norms, `lr_scale`
multipliers) and `train.freeze`."""
from __future__ import annotations

import torch

from kdistill.errors import ConfigError, did_you_mean


def param_groups(module: torch.nn.Module, weight_decay: float, lr: float,
                 lr_scale: dict[str, float] | None = None) -> list[dict]:
    """No weight decay on biases and norms, as BERT-style training does; `lr_scale` globs (student
    parameter names) give their parameters a multiple of the learning rate. A classifier head that starts
    from random weights on top of a pretrained body learns too slowly at the body's rate: at 1e-4 for both,
    MiniLM's supersense head reached 0.62 dev accuracy in 300 steps, at 10x for the head 0.76
    (docs/encoders/teacher-supersense.md)."""
    lr_scale = lr_scale or {}
    groups: dict[tuple[float, float], list] = {(weight_decay, 1.0): [], (0.0, 1.0): []}
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        decay = 0.0 if p.ndim < 2 or "norm" in name.lower() else weight_decay
        # the globs name student parameters; training-only parts (projectors) keep the base rate
        student_name = name[len("student."):] if name.startswith("student.") else None
        scale = lr_multiplier(student_name, lr_scale) if student_name else 1.0
        groups.setdefault((decay, scale), []).append(p)
    return [{"params": params, "weight_decay": decay, "lr": lr * scale} for (decay, scale), params in groups.items()]


def lr_multiplier(name: str, lr_scale: dict[str, float]) -> float:
    """The multiplier of the first `lr_scale` glob that matches this parameter name (1 when none does)."""
    from fnmatch import fnmatch

    return next((v for glob, v in lr_scale.items() if fnmatch(name, glob)), 1.0)


def check_globs(field: str, patterns, names: list[str], whose: str = "student") -> None:
    """A glob that matches no parameter is a typo, not a no-op: say which and what names look like."""
    from fnmatch import fnmatch

    for i, pattern in enumerate(patterns):
        if not any(fnmatch(name, pattern) for name in names):
            label = f"{field}[{i}]" if isinstance(patterns, list) else f"{field}[{pattern!r}]"
            hint = did_you_mean(pattern, names, cutoff=0.6) or f"; names look like {names[len(names) // 2]!r}"
            raise ConfigError(f"{label}: {pattern!r} matches no {whose} parameter{hint}")


def freeze(student: torch.nn.Module, patterns: list[str]) -> None:
    """Keep parameters matching any glob fixed (the MobileBERT paper's progressive transfer freezes lower layers);
    the globs were checked against the student's names when the stage was built (build_stage)."""
    from fnmatch import fnmatch

    for name, param in student.named_parameters():
        if any(fnmatch(name, pattern) for pattern in patterns):
            param.requires_grad_(False)
    if patterns and not any(param.requires_grad for param in student.parameters()):
        raise ConfigError(freezes_all("train.freeze", patterns))


def check_freeze(field: str, patterns: list[str], names: list[str]) -> None:
    """When the stage is built, so `validate --full` refuses it too, not only the run."""
    from fnmatch import fnmatch

    if patterns and all(any(fnmatch(name, pattern) for pattern in patterns) for name in names):
        raise ConfigError(freezes_all(field, patterns))


def freezes_all(field: str, patterns: list[str]) -> str:
    return (f"{field} {patterns} fixes every parameter of the student, so the stage would train nothing; name only "
            f"the parts to keep fixed (e.g. '*embeddings*')")
