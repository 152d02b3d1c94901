"""Lion (Jiang et al., 2023): adversarial distillation in rounds of imitation, discrimination and generation.

Round r of a stage with a `lion:` block:
 1. imitation: the teacher answers the round's new instructions (round 1: the seed pool, from data.train);
    the student (the previous round's, or the stage's student in round 1) is fine-tuned with the stage's
    losses and train settings on the teacher's answers to every instruction so far (`train_on: pool`) or
    to the round's new ones only (`train_on: new`);
 2. discrimination (every round but the last): the student answers every instruction of the pool and the
    referee (kdistill.api.referees) marks each hard or easy; a referee failure marks it neither;
 3. generation (every round but the last): the writer (kdistill.api.instruction_writers) adds
    `new_instructions`, `hard_share` of them modelled on hard instructions and the rest on easy ones: the
    next round's new instructions.
With `lion.eval`, the student's ROUGE-L on held-out prompts is measured before round 1 and after each round.

Files, in runs/NAME/stages/STAGE/:
  round-00/eval.json        the student before any imitation
  round-RR/pool.jsonl       the pool of round r: id, prompt, origin (seed/hard/easy/random), parent, round added
           answers.jsonl    the teacher's answers to the round's new instructions (or why there is none)
           imitation.jsonl  the round's training texts
           student/         the student after round r (a Hugging Face directory)
           student_answers.jsonl, judgements.jsonl   the student's answers on the pool; the referee's verdicts
           new.jsonl, new_failures.jsonl             what the writer wrote for round r + 1; the slots it failed
           eval.json        held-out ROUGE-L after round r
           done.json        the round's summary, written last: the round is finished
  summary.json              every finished round's summary, rewritten after each round
  teacher.sqlite            the teacher's answers, local or API (`lion.cache` moves it; judge.sqlite and
                            writer.sqlite likewise for service referees and writers)
Each file is written whole (a temp file, then a rename) when its step finishes, so a killed run resumes at
the first unfinished step of the first unfinished round, and the imitation training at its last checkpoint
(checkpoints/STAGE-round-RR). A finished step is never paid for again.
"""
from __future__ import annotations

import hashlib
import json
import random
import time
from contextlib import contextmanager
from pathlib import Path

from kdistill.api.lion_eval import HeldOutScore
from kdistill.api.synthesize import (API_CACHE, SUMMARY, jsonl, prompt_key, prompt_seed, read_prompt_records, render,
                                     write_atomic, write_json)
from kdistill.errors import CheckpointError, DataError

POOL, ANSWERS, IMITATION, STUDENT = "pool.jsonl", "answers.jsonl", "imitation.jsonl", "student"
STUDENT_ANSWERS, JUDGEMENTS, NEW, NEW_FAILURES = "student_answers.jsonl", "judgements.jsonl", "new.jsonl", "new_failures.jsonl"
DONE, ANSWERS_SO_FAR = "done.json", "answers.partial.jsonl"


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def round_seed(seed: int, r: int, what: str) -> int:
    return int(hashlib.sha256(f"{seed}:{r}:{what}".encode()).hexdigest()[:8], 16)


def describe(cfg, stage) -> str:
    """One line about a lion block, for `kdistill validate`."""
    teacher = cfg.teacher.model or cfg.teacher.api.model if cfg.teacher else stage.teacher.model
    return (f"lion: teacher {teacher}, {cfg.rounds} rounds, {cfg.new_instructions} new instructions a round "
            f"({cfg.hard_share:.0%} like hard ones), referee {cfg.referee.type}, writer {cfg.writer.type}")


