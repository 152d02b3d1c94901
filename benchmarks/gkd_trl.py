"""kdistill's `gkd` recipe against TRL's `GKDTrainer`, trained on the same settings and scored the same way.

Both start from the same student (the recipe's: the teacher's layers, built once by kdistill and handed to TRL),
distil the same teacher on the same records, tokens and loss positions (`data.loss_on: completion`: the loss
after each record's prompt, as TRL's collator masks it), with the same divergence (generalised JSD, beta), on-policy
fraction lambda, sampling temperature and length, steps, batch, seed, and the same optimizer and schedule (kdistill's
AdamW parameter groups and warm-up/cosine schedule, passed to TRL's trainer). Dropout stays on in both (TRL's
`disable_dropout` is off) and batches are drawn at random in both (the recipe's `group_by_length` is off). Each
student is then scored by `kdistill compare`'s scorer: ROUGE-L of 500 greedy definitions and the perplexity of
1,000 texts, both taken evenly through the test split, and by the perplexity of those texts' definitions given
their prompts (what completion-only training trains: the whole-text perplexity counts prompt tokens that neither
student is trained on).

What still differs, by design of each library: the on-policy prompts here are each record's `prompt` (TRL's
trainer reads the `prompts` our collator gives it: the same token ids); TRL divides a micro-batch's loss by the
number of completion tokens of the *data* batch even when the batch it trains on was generated (its
`num_items_in_batch`), kdistill by the tokens it trains on; the lambda draws come from each library's own
random stream.

    python benchmarks/gkd_trl.py [--steps 400] [--seeds 0 1] [--train-limit 16000] [--device cpu] [--reuse]
                                 [--libraries kdistill trl] [--trl-token-mean]

`--reuse` scores the students an earlier call left in the same `--output` instead of training them again.
`--trl-token-mean` adds a third run: TRL's trainer with each micro-batch's loss averaged over the tokens it trains
on, as kdistill's is (the one normalisation the two trainers differ in).

Prints a table and writes its runs into benchmarks/results/gkd_trl.json (a run with the same settings, seed
and device replaces the one before).
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from kdistill.compare import score, test_records
from kdistill.config import load_recipe
from kdistill.engine.run import run_recipe


class TRLBatches:
    """What TRL's GKDTrainer reads from a batch: input_ids, attention_mask, labels (-100 where no loss is taken:
    the prompt and padding) and the left-padded prompts it samples from, all from kdistill's own tokenization."""

    def __init__(self, collator, on_policy, max_length: int, pad: int):
        self.collator, self.on_policy, self.max_length, self.pad = collator, on_policy, max_length, pad

    def __call__(self, records: list[dict]) -> dict:
        records = [{k: v for k, v in r.items() if v is not None} for r in records]
        batch = self.collator(records)  # completion_only: its loss_mask marks the positions kdistill scores
        ids = batch["input_ids"]
        labels = torch.full_like(ids, -100)
        # TRL scores position i against labels[i + 1]: the same positions as loss_mask[i]
        labels[:, 1:] = torch.where(batch["loss_mask"][:, :-1], ids[:, 1:], torch.full_like(ids[:, 1:], -100))
        prompts = [self.on_policy.prompt_ids(r, self.max_length) for r in records]
        width = max(len(p) for p in prompts)
        return {"input_ids": ids, "attention_mask": batch["attention_mask"], "labels": labels,
                "prompts": torch.tensor([[self.pad] * (width - len(p)) + p for p in prompts]),
                "prompt_attention_mask": torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])}


def kdistill_run(recipe, output: Path) -> tuple[Path, float]:
    import shutil

    shutil.rmtree(output, ignore_errors=True)
    run_recipe(recipe, force=True, progress=False)
    meta = json.loads((output / "student" / "kdistill.json").read_text())
    return output / "student", meta["wall_time_s"] / meta["steps"]


def token_mean_trainer(base):
    """TRL's GKDTrainer with each micro-batch's loss averaged over the tokens it trains on. Its own divides the sum
    by `num_items_in_batch`, the completion tokens of the batch the data loader gave, also when the batch it
    trains on is the student's generation, which is longer: generated batches then weigh more than data ones."""

    class TokenMean(base):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch=None)

    return TokenMean


def trl_run(recipe, output: Path, device: str, token_mean: bool = False) -> tuple[Path, float]:
    from datasets import Dataset
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    from kdistill.engine.build import build_stage
    from kdistill.engine.params import param_groups
    from kdistill.engine.on_policy import OnPolicy
    from kdistill.engine.schedule import make_adamw, make_scheduler

    stage = recipe.stages[0]
    term, train, policy = stage.losses[0], stage.train, stage.on_policy
    parts = build_stage(stage)
    student, tokenizer = parts.student.to(device), parts.tokenizer
    eos = student.config.eos_token_id
    batches = TRLBatches(parts.collator, OnPolicy(policy, tokenizer, eos, train.seed), stage.data.max_length,
                         tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos)
    args = GKDConfig(output_dir=str(output / "trl"), max_steps=train.steps, per_device_train_batch_size=train.batch_size,
                     gradient_accumulation_steps=train.grad_accum, seed=train.seed, lmbda=policy.fraction,
                     beta=term.beta, temperature=policy.temperature, max_new_tokens=policy.max_new_tokens,
                     max_length=stage.data.max_length, max_grad_norm=train.max_grad_norm, disable_dropout=False,
                     bf16=False, use_cpu=device == "cpu", save_strategy="no", report_to=[], logging_steps=50,
                     remove_unused_columns=False, dataloader_num_workers=0)
    optimizer = make_adamw(param_groups(student, train.weight_decay, train.lr), train.lr, device)
    scheduler = make_scheduler(optimizer, train.steps, train.warmup, train.schedule)
    trainer_class = token_mean_trainer(GKDTrainer) if token_mean else GKDTrainer
    trainer = trainer_class(model=student, teacher_model=parts.teacher.to(device), args=args,
                            train_dataset=Dataset.from_list(parts.train_records), processing_class=tokenizer,
                            data_collator=batches, optimizers=(optimizer, scheduler))
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    trainer.model.save_pretrained(output / "student")
    tokenizer.save_pretrained(output / "student")
    return output / "student", seconds / train.steps


