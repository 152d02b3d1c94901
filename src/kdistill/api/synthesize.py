"""The synthesize stage: a generator writes candidates for each prompt, a filter keeps or drops each, and
the kept set becomes a dataset on disk, every row with its provenance.

Files in the stage directory (`runs/NAME/stages/STAGE/`):
  data.jsonl     every candidate, kept or not: prompt, completion, training text, teacher, sampling
                 settings, filter verdict and reason, kept flag, the source record's fields. Written
                 batch by batch (flushed and fsynced), so a killed run loses at most the batch in flight.
  kept.jsonl     the kept rows: what `data: {train: {path: stage:STAGE}}` reads (field `text`)
  summary.json   counts kept and dropped by verdict; written last, so its presence means "complete"
  teacher.sqlite an API teacher's answers (kdistill.api.response_cache), unless synthesize.cache moves it

Resuming reads data.jsonl back: prompts with all their candidates there are finished and are not
asked again; a prompt the generator failed on (a service error after retries) is asked again.
Prompts go out in fixed batches of `batch_size` with seeds derived from `sampling.seed` and each
prompt's id, so a resumed run writes the rows an uninterrupted one would.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections import Counter
from pathlib import Path

from kdistill.api.filters import Candidate, Judgement, make_filter
from kdistill.api.generators import Sample, generator_kind, make_generator
from kdistill.errors import ConfigError, DataError

DATA, KEPT, SUMMARY, API_CACHE = "data.jsonl", "kept.jsonl", "summary.json", "teacher.sqlite"


def is_synthesized(stage_dir: str | Path) -> bool:
    path = Path(stage_dir) / SUMMARY
    try:
        return bool(json.loads(path.read_text()).get("complete"))
    except (OSError, ValueError):
        return False


def kept_path(stage_dir: str | Path) -> Path:
    return Path(stage_dir) / KEPT


def describe(cfg) -> str:
    """One line about a synthesize block, for `kdistill validate`."""
    teacher = cfg.teacher.model or f"{cfg.teacher.api.base_url} {cfg.teacher.api.model}"
    prompts = cfg.prompts.source or cfg.prompts.path or cfg.prompts.dataset
    refine = getattr(cfg.filter, "refine", None) is not None
    return (f"synthesize: teacher {teacher}, prompts {prompts}"
            + (f" (limit {cfg.prompts.limit})" if cfg.prompts.limit else "")
            + f", {cfg.candidates} candidates at temperature {cfg.sampling.temperature:g}, "
            f"filter {cfg.filter.type}{' + refine' if refine else ''}")


# ---------------------------------------------------------------- prompts


def read_prompt_records(spec, where: str = "synthesize.prompts") -> list[dict]:
    """Every field of every record (a template may use any of them), unlike training sources, which keep
    only text, label and the generation fields."""
    from kdistill.data.corpora import load_corpus
    from kdistill.data.sources import _csv_rows, _jsonl_rows

    if spec.source is not None:
        records = load_corpus(spec.source, spec.split or "train", where=f"{where}.source")
    elif spec.path is not None:
        path = str(spec.path)
        if not os.path.isfile(path):
            raise DataError(f"{where}.path: {path} not found (paths are relative to {os.getcwd()})")
        readers = {".jsonl": _jsonl_rows, ".csv": _csv_rows}
        ext = os.path.splitext(path)[1].lower()
        if ext not in readers:
            raise ConfigError(f"{where}.path: prompts are read from .jsonl or .csv files, not {ext or path!r}")
        records = [row for _, row in readers[ext](path)]
    else:
        from kdistill.data.sources import _import_datasets

        datasets = _import_datasets(f"{where}.dataset")
        try:
            records = [dict(row) for row in datasets.load_dataset(spec.dataset, spec.config, split=spec.split or "train")]
        except Exception as err:  # noqa: BLE001 - network, auth and naming errors all land here
            raise DataError(f"{where}.dataset: cannot load {spec.dataset!r}: {type(err).__name__}: {err}") from None
    records = records[: spec.limit] if spec.limit else records
    if not records:
        raise DataError(f"{where}: no records")
    return records


def render(template: str, fields: dict, where: str) -> str:
    try:
        return template.format_map(fields)
    except KeyError as err:
        raise DataError(f"{where} uses the field {{{err.args[0]}}}, which the records do not have; "
                        f"fields there: {', '.join(sorted(map(str, fields)))}") from None
    except (ValueError, IndexError) as err:
        raise ConfigError(f"{where}: not a valid format string ({err}); write a literal brace as {{{{ or }}}}") from None


def prompt_keys(records: list[dict], prompts: list[str]) -> list[str]:
    """A stable id per prompt: the record's `id` when it has one, else a hash of the prompt text."""
    keys, seen = [], Counter()
    for record, prompt in zip(records, prompts):
        key = prompt_key(record, prompt)
        seen[key] += 1
        keys.append(key if seen[key] == 1 else f"{key}#{seen[key]}")
    return keys