class Lion:
    """One Lion stage; `run(resume)` returns the last round's student directory. `answerer`, `referee` and
    `writer` replace the ones the config describes (tests pass stubs)."""

    def __init__(self, stage, root: str | Path, run_dir: str | Path, *, previous_student: str | None = None,
                 accelerator=None, prefix: str = "", console=None, progress: bool = True, answerer=None,
                 referee=None, writer=None, declared=None):
        self.stage, self.cfg, self.prefix = stage, stage.lion, prefix
        self.declared = declared or stage  # as the recipe wrote it: its `stage:` references not yet paths
        self.root, self.run_dir = Path(root), Path(run_dir)
        self.previous_student, self.accelerator = previous_student, accelerator
        self.console, self.show_progress = console, progress
        self.parts = {"answerer": answerer, "referee": referee, "writer": writer}
        self.owned = {name for name, part in self.parts.items() if part is None}  # injected ones are the caller's
        self.checked = False
        self.where = f"{prefix}lion"
        self.held_out = HeldOutScore(self.cfg, f"{self.where}.eval", self.round_dir)

    # ---- the three roles -----------------------------------------------------------------------

    def teacher_spec(self):
        from kdistill.config import GeneratorTeacher

        return self.cfg.teacher or GeneratorTeacher(model=self.stage.teacher.model)

    def part(self, name: str):
        if self.parts[name] is None:
            from kdistill.api.generators import make_generator
            from kdistill.api.instruction_writers import make_writer
            from kdistill.api.referees import make_referee

            api = self.teacher_spec().api
            if name == "answerer":
                self.parts[name] = make_generator(self.teacher_spec(), self.cfg.cache or self.root / API_CACHE,
                                                  self.console, f"{self.where}.teacher")
            elif name == "referee":
                self.parts[name] = make_referee(self.cfg.referee, api, self.root / "judge.sqlite", f"{self.where}.referee")
            else:
                self.parts[name] = make_writer(self.cfg.writer, api, self.root / "writer.sqlite", f"{self.where}.writer")
        return self.parts[name]

    def close(self) -> None:
        for name in self.owned:
            if self.parts[name] is not None:
                self.parts[name].close()

    # ---- the loop ------------------------------------------------------------------------------

    def round_dir(self, r: int) -> Path:
        return self.root / f"round-{r:02d}"

    def run(self, resume: bool = False) -> Path:
        if not resume and any(self.root.glob("round-*")):
            raise CheckpointError(f"{self.root} already holds Lion rounds; resume the run, or start in another output")
        self.root.mkdir(parents=True, exist_ok=True)
        summaries = []
        try:
            for r in range(1, self.cfg.rounds + 1):
                summaries.append(self.round(r))
                write_json(self.root / SUMMARY, {
                    "complete": r == self.cfg.rounds, "rounds_done": r, "rounds": summaries,
                    "eval_before": self.held_out.written(0),
                    "teacher_answers": summaries[-1]["teacher_answers_total"]})
        finally:
            self.close()
        return self.round_dir(self.cfg.rounds) / STUDENT

    def round(self, r: int) -> dict:
        folder = self.round_dir(r)
        if (folder / DONE).exists():
            return json.loads((folder / DONE).read_text())
        folder.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        pool = self.pool(r)
        new = [p for p in pool if p["round"] == r]
        self.answer(r, new)
        answers = {row["id"]: row for q in range(1, r + 1) for row in read_jsonl(self.round_dir(q) / ANSWERS)}
        rows = self.imitation_rows(r, new, answers)
        student = self.imitate(r, rows)
        score = self.held_out.after(r, student)
        judged, written, failed = [], [], []
        if r < self.cfg.rounds:
            judged = self.discriminate(r, student, pool, answers)
            written, failed = self.generate(r, pool, judged)
        answered = [a for a in answers.values() if usable(a)]
        summary = {
            "round": r, "pool": len(pool), "new_instructions": len(new),
            "teacher_answers": len(new), "teacher_answers_total": sum(len(read_jsonl(self.round_dir(q) / ANSWERS))
                                                                      for q in range(1, r + 1)),
            "teacher_failures": sum(not usable(answers[p["id"]]) for p in new), "trained_on": len(rows),
            "answered_pool": len(answered), "judged": len(judged),
            "hard": sum(j["hard"] is True for j in judged), "easy": sum(j["hard"] is False for j in judged),
            "referee_failures": sum(j["hard"] is None for j in judged),
            "referee_requests": len(judged) * getattr(self.part("referee"), "requests_per_pair", 0) if judged else 0,
            "written": {k: sum(w["origin"] == k for w in written) for k in ("hard", "easy", "random")},
            "writer_failures": len(failed),
            "writer_requests": (len(written) + len(failed)) * getattr(self.part("writer"), "requests_per_slot", 0)
            if judged else 0,
            "eval_rouge_l": score, "wall_time_s": round(time.perf_counter() - start, 1),
        }
        write_json(folder / DONE, summary)
        if self.console is not None:
            hard = f", {summary['hard']} hard of {len(judged)} judged" if judged else ""
            rouge = f", held-out ROUGE-L {score:.4f}" if score is not None else ""
            unanswered = summary["teacher_failures"]  # failed answers stop the round (answer()); empty ones are counted
            lost = f" ({unanswered} unanswered: empty answers, in {ANSWERS})" if unanswered else ""
            self.console.print(f"lion round {r}: {len(new)} new instructions{lost}, trained on {len(rows)}{hard}{rouge}",
                               highlight=False)
        return summary

    # ---- the pool ------------------------------------------------------------------------------

    def pool(self, r: int) -> list[dict]:
        path = self.round_dir(r) / POOL
        if path.exists():
            return read_jsonl(path)
        if r == 1:
            pool = [dict(p, origin="seed", parent=None, round=1) for p in self.seed_pool()]
        else:
            new = read_jsonl(self.round_dir(r - 1) / NEW)
            pool = read_jsonl(self.round_dir(r - 1) / POOL) + [dict(p, round=r) for p in new]
        write_atomic(path, jsonl(pool))
        return pool

    def seed_pool(self) -> list[dict]:
        specs = self.stage.data.train if isinstance(self.stage.data.train, list) else [self.stage.data.train]
        records = [r for j, spec in enumerate(specs) for r in read_prompt_records(
            spec, f"{self.prefix}data.train" + (f"[{j}]" if len(specs) > 1 else ""))]
        seeds = {}
        for record in records:
            prompt = render(self.cfg.template, record, f"{self.where}.template")
            key = prompt_key(record, prompt)
            seeds.setdefault(key, {"id": key, "prompt": prompt, "reference": record.get("reference")})
        chosen = list(seeds.values())
        if self.cfg.seed_instructions and self.cfg.seed_instructions < len(chosen):
            chosen = random.Random(self.cfg.seed).sample(chosen, self.cfg.seed_instructions)
        return chosen

    def render_record(self, record: dict) -> str:
        return render(self.cfg.template, record, f"{self.where}.template")

    # ---- 1. imitation --------------------------------------------------------------------------

    def answer(self, r: int, new: list[dict]) -> None:
        """The teacher's answer to each new instruction. One that failed after the client's retries stops the
        round, keeping those that came back (ANSWERS_SO_FAR), so a resumed run asks only the rest: an instruction
        is never silently left out of every round after."""
        path, kept_path = self.round_dir(r) / ANSWERS, self.round_dir(r) / ANSWERS_SO_FAR
        if path.exists():
            return
        answerer, cfg = self.part("answerer"), self.cfg
        if not self.checked:
            answerer.check()  # a dead service fails here, clearly, before anything is asked
            self.checked = True
        kept = {row["id"]: row for row in read_jsonl(kept_path)} if kept_path.exists() else {}
        ask = [p for p in new if p["id"] not in kept]
        with self.bar(f"round {r}: teacher answers", len(ask)) as (bar, task):
            for start in range(0, len(ask), cfg.batch_size):
                batch = ask[start:start + cfg.batch_size]
                seeds = [prompt_seed(cfg.answers.seed, p["id"]) for p in batch]
                samples = answerer.sample([p["prompt"] for p in batch], seeds, 1, cfg.answers)
                kept.update({p["id"]: {"id": p["id"], "prompt": p["prompt"], "answer": s.text, "error": s.error,
                                       "finish_reason": s.finish_reason} for p, (s, *_) in zip(batch, samples)})
                bar.advance(task, len(batch))
        rows = [kept[p["id"]] for p in new]
        failed = [row for row in rows if row["error"] is not None]
        if failed:
            write_atomic(kept_path, jsonl(row for row in rows if row["error"] is None))
            raise DataError(f"{self.where}.teacher: {len(failed)} of round {r}'s {len(rows)} answers failed (first: "
                            f"{failed[0]['error']}); the {len(rows) - len(failed)} that came back are kept: run again "
                            f"with --resume to ask the rest")
        write_atomic(path, jsonl(rows))
        kept_path.unlink(missing_ok=True)

    def imitation_rows(self, r: int, new: list[dict], answers: dict[str, dict]) -> list[dict]:
        ids = [p["id"] for p in new] if self.cfg.train_on == "new" else list(answers)
        rows = [{"id": i, "prompt": answers[i]["prompt"], "text": render(
            self.cfg.text, {"prompt": answers[i]["prompt"], "answer": answers[i]["answer"]}, f"{self.where}.text")}
            for i in ids if usable(answers[i])]
        if not rows:
            errors = [answers[p["id"]]["error"] for p in new if answers[p["id"]]["error"]]
            raise DataError(f"{self.where}: round {r} has no teacher answer to train on ({len(new)} new instructions; "
                            f"first error: {errors[0] if errors else 'every answer was empty'}); the answers are in "
                            f"{self.round_dir(r) / ANSWERS}: delete it to ask again")
        return rows

    @staticmethod
    def round_stage(stage, r: int, imitation: Path):
        """Round r's training stage: the Lion stage on that round's imitation data, continuing the last student."""
        from kdistill.config import DataSource

        data = stage.data.model_copy(update={"train": DataSource(path=str(imitation))})
        return stage.model_copy(update={"name": f"{stage.name}-round-{r:02d}", "lion": None, "data": data,
                                        "student": stage.student if r == 1 else None})

    def imitate(self, r: int, rows: list[dict]) -> Path:
        from kdistill.engine.build import build_stage
        from kdistill.engine.export import is_complete, save_student
        from kdistill.engine.loop import StageTrainer
        from kdistill.engine.run import make_accelerator

        folder = self.round_dir(r)
        target = folder / STUDENT
        if is_complete(target):
            return target
        imitation = folder / IMITATION
        write_atomic(imitation, jsonl(rows))
        stage = self.round_stage(self.stage, r, imitation)
        # checkpoints are bound to the round as written, its data under the run folder however that is spelt
        if imitation.is_relative_to(self.run_dir):
            imitation = imitation.relative_to(self.run_dir)
        declared = self.round_stage(self.declared, r, imitation)
        previous = self.previous_student if r == 1 else str(self.round_dir(r - 1) / STUDENT)
        parts = build_stage(stage, previous, self.prefix, self.console, generated=True)
        if r == 1 and self.held_out.records() and self.held_out.written(0) is None:
            self.held_out.write(0, parts.student, parts.tokenizer)
        accelerator = self.accelerator or make_accelerator(stage.train.precision)
        trainer = StageTrainer(parts, stage, self.run_dir, accelerator, console=self.console, progress=self.show_progress,
                               declared=declared)
        if trainer.resume() and self.console is not None:
            self.console.print(f"resuming lion round {r} imitation at step {trainer.step}")
        result = trainer.fit()
        metadata = {"recipe_stage": self.stage.name, "lion_round": r, "trained_on": len(rows), "steps": result.steps,
                    "wall_time_s": round(result.wall_time_s, 2), "config": stage.model_dump(mode="json", exclude_none=True),
                    "teacher": str(self.teacher_spec().model or self.teacher_spec().api.model),
                    "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        save_student(accelerator.unwrap_model(trainer.model).student, parts.tokenizer, target,
                     teacher_dir=parts.teacher_dir, metadata=metadata)
        return target

    # ---- 2. discrimination ---------------------------------------------------------------------

    def discriminate(self, r: int, student: Path, pool: list[dict], answers: dict[str, dict]) -> list[dict]:
        from kdistill.api.referees import Pair

        folder = self.round_dir(r)
        if (folder / JUDGEMENTS).exists():
            return read_jsonl(folder / JUDGEMENTS)
        items = [p for p in pool if usable(answers.get(p["id"]))]
        if (folder / STUDENT_ANSWERS).exists():
            mine = {row["id"]: row["answer"] for row in read_jsonl(folder / STUDENT_ANSWERS)}
        else:
            mine = dict(zip([p["id"] for p in items], self.student_answers(r, student, [p["prompt"] for p in items])))
            write_atomic(folder / STUDENT_ANSWERS, jsonl({"id": k, "answer": v} for k, v in mine.items()))
        pairs = [Pair(p["prompt"], answers[p["id"]]["answer"], mine[p["id"]]) for p in items]
        verdicts = self.part("referee").judge(pairs) if pairs else []
        rows = [{"id": p["id"], "hard": v.hard, "score": v.score, "reason": v.reason, "raw": v.raw}
                for p, v in zip(items, verdicts)]
        if rows and all(row["hard"] is None for row in rows):  # nothing to write new instructions from
            raise DataError(f"{self.where}.referee judged none of round {r}'s {len(rows)} pairs (e.g. "
                            f"{rows[0]['reason']!r}): check its service, or that its answers can be read, then run "
                            f"again with --resume (the round's answers are kept)")
        write_atomic(folder / JUDGEMENTS, jsonl(rows))
        return rows

    def student_answers(self, r: int, student: Path, prompts: list[str]) -> list[str]:
        from kdistill.eval.generation import generate
        from kdistill.models.loading import load_model

        loaded = load_model(str(student), "causal-lm")
        out = []
        with self.bar(f"round {r}: student answers", len(prompts)) as (bar, task):
            for start in range(0, len(prompts), self.cfg.batch_size):
                chunk = prompts[start:start + self.cfg.batch_size]
                out += generate(loaded.model, loaded.tokenizer, chunk, self.cfg.answers.max_new_tokens, len(chunk))
                bar.advance(task, len(chunk))
        return out

    # ---- 3. generation -------------------------------------------------------------------------

    def generate(self, r: int, pool: list[dict], judged: list[dict]) -> tuple[list[dict], list[dict]]:
        from kdistill.api.instruction_writers import WriteContext

        folder = self.round_dir(r)
        if (folder / NEW).exists():
            return read_jsonl(folder / NEW), read_jsonl(folder / NEW_FAILURES)
        by_id = {p["id"]: p for p in pool}
        hard = [by_id[j["id"]] for j in judged if j["hard"] is True]
        easy = [by_id[j["id"]] for j in judged if j["hard"] is False]
        n_hard = round(self.cfg.new_instructions * self.cfg.hard_share)
        taken = {p["id"] for p in pool} | {p["prompt"] for p in pool}
        context = WriteContext(self.render_record, round_seed(self.cfg.seed, r, "writer"))
        written, failed = self.part("writer").write(hard, easy, n_hard, self.cfg.new_instructions - n_hard, taken, context)
        write_atomic(folder / NEW_FAILURES, jsonl(failed))
        write_atomic(folder / NEW, jsonl(written))  # last: its presence means the step is finished
        return written, failed

    def bar(self, description: str, total: int):
        return progress_bar(self.console, self.show_progress, description, total)


@contextmanager
def progress_bar(console, enabled: bool, description: str, total: int):
    """(progress, task) of one rich bar; `progress.advance(task, n)`."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        console=console, disable=not enabled)
    with progress:
        yield progress, progress.add_task(description, total=total)


def usable(answer: dict | None) -> bool:
    """A teacher answer to train on and to judge against: it came back, and it says something."""
    return bool(answer) and answer.get("error") is None and bool(str(answer.get("answer", "")).strip())


def run_lion(stage, root, run_dir, *, resume: bool = False, **kwargs) -> Path:
    """Run (or resume) one Lion stage; returns the last round's student directory."""
    return Lion(stage, root, run_dir, **kwargs).run(resume=resume)
