"""Why the encoder recipes give a new classifier head its own learning rate (`train.lr_scale`).

Fine-tunes the packaged all-MiniLM-L6-v2 on `wordnet-supersense` for a few hundred steps, three ways, and
scores dev accuracy (records taken evenly through the dev split):
  cls      BertForSequenceClassification ([CLS] -> pooler -> head), one learning rate for everything
  cls-10x  the same with the pooler and the head at 10x (what teacher-supersense does)
  mean     a linear head on mean-pooled states, the pooling all-MiniLM was trained with (not savable as a
           standard AutoModelForSequenceClassification, so a reference, not an option)

    python benchmarks/head_lr.py [--steps 300] [--lr 1e-4] [--modes cls cls-10x mean]

About 6 minutes per mode (12 for `cls`) on 2 cores. Prints a table and writes benchmarks/results/head_lr.json.
"""
from __future__ import annotations

import argparse
import json
import platform
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F


def build(mode: str, model_dir: str, lr: float):
    from transformers import AutoModel, AutoModelForSequenceClassification

    if mode.startswith("cls"):
        model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=45)
        head = [p for n, p in model.named_parameters() if n.startswith(("classifier", "bert.pooler"))]
        body = [p for n, p in model.named_parameters() if not n.startswith(("classifier", "bert.pooler"))]
        scale = 10.0 if mode == "cls-10x" else 1.0
        groups = [{"params": body}, {"params": head, "lr": lr * scale}]
        return model, (lambda batch: model(**batch).logits), groups
    encoder, head = AutoModel.from_pretrained(model_dir), torch.nn.Linear(384, 45)

    def forward(batch):
        mask = batch["attention_mask"].unsqueeze(-1).float()
        return head((encoder(**batch).last_hidden_state * mask).sum(1) / mask.sum(1))
    return torch.nn.ModuleList([encoder, head]), forward, [{"params": encoder.parameters()}, {"params": head.parameters()}]


def run(mode: str, steps: int, lr: float, batch_size: int, dev_records: int) -> dict:
    from transformers import AutoTokenizer

    from kdistill.data.corpora import WORDNET_SUPERSENSES, wordnet_supersense
    from kdistill.models.loading import packaged_dir

    torch.manual_seed(0)
    model_dir = packaged_dir("all-MiniLM-L6-v2")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    label = {name: i for i, name in enumerate(WORDNET_SUPERSENSES)}
    train = list(wordnet_supersense("train"))
    random.Random(0).shuffle(train)
    dev = wordnet_supersense("dev")
    dev = dev[:: max(1, len(dev) // dev_records)][:dev_records]

    def batch(records):
        enc = tokenizer([r["text"] for r in records], padding=True, truncation=True, max_length=64, return_tensors="pt")
        return enc, torch.tensor([label[r["label"]] for r in records])

    model, forward, groups = build(mode, model_dir, lr)
    optimizer = torch.optim.AdamW(groups, lr=lr)
    warmup = 0.06 * steps  # linear warm-up, then linear decay to zero, as the recipes
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min((s + 1) / warmup, max(0.0, (steps - s) / (steps - warmup))))
    start = time.perf_counter()
    model.train()
    for step in range(steps):
        inputs, labels = batch(train[step * batch_size:(step + 1) * batch_size])
        F.cross_entropy(forward(inputs), labels).backward()
        optimizer.step(), scheduler.step(), optimizer.zero_grad()
    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(dev), 64):
            inputs, labels = batch(dev[i:i + 64])
            correct += int((forward(inputs).argmax(-1) == labels).sum())
    return {"mode": mode, "steps": steps, "lr": lr, "dev_accuracy": correct / len(dev), "dev_records": len(dev),
            "train_s": round(time.perf_counter() - start, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--dev-records", type=int, default=1500)
    parser.add_argument("--modes", nargs="+", default=["cls", "cls-10x", "mean"], choices=["cls", "cls-10x", "mean"])
    parser.add_argument("--output", default=str(Path(__file__).parent / "results" / "head_lr.json"))
    args = parser.parse_args()
    rows = []
    print(f"{'mode':<8} {'steps':>5} {'lr':>8} {'dev accuracy':>12} {'train s':>8}")
    for mode in args.modes:
        row = run(mode, args.steps, args.lr, args.batch_size, args.dev_records)
        rows.append(row)
        print(f"{mode:<8} {row['steps']:>5} {row['lr']:>8.0e} {row['dev_accuracy']:>12.4f} {row['train_s']:>8}", flush=True)
    Path(args.output).write_text(json.dumps({"machine": platform.processor() or platform.machine(),
                                             "threads": torch.get_num_threads(), "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
