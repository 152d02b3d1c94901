"""Which student layer learns from which teacher layer. Layers are numbered 1..N; 0 is the embeddings."""
from __future__ import annotations

from dataclasses import dataclass

from kdistill.errors import PairingError


# how an explicit map is written, for every message that asks for one
PAIRS_EXAMPLE = ("[[student, teacher], ...] pairs, e.g. [[1, 2], [3, 6]] (student layer 1 learns from teacher layer 2; "
                 "layer 0 is the embeddings)")


@dataclass(frozen=True)
class LayerMap:
    pairs: tuple[tuple[int, int], ...]  # (student layer, teacher layer)

    @classmethod
    def uniform(cls, n_student: int, n_teacher: int) -> "LayerMap":
        """TinyBERT's g(m) = m·N_T/N_S: student layer m learns from teacher layer g(m); last maps to last."""
        return cls(tuple((m, max(1, (m * n_teacher) // n_student)) for m in range(1, n_student + 1)))

    @classmethod
    def last(cls, n_student: int, n_teacher: int) -> "LayerMap":
        return cls(((n_student, n_teacher),))

    @classmethod
    def resolve(cls, spec, n_student: int, n_teacher: int, where: str = "layers") -> "LayerMap":
        """`uniform`, `last`, or explicit [[student, teacher], ...] pairs (negative numbers count from the end)."""
        if spec == "uniform":
            return cls.uniform(n_student, n_teacher)
        if spec == "last":
            return cls.last(n_student, n_teacher)
        if isinstance(spec, str):
            raise PairingError(f"{where}: unknown layer map {spec!r}; valid: uniform, last, or {PAIRS_EXAMPLE}")
        pairs = []
        for pair in spec:
            if len(pair) != 2:
                raise PairingError(f"{where}: each pair must be [student_layer, teacher_layer], got {pair!r}; a "
                                   f"layer map is {PAIRS_EXAMPLE}")
            s, t = (normalise_layer(x, n, f"{where} ({who} layer)") for x, n, who in
                    ((pair[0], n_student, "student"), (pair[1], n_teacher, "teacher")))
            if (s, t) in pairs:
                # counted twice it would silently double that pair's weight in the loss
                raise PairingError(f"{where}: the pair {list(pair)} is student layer {s} -> teacher layer {t}, "
                                   "already listed; give each pair once (the loss's weight scales it)")
            pairs.append((s, t))
        return cls(tuple(pairs))


def normalise_layer(index: int, num_layers: int, where: str, allow_embeddings: bool = True) -> int:
    """Map a possibly negative layer number to 0..N (or 1..N) and refuse one out of range."""
    low = 0 if allow_embeddings else 1
    value = index + num_layers + 1 if index < 0 else index
    if not low <= value <= num_layers:
        raise PairingError(
            f"{where}: layer {index} is out of range; this model has layers {low}..{num_layers} "
            f"(0 is the embeddings, negative numbers count from the last layer)"
        )
    return value
