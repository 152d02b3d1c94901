"""`kdistill compare`'s score on a domain no built-in recipe trains on: the paragraphs of the free-software
licenses Debian ships (legal English; the `license-texts` corpus, all of it, since none of it is trained on).
The test split says how well a student learnt its task; this says how much of it holds where its training
text never went.

- causal LM: perplexity on the paragraphs.
- classifier: agreement with the teacher, the share of paragraphs where student and teacher predict the same
  class. Legal paragraphs have no supersense labels, so accuracy cannot be measured there; fidelity to the
  teacher can, and it is what distillation promises to carry over.
Image students have no unseen domain here (digits are the only images that install offline).
"""
from __future__ import annotations

from kdistill.errors import DataError

UNSEEN = "license-texts"
UNSEEN_METRICS = {"causal-lm": "perplexity", "classification": "agreement with the teacher"}


def unseen_texts() -> list[str] | None:
    """Every paragraph of the corpus, or None where it is not installed (/usr/share/common-licenses)."""
    from kdistill.data import load_records

    try:
        return [r["text"] for split in ("train", "eval", "test")
                for r in load_records({"source": UNSEEN, "split": split}, split)]
    except DataError:
        return None


def unseen_records(task: str, teacher) -> list[dict] | None:
    """What a student of `task` is scored on (a classifier's labels are the teacher's predictions), or None
    when this task has no unseen-domain score or the corpus is missing."""
    texts = unseen_texts() if task in UNSEEN_METRICS else None
    if not texts:
        return None
    if task == "causal-lm":
        return [{"text": text} for text in texts]
    from kdistill.eval.metrics import predictions

    names = teacher.model.config.id2label
    predicted = predictions(teacher.model, teacher.tokenizer, [{"text": text} for text in texts])
    return [{"text": text, "label": names[p]} for text, p in zip(texts, predicted)]


def score_unseen(model_dir: str, records: list[dict], task: str,
                 trust_remote_code: bool = False) -> tuple[float, object, dict]:
    """(the unseen-domain metric, the loaded model, {}): compare.score's shape, so score_once keeps it."""
    from kdistill.models.loading import load_model

    loaded = load_model(model_dir, task, trust_remote_code)
    return unseen_metric(loaded, records, task), loaded, {}


def unseen_metric(loaded, records: list[dict], task: str) -> float:
    """The metric of a model already loaded (the table's teacher is, for its own row)."""
    from kdistill.eval.metrics import accuracy, perplexity

    if task == "causal-lm":
        return perplexity(loaded.model, loaded.tokenizer, [r["text"] for r in records])
    config = loaded.model.config
    return accuracy(loaded.model, loaded.tokenizer, records, [config.id2label[i] for i in range(config.num_labels)])
