"""ProKT (Shi 2021): a teacher that keeps learning while the student distils from it.

Each step the teacher first minimises its task loss plus a KL term that pulls it toward the current
student, with its own optimizer, so every intermediate target stays within the student's reach; then the
student distils from the updated teacher, its outputs fixed targets (the loop's teacher_step).
"""
from __future__ import annotations

import torch

from kdistill.engine.schedule import make_adamw
from kdistill.errors import PairingError
from kdistill.losses import functional as fn
from kdistill.losses.logits import hard_label_count, hard_label_loss, logits_mask


class TeacherUpdater:
    def __init__(self, teacher, reader, task: str, cfg, accelerator, max_grad_norm: float | None):
        if task not in ("classification", "causal-lm", "masked-lm"):
            raise PairingError("teacher.update (ProKT) needs a teacher with logits and a task loss")
        self.reader, self.task, self.cfg, self.acc, self.max_grad_norm = reader, task, cfg, accelerator, max_grad_norm
        teacher.requires_grad_(True)
        optimizer = make_adamw(scaled_groups(teacher, cfg.lr, cfg.lr_scale), cfg.lr, accelerator.device)
        self.model, self.optimizer = accelerator.prepare(teacher, optimizer)
        self.module = teacher

    def logits(self, batch: dict) -> torch.Tensor:
        """The teacher's logits in train mode, with their graph: what its own step trains."""
        self.module.train()
        return self.reader(batch, ["logits"])["logits"]

    def count(self, batch: dict) -> int:
        return hard_label_count(batch, self.task)

    def loss(self, teacher_logits, student_logits, batch) -> torch.Tensor:
        task = hard_label_loss(teacher_logits, batch, self.task)
        # the teacher moves toward the student: KL(student ‖ teacher), the student fixed
        toward = fn.kl_div(teacher_logits, student_logits.detach(), temperature=self.cfg.temperature,
                           mask=logits_mask(batch, teacher_logits))
        return task + self.cfg.kl_weight * toward

    def step(self) -> None:
        if self.max_grad_norm:
            self.acc.clip_grad_norm_(self.model.parameters(), self.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


def scaled_groups(teacher, lr: float, lr_scale: dict[str, float]) -> list[dict]:
    """One parameter group per learning rate: a teacher that starts from a pretrained body and an untrained
    head (ProKT's teacher is not a converged one) needs the head's rate raised, as a fine-tuned student does."""
    from kdistill.engine.params import check_globs, lr_multiplier

    named = list(teacher.named_parameters())
    check_globs("teacher.update.lr_scale", lr_scale, [name for name, _ in named], whose="teacher")
    groups: dict[float, list] = {}
    for name, p in named:
        groups.setdefault(lr_multiplier(name, lr_scale), []).append(p)
    return [{"params": params, "lr": lr * scale} for scale, params in groups.items()]