def completion_perplexity(student_dir: Path, records: list[dict], max_length: int, limit: int = 1000) -> float:
    """exp of the mean NLL of the tokens after each record's prompt: what completion-only training trains. (The
    scorer's perplexity counts the prompts' tokens too, which neither student here is ever trained on.)"""
    import math

    import torch.nn.functional as F

    from kdistill.data.collate import TextCollator
    from kdistill.engine.build import spread
    from kdistill.losses.logits import next_token_mask
    from kdistill.models.loading import load_model

    loaded = load_model(str(student_dir), "causal-lm")
    collator = TextCollator(loaded.tokenizer, max_length, completion_only=True, token_types=False)
    chosen = spread([r for r in records if r.get("prompt")], limit)
    total, count = 0.0, 0
    loaded.model.eval()
    with torch.inference_mode():
        for start in range(0, len(chosen), 16):
            batch = collator(chosen[start:start + 16])
            logits = loaded.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            keep = next_token_mask(batch)
            total += float(F.cross_entropy(logits[:, :-1][keep].float(), batch["input_ids"][:, 1:][keep], reduction="sum"))
            count += int(keep.sum())
    return math.exp(total / count)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="gkd")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--train-limit", type=int, default=16000, help="first N records of each training source")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--output", default="runs/bench-gkd-trl")
    parser.add_argument("--reuse", action="store_true", help="score the students an earlier call trained (same output)")
    parser.add_argument("--libraries", nargs="+", default=["kdistill", "trl"], choices=["kdistill", "trl", "trl-token-mean"],
                        help="which trainers to run (default kdistill and trl)")
    parser.add_argument("--trl-token-mean", action="store_true",
                        help="also TRL's trainer with every micro-batch's loss averaged over its own tokens")
    args = parser.parse_args()

    import trl
    from rich.console import Console
    from rich.table import Table

    console, root, rows = Console(), Path(args.output), []
    settings = {"recipe": args.recipe, "steps": args.steps, "train_limit": args.train_limit, "seeds": args.seeds,
                "libraries": args.libraries + ["trl-token-mean"] * args.trl_token_mean}
    for seed in args.seeds:
        # no checkpoints and no evaluation during the run: TRL's trainer times its steps alone too
        overrides = [f"train.steps={args.steps}", "train.eval_every=null", "train.save_every=null", "data.eval=null",
                     f"train.seed={seed}", "data.loss_on=completion", "data.group_by_length=false"]
        raw = load_recipe(args.recipe, overrides).dump()
        train = raw["stages"][0]["data"]["train"]
        raw["stages"][0]["data"]["train"] = [{**spec, "limit": args.train_limit}
                                             for spec in (train if isinstance(train, list) else [train])]
        recipe = load_recipe(raw, output=str(root / f"kdistill-{seed}"))
        records = test_records(load_recipe(args.recipe))  # the recipe's own eval source's test split (eval is off here)
        for library in args.libraries + ["trl-token-mean"] * (args.trl_token_mean and "trl-token-mean" not in args.libraries):
            console.print(f"[bold]{library}[/], seed {seed}: {args.steps} steps")
            output = root / f"{library}-{seed}"
            if args.reuse and (output / "timing.json").exists():  # trained by an earlier call: score it again
                student, per_step = output / "student", json.loads((output / "timing.json").read_text())["s_per_step"]
            else:
                student, per_step = (kdistill_run(recipe, output) if library == "kdistill"
                                     else trl_run(recipe, output, args.device, token_mean=library == "trl-token-mean"))
                (output / "timing.json").write_text(json.dumps({"s_per_step": per_step}))
            rouge, _, extra = score(str(student), records, "causal-lm")
            completion = completion_perplexity(student, records, recipe.stages[0].data.max_length)
            rows.append({"library": library, "seed": seed, "rouge_l": rouge, "perplexity": extra["perplexity"],
                         "completion_perplexity": completion, "s_per_step": per_step})
            console.print(rows[-1])

    table = Table(title=f"{args.recipe} vs TRL {trl.__version__} GKDTrainer, {args.steps} steps, device {args.device}")
    for column in ("library", "seed", "test ROUGE-L", "perplexity", "completion perplexity", "s/step"):
        table.add_column(column)
    for r in rows:
        table.add_row(r["library"], str(r["seed"]), f"{r['rouge_l']:.4f}", f"{r['perplexity']:.2f}",
                      f"{r['completion_perplexity']:.2f}", f"{r['s_per_step']:.3f}")
    console.print(table)

    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"cpu ({platform.processor() or 'x86_64'})"
    out = Path(__file__).parent / "results" / "gkd_trl.json"
    kept = json.loads(out.read_text()) if out.exists() else {"runs": []}
    run = {"date": time.strftime("%Y-%m-%d %H:%M"), "device": device, "torch": torch.__version__, "trl": trl.__version__,
           "settings": settings, "rows": rows}
    same = lambda other: other["device"] == device and other["settings"] == settings  # noqa: E731
    kept["runs"] = [r for r in kept["runs"] if not same(r)] + [run]
    out.write_text(json.dumps(kept, indent=1) + "\n")
    console.print(f"written to {out}")


if __name__ == "__main__":
    main()
