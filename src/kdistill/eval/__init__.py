"""Evaluation: embedding fidelity, task metrics, footprint and speed, and the student-vs-teacher report.

Submodules import torch, so names are resolved on first use: `import kdistill.eval` stays cheap
for the CLI.
"""
from __future__ import annotations

_EXPORTS = {
    "encode": "embeddings", "fidelity": "embeddings", "mean_cosine": "embeddings",
    "encode_speed": "embeddings", "compare_speed": "embeddings",
    "accuracy": "metrics", "perplexity": "metrics", "count_parameters": "metrics",
    "size_on_disk": "metrics", "stopwatch": "metrics",
    "evaluate": "report", "render_table": "report", "save": "report", "spec_from_arg": "report",
    "load_datasets": "report",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(f"kdistill.eval.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'kdistill.eval' has no attribute {name!r}")
