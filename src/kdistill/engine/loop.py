"""The one training loop. It owns devices, precision, accumulation, clipping, logging, eval and checkpoints.

Accumulation is exact: each term is a mean over its own items (tokens, sequences, masked tokens),
and every micro-batch on every process is weighted by its share of the global item count, so the
update equals the one a single process would make on the whole global batch.
"""
from __future__ import annotations

import math
import time
from contextlib import ExitStack
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from kdistill.config import Stage
from kdistill.errors import CheckpointError
from kdistill.data import mask_tokens
from kdistill.data.images import view_seed
from kdistill.engine.batches import BatchPlan
from kdistill.engine.build import StageParts, positions_of
from kdistill.engine.checkpoint import (CheckpointMismatch, list_checkpoints, load_checkpoint, prune, read_manifest,
                                       save_checkpoint, saved_loss_terms, written_by)
from kdistill.engine.distiller import Distiller
from kdistill.engine.logs import RunLogger
from kdistill.engine.on_policy import OnPolicy
from kdistill.engine.params import freeze, param_groups
from kdistill.engine.schedule import make_adamw, make_scheduler
from kdistill.engine.stage_hash import stage_hash
from kdistill.engine.start_fits import StartFits
from kdistill.engine.teacher_update import TeacherUpdater
from kdistill.models.taps import TapReader
from kdistill.teachers.cached import SparseLogits, sparse_batch


def to_device(value, device):
    if isinstance(value, SparseLogits):
        return replace(value, logprobs=value.logprobs.to(device), indices=value.indices.to(device),
                       tail=value.tail.to(device))
    return value.to(device)


@dataclass
class StageResult:
    steps: int
    wall_time_s: float
    final_train: dict
    final_eval: dict


