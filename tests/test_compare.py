"""`kdistill compare` on tiny models: a recipe and its no-teacher baseline, two seeds, a results section."""
import json

import pytest
import yaml

from kdistill.compare import compare
from kdistill.compare_runs import baseline_of
from kdistill.config import load_recipe


def tiny_kd_file(tmp_path, make_classifier, **train):
    """A one-stage logit-KD recipe file on a tiny red/green/blue teacher (2 steps unless `train` says more)."""
    teacher = make_classifier(tmp_path / "teacher")
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"text": f"{w} thing {i}", "y": w}) + "\n"
                            for i in range(8) for w in ("red", "green", "blue")))
    recipe = {"name": "tiny-kd", "teacher": {"model": teacher}, "student": {"from_teacher": {"layers": [2, 4]}},
              "data": {"train": {"path": str(data), "label": "y"}, "eval": {"path": str(data), "label": "y"},
                       "max_length": 16},
              "losses": [{"type": "logit_kd", "alpha": 0.5}], "train": {"steps": 2, "batch_size": 4, **train}}
    path = tmp_path / "tiny-kd.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def slow_agreement(teacher_dir: str, student_dir: str) -> float:
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from kdistill.compare_unseen import unseen_texts

    def predict(path):
        model, tokenizer = AutoModelForSequenceClassification.from_pretrained(path), AutoTokenizer.from_pretrained(path)
        limit = min(128, model.config.max_position_embeddings)
        with torch.no_grad():
            return [int(model(**tokenizer(t, truncation=True, max_length=limit, return_tensors="pt")).logits.argmax())
                    for t in unseen_texts()]

    return sum(a == b for a, b in zip(predict(teacher_dir), predict(student_dir))) / len(unseen_texts())


def test_compare_writes_a_table_with_baseline(tmp_path, make_classifier, monkeypatch):
    path = tiny_kd_file(tmp_path, make_classifier)

    base = baseline_of(load_recipe(str(path)))
    assert [p.type for p in base.stages[0].losses] == ["cross_entropy"] and base.stages[0].train.steps == 2
    assert base.stages[0].student == load_recipe(str(path)).stages[0].student

    results = tmp_path / "results.md"
    report = compare([str(path)], seeds=2, output=str(tmp_path / "runs"), results=str(results))
    names = [row["name"] for row in report["rows"]]
    assert names == ["tiny-kd", "tiny-kd-baseline"]
    assert all(len(row["score"]) == 2 and all(0 <= a <= 1 for a in row["score"]) for row in report["rows"])
    text = results.read_text()
    assert "| tiny-kd-baseline |" in text and (tmp_path / "results-tiny-kd.png").exists()
    # the unseen domain: agreement with the teacher on license paragraphs, against a text-at-a-time count
    assert report["unseen"]["metric"] == "agreement with the teacher" and "unseen domain: agreement" in text
    seed1 = tmp_path / "runs" / "full" / "tiny-kd" / "seed-1" / "student"
    assert report["rows"][0]["unseen"][1] == slow_agreement(str(tmp_path / "teacher"), str(seed1))
    import kdistill.compare as compare_module

    scored = []
    real_score = compare_module.score
    monkeypatch.setattr(compare_module, "score", lambda *a: scored.append(a[0]) or real_score(*a))
    bars, real_train = [], compare_module.train_or_reuse
    monkeypatch.setattr(compare_module, "train_or_reuse", lambda run, console, progress: bars.append(progress)
                        or real_train(run, console, progress))
    again = compare([str(path)], seeds=3, output=str(tmp_path / "runs"), results=str(results),  # reuses the runs
                    progress=False)
    assert bars and not any(bars)  # --no-progress reaches every run
    assert results.read_text().count("<!-- compare:tiny-kd -->") == 1
    # only the new seed's students and the teacher are tested again; the earlier scores come back as they were
    assert len(scored) == 3 and all("seed-2" in d for d in scored[1:])
    assert [row["score"][:2] for row in again["rows"]] == [row["score"] for row in report["rows"]]