def prompt_key(record: dict, prompt: str) -> str:
    return str(record.get("id") or hashlib.sha1(prompt.encode("utf-8")).hexdigest()[:16])


def prompt_seed(seed: int, key: str) -> int:
    return int(hashlib.sha256(f"{seed}:{key}".encode()).hexdigest()[:7], 16)  # < 2**28: room for + candidate


def provenance(record: dict) -> dict:
    """The record's small JSON fields (its answer, id, ...), not its texts or images."""
    skip = {"text", "prompt"}
    return {k: v for k, v in record.items() if k not in skip and isinstance(v, (str, int, float, bool, type(None)))
            and (not isinstance(v, str) or len(v) <= 2000)}


# ---------------------------------------------------------------- resume


def finished_rows(path: Path, candidates: int) -> dict[str, list[dict]]:
    """Rows of data.jsonl by prompt id, for prompts with every candidate there and no generator failure.
    A torn last line (killed mid-write) is ignored."""
    rows: dict[str, list[dict]] = {}
    if not path.exists():
        return rows
    with path.open(encoding="utf-8") as f:
        for line in f:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict) and "id" in row:
                rows.setdefault(row["id"], []).append(row)
    return {key: r for key, r in rows.items()
            if len(r) == candidates and not any(x["verdict"] == "teacher_error" for x in r)}


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_json(path: Path, value) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps(value, indent=2, ensure_ascii=False))


def jsonl(rows) -> str:
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


# ---------------------------------------------------------------- one batch