class StageTrainer(StartFits):
    def __init__(self, parts: StageParts, stage: Stage, run_dir: Path, accelerator, console=None, progress=True,
                 declared: Stage | None = None, force: bool = False):
        self.parts, self.stage, self.cfg, self.acc = parts, stage, stage.train, accelerator
        self.force = force  # resume a checkpoint written under other settings (kdistill run --resume --force)
        self.resumed_under_changes = False
        self.run_dir = run_dir
        self.ckpt_root = run_dir / "checkpoints" / stage.name
        # checkpoints are bound to the stage as the recipe wrote it: `stage:` references resolved to paths
        # under the run folder would tie them to how that folder was spelt
        self.hash = stage_hash(declared or stage, real_paths=False)
        self.path_hash = stage_hash(declared or stage)
        self.accepted_hashes = (self.hash, self.path_hash, stage_hash(declared or stage, legacy=True, real_paths=False))
        self.console = console
        self.show_progress = progress and accelerator.is_main_process
        freeze(parts.student, self.cfg.freeze)
        self.distiller = Distiller(parts.student, parts.student_info, parts.terms, parts.student_taps)
        self.teacher = parts.teacher.to(accelerator.device) if parts.teacher is not None else None
        self.teacher_reader = TapReader(self.teacher, parts.teacher_info) if self.teacher is not None else None
        self.updater = None
        if stage.teacher.update:  # ProKT: the teacher trains in the loop
            self.updater = TeacherUpdater(self.teacher, self.teacher_reader, parts.teacher_info.task,
                                          stage.teacher.update, accelerator, self.cfg.max_grad_norm)
            self.teacher_reader.model = self.updater.model  # forward through the (possibly DDP) wrapper
        self.needs_teacher = any(t.needs_teacher for t in parts.terms)
        # parts with a schedule and state: the loss terms, plus student modules such as Theseus' layers
        self.stateful = list(parts.terms) + [m for m in parts.student.modules() if hasattr(m, "method_state")]
        optimizer = make_adamw(param_groups(self.distiller, self.cfg.weight_decay, self.cfg.lr, self.cfg.lr_scale),
                               self.cfg.lr, accelerator.device)
        self.scheduler = make_scheduler(optimizer, self.cfg.steps, self.cfg.warmup, self.cfg.schedule)
        self.model, self.optimizer = accelerator.prepare(self.distiller, optimizer)
        self.plan = BatchPlan(len(parts.train_records), self.cfg.batch_size, self.cfg.grad_accum,
                              accelerator.num_processes, accelerator.process_index, self.cfg.seed,
                              lengths=[len(r["text"]) for r in parts.train_records] if stage.data.group_by_length else None)
        records = len(parts.train_records)
        if self.cfg.batch_size > records and console is not None and accelerator.is_main_process:
            console.print(f"[yellow]train.batch_size {self.cfg.batch_size} is more than the {records:,} training "
                          f"records[/yellow]: every batch holds some of them twice or more")
        self.logger = RunLogger(run_dir, stage.name, enabled=accelerator.is_main_process)
        self.on_policy = None
        if stage.on_policy is not None and stage.on_policy.fraction > 0:
            limits = [positions_of(m) for m in (parts.student, parts.teacher) if m is not None]
            self.on_policy = OnPolicy(stage.on_policy, parts.tokenizer, parts.student.config.eos_token_id,
                                      self.cfg.seed, positions=min(filter(None, limits), default=None))
        self.step = 0
        # training time before this process took over (from the checkpoint it resumed), and when it did
        self.elapsed_before, self.fit_start = 0.0, time.perf_counter()

    # ---- batches -------------------------------------------------------------------------------
    def collate(self, indices: list[int], step: int, micro: int, epochs: list[int] | None = None) -> dict:
        records = self.views([self.parts.train_records[i] for i in indices], epochs)
        rank = self.acc.process_index
        if self.on_policy is not None and self.on_policy.wants(step, micro, rank):
            student = self.acc.unwrap_model(self.model).student
            batch = self.on_policy.sample(student, records, self.stage.data.max_length, step, micro, rank,
                                          teacher=self.teacher)
            return {k: v.to(self.acc.device) for k, v in batch.items()}
        batch = self.parts.collator(records)
        if self.parts.store is not None:  # the teacher's stored top-k, padded to this batch
            batch["stored_teacher"] = sparse_batch(self.parts.store, records, batch.get("attention_mask"),
                                                   self.parts.teacher_info.logits_per == "token")
        if self.parts.needs_mlm:
            gen = torch.Generator().manual_seed(hash((self.cfg.seed, step, micro, self.acc.process_index)) % 2**62)
            batch["input_ids"], batch["mlm_labels"] = mask_tokens(
                batch["input_ids"], batch["attention_mask"], self.parts.tokenizer, self.cfg.mlm_probability, gen)
        return {k: to_device(v, self.acc.device) for k, v in batch.items()}

    def views(self, records: list[dict], epochs: list[int]) -> list[dict]:
        """Each image's view of its epoch, replayable from its seed; text records as they are."""
        if self.stage.data.image_augment is None:
            return records
        seed = self.stage.data.image_augment.seed
        return [dict(r, view_seed=view_seed(seed, r["id"], e), epoch=e) for r, e in zip(records, epochs)]

    def teacher_taps(self, batch: dict) -> dict:
        if not self.needs_teacher:
            return {}
        if "stored_teacher" in batch:
            return {"logits": batch["stored_teacher"]}
        self.teacher.eval()
        with torch.no_grad(), self.acc.autocast():
            return self.teacher_reader(batch, sorted(self.parts.teacher_taps))

    def teacher_step(self, batches: list[dict], world: int) -> None:
        """ProKT's order, as in the authors' code: the teacher first takes its step toward the student as it is,
        then the student distils from the updated teacher (with grad_accum above 1 the teacher's one step comes
        before every micro-batch, as for one large batch; the authors' code steps it after the earlier ones). Each reads the other in eval mode (no dropout), as
        fixed targets; the teacher's loss is weighted by its share of the global labelled items, as the student's."""
        counts = torch.tensor([float(self.updater.count(b)) for b in batches], dtype=torch.float64,
                              device=self.acc.device)
        total = self.acc.reduce(counts.sum(), reduction="sum").clamp_min(1)
        distiller = self.acc.unwrap_model(self.model)
        distiller.eval()
        for j, batch in enumerate(batches):
            with ExitStack() as stack:
                if j < len(batches) - 1:
                    stack.enter_context(self.acc.no_sync(self.updater.model))
                stack.enter_context(self.acc.autocast())
                with torch.no_grad():
                    student_logits = distiller.reader(batch, ["logits"])["logits"]
                loss = self.updater.loss(self.updater.logits(batch), student_logits, batch)
                self.acc.backward(loss * float(counts[j] / total) * world)
        self.updater.step()

    # ---- one optimizer step --------------------------------------------------------------------
    def train_step(self, step: int) -> dict:
        terms = self.parts.terms
        epochs = self.plan.micro_epochs(step)
        batches = [self.collate(idx, step, j, epochs[j]) for j, idx in enumerate(self.plan.micro_batches(step))]
        counts = torch.tensor([[t.count(b) for t in terms] for b in batches], dtype=torch.float64, device=self.acc.device)
        totals = self.acc.reduce(counts.sum(0), reduction="sum").clamp_min(1)
        world = self.acc.num_processes
        weights = torch.tensor([t.weight for t in terms], dtype=torch.float64, device=self.acc.device)
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.acc.device)
        part_sums = torch.zeros(len(terms), dtype=torch.float64, device=self.acc.device)
        if self.updater is not None:
            self.teacher_step(batches, world)
        self.model.train()
        for j, batch in enumerate(batches):
            share = counts[j] / totals  # this micro-batch's fraction of each term's global items
            sync = j == len(batches) - 1
            with ExitStack() as stack:
                if not sync:
                    stack.enter_context(self.acc.no_sync(self.model))
                stack.enter_context(self.acc.autocast())
                out = self.model(batch, self.teacher_taps(batch), (share * world).tolist())
                self.backward(out["loss"], world)
            values = torch.stack([out["parts"][t.name].double() for t in terms])
            part_sums += values * share
            loss_sum += (values * share * weights).sum()
        grad_norm = None
        if self.cfg.max_grad_norm:
            grad_norm = self.acc.clip_grad_norm_(self.model.parameters(), self.cfg.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        reduced = self.acc.reduce(torch.cat([loss_sum[None], part_sums]), reduction="sum")
        result = {"loss": float(reduced[0]), "parts": {t.name: float(v) for t, v in zip(terms, reduced[1:])},
                  "lr": self.scheduler.get_last_lr()[0]}
        for part in self.stateful:  # schedules see this step's global term values, the same on every process
            part.after_step(step + 1, self.cfg.steps, result["parts"])
        if grad_norm is not None:
            result["grad_norm"] = float(grad_norm)
        return result

    def backward(self, loss: torch.Tensor, world: int) -> None:
        """A micro-batch can run no trainable parameter at all: BERT-of-Theseus drawing every (frozen)
        predecessor while the embeddings and head are frozen too. Alone, there is nothing to do; with
        several processes, a zero that reaches every trainable parameter keeps their gradient
        reductions in step (a skipped backward on one process would hang the others)."""
        if not loss.requires_grad:
            if world == 1:
                return
            loss = loss + sum((p * 0).sum() for p in self.model.parameters() if p.requires_grad)
        self.acc.backward(loss)

    # ---- evaluation ----------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> dict:
        records = self.parts.eval_records
        if not records:
            return {}
        terms = self.parts.terms
        size = max(1, self.cfg.batch_size // self.cfg.grad_accum)
        # each process scores every world-th batch, each batch as one process would cut it, and the sums are added
        starts = range(0, len(records), size)[self.acc.process_index::self.acc.num_processes]
        if self.updater is not None:  # ProKT's teacher read without its DDP wrapper: that forward broadcasts buffers,
            self.teacher_reader.model = self.teacher  # a collective a process with no eval batch would never join
        try:
            totals = self.eval_totals(records, starts, size)
        finally:
            if self.updater is not None:
                self.teacher_reader.model = self.updater.model
        if self.acc.num_processes > 1:
            totals = self.acc.reduce(totals.to(self.acc.device), reduction="sum").cpu()
        sums, counts = totals[:len(terms)], totals[len(terms): 2 * len(terms)]
        cosine, n_seq, correct, n_labeled = totals[2 * len(terms):].tolist()
        parts = {t.name: float(s / max(c, 1)) for t, s, c in zip(terms, sums, counts) if c > 0}
        # from a store no term can be scored on eval records (it holds the training records only): no loss, not 0
        loss = sum(t.weight * parts[t.name] for t in terms if t.name in parts)
        result = {"loss": loss, "parts": parts} if parts else {}
        if n_seq:
            result["embedding_cosine_to_teacher"] = cosine / n_seq
        if n_labeled:
            result["accuracy"] = correct / n_labeled
        return result

    def eval_totals(self, records: list[dict], starts: range, size: int) -> torch.Tensor:
        """Sums over this process's eval batches: each term's mean times its item count, the item counts, then
        pooled cosine to the teacher, sequences, correct predictions and labelled records."""
        distiller = self.acc.unwrap_model(self.model)
        distiller.eval()
        terms = self.parts.terms
        sums = torch.zeros(len(terms), dtype=torch.float64)
        counts = torch.zeros(len(terms), dtype=torch.float64)
        cosine, n_seq, correct, n_labeled = 0.0, 0, 0, 0
        for start in starts:
            batch = self.parts.collator(records[start: start + size])
            if self.parts.needs_mlm:
                gen = torch.Generator().manual_seed(start)
                batch["input_ids"], batch["mlm_labels"] = mask_tokens(
                    batch["input_ids"], batch["attention_mask"], self.parts.tokenizer, self.cfg.mlm_probability, gen)
            batch = {k: v.to(self.acc.device) for k, v in batch.items()}
            t_taps = self.teacher_taps(batch) if self.parts.store is None else {}
            want = []  # read in the same student pass as the terms: a second pass cost a third of the eval
            if "labels" in batch and self.parts.student_info.task in ("classification", "image-classification"):
                want.append("logits")
            if "pooled" in t_taps and self.parts.student_info.hidden_size == self.parts.teacher_info.hidden_size:
                want.append("pooled")
            if self.parts.store is None:  # a store covers the training records only: eval reports accuracy
                out = distiller(batch, t_taps, also=want)
                s_taps = out["taps"]
                n = torch.tensor([t.count(batch) for t in terms], dtype=torch.float64)
                sums += torch.stack([out["parts"][t.name].double().cpu() for t in terms]) * n
                counts += n
            else:
                s_taps = distiller.reader(batch, want) if want else {}
            if "logits" in want:
                correct += int((s_taps["logits"].argmax(-1) == batch["labels"]).sum())
                n_labeled += int(batch["labels"].numel())
            if "pooled" in want:
                s_pooled = s_taps["pooled"]
                cosine += torch.nn.functional.cosine_similarity(s_pooled, t_taps["pooled"], dim=-1).sum().item()
                n_seq += s_pooled.shape[0]
        return torch.cat([sums, counts, torch.tensor([cosine, n_seq, correct, n_labeled], dtype=torch.float64)])

    # ---- checkpoints ---------------------------------------------------------------------------
    def method_state(self) -> dict:
        return {str(i): part.method_state() for i, part in enumerate(self.stateful)}

    def extras(self) -> dict:
        """Trainable parts outside the student that a checkpoint must hold (ProKT's teacher)."""
        if self.updater is None:
            return {}
        return {"teacher": (self.acc.unwrap_model(self.updater.model), self.updater.optimizer)}

    def save(self) -> None:
        path = self.ckpt_root / f"step-{self.step:07d}"
        save_checkpoint(path, model=self.acc.unwrap_model(self.model), optimizer=self.optimizer,
                        scheduler=self.scheduler, step=self.step, stage=self.stage.name, recipe_hash=self.hash,
                        path_hash=self.path_hash,
                        method_state=self.method_state(), rank=self.acc.process_index,
                        world=self.acc.num_processes, is_main=self.acc.is_main_process,
                        barrier=self.acc.wait_for_everyone, extras=self.extras(), elapsed_s=self.elapsed())
        if self.acc.is_main_process:
            prune(self.ckpt_root, self.cfg.keep_checkpoints)

    def elapsed(self) -> float:
        """The stage's training time so far, across resumes."""
        return self.elapsed_before + time.perf_counter() - self.fit_start

    def resume(self) -> bool:
        checkpoints = list_checkpoints(self.ckpt_root)
        if not checkpoints:
            self.logger.forget_after(0)  # the steps an interrupted start logged are trained again
            return False
        written_for = read_manifest(checkpoints[-1]).get("stage")
        if written_for not in (None, self.stage.name):  # copied or moved here by hand: another stage's weights
            raise CheckpointError(f"{checkpoints[-1]} was written by stage {written_for!r}, not {self.stage.name!r}; "
                                  f"move it back to that stage's checkpoints (or delete it) to resume")
        changed = self.force and not written_by(read_manifest(checkpoints[-1]), self.accepted_hashes)
        settings = [{k: v for k, v in group.items() if k != "params"} for group in self.optimizer.param_groups]
        try:
            state = load_checkpoint(checkpoints[-1], model=self.acc.unwrap_model(self.model), optimizer=self.optimizer,
                                    scheduler=self.scheduler, rank=self.acc.process_index,
                                    recipe_hash=None if changed else self.accepted_hashes,
                                    extras=self.extras())
        except CheckpointMismatch as err:
            if not changed:
                raise
            raise CheckpointError(f"{err}. A forced resume can change how the stage trains (steps, learning rate, "
                                  f"schedule), not what it trains: another student, other loss terms, train.freeze, "
                                  f"train.lr_scale or a weight_decay of 0 change the student's parameters or their "
                                  f"optimizer groups; undo "
                                  f"that change, or start a new run with another --output") from None
        if changed:
            before, now = saved_loss_terms(self.run_dir, self.stage.name), [term.type for term in self.stage.losses]
            if before is not None and before != now:  # the loss curves and a method's state belong to the terms
                raise CheckpointError(f"{checkpoints[-1]} was trained with the loss terms {before}, this recipe has "
                                      f"{now}: a forced resume can change how the stage trains, not what it "
                                      "trains; undo that change, or start a new run with another --output")
            if state["step"] > self.cfg.steps:
                raise CheckpointError(f"{checkpoints[-1]} is at step {state['step']}, past this recipe's "
                                      f"train.steps {self.cfg.steps}; raise train.steps to {state['step']} or more")
            self.take_new_settings(settings)
        self.resumed_under_changes = changed
        self.step = state["step"]
        self.elapsed_before = state.get("elapsed_s", 0.0)  # checkpoints written before it was kept have none
        for i, part in enumerate(self.stateful):
            part.load_method_state(state["method"].get(str(i), {}))
        self.logger.forget_after(self.step)
        world = read_manifest(checkpoints[-1]).get("world", 1)
        if world != self.acc.num_processes and self.console is not None and self.acc.is_main_process:
            # each process's batches and random state follow from the process count: the run goes on, not exactly
            self.console.print(f"[yellow]{checkpoints[-1]} was written by {world} process(es), this run has "
                               f"{self.acc.num_processes}[/yellow]: it continues, but not bit for bit as the "
                               f"interrupted run would have")
        return True

    def take_new_settings(self, settings: list[dict]) -> None:
        """A forced resume goes on under the recipe as it is now: the checkpoint's optimizer state brought back its
        learning rates and weight decay, and its scheduler the old base rates; the schedule itself (steps, warm-up,
        shape) is already this recipe's, as it is made from the recipe and not saved."""
        for group, new in zip(self.optimizer.param_groups, settings):
            group.update({key: new[key] for key in ("initial_lr", "weight_decay") if key in new})
        self.scheduler.base_lrs = [group["initial_lr"] for group in self.optimizer.param_groups]
        for group, base, factor in zip(self.optimizer.param_groups, self.scheduler.base_lrs, self.scheduler.lr_lambdas):
            group["lr"] = base * factor(self.scheduler.last_epoch)

    # ---- the loop ------------------------------------------------------------------------------
    def fit(self) -> StageResult:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        cfg = self.cfg
        self.fit_start, last = time.perf_counter(), {}
        progress = Progress(TextColumn("[bold]{task.fields[stage]}"), BarColumn(), MofNCompleteColumn(),
                            TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[parts]}"),
                            console=self.console, disable=not self.show_progress, transient=False)
        last_eval = {}
        with progress:
            task = progress.add_task("train", total=cfg.steps, completed=self.step, stage=self.stage.name, parts="")
            self.logger.console = progress.console if self.show_progress else (self.console if self.acc.is_main_process else None)
            if self.step == 0:  # not on resume: the checkpoint holds the projector and head as they had trained
                self.fit_projectors()
                if cfg.head_init == "fit":
                    self.init_head()
            while self.step < cfg.steps:
                tick = time.perf_counter()
                last = self.train_step(self.step)
                self.step += 1
                if not math.isfinite(last["loss"]):
                    raise FloatingPointError(f"loss became {last['loss']} at step {self.step}; lower train.lr")
                last["s_per_step"] = round(time.perf_counter() - tick, 4)
                progress.update(task, advance=1, parts=" ".join(f"{k} {v:.3g}" for k, v in last["parts"].items()))
                if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                    self.logger.log(self.step, last)
                if cfg.eval_every and (self.step % cfg.eval_every == 0 or self.step == cfg.steps):
                    last_eval = self.evaluate()
                    if last_eval:
                        self.logger.log(self.step, last_eval, kind="eval")
                if cfg.save_every and self.step % cfg.save_every == 0 and self.step < cfg.steps:
                    self.save()
        if not last_eval and self.parts.eval_records:
            last_eval = self.evaluate()
            if last_eval:
                self.logger.log(self.step, last_eval, kind="eval")
        self.logger.close()
        return StageResult(self.step, self.elapsed(), last, last_eval)
