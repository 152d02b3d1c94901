"""The real packaged MiniLM teacher, a few steps: the student loads in transformers and sentence-transformers."""
import json

import pytest
import torch
from rich.console import Console

from kdistill import distill

FAST = ["train.steps=2", "train.batch_size=4", "data.max_length=32", "data.eval_limit=8", "train.eval_every=null",
        "train.save_every=null"]


def test_minilm_student_loads_in_transformers_and_sentence_transformers(tmp_path):
    student = distill("minilm-l3", overrides=FAST, output=str(tmp_path / "run"), progress=False)
    from transformers import AutoModel, AutoTokenizer

    model = AutoModel.from_pretrained(student).eval()
    tokenizer = AutoTokenizer.from_pretrained(student)
    assert model.config.num_hidden_layers == 3
    st = pytest.importorskip("sentence_transformers")
    encoder = st.SentenceTransformer(str(student), device="cpu")
    texts = ["Return the number of items in a container.", "A small domesticated carnivorous mammal."]
    emb = torch.tensor(encoder.encode(texts, normalize_embeddings=False))
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    mean = (hidden * mask).sum(1) / mask.sum(1)
    normalised = "Normalize" in json.loads((student / "modules.json").read_text())[-1]["type"]
    if normalised:
        mean = torch.nn.functional.normalize(mean, dim=-1)
    torch.testing.assert_close(emb, mean, atol=1e-4, rtol=1e-4)


def test_demo_runs_and_reports_three_columns(tmp_path):
    from kdistill.demo import run_demo

    console = Console(width=140, record=True)
    report = run_demo(console, steps=2, output=str(tmp_path / "demo"), limit=16, extra_overrides=tuple(FAST[1:]))
    final = report["distilled"]
    assert final["speedup"] > 0
    models = final["models"]
    assert models["teacher"]["params"] == 22_713_216 > models["student"]["params"]  # the packaged MiniLM-L6
    printed = " ".join(console.export_text().translate({ord(c): " " for c in "┃│┏┓┡┩━╇┳┗┛└┘─┼┠┨"}).split())
    assert "teacher student at init distilled student" in printed
    assert f"parameters {models['teacher']['params']:,} " in printed
    docs = final["datasets"]["stdlib-docstrings"]
    assert -1 <= docs["cosine"] <= 1 and report["student_at_init"]["datasets"]["stdlib-docstrings"]["n"] == 16
    assert (tmp_path / "demo" / "demo.json").exists() and (tmp_path / "demo" / "student-init" / "config.json").exists()


def test_demo_resume_refuses_a_folder_holding_another_recipes_run(tmp_path, tiny_recipe):
    """It showed that run's student as the demo's result, and wrote demo.json into it."""
    from kdistill.demo import run_demo
    from kdistill.errors import CheckpointError

    distill(tiny_recipe, progress=False)
    before = sorted(p.name for p in (tmp_path / "run").iterdir())
    with pytest.raises(CheckpointError, match=r"cannot resume .*run: the recipe differs from the one that started it"):
        run_demo(Console(width=120), steps=1, output=tiny_recipe["output"], resume=True, limit=4)
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == before