def test_recipes_whose_students_start_alike_share_one_baseline(tmp_path, make_classifier, monkeypatch):
    teacher = make_classifier(tmp_path / "teacher")
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"text": f"{w} thing {i}", "y": w}) + "\n"
                            for i in range(8) for w in ("red", "green", "blue")))
    paths = []
    # every_other of 4 layers is [2, 4]; a different eval cadence does not make another baseline
    for name, layers, loss, eval_every in (("tiny-a", [2, 4], "logit_kd", 1), ("tiny-b", "every_other", "logit_kd", 2),
                                           ("tiny-c", [1, 2], "logit_kd", 1)):
        recipe = {"name": name, "teacher": {"model": teacher}, "student": {"from_teacher": {"layers": layers}},
                  "data": {"train": {"path": str(data), "label": "y"}, "eval": {"path": str(data), "label": "y"},
                           "max_length": 16},
                  "losses": [{"type": loss}], "train": {"steps": 2, "batch_size": 4, "eval_every": eval_every}}
        paths.append(tmp_path / f"{name}.yaml")
        paths[-1].write_text(yaml.safe_dump(recipe))
    results = tmp_path / "results.md"
    from rich.console import Console

    console = Console(record=True, width=200)
    report = compare([str(p) for p in paths], seeds=1, output=str(tmp_path / "runs"), results=str(results),
                     console=console)
    assert [row["name"] for row in report["rows"]] == ["tiny-a", "tiny-a-baseline", "tiny-b", "tiny-c",
                                                      "tiny-c-baseline"]
    # progress counts the runs it will train: three recipes and two baselines
    counted = [line.split("]")[0] + "]" for line in console.export_text().splitlines() if line.startswith("[")]
    assert counted == [f"[{k}/5]" for k in range(1, 6)]
    assert report["rows"][1]["baseline_of"] == ["tiny-a", "tiny-b"]
    assert not (tmp_path / "runs" / "full" / "tiny-b-baseline").exists()  # trained once
    assert "| tiny-a-baseline (also the baseline of tiny-b) |" in results.read_text()
    # compared alone later, tiny-b finds its baseline kept under tiny-a's spelling ([2, 4]) and trains nothing
    import kdistill.engine.run as engine_run

    def no_training(*args, **kwargs):
        raise AssertionError("a kept run was trained again")

    monkeypatch.setattr(engine_run, "run_recipe", no_training)
    alone = compare([str(paths[1])], seeds=1, output=str(tmp_path / "runs"), results=str(results))
    assert alone["rows"][1]["score"] == report["rows"][1]["score"]


def test_a_later_compare_reuses_a_baseline_of_the_same_content(tmp_path, make_classifier, monkeypatch):
    # a sweep: two recipe files differing only in their loss share one baseline across two invocations,
    # and a baseline folder an earlier version named after its recipe is moved, not trained again
    teacher = make_classifier(tmp_path / "teacher")
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"text": f"{w} thing {i}", "y": w}) + "\n"
                            for i in range(8) for w in ("red", "green", "blue")))
    paths = []
    for name, temperature in (("kd-t2", 2.0), ("kd-t4", 4.0)):
        recipe = {"name": name, "teacher": {"model": teacher}, "student": {"from_teacher": {"layers": [2, 4]}},
                  "data": {"train": {"path": str(data), "label": "y"}, "eval": {"path": str(data), "label": "y"},
                           "max_length": 16},
                  "losses": [{"type": "logit_kd", "temperature": temperature}], "train": {"steps": 2, "batch_size": 4}}
        paths.append(tmp_path / f"{name}.yaml")
        paths[-1].write_text(yaml.safe_dump(recipe))
    runs, results = tmp_path / "runs", tmp_path / "results.md"
    first = compare([str(paths[0])], seeds=1, output=str(runs), results=str(results))
    [folder] = list((runs / "full" / "baselines").iterdir())
    folder.rename(runs / "full" / "kd-t2-baseline")  # where an earlier version kept it

    from kdistill.engine import run as run_module

    trained, original = [], run_module.run_recipe
    monkeypatch.setattr(run_module, "run_recipe",
                        lambda recipe, **kw: trained.append(recipe.name) or original(recipe, **kw))
    second = compare([str(paths[0])], seeds=1, output=str(runs), results=str(results))
    assert trained == [] and (folder / "seed-0" / "student").is_dir()  # moved into place, reused
    assert second["rows"][1]["score"] == first["rows"][1]["score"]
    third = compare([str(paths[1])], seeds=1, output=str(runs), results=str(results))
    assert trained == ["kd-t4"]  # the new recipe only: its baseline is the one already trained
    assert third["rows"][1]["name"] == "kd-t4-baseline" and third["rows"][1]["score"] == first["rows"][1]["score"]
    # filed under the key an older schema gave it (a field added since changes every key): found and moved
    old_key = folder.with_name("0123456789abcdef")
    folder.rename(old_key)
    compare([str(paths[0])], seeds=1, output=str(runs), results=str(results))
    assert trained == ["kd-t4"] and (folder / "seed-0" / "student").is_dir() and not old_key.exists()