class Synthesis:
    """One synthesize stage over its prompts; `run()` returns the summary."""

    def __init__(self, cfg, stage_dir: str | Path, generator=None, console=None, progress: bool = True,
                 where: str = "synthesize"):
        self.cfg, self.dir, self.console, self.show_progress, self.where = cfg, Path(stage_dir), console, progress, where
        self.records = read_prompt_records(cfg.prompts, f"{where}.prompts")
        self.prompts = [render(cfg.template, r, f"{where}.template") for r in self.records]
        self.keys = prompt_keys(self.records, self.prompts)
        self.filter = make_filter(cfg.filter, f"{where}.filter")
        self._generator = generator
        self.owns_generator = generator is None  # an injected one (a test's stub) is the caller's to close
        self.generated = 0  # prompts sent to the generator by this run

    @property
    def generator(self):
        if self._generator is None:
            cache = self.cfg.cache
            if cache is None and generator_kind(self.cfg.teacher) == "api":
                cache = self.dir / API_CACHE  # what a service answered is never paid for twice
            self._generator = make_generator(self.cfg.teacher, cache, self.console, f"{self.where}.teacher")
        return self._generator

    def row(self, index: int, j: int, sample: Sample, judgement: Judgement, first: dict | None = None) -> dict:
        record, prompt = self.records[index], self.prompts[index]
        fields = {**record, "prompt": prompt, "completion": sample.text}
        return {"id": self.keys[index], "candidate": j, "prompt": prompt, "completion": sample.text,
                "text": render(self.cfg.text, fields, f"{self.where}.text"),
                "teacher": self.generator.id, "sampling": self.cfg.sampling.model_dump(),
                "filter": self.cfg.filter.type, "verdict": judgement.verdict, "reason": judgement.reason,
                "kept": judgement.kept, "score": judgement.score, "mean_logprob": sample.mean_logprob,
                "finish_reason": sample.finish_reason, "error": sample.error, "refined": first is not None,
                "first_attempt": first, "record": provenance(record)}

    def batch(self, indices: list[int]) -> list[dict]:
        """Generate, judge and (optionally) refine the candidates of these prompts; their rows, in order."""
        cfg = self.cfg
        seeds = [prompt_seed(cfg.sampling.seed, self.keys[i]) for i in indices]
        answers = self.generator.sample([self.prompts[i] for i in indices], seeds, cfg.candidates, cfg.sampling,
                                        logprobs=getattr(self.filter, "needs_logprobs", False))
        if len(answers) != len(indices) or any(len(row) != cfg.candidates for row in answers):
            raise RuntimeError(f"the generator returned {[len(r) for r in answers]} samples for {len(indices)} "
                               f"prompts x {cfg.candidates} candidates")
        samples = dict(zip(indices, answers))
        self.generated += len(indices)
        judgements: dict[tuple[int, int], Judgement] = {}
        to_judge = []
        for i in indices:
            seen = {}
            for j, sample in enumerate(samples[i]):
                text = sample.text.strip()
                if sample.error is not None:
                    judgements[i, j] = Judgement(False, "teacher_error", sample.error)
                elif cfg.dedupe and text in seen:
                    judgements[i, j] = Judgement(False, "duplicate", f"same completion as candidate {seen[text]}")
                else:
                    seen.setdefault(text, j)
                    to_judge.append((i, j))
        candidates = [Candidate(self.records[i], self.prompts[i], samples[i][j].text, samples[i][j].mean_logprob)
                      for i, j in to_judge]
        for (i, j), judgement in zip(to_judge, self.filter.judge(candidates) if candidates else []):
            judgements[i, j] = judgement
        final = {(i, j): (samples[i][j], judgements[i, j], None) for i in indices for j in range(cfg.candidates)}
        if self.filter.refine is not None:
            final.update(self.refine([(i, j) for i, j in to_judge if not judgements[i, j].kept], final))
        return [self.row(i, j, *final[i, j]) for i in indices for j in range(cfg.candidates)]

    def refine(self, failed: list[tuple[int, int]], final: dict) -> dict:
        """One more try per failed candidate, with the failure in the prompt (Self-Refine, once)."""
        if not failed:
            return {}
        template = self.filter.refine.template
        prompts, seeds = [], []
        for i, j in failed:
            sample, judgement, _ = final[i, j]
            fields = {**self.records[i], "prompt": self.prompts[i], "template_prompt": self.prompts[i],
                      "completion": sample.text, "reason": judgement.reason}
            prompts.append(render(template, fields, f"{self.where}.filter.refine.template"))
            seeds.append(prompt_seed(self.cfg.sampling.seed + 1, f"{self.keys[i]}/{j}"))
        retries = [row[0] for row in self.generator.sample(prompts, seeds, 1, self.cfg.sampling)]
        judged = [(k, s) for k, s in enumerate(retries) if s.error is None]
        candidates = [Candidate(self.records[failed[k][0]], self.prompts[failed[k][0]], s.text, s.mean_logprob)
                      for k, s in judged]
        verdicts = dict(zip((k for k, _ in judged), self.filter.judge(candidates) if candidates else []))
        out = {}
        for k, (i, j) in enumerate(failed):
            sample, judgement, _ = final[i, j]
            first = {"completion": sample.text, "verdict": judgement.verdict, "reason": judgement.reason}
            retry = retries[k]
            out[i, j] = (retry, verdicts.get(k) or Judgement(False, "teacher_error", retry.error or ""), first)
        return out

    # ---- the whole stage ----------------------------------------------------------------------

    def run(self, resume: bool = False) -> dict:
        cfg, start = self.cfg, time.perf_counter()
        self.dir.mkdir(parents=True, exist_ok=True)
        data = self.dir / DATA
        keys = set(self.keys)
        done = {k: v for k, v in (finished_rows(data, cfg.candidates) if resume else {}).items() if k in keys}
        # keep only finished prompts' rows (drops a torn line and failed prompts, which are asked again)
        write_atomic(data, jsonl(row for key in self.keys if key in done for row in done[key]))
        # fixed batches over all prompts, so a resumed run batches (and seeds) its prompts as before
        batches = [[i for i in range(s, min(s + cfg.batch_size, len(self.keys))) if self.keys[i] not in done]
                   for s in range(0, len(self.keys), cfg.batch_size)]
        batches = [b for b in batches if b]
        try:
            if batches:
                self.generator.check()  # a dead service fails here, clearly, before anything is asked
                self.generate(batches, data, Counter(row["verdict"] for rows in done.values() for row in rows),
                              len(done))
        finally:
            if self._generator is not None and self.owns_generator:
                self._generator.close()
        return self.finish(time.perf_counter() - start, resumed=len(done))

    def generate(self, batches: list[list[int]], data: Path, counts: Counter, resumed: int) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        bar = Progress(TextColumn("[bold]synthesize"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[counts]}"),
                       TimeElapsedColumn(), TimeRemainingColumn(), console=self.console, disable=not self.show_progress)
        with bar, data.open("a", encoding="utf-8") as f:
            task = bar.add_task("prompts", total=len(self.keys), completed=resumed, counts="")
            for indices in batches:
                rows = self.batch(indices)
                f.write(jsonl(rows))  # one write per batch: its prompts are finished together
                f.flush()
                os.fsync(f.fileno())
                counts.update(row["verdict"] for row in rows)
                bar.update(task, advance=len(indices), counts=" ".join(f"{k} {v}" for k, v in counts.most_common(4)))

    def finish(self, wall_s: float, resumed: int) -> dict:
        rows = [row for row in map(json.loads, (self.dir / DATA).read_text(encoding="utf-8").splitlines())]
        kept = [row for row in rows if row["kept"]]
        write_atomic(self.dir / KEPT, jsonl(kept))
        refined = [row for row in rows if row["refined"]]
        failed = {row["id"]: row["error"] or row["reason"] for row in rows if row["verdict"] == "teacher_error"}
        summary = {
            # prompts the service failed on leave the set incomplete unless the recipe says to train without them
            "complete": not failed or self.cfg.on_teacher_error == "skip", "teacher_errors": len(failed),
            "teacher": rows[0]["teacher"] if rows else None, "filter": self.cfg.filter.type,
            "prompts": len(self.keys), "candidates": len(rows), "kept": len(kept), "dropped": len(rows) - len(kept),
            "prompts_with_a_kept_candidate": len({row["id"] for row in kept}),
            "by_verdict": dict(Counter(row["verdict"] for row in rows).most_common()),
            "dropped_by_verdict": dict(Counter(row["verdict"] for row in rows if not row["kept"]).most_common()),
            "refine": {"tried": len(refined), "fixed": sum(row["kept"] for row in refined)} if self.filter.refine else None,
            "sampling": self.cfg.sampling.model_dump(), "candidates_per_prompt": self.cfg.candidates,
            "prompts_generated_this_run": self.generated, "prompts_resumed": resumed, "wall_time_s": round(wall_s, 2),
        }
        write_atomic(self.dir / SUMMARY, json.dumps(summary, indent=2))
        if failed and self.cfg.on_teacher_error == "stop":
            from kdistill.api.client import TeacherRequestError

            raise TeacherRequestError(
                f"{self.where}: the teacher failed {len(failed)} of {len(self.keys)} prompts after its retries "
                f"(first: {next(iter(failed.values()))}); every other prompt's candidates are kept in "
                f"{self.dir / DATA}. Run the same command with --resume to ask only those {len(failed)} again, or "
                f"set {self.where}.on_teacher_error: skip to train without them")
        if self.cfg.export:  # only a finished set leaves the stage
            Path(self.cfg.export).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(self.dir / KEPT, self.cfg.export)
        if self.console is not None:
            self.console.print(f"synthesize: kept {summary['kept']} of {summary['candidates']} candidates "
                               f"({', '.join(f'{k} {v}' for k, v in summary['by_verdict'].items())}) -> {self.dir / KEPT}",
                               highlight=False)
        return summary


def run_synthesis(cfg, stage_dir: str | Path, *, resume: bool = False, generator=None, console=None,
                  progress: bool = True, where: str = "synthesize") -> dict:
    """Run (or resume) one synthesize stage into `stage_dir`; returns its summary. `generator` replaces the
    one `cfg.teacher` describes (tests pass a stub)."""
    return Synthesis(cfg, stage_dir, generator, console, progress, where).run(resume=resume)
