"""What a stage sets by least squares before its first step: learned projectors (`projector_init: fit`) and the
classifier head (`train.head_init: fit`), on records spread over the training data, the same on every process."""
from __future__ import annotations

import torch

from kdistill.data.sources import spread
from kdistill.engine.build import shortest_first
from kdistill.engine.head_fit import HEAD_FIT_RECORDS, classifier_layer, fit_head, head_targets
from kdistill.losses.base import LeastSquares

FIT_RECORDS = 256  # thousands of tokens, so a least-squares map over a few hundred features does not memorise them


class StartFits:
    """Mixed into StageTrainer (kdistill.engine.loop), whose parts, teacher and distiller it reads."""

    @torch.no_grad()
    def fit_projectors(self) -> None:
        """Terms with a learned projector fit it on records spread over the training data before step 1:
        the same records on every process, then rank 0's weights everywhere, so DDP's replicas agree."""
        terms = [t for t in self.parts.terms if t.fits_projector()]
        if not terms or self.teacher is None:  # a teacher store holds logits only, no hidden states
            return
        sums = [LeastSquares() for _ in terms]
        self.distiller.eval()
        for batch in self.fit_batches(FIT_RECORDS):
            targets = self.teacher_taps(batch)
            with self.acc.autocast():
                taps = self.distiller.reader(batch, self.distiller.tap_names)
            for term, total in zip(terms, sums):
                total.add(*term.projector_rows(taps, targets, batch))
        for term, total in zip(terms, sums):
            total.solve_into(term.projector)
            self.agree(term.parameters())

    def fit_batches(self, limit: int):
        """Batches of records spread across the training data (not one source's first rows), the same on
        every process."""
        from kdistill.engine.loop import to_device

        records = spread(self.parts.train_records, limit)
        records = shortest_first(self.views(records, [0] * len(records)))  # a fit sums over all: order is free
        for start in range(0, len(records), self.cfg.batch_size):
            yield {k: to_device(v, self.acc.device)
                   for k, v in self.parts.collator(records[start:start + self.cfg.batch_size]).items()}

    def agree(self, params) -> None:
        """Rank 0's fitted weights everywhere, so DDP's replicas start alike."""
        if self.acc.num_processes > 1:
            from accelerate.utils import broadcast

            for param in params:
                param.data.copy_(broadcast(param.detach().clone(), from_process=0))

    @torch.no_grad()
    def init_head(self) -> None:
        """train.head_init: fit (kdistill.engine.head_fit)."""
        reads_teacher = self.needs_teacher and "logits" in self.parts.teacher_taps
        layer = classifier_layer(self.parts.student)

        def targets(batch):
            return head_targets(batch, self.teacher_taps(batch)["logits"] if reads_teacher else None,
                                layer.out_features)

        def read(batch):
            with self.acc.autocast():
                self.distiller.reader(batch, ["logits"])

        self.distiller.eval()
        fit_head(layer, read, self.fit_batches(HEAD_FIT_RECORDS), targets)
        self.agree(layer.parameters())