def test_compare_scores_a_causal_lm_with_rouge_and_perplexity(tmp_path, tiny_gpt2_dir):
    data = tmp_path / "defs.jsonl"
    rows = [{"text": f"word: w{i} (noun)\ndefinition: a thing {i}", "prompt": f"word: w{i} (noun)\ndefinition:",
             "reference": f"a thing {i}"} for i in range(12)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = {"name": "tiny-lm-kd", "teacher": {"model": tiny_gpt2_dir, "task": "causal-lm"},
              "student": {"from_teacher": {"layers": [2]}},
              "data": {"train": {"path": str(data)}, "eval": {"path": str(data)}, "max_length": 24},
              "losses": [{"type": "logit_kd", "temperature": 1.0}], "train": {"steps": 2, "batch_size": 4}}
    path = tmp_path / "tiny-lm-kd.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert baseline_of(load_recipe(str(path))).stages[0].teacher.task == "causal-lm"
    results = tmp_path / "results.md"
    report = compare([str(path)], seeds=1, output=str(tmp_path / "runs"), results=str(results))
    assert report["metric"] == "ROUGE-L" and [r["name"] for r in report["rows"]] == ["tiny-lm-kd", "tiny-lm-kd-baseline"]
    assert all(0 <= r["score"][0] <= 1 and r["perplexity"][0] > 1 for r in report["rows"])
    assert "test ROUGE-L" in results.read_text() and "perplexity" in results.read_text()
    # the unseen domain: perplexity on license paragraphs, against a text-at-a-time mean of token NLLs
    import math

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kdistill.compare_unseen import unseen_texts

    student = tmp_path / "runs" / "full" / "tiny-lm-kd" / "seed-0" / "student"
    model, tokenizer = AutoModelForCausalLM.from_pretrained(student), AutoTokenizer.from_pretrained(student)
    total = count = 0
    with torch.no_grad():
        for text in unseen_texts():
            ids = tokenizer(text, truncation=True, max_length=min(128, model.config.n_positions),
                            return_tensors="pt")["input_ids"]
            logits = model(ids).logits[0, :-1]
            total += float(torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum"))
            count += ids.shape[1] - 1
    assert math.isclose(report["rows"][0]["unseen"][0], math.exp(total / count), rel_tol=1e-4)
    assert report["teacher"]["unseen"][0] > 1 and "unseen domain: perplexity" in results.read_text()


def test_causal_lm_scores_prompts_taken_evenly_through_the_split(tmp_path, tiny_gpt2_dir, monkeypatch):
    import kdistill.compare as compare_module
    import kdistill.eval.generation as generation
    import kdistill.eval.metrics as metrics

    # the test split is ordered (all nouns first): scoring its front would measure nouns only
    records = [{"text": f"t{i}", "prompt": f"p{i}", "reference": f"r{i}"} for i in range(3000)]
    seen = {}
    monkeypatch.setattr(generation, "definition_scores",
                        lambda model, tok, recs, limit: seen.setdefault("prompts", recs) and {"rouge_l": 0.5})
    monkeypatch.setattr(metrics, "perplexity", lambda model, tok, texts: seen.setdefault("texts", texts) and 9.0)
    rouge, _, extra = compare_module.score(tiny_gpt2_dir, records, "causal-lm")
    assert (rouge, extra) == (0.5, {"perplexity": 9.0})
    assert len(seen["prompts"]) == compare_module.GENERATED == 500
    assert seen["prompts"][0]["prompt"] == "p0" and seen["prompts"][-1]["prompt"] == "p2994"  # i·3000//500
    assert seen["texts"][1] == "t3" and len(seen["texts"]) == 1000


def test_a_finished_run_is_reused_only_for_the_same_recipe(tiny_recipe):
    import json

    from kdistill.compare_runs import train_or_reuse
    from kdistill.config import load_recipe

    first = train_or_reuse(load_recipe(tiny_recipe), None)
    stamp = (first / "kdistill.json").stat().st_mtime_ns
    assert (train_or_reuse(load_recipe(tiny_recipe), None) / "kdistill.json").stat().st_mtime_ns == stamp
    tiny_recipe["train"]["steps"] = 2  # an edited recipe must not be scored on the old run
    again = train_or_reuse(load_recipe(tiny_recipe), None)
    assert json.loads((again / "kdistill.json").read_text())["steps"] == 2


def test_compare_runs_evaluate_once_a_stage_and_reuse_runs_made_with_more_evaluations(tiny_recipe, tmp_path):
    from pathlib import Path

    from kdistill.compare_runs import train_or_reuse, variant
    from kdistill.config import load_recipe

    tiny_recipe["train"].update(steps=4, eval_every=1)
    earlier = train_or_reuse(load_recipe(tiny_recipe), None)  # a run made with an evaluation every step
    stamp = (earlier / "kdistill.json").stat().st_mtime_ns
    run = variant(load_recipe(tiny_recipe), 0, False, Path(tiny_recipe["output"]))
    assert [s.train.eval_every for s in run.stages] == [None] and run.stages[0].train.seed == 0
    assert (train_or_reuse(run, None) / "kdistill.json").stat().st_mtime_ns == stamp
    fresh = train_or_reuse(variant(load_recipe(tiny_recipe), 1, False, tmp_path / "fresh"), None)
    evals = [line for line in (fresh.parent / "logs" / "main.jsonl").read_text().splitlines() if '"eval"' in line]
    assert len(evals) == 1 and json.loads(evals[0])["step"] == 4


def test_kept_scores_follow_the_records_and_the_weights(tmp_path, monkeypatch):
    import kdistill.compare as compare_module

    student = tmp_path / "student"
    student.mkdir()
    (student / "model.safetensors").write_bytes(b"weights")
    calls = []
    monkeypatch.setattr(compare_module, "score", lambda d, r, t, trust: calls.append(d) or (0.5 + len(calls), None, {}))
    records = [{"text": "a gloss", "label": "noun.act"}]
    assert compare_module.score_once(student, records, "classification") == (1.5, {})
    assert compare_module.score_once(student, records, "classification") == (1.5, {}) and len(calls) == 1
    relabelled = [{"text": "a gloss", "label": "noun.artifact"}]  # same text, other label: tested again
    assert compare_module.score_once(student, relabelled, "classification") == (2.5, {})
    (student / "model.safetensors").write_bytes(b"retrained weights")  # a new student: tested again
    assert compare_module.score_once(student, records, "classification") == (3.5, {})
    (student / "test-scores.json").write_text('{"half a fi')  # a crash mid-write elsewhere: scored again
    assert compare_module.score_once(student, records, "classification") == (4.5, {})
    assert compare_module.score_once(student, records, "classification") == (4.5, {}) and len(calls) == 4


def two_stage_pipeline(tmp_path, make_classifier):
    """A builder of two-stage logit-KD recipes on a tiny teacher: (name, first stage's steps, last stage's alpha)."""
    teacher = make_classifier(tmp_path / "teacher")
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"text": f"{w} thing {i}", "y": w}) + "\n"
                            for i in range(8) for w in ("red", "green", "blue")))

    def recipe(name, first_steps, last_alpha):
        return load_recipe({"name": name, "teacher": {"model": teacher}, "student": {"from_teacher": {"layers": [2, 4]}},
                            "data": {"train": {"path": str(data), "label": "y"}, "max_length": 16},
                            "losses": [{"type": "logit_kd", "alpha": 0.5}], "train": {"steps": 2, "batch_size": 4},
                            "stages": [{"name": "first", "train": {"steps": first_steps}},
                                       {"name": "last", "losses": [{"type": "logit_kd", "alpha": last_alpha}]}]})
    return recipe


