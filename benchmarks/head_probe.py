"""How linearly readable a student's features are for the task: the `train.head_init: fit` solve, scored.

For each student directory (an AutoModelForSequenceClassification, e.g. a TinyBERT stage's output under
`runs/compare/full/tinybert/seed-0/stages/`), fits the classifier by ridge least squares (kdistill's
LeastSquares, the same solve and ridge as `head_init: fit`) from the features its head reads to
  teacher  the teacher's logits, less each row's mean (what a distillation stage fits)
  labels   the labels one-hot (what a no-teacher baseline fits)
on records spread over the `wordnet-supersense` training split, then scores test accuracy with that head
alone (no training), its soft-target cross-entropy against the teacher on the test split (the loss a
`logit_kd` stage at τ = 1 starts from), the head's weight norm and the variance of what the head reads.

    python benchmarks/head_probe.py [DIR ...] [--init tinybert] [--records 4096] [--teacher recipe:teacher-supersense]

`--init RECIPE` adds the student that recipe starts from (built, not trained: e.g. TinyBERT's narrowed cut
before any stage).

About 1.5 minutes per directory on 2 cores. Prints a table and writes benchmarks/results/head_probe.json.
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch


def features_and_logits(model, tokenizer, texts, batch_size=128, max_length=64):
    """What the classifier reads (captured on its input) and the model's logits."""
    from kdistill.engine.head_fit import classifier_layer, head_inputs

    logits = []
    with head_inputs(classifier_layer(model)) as feats, torch.no_grad():
        for start in range(0, len(texts), batch_size):
            batch = tokenizer(texts[start:start + batch_size], padding=True, truncation=True,
                              max_length=max_length, return_tensors="pt")
            logits.append(model(**batch).logits)
    return torch.cat(feats), torch.cat(logits)


def main() -> None:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from kdistill.data.sources import load_records
    from kdistill.engine.build import shortest_first, spread
    from kdistill.engine.head_fit import head_targets
    from kdistill.losses.base import LeastSquares
    from kdistill.teachers.recipe_runs import resolve_teacher

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("students", nargs="*")
    parser.add_argument("--init", help="also probe the student this recipe starts from")
    parser.add_argument("--records", type=int, default=4096)
    parser.add_argument("--teacher", default="recipe:teacher-supersense")
    parser.add_argument("--out", default="benchmarks/results/head_probe.json")
    args = parser.parse_args()

    teacher_dir = resolve_teacher(args.teacher)
    teacher = AutoModelForSequenceClassification.from_pretrained(teacher_dir).eval()
    label_id = teacher.config.label2id
    # shortest first: batches of similar length pad little, and every sum below is over all records
    train = shortest_first(spread(load_records({"source": "wordnet-supersense"}, "train"), args.records))
    test = shortest_first(load_records({"source": "wordnet-supersense", "split": "test"}, "test"))
    tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
    _, teacher_logits = features_and_logits(teacher, tokenizer, [r["text"] for r in train])
    _, teacher_test = features_and_logits(teacher, tokenizer, [r["text"] for r in test])
    truth = torch.tensor([label_id[r["label"]] for r in test])
    labels = {"labels": torch.tensor([label_id[r["label"]] for r in train])}
    students = [(d, lambda d=d: AutoModelForSequenceClassification.from_pretrained(d)) for d in args.students]
    if args.init:
        from kdistill.config import load_recipe
        from kdistill.models.student import build_student

        head = {"num_labels": len(label_id), "id2label": teacher.config.id2label, "label2id": label_id}
        spec = load_recipe(args.init).stages[0].student
        students.insert(0, (f"{args.init} (its starting student)",
                            lambda: build_student(spec, teacher, "classification", seed=0, head=head)))
    rows = []
    for student_dir, build in students:
        student = build().eval()  # the recipes here keep the teacher's tokenizer
        fit_x, _ = features_and_logits(student, tokenizer, [r["text"] for r in train])
        test_x, _ = features_and_logits(student, tokenizer, [r["text"] for r in test])
        for target, y in (("teacher", head_targets({}, teacher_logits, len(label_id))),
                          ("labels", head_targets(labels, None, len(label_id)))):
            sums, head = LeastSquares(), torch.nn.Linear(fit_x.shape[1], y.shape[1])
            sums.add(fit_x, y)
            sums.solve_into(head)
            with torch.no_grad():
                logits = head(test_x)
                accuracy = (logits.argmax(-1) == truth).float().mean().item()
                soft_ce = -(teacher_test.softmax(-1) * logits.log_softmax(-1)).sum(-1).mean().item()
            rows.append({"student": student_dir, "target": target, "test_accuracy": round(accuracy, 4),
                         "soft_ce_vs_teacher": round(soft_ce, 3),
                         "head_weight_norm": round(head.weight.norm().item(), 1),
                         "feature_variance": float(f"{fit_x.var(0).mean().item():.3g}")})
            print(f"{student_dir:70s} {target:8s} test {accuracy:.4f}  soft CE {soft_ce:.3f}  |W| {rows[-1]['head_weight_norm']:>9}  "
                  f"feature var {rows[-1]['feature_variance']}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"records": args.records, "test_records": len(test), "teacher": args.teacher,
                               "machine": platform.machine(), "measured": time.strftime("%Y-%m-%d %H:%M"),
                               "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
