"""What a compared pipeline cost and gives: training wall time, estimated training FLOPs, the student's speed
against the teacher's, and the packed size of a 1-bit student (kdistill/compare.py writes them into its table)."""
from __future__ import annotations

import json
from pathlib import Path

from kdistill.compare_runs import asks_teacher
from kdistill.config import Recipe


def pipeline_wall_time(run: Recipe) -> float:
    """Training wall time of every stage of a finished run (each stage's student records its own)."""
    from kdistill.engine.stage_refs import stage_student_dir

    total = 0.0
    for index in range(len(run.stages)):
        meta = json.loads((stage_student_dir(Path(run.output), run, index) / "kdistill.json").read_text())
        total += meta.get("wall_time_s") or 0.0
    return total


def estimated_train_flops(recipe: Recipe, student_params: int, tokens_per_seq: float, teacher_cost) -> float:
    """6·N·D for the student's forward and backward plus, per stage, 2·N·D for the teacher's forward (or its
    blocks inside a Theseus hybrid), nothing where no loss asks it (a baseline); where the teacher trains in the
    loop (ProKT) 8·N·D for each: its forward and backward, and each model's extra forward to read the other
    (non-embedding parameters, D = tokens seen): an estimate for comparing pipelines, not a measurement.
    ``teacher_cost(stage)``: that stage's teacher's N times its tokens per sequence (a convnet teacher of a ViT
    reads one "token" an image where the student reads its patches)."""
    total = 0.0
    for stage in recipe.stages:
        in_loop = stage.teacher.update is not None
        teacher = (8 if in_loop else 2) * teacher_cost(stage) if asks_teacher(stage) else 0
        student = (8 if in_loop else 6) * student_params * tokens_per_seq
        total += stage.train.steps * stage.train.batch_size * (student + teacher)
    return total


class TeacherCosts:
    """Per teacher reference, its non-embedding parameters times its tokens per sequence, loaded once."""

    def __init__(self, records: list[dict], console=None):
        self.records, self.console, self.known = records, console, {}

    def of(self, model, tokenizer, max_length: int) -> float:
        from kdistill.eval.metrics import non_embedding_parameters

        return non_embedding_parameters(model) * mean_tokens(tokenizer, self.records, max_length, model.config)

    def for_stage(self, stage, student, fallback: float) -> float:
        """The student's own cost for an earlier stage's student (`stage:NAME`), ``fallback`` (the table's
        teacher) for a store without a model."""
        from kdistill.models.loading import load_model
        from kdistill.teachers.recipe_runs import resolve_teacher

        ref = stage.teacher.model
        if ref is None:
            return fallback
        if ref.startswith("stage:"):
            return self.of(student.model, student.tokenizer, stage.data.max_length)
        if ref not in self.known:
            loaded = load_model(resolve_teacher(ref, self.console), trust_remote_code=stage.teacher.trust_remote_code)
            self.known[ref] = self.of(loaded.model, loaded.tokenizer, stage.data.max_length)
        return self.known[ref]


def mean_tokens(tokenizer, records: list[dict], max_length: int, config=None) -> float:
    if "text" not in records[0]:  # images: a ViT's patches and special tokens, one "token" for a convnet
        patch = getattr(config, "patch_size", None)
        size = getattr(config, "image_size", 0)
        return (size // patch) ** 2 + 1 if patch else 1.0
    lengths = [min(len(ids), max_length) for ids in tokenizer([r["text"] for r in records[:2000]])["input_ids"]]
    return sum(lengths) / max(1, len(lengths))


def speedup(teacher, student, records: list[dict], task: str) -> float | None:
    """The student's encode (or forward) speed over the teacher's; None for fake-quantized students, whose float
    kernels say nothing about 1-bit ones."""
    if getattr(student.model.config, "kdistill_quant", None):
        return None
    speed = measure_speed(teacher, student, records, task)
    return speed["student"] / speed["teacher"]


def pipeline_cost(run: Recipe, student, walls: list[float], tokenizer, records: list[dict], teacher_cost) -> dict:
    """What training the whole pipeline cost: wall times, steps, estimated PFLOPs; the packed 1-bit size if any."""
    from kdistill.eval.metrics import non_embedding_parameters

    tokens = mean_tokens(tokenizer, records, run.stages[-1].data.max_length, student.model.config)
    cost = {"wall_time_s": walls, "steps": sum(s.train.steps for s in run.stages),
            "train_pflops": estimated_train_flops(run, non_embedding_parameters(student.model), tokens,
                                                  teacher_cost) / 1e15}
    packed = packed_size(student.path, Path(run.output) / "packed")
    return {**cost, "packed": packed} if packed else cost


def measure_speed(teacher, student, records: list[dict], task: str) -> dict[str, float]:
    """Records/second of teacher and student on the same test records (texts or images)."""
    if task == "image-classification":
        from kdistill.eval.images import image_speed

        return image_speed({"teacher": teacher.model, "student": student.model}, records[:512])
    from kdistill.eval.embeddings import compare_speed

    texts = [r["text"] for r in records[:128]]
    return compare_speed({"teacher": (teacher.model, teacher.tokenizer, "cls"),
                          "student": (student.model, student.tokenizer, "cls")}, texts)


def packed_size(student_dir: str, out: Path) -> dict | None:
    """Sizes of the packed 1-bit export of a binary student (None for other students)."""
    config = json.loads((Path(student_dir) / "config.json").read_text())
    if (config.get("kdistill_quant") or {}).get("weights") != 1:
        return None
    from kdistill.quant.packing import export_packed

    return export_packed(student_dir, str(out))