def test_a_pipeline_reuses_the_finished_stages_it_shares_with_an_earlier_one(tmp_path, make_classifier):
    from kdistill.compare_runs import reuse_shared_stages, train_or_reuse, variant
    from kdistill.engine.stage_refs import stage_student_dir

    pipeline = two_stage_pipeline(tmp_path, make_classifier)

    def recipe(name, last_alpha):
        return pipeline(name, 2, last_alpha)

    first = variant(recipe("a", 0.5), 0, False, tmp_path / "a")
    train_or_reuse(first, None)
    second = variant(recipe("b", 0.9), 0, False, tmp_path / "b")
    assert reuse_shared_stages(second, [first]) == ["first"]
    train_or_reuse(second, None)
    copied = stage_student_dir(tmp_path / "b", second, 0) / "model.safetensors"
    assert copied.read_bytes() == (stage_student_dir(tmp_path / "a", first, 0) / "model.safetensors").read_bytes()
    # what the copy stands for: the same stage trained again gives the same bytes
    fresh = variant(recipe("b", 0.9), 0, False, tmp_path / "fresh")
    train_or_reuse(fresh, None)
    assert (stage_student_dir(tmp_path / "fresh", fresh, 0) / "model.safetensors").read_bytes() == copied.read_bytes()
    assert (tmp_path / "fresh" / "student" / "model.safetensors").read_bytes() == \
        (tmp_path / "b" / "student" / "model.safetensors").read_bytes()
    # how often a stage saves or evaluates changes no weight: still shared
    saves_often = variant(recipe("d", 0.9), 0, False, tmp_path / "d")
    saves_often.stages[0].train.save_every = 1
    assert reuse_shared_stages(saves_often, [first]) == ["first"]
    # another seed, or a run that has started, shares nothing
    assert reuse_shared_stages(variant(recipe("c", 0.9), 1, False, tmp_path / "c"), [first]) == []
    assert reuse_shared_stages(second, [first]) == []


