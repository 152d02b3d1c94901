"""What `evaluate` refuses before a model loads or a record is read: its own arguments, and data sources checked by
the schema a recipe's are."""
from __future__ import annotations

import os

from kdistill.errors import ConfigError


def check_data_source(spec: dict, index: int) -> None:
    """The fields a recipe's data source takes, checked by the same schema (a misspelt key is named, with the one
    meant), before any record is read; `name` labels the source in the report."""
    from pydantic import ValidationError

    from kdistill.config import DataSource
    from kdistill.recipe_errors import format_validation

    try:
        DataSource.model_validate({k: v for k, v in spec.items() if k != "name"})
    except ValidationError as err:
        raise ConfigError(format_validation(err, f"data[{index}]", "evaluate", DataSource, "invalid data source"))


def check_settings(student_ref, teacher_ref, batch_size, max_length, device) -> None:
    """evaluate's own arguments, refused by name before a model loads (else a range() error, a CUDA assertion)."""
    for name, ref in (("student", student_ref), ("teacher", teacher_ref)):
        if not isinstance(ref, (str, os.PathLike)) and not (name == "teacher" and ref is None):
            raise ConfigError(f"{name} is a model folder, hub id, packaged:NAME or recipe:NAME; got "
                              f"{type(ref).__name__} {ref!r}")
    for name, value, low in (("batch_size", batch_size, 1), ("max_length", max_length, 8)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ConfigError(f"{name} must be a whole number >= {low}, got {value!r}")
    if device is not None:
        import torch

        kind = str(device).split(":")[0]
        if kind == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"device {device!r}: this torch sees no CUDA device (a CPU build, or no GPU here); "
                              f"leave device out to evaluate on the CPU")
