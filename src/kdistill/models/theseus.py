"""BERT-of-Theseus (Xu 2020): compress by progressive module replacing.

The teacher's blocks are split into groups ("predecessors"); each group gets one successor block.
In training, every forward pass runs each group's successor with probability p and its frozen
predecessor blocks otherwise; p rises linearly from `start` to 1. In eval mode, and in the exported
model, only the successors run, so the result is a plain, shallower model of the teacher's class.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from kdistill.errors import PairingError
from kdistill.models.arch import find_layers, layer_count


class TheseusLayers(nn.ModuleList):
    """Holds the successors (as the list itself, so state-dict keys are those of the final model) and
    the frozen predecessor groups; iterating yields the blocks this forward pass runs."""

    def __init__(self, successors: list[nn.Module], predecessors: list[list[nn.Module]], start: float, full_at_step: int):
        super().__init__(successors)
        self.predecessors = nn.ModuleList(nn.ModuleList(group) for group in predecessors)
        self.predecessors.requires_grad_(False)
        self.start, self.full_at_step = start, max(1, full_at_step)
        self.replace_rate = start

    def __iter__(self):
        successors = list(self._modules[str(i)] for i in range(len(self)))
        if not self.training:
            return iter(successors)
        draws = torch.rand(len(successors)).tolist()  # the global RNG: restored on resume
        blocks = []
        for successor, group, draw in zip(successors, self.predecessors, draws):
            blocks += [successor] if draw < self.replace_rate else list(group)
        return iter(blocks)

    def __len__(self):
        return sum(1 for key in self._modules if key.isdigit())

    # engine extension points: the schedule and its state
    def after_step(self, step: int, total_steps: int, parts: dict | None = None) -> None:
        self.replace_rate = min(1.0, self.start + (1.0 - self.start) * step / self.full_at_step)

    def method_state(self) -> dict:
        return {"replace_rate": self.replace_rate}

    def load_method_state(self, state: dict) -> None:
        self.replace_rate = state.get("replace_rate", self.replace_rate)


def build_theseus(spec, teacher: nn.Module, steps: int, donor: nn.Module | None = None) -> nn.Module:
    """A copy of the teacher whose block list is a TheseusLayers; successor i starts as the last
    block of group i, so the top block of the teacher stays on top (`successors: top`), or as teacher
    block i (`successors: first`, as the paper's code does); those blocks of `donor` instead of the teacher's
    when given (`layers_from`)."""
    n = layer_count(teacher.config)
    if n % spec.modules:
        raise PairingError(f"student.theseus.modules: {spec.modules} does not divide the teacher's {n} layers")
    model = copy.deepcopy(teacher)
    path, blocks = find_layers(model, n)
    size = n // spec.modules
    groups = [list(blocks[i * size:(i + 1) * size]) for i in range(spec.modules)]
    picks = ([(i + 1) * size - 1 for i in range(spec.modules)] if spec.successors == "top"
             else list(range(spec.modules)))
    source = blocks if donor is None else find_layers(donor, n)[1]
    successors = [copy.deepcopy(source[i]) for i in picks]
    parent_path, _, attr = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, attr, TheseusLayers(successors, groups, spec.start, int(spec.full_at * steps)))
    model.config.num_hidden_layers = spec.modules
    model.requires_grad_(True)
    for group in model.get_submodule(path).predecessors:
        group.requires_grad_(False)
    return model


def successor_only(model: nn.Module) -> nn.Module:
    """The exported model: every TheseusLayers becomes a plain ModuleList of its successors."""
    for name, module in list(model.named_modules()):
        if isinstance(module, TheseusLayers):
            parent_path, _, attr = name.rpartition(".")
            parent = model.get_submodule(parent_path) if parent_path else model
            setattr(parent, attr, nn.ModuleList(module._modules[str(i)] for i in range(len(module))))
    return model