def test_an_edited_run_keeps_the_leading_stages_the_edit_left_alone(tmp_path, make_classifier):
    from kdistill.compare_runs import train_or_reuse, variant
    from kdistill.engine.stage_refs import stage_student_dir

    pipeline = two_stage_pipeline(tmp_path, make_classifier)

    def recipe(first_steps, last_alpha):
        return variant(pipeline("r", first_steps, last_alpha), 0, False, tmp_path / "run")

    original = recipe(2, 0.5)
    train_or_reuse(original, None)
    first = stage_student_dir(tmp_path / "run", original, 0) / "model.safetensors"
    stamp, last_bytes = first.stat().st_mtime_ns, (tmp_path / "run" / "student" / "model.safetensors").read_bytes()
    edited = recipe(2, 0.9)  # only the last stage changed: the first is kept as it was trained
    train_or_reuse(edited, None)
    assert first.stat().st_mtime_ns == stamp and not (tmp_path / "run.edited").exists()
    assert (tmp_path / "run" / "student" / "model.safetensors").read_bytes() != last_bytes
    assert "0.9" in (tmp_path / "run" / "config.resolved.yaml").read_text()
    train_or_reuse(recipe(3, 0.9), None)  # the first stage changed: everything is trained again
    assert first.stat().st_mtime_ns != stamp
    assert json.loads((tmp_path / "run" / "stages" / "first" / "student" / "kdistill.json").read_text())["steps"] == 3


