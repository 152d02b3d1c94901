"""Lion's held-out score: the student's ROUGE-L on `lion.eval` prompts, before round 1 and after each round.

Each score is written to round-RR/eval.json once and read back from there, so a resumed run never
generates the same round's answers twice.
"""
from __future__ import annotations

import json
from pathlib import Path

from kdistill.api.synthesize import read_prompt_records, write_json
from kdistill.errors import DataError

EVAL = "eval.json"


def held_out_records(cfg, where: str = "lion.eval") -> list[dict]:
    """`eval_limit` records of `lion.eval`, spread through it (corpora are ordered: nouns before verbs)."""
    from kdistill.data.sources import spread

    if cfg.eval is None:
        return []
    records = spread(read_prompt_records(cfg.eval, where), cfg.eval_limit)
    bad = [r for r in records if not isinstance(r.get("prompt"), str) or not isinstance(r.get("reference"), str)]
    if bad:
        raise DataError(f"{where}: records need a `prompt` and a `reference` (the expected answer), e.g. "
                        f"{{source: wordnet-definitions, split: dev}}; one has {', '.join(sorted(map(str, bad[0])))}")
    return records


class HeldOutScore:
    """`round_dir(r)` is where round r's eval.json goes; the records are read on first use only."""

    def __init__(self, cfg, where: str, round_dir):
        self.cfg, self.where, self.round_dir = cfg, where, round_dir
        self._records: list[dict] | None = None

    def records(self) -> list[dict]:
        if self._records is None:
            self._records = held_out_records(self.cfg, self.where)
        return self._records

    def written(self, r: int) -> float | None:
        """Round r's score as written before; None if it was not."""
        path = self.round_dir(r) / EVAL
        return json.loads(path.read_text())["rouge_l"] if path.exists() else None

    def write(self, r: int, model, tokenizer) -> float:
        from kdistill.eval.generation import definition_scores

        records = self.records()
        result = definition_scores(model, tokenizer, records, limit=len(records),
                                   max_new_tokens=self.cfg.answers.max_new_tokens)
        write_json(self.round_dir(r) / EVAL, {"round": r, "rouge_l": result["rouge_l"], "prompts": len(records),
                                              "examples": result["examples"]})
        return result["rouge_l"]

    def after(self, r: int, student: Path) -> float | None:
        """Round r's score: the one written before, or the student's now; None without `lion.eval`."""
        score = self.written(r)
        if score is not None or not self.records():
            return score
        from kdistill.models.loading import load_model

        loaded = load_model(str(student), "causal-lm")
        return self.write(r, loaded.model, loaded.tokenizer)