def test_a_teacher_that_learns_in_the_loop_is_listed_not_scored(tmp_path, tiny_bert_dir, make_classifier):
    # ProKT from a base encoder: its teacher has no head for the task until the run trains one, so a table
    # of it alone lists the teacher unscored; with a fixed-teacher recipe beside it, that teacher is the row
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"text": f"{w} thing {i}", "y": w}) + "\n"
                            for i in range(8) for w in ("red", "green", "blue")))
    common = {"data": {"train": {"path": str(data), "label": "y"}, "eval": {"path": str(data), "label": "y"},
                       "max_length": 16},
              "train": {"steps": 2, "batch_size": 4}}
    prokt = {"name": "tiny-prokt", "student": {"from_teacher": {"layers": [2, 4]}},
             "teacher": {"model": tiny_bert_dir, "task": "classification",
                         "update": {"lr": 1e-3, "lr_scale": {"classifier.*": 10}}},
             "losses": [{"type": "logit_kd", "alpha": 0.5}], **common}
    fixed = {"name": "tiny-kd", "teacher": {"model": make_classifier(tmp_path / "teacher")},
             "student": {"from_teacher": {"layers": [2, 4]}}, "losses": [{"type": "logit_kd"}], **common}
    paths = {}
    for recipe in (prokt, fixed):
        paths[recipe["name"]] = tmp_path / f"{recipe['name']}.yaml"
        paths[recipe["name"]].write_text(yaml.safe_dump(recipe))
    results = tmp_path / "results.md"
    alone = compare([str(paths["tiny-prokt"])], seeds=1, output=str(tmp_path / "runs"), results=str(results))
    assert alone["teacher"]["score"] is None and [r["name"] for r in alone["rows"]] == ["tiny-prokt",
                                                                                    "tiny-prokt-baseline"]
    table = results.read_text()
    assert "— (learns the task in the loop: not scored) | —" in table and "| tiny-prokt |" in table
    both = compare([str(paths["tiny-prokt"]), str(paths["tiny-kd"])], seeds=1, output=str(tmp_path / "runs"),
                   results=str(results))
    assert both["teacher"]["ref"] == fixed["teacher"]["model"] and both["teacher"]["score"][0] >= 0


def test_train_flops_charge_the_teacher_for_what_it_does():
    from kdistill.compare_costs import estimated_train_flops

    def recipe(losses, update=None):
        teacher = {"model": "packaged:all-MiniLM-L6-v2", **({"update": update} if update else {})}
        return load_recipe({"name": "r", "teacher": teacher, "student": {"from_teacher": {"layers": [2]}},
                            "data": {"train": {"source": "wordnet-supersense"}}, "losses": losses,
                            "train": {"steps": 10, "batch_size": 2}})

    tokens = 10 * 2 * 5.0  # steps x batch x tokens per sequence
    flops = {name: estimated_train_flops(r, 100, 5.0, lambda stage: 1000 * 5.0) for name, r in {
        "labels": recipe([{"type": "cross_entropy"}]), "kd": recipe([{"type": "logit_kd"}]),
        "prokt": recipe([{"type": "logit_kd"}], update={"lr": 1e-5})}.items()}
    # ProKT: each model also runs a forward to read the other (the teacher steps first, then the student)
    assert flops == {"labels": tokens * 600, "kd": tokens * (600 + 2000), "prokt": tokens * (800 + 8000)}


def test_train_flops_charge_each_stage_its_own_teacher(tiny_bert_dir, make_classifier, tmp_path):
    """Every row is costed with the teacher its stages run, not the table's: a convnet-taught DeiT was costed
    as if the ViT teacher of the rows above had taught it."""
    from kdistill.compare_costs import TeacherCosts
    from kdistill.eval.metrics import non_embedding_parameters
    from kdistill.models.loading import load_model

    records = [{"text": "a red thing"}, {"text": "two green things here"}]
    other, student = load_model(make_classifier(tmp_path / "other")), load_model(tiny_bert_dir)
    recipe = load_recipe({"name": "r", "teacher": {"model": str(tmp_path / "other")}, "student": {"model": tiny_bert_dir},
                          "data": {"train": {"source": "wordnet-supersense"}, "max_length": 16},
                          "losses": [{"type": "logit_kd"}], "train": {"steps": 10, "batch_size": 2},
                          "stages": [{"name": "a"}, {"name": "b", "teacher": {"model": "stage:a"}}]})
    costs = TeacherCosts(records)
    tokens = costs.of(other.model, other.tokenizer, 16) / non_embedding_parameters(other.model)
    assert tokens == (5 + 6) / 2  # [CLS] ... [SEP], the MiniLM tokenizer's word pieces
    first, second = recipe.stages
    assert costs.for_stage(first, student, fallback=-1.0) == non_embedding_parameters(other.model) * tokens
    assert costs.for_stage(second, student, fallback=-1.0) == non_embedding_parameters(student.model) * tokens
    assert non_embedding_parameters(other.model) != non_embedding_parameters(student.model)


def test_a_recipe_compare_cannot_run_is_refused_before_anything_trains(tiny_recipe, tmp_path):
    import pytest

    from kdistill.errors import ConfigError

    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(tiny_recipe))
    with pytest.raises(ConfigError, match="compare-lion"):
        compare(["lion", str(path)], seeds=1, output=str(tmp_path / "runs"), results=str(tmp_path / "r.md"))
    with pytest.raises(ConfigError, match="results .* is a folder"):  # not after the runs, losing the table
        compare([str(path)], seeds=1, output=str(tmp_path / "runs"), results=str(tmp_path))
    weights = tmp_path / "model.safetensors"  # a mistyped --results: refused, not appended to after the runs
    weights.write_bytes(b"\x00\xff" * 8)
    with pytest.raises(ConfigError, match=r"--results .*model.safetensors: .* give a .md file"):
        compare([str(path)], seeds=1, output=str(tmp_path / "runs"), results=str(weights))
    notes = tmp_path / "notes.md"
    notes.write_bytes(b"\xff\xfe binary")
    with pytest.raises(ConfigError, match=r"--results .*notes.md exists and is not readable text"):
        compare([str(path)], seeds=1, output=str(tmp_path / "runs"), results=str(notes))
    assert weights.read_bytes() == b"\x00\xff" * 8
    with pytest.raises(ConfigError, match="none of teacher-supersense distils from a teacher"):
        compare(["teacher-supersense"], seeds=1, output=str(tmp_path / "runs"), results=str(tmp_path / "r.md"))
    assert not (tmp_path / "runs").exists()


def test_a_recipe_teacher_is_trained_once_and_in_view_before_any_run(cached_recipe_run, monkeypatch):
    """On a fresh machine the task teacher is trained first, in the main process with its progress shown;
    with --jobs the workers would otherwise each start training it."""
    import io

    from rich.console import Console

    import kdistill.engine.run as run_module
    from kdistill.compare import train_recipe_teachers

    trained = []

    def fake_run(recipe, resume=False, console=None, **_):
        trained.append((recipe.name, console))
        cached_recipe_run(recipe.name)

    monkeypatch.setattr(run_module, "run_recipe", fake_run)
    out = io.StringIO()
    console = Console(file=out, width=200)
    recipes = [load_recipe(name) for name in ("theseus", "supersense-kd")]  # both taught by recipe:teacher-supersense
    train_recipe_teachers(recipes, console)
    assert trained == [("teacher-supersense", console)]
    assert "recipe:teacher-supersense is not trained yet" in out.getvalue()
    train_recipe_teachers(recipes, console)  # cached now
    assert len(trained) == 1


def test_tinybert_baseline_reads_the_plain_glosses_not_the_synonym_copies():
    recipe = load_recipe("tinybert")
    assert recipe.stages[-1].data.train.augment is not None  # the recipe's task stages train on copies
    base = baseline_of(recipe).stages[0]
    assert base.data.train.source == "wordnet-supersense" and base.data.train.augment is None
    assert base.data.eval == recipe.stages[-1].data.eval
    assert base.train.steps == 450  # every step of the recipe's three stages


def test_quick_runs_an_eighth_of_the_steps_in_a_folder_of_its_own(tmp_path, make_classifier):
    path = tiny_kd_file(tmp_path, make_classifier, steps=16)
    report = compare([str(path)], seeds=1, quick=True, output=str(tmp_path / "runs"), results=str(tmp_path / "r.md"))
    assert [row["steps"] for row in report["rows"]] == [2, 2]  # the recipe and its baseline, 16 // 8 each
    run = tmp_path / "runs" / "quick" / "tiny-kd" / "seed-0"
    assert yaml.safe_load((run / "config.resolved.yaml").read_text())["stages"][0]["train"]["steps"] == 2
    assert not (tmp_path / "runs" / "full").exists()  # a later full comparison never reuses a quick run


def test_an_embedding_recipe_is_refused_before_any_training(tmp_path):
    import pytest

    from kdistill.errors import ConfigError

    with pytest.raises(ConfigError, match="minilm-l3's teacher task is 'embedding'.*kdistill eval"):
        compare(["minilm-l3"], seeds=1, output=str(tmp_path / "runs"), results=str(tmp_path / "r.md"))
    assert not (tmp_path / "runs").exists()


def test_no_unseen_score_where_the_corpus_is_missing_or_the_task_has_none(monkeypatch, tmp_path):
    import kdistill.data.corpora as corpora
    from kdistill.compare_unseen import unseen_records, unseen_texts

    assert len(unseen_texts()) > 500 and unseen_records("image-classification", None) is None
    monkeypatch.setattr(corpora, "LICENSES_DIR", str(tmp_path / "none"))
    assert unseen_texts() is None and unseen_records("causal-lm", None) is None


def test_training_records_are_never_the_test_split(tmp_path, make_classifier):
    import pytest

    from kdistill.compare import test_records
    from kdistill.errors import ConfigError

    recipe = yaml.safe_load(tiny_kd_file(tmp_path, make_classifier).read_text())
    del recipe["data"]["eval"]  # a file is one split: its "test" records would be the training records
    with pytest.raises(ConfigError, match="no data.eval and .*d.jsonl has no test split of its own"):
        test_records(load_recipe(recipe))
    recipe["data"]["train"] = {"source": "wordnet-supersense", "limit": 5}  # a corpus has its own test split
    from kdistill.data import load_records

    train = {r["id"] for r in load_records({"source": "wordnet-supersense"}, "train")}
    assert not train & {r["id"] for r in test_records(load_recipe(recipe))}


def test_quick_gives_the_baseline_as_many_steps_as_the_shortened_stages_together(tmp_path):
    from kdistill.compare import seed_run
    from kdistill.config import builtin_recipes

    mobilebert = load_recipe(str(builtin_recipes()["mobilebert"]))
    quick_total = sum(max(1, s.train.steps // 8) for s in mobilebert.stages)
    assert quick_total != max(1, sum(s.train.steps for s in mobilebert.stages) // 8)  # the rounding that differed
    runs = [seed_run(r, r is not mobilebert, tmp_path / r.name, 0, quick=True)
            for r in (mobilebert, baseline_of(mobilebert, quick=True))]
    assert [sum(s.train.steps for s in run.stages) for run in runs] == [quick_total, quick_total]
    assert baseline_of(mobilebert).stages[0].train.steps == sum(s.train.steps for s in mobilebert.stages)


@pytest.mark.parametrize("name, command", [("pad", "compare-pad"), ("lion", "compare-lion")])
def test_compare_sends_a_recipe_to_its_own_command_before_anything_else(name, command):
    # pad crashed (a stage with no teacher); lion was told that none of it distils from a teacher
    from kdistill.compare_runs import comparable_recipes
    from kdistill.errors import ConfigError

    with pytest.raises(ConfigError, match=rf"{name} .*compare it with `kdistill {command}`"):
        comparable_recipes([name])


def test_compare_refuses_an_output_that_is_a_file_before_anything_loads(tmp_path, monkeypatch):
    # it was refused after the teacher loaded and the first run was announced
    from kdistill.errors import ConfigError

    (tmp_path / "afile").write_text("mine")
    monkeypatch.setattr("kdistill.compare.comparable_recipes", lambda names: pytest.fail("recipes were loaded"))
    with pytest.raises(ConfigError, match=r"output .*afile is a file; choose another --output"):
        compare(["supersense-kd"], seeds=1, output=str(tmp_path / "afile"), results=str(tmp_path / "r.md"))
    assert (tmp_path / "afile").read_text() == "mine"


def test_a_damaged_saved_recipe_reads_as_none(tmp_path):
    # compare and cached teachers read run folders' recipes: damaged ones are "unreadable", not a traceback
    from kdistill.recipe_diff import read_saved

    path = tmp_path / "config.resolved.yaml"
    for damage in (b"\xff\xfe", b"a: [", b"- a list\n", b""):
        path.write_bytes(damage)
        assert read_saved(path) is None
    assert read_saved(tmp_path / "missing.yaml") is None
    path.write_text("name: x\n")
    assert read_saved(path) == {"name": "x"}
