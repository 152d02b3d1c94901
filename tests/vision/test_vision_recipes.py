"""The vision branch end to end on tiny random ViTs: DeiT's two heads, TinyViT's replayed views from a
teacher store, the exported student in transformers' own tools, and per-layer CKA."""
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import DeiTForImageClassificationWithTeacher, ViTConfig, ViTForImageClassification

from kdistill import distill
from kdistill.config import load_recipe
from kdistill.errors import CheckpointError, PairingError
from kdistill.losses import LOSSES
from kdistill.models.arch import model_info
from kdistill.models.loading import load_model
from kdistill.teachers.store_build import cache_teacher

DIGITS = {"num_labels": 10, "id2label": {i: str(i) for i in range(10)}, "label2id": {str(i): i for i in range(10)}}


def tiny_vit(layers=2, width=32, **extra):
    config = ViTConfig(image_size=16, patch_size=4, num_channels=1, hidden_size=width, num_hidden_layers=layers,
                       num_attention_heads=2, intermediate_size=2 * width, **{**DIGITS, **extra})
    return ViTForImageClassification(config)


@pytest.fixture
def vit_teacher(tmp_path):
    torch.manual_seed(0)
    model = tiny_vit(layers=4, width=48)
    model.save_pretrained(tmp_path / "vit-teacher")
    return str(tmp_path / "vit-teacher")


def recipe(teacher, out, losses, student=None, steps=3, **teacher_extra):
    return {"name": "vision", "teacher": {"model": teacher, "task": "image-classification", **teacher_extra},
            "student": student or {"config": {"num_hidden_layers": 2, "hidden_size": 32, "num_attention_heads": 2,
                                              "intermediate_size": 64}},
            "data": {"train": {"source": "digits", "limit": 40}, "eval": {"source": "digits", "split": "dev", "limit": 16},
                     "image_augment": {"shift": 0.1, "rotate": 10}},
            "losses": losses, "train": {"steps": steps, "batch_size": 8, "lr": 1e-3}, "output": str(out)}


def test_deit_student_averages_its_heads_and_the_loss_matches_the_paper(tmp_path, monkeypatch):
    from kdistill.models.student import from_directory

    torch.manual_seed(0)
    monkeypatch.setenv("KDISTILL_HOME", str(tmp_path / "home"))
    student = from_directory("blueprint:deit-3x96-p4", None, task="image-classification", head=DIGITS)
    assert isinstance(student, DeiTForImageClassificationWithTeacher)
    pixels, labels = torch.randn(5, 1, 16, 16), torch.randint(0, 10, (5,))
    out = student(pixel_values=pixels)
    assert out.logits.allclose((out.cls_logits + out.distillation_logits) / 2)
    teacher_logits = torch.randn(5, 10) * 3
    s_info, t_info = model_info(student, "image-classification"), model_info(tiny_vit(), "image-classification")
    taps = {"cls_logits": out.cls_logits, "distillation_logits": out.distillation_logits}
    batch = {"pixel_values": pixels, "labels": labels}
    hard = LOSSES.get("deit")(LOSSES.get("deit").Params(type="deit", alpha=0.5), s_info, t_info)
    expected = 0.5 * F.cross_entropy(out.cls_logits, labels) + 0.5 * F.cross_entropy(
        out.distillation_logits, teacher_logits.argmax(-1))
    assert hard(taps, {"logits": teacher_logits}, batch).item() == pytest.approx(expected.item(), rel=1e-6)
    soft = LOSSES.get("deit")(LOSSES.get("deit").Params(type="deit", distillation="soft", alpha=0.1,
                                                         temperature=3.0), s_info, t_info)
    p = F.softmax(teacher_logits / 3, -1)
    kl = (p * (p.log() - F.log_softmax(out.distillation_logits / 3, -1))).sum(-1).mean()
    expected = 0.9 * F.cross_entropy(out.cls_logits, labels) + 0.1 * 9 * kl
    assert soft(taps, {"logits": teacher_logits}, batch).item() == pytest.approx(expected.item(), rel=1e-5)
    with pytest.raises(PairingError, match="distillation token"):
        LOSSES.get("deit")(LOSSES.get("deit").Params(type="deit"), t_info, t_info)


def test_deit_student_exports_as_a_directory_transformers_loads(vit_teacher, tmp_path, monkeypatch):
    from PIL import Image
    from transformers import AutoImageProcessor

    from kdistill.data import load_corpus
    from kdistill.eval.images import predict

    monkeypatch.setenv("KDISTILL_HOME", str(tmp_path / "home"))
    out = distill(recipe(vit_teacher, tmp_path / "deit", [{"type": "deit"}],
                         student={"model": "blueprint:deit-3x96-p4"}), progress=False)
    model = DeiTForImageClassificationWithTeacher.from_pretrained(out)
    assert type(load_model(str(out)).model) is DeiTForImageClassificationWithTeacher
    records = load_corpus("digits", "test")[:12]
    ours = predict(model, records)
    # transformers' own loaders: the saved image processor prepares the 8×8 images, fed as PIL images
    # (not pipeline(): it converts every image to RGB, and this model takes one grey channel)
    processor = AutoImageProcessor.from_pretrained(out)
    images = [Image.fromarray((r["image"][0] * 255).round().astype(np.uint8), mode="L") for r in records]
    with torch.inference_mode():
        theirs = model(**processor(images, return_tensors="pt")).logits.argmax(-1).tolist()
    agree = sum(a == b for a, b in zip(ours.tolist(), theirs))
    assert agree >= 10  # the same predictions up to 8-bit rounding of the pixels


def test_tinyvit_replays_the_stored_views_and_trains_exactly_like_the_live_teacher(vit_teacher, tmp_path):
    losses = [{"type": "logit_kd", "temperature": 1.0, "alpha": 0.0}]
    student = {"model": str(tmp_path / "student-init")}
    torch.manual_seed(1)
    tiny_vit().save_pretrained(tmp_path / "student-init")
    live = distill(recipe(vit_teacher, tmp_path / "live", losses, student=student, steps=8), progress=False)
    base = recipe(vit_teacher, tmp_path / "unused", losses, student=student, steps=8)
    store = cache_teacher(load_recipe(base), k=10, out=str(tmp_path / "store"), dtype="float32")
    manifest = json.loads((store / "manifest.json").read_text())
    assert manifest["num_items"] == 2 * 40 and "view_seed" in manifest["extras"]  # 8 steps × 8 images = 64 draws over 40 images: 2 epochs of views
    cached = recipe(vit_teacher, tmp_path / "cached", losses, student=student, steps=8, source="cache",
                    path=str(store))
    from_store = distill(cached, progress=False)
    a = load_model(str(live), "image-classification").model.state_dict()
    b = load_model(str(from_store), "image-classification").model.state_dict()
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)  # the same views, the same teacher outputs

    longer = recipe(vit_teacher, tmp_path / "longer", losses, student=student, steps=12, source="cache",
                    path=str(store))
    with pytest.raises(CheckpointError, match="data fingerprint|no entry"):
        distill(longer, progress=False)  # 12 steps need a third epoch of views the store does not hold
    other_views = recipe(vit_teacher, tmp_path / "other", losses, student=student, steps=8, source="cache",
                         path=str(store))
    other_views["data"]["image_augment"]["seed"] = 1
    with pytest.raises(CheckpointError, match=r"data cut differs: .*\"seed\": 0.*\"seed\": 1"):
        distill(other_views, progress=False)


def test_automatic_store_is_built_once_and_shared_by_seeds(vit_teacher, tmp_path, monkeypatch):
    monkeypatch.setenv("KDISTILL_HOME", str(tmp_path / "home"))
    losses = [{"type": "logit_kd", "temperature": 1.0}]
    first = recipe(vit_teacher, tmp_path / "a", losses, source="cache", top_k=4)
    distill(first, progress=False)
    stores = list((tmp_path / "home" / "stores").iterdir())
    assert len(stores) == 1 and json.loads((stores[0] / "manifest.json").read_text())["k"] == 4
    stamp = (stores[0] / "manifest.json").stat().st_mtime_ns
    second = recipe(vit_teacher, tmp_path / "b", losses, source="cache", top_k=4)
    second["train"]["seed"] = 1
    distill(second, progress=False)
    assert list((tmp_path / "home" / "stores").iterdir()) == stores
    assert (stores[0] / "manifest.json").stat().st_mtime_ns == stamp


def test_layer_cka_of_a_model_with_itself_is_one_on_the_diagonal():
    from kdistill.data import load_corpus
    from kdistill.eval.images import layer_cka

    torch.manual_seed(0)
    model = tiny_vit(layers=3)
    grid = layer_cka(model, model, load_corpus("digits", "test")[:40])
    assert len(grid) == 3 and len(grid[0]) == 3
    assert all(grid[i][i] == pytest.approx(1.0, abs=1e-6) for i in range(3))
    assert all(0 <= v <= 1 + 1e-9 for row in grid for v in row)


def gram_cka(x, y):
    """Linear CKA in its Gram-matrix form (HSIC of centred kernels), a route apart from the feature form used."""
    import numpy as np

    n = x.shape[0]
    h = np.eye(n) - 1.0 / n
    k, l = h @ (x @ x.T) @ h, h @ (y @ y.T) @ h
    return float((k * l).sum() / np.sqrt((k * k).sum() * (l * l).sum()))


@pytest.mark.parametrize("tokens", ["all", "patches", "cls"])
def test_layer_cka_grid_rows_are_student_layers_and_columns_teacher_layers(tokens):
    from kdistill.data import load_corpus
    from kdistill.eval.images import collator_for, layer_cka

    torch.manual_seed(0)
    student, teacher = tiny_vit(layers=2, width=16).eval(), tiny_vit(layers=3, width=32).eval()
    records = load_corpus("digits", "test")[:24]
    grid = layer_cka(student, teacher, records, tokens=tokens)
    feats = []
    for model in (student, teacher):
        with torch.no_grad():
            states = model(pixel_values=collator_for(model)(records)["pixel_values"], output_hidden_states=True)
        # layer i's output is hidden_states[i] (0 is the embeddings); token 0 is the CLS token
        picked = [h[:, 1:] if tokens == "patches" else h[:, :1] if tokens == "cls" else h
                  for h in states.hidden_states[1:]]
        feats.append([h.reshape(len(records), -1).double().numpy() for h in picked])
    assert len(grid) == 2 and all(len(row) == 3 for row in grid)
    for i in range(2):
        for j in range(3):
            assert grid[i][j] == pytest.approx(gram_cka(feats[0][i], feats[1][j]), rel=1e-6), (i, j)


def test_image_eval_feeds_each_model_on_its_own_device():
    # a model on another device (here "meta", as a GPU would be) must get its pixels there, not on the CPU
    from types import SimpleNamespace

    from kdistill.data import load_corpus
    from kdistill.eval.images import image_accuracy, image_speed, layer_cka

    class Elsewhere(torch.nn.Module):
        config = SimpleNamespace(image_size=8, num_channels=3, num_labels=2, model_type="resnet", hidden_sizes=[2])

        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.empty(1, device="meta"))
            self.seen = set()

        def forward(self, pixel_values, output_hidden_states=False):
            self.seen.add(pixel_values.device.type)
            n = pixel_values.shape[0]
            return SimpleNamespace(logits=torch.zeros(n, 2, device="meta"), hidden_states=[torch.zeros(n, 2)] * 2)

    model, records = Elsewhere(), load_corpus("digits", "test")[:6]
    for record in records:
        record["label"] = "a"
    with pytest.raises(NotImplementedError):  # a meta tensor holds no values to count
        image_accuracy(model, records, ["a", "b"])
    image_speed({"m": model}, records, repeats=1)
    layer_cka(model, model, records)
    assert model.seen == {"meta"}


def test_kdistill_eval_reports_accuracy_speed_and_per_layer_cka_for_images(vit_teacher, tmp_path):
    from kdistill.eval.report import evaluate, render_table

    torch.manual_seed(0)
    tiny_vit(layers=2).save_pretrained(tmp_path / "student")
    result = evaluate(str(tmp_path / "student"), vit_teacher, {"source": "digits"}, split="test", limit=40)
    entry = result["datasets"]["digits"]
    assert entry["n"] == 40 and set(entry["accuracy"]) == {"teacher", "student"}
    assert len(entry["cka"]) == 2 and len(entry["cka"][0]) == 4  # student layers × teacher layers
    assert result["models"]["student"]["images_per_s"] > 0 and result["speedup"] > 0
    render_table(result)  # renders without error


def test_kdistill_eval_of_an_image_student_takes_a_table_of_images_and_refuses_texts(vit_teacher, tmp_path):
    from PIL import Image
    from typer.testing import CliRunner

    from kdistill.cli import app

    (tmp_path / "pics").mkdir()
    rows = []
    for i in range(6):
        Image.fromarray(np.full((16, 16), 40 * i, dtype=np.uint8)).save(tmp_path / "pics" / f"{i}.png")
        rows.append(f"pics/{i}.png,{i % 2}")
    (tmp_path / "t.csv").write_text("file,digit\n" + "\n".join(rows) + "\n")
    args = ["eval", "--student", vit_teacher, "--no-speed", "--output", str(tmp_path / "r.json")]
    result = CliRunner().invoke(app, args + ["--data", str(tmp_path / "t.csv"), "--image", "file", "--label", "digit"])
    assert result.exit_code == 0, result.output
    entry = next(iter(json.loads((tmp_path / "r.json").read_text())["datasets"].values()))
    assert entry["n"] == 6 and 0 <= entry["accuracy"]["student"] <= 1
    assert "no model here is a classifier" not in result.output  # an image classifier scores its labels
    result = CliRunner().invoke(app, args + ["--data", "stdlib-docstrings", "--limit", "4"])
    assert result.exit_code == 2 and "data 'stdlib-docstrings' holds texts" in " ".join(result.output.split())
    assert "Traceback" not in result.output


def test_vit_taps_give_patch_tokens_and_the_deit_distillation_token(tmp_path, monkeypatch):
    from kdistill.models.student import from_directory
    from kdistill.models.taps import TapReader

    monkeypatch.setenv("KDISTILL_HOME", str(tmp_path / "home"))
    pixels = {"pixel_values": torch.randn(3, 1, 16, 16)}
    vit = tiny_vit(layers=2)
    taps = TapReader(vit, model_info(vit, "image-classification"))(
        pixels, ["patches[1]", "hidden_states[1]", "hidden_states[2]", "pooled"])
    assert taps["patches[1]"].shape == (3, 16, 32) and torch.equal(taps["patches[1]"], taps["hidden_states[1]"][:, 1:])
    assert torch.equal(taps["pooled"], taps["hidden_states[2]"][:, 0])  # the last layer's CLS token
    deit = from_directory("blueprint:deit-3x96-p4", None, task="image-classification", head=DIGITS)
    taps = TapReader(deit, model_info(deit, "image-classification"))(pixels, ["distillation_token", "patches[3]",
                                                                              "hidden_states[3]"])
    assert torch.equal(taps["distillation_token"], taps["hidden_states[3]"][:, 1])
    assert taps["patches[3]"].shape == (3, 16, 96)
    with pytest.raises(PairingError, match="no distillation token"):
        TapReader(vit, model_info(vit, "image-classification"))(pixels, ["distillation_token"])


def test_an_unreadable_image_stops_the_run_before_its_first_step(vit_teacher, tmp_path):
    from PIL import Image

    from kdistill.errors import DataError

    for split in ("train", "dev"):
        for label in ("3", "7"):
            (tmp_path / "imgs" / split / label).mkdir(parents=True)
            for i in range(4):
                Image.fromarray(np.full((16, 16), 40 * i, dtype=np.uint8)).save(tmp_path / "imgs" / split / label / f"{i}.png")
    (tmp_path / "imgs" / "dev" / "7" / "9.png").write_bytes(b"")  # an empty file, in the eval data
    run = recipe(vit_teacher, tmp_path / "run", [{"type": "cross_entropy"}])
    run["data"] = {"train": {"path": str(tmp_path / "imgs")}, "eval": {"path": str(tmp_path / "imgs")}}
    with pytest.raises(DataError, match=r"cannot read image .*dev/7/9.png .*remove or replace the file"):
        distill(run, progress=False)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_blueprint_teacher_takes_the_data_classes_and_is_listed_unscored(tmp_path, monkeypatch):
    """A blueprint's saved head (DeiT's: 2 classes) is a random init like the rest: the data's 10 digit classes
    replace it, and compare's table does not score it as if it were a trained teacher."""
    from kdistill.compare import reference_teacher
    from kdistill.data import load_records

    monkeypatch.setenv("KDISTILL_HOME", str(tmp_path / "home"))
    run = recipe("blueprint:deit-3x96-p4", tmp_path / "run", [{"type": "cross_entropy"}], steps=1)
    student = distill(run, progress=False)
    assert len(json.loads((student / "config.json").read_text())["id2label"]) == 10
    row, _ = reference_teacher(load_recipe(run), load_records({"source": "digits", "limit": 8}, "test"),
                               "image-classification")
    assert row["score"] is None and "random init" in row["note"] and row["params"] > 0


def test_a_cnn_trained_at_another_size_is_saved_and_evaluated_at_it(tmp_path, monkeypatch):
    from kdistill.eval.images import collator_for
    from kdistill.models.loading import load_model

    monkeypatch.setenv("KDISTILL_HOME", str(tmp_path / "home"))
    run = recipe("blueprint:resnet-small", tmp_path / "run", [{"type": "cross_entropy"}],
                 student={"model": "blueprint:resnet-small"}, steps=1)
    run["data"]["image_size"] = 32  # the blueprint's config says 16
    student = distill(run, progress=False)
    loaded = load_model(str(student))
    assert loaded.model.config.image_size == 32 and collator_for(loaded.model).image_size == 32
    assert loaded.tokenizer.size["height"] == 32  # the saved processor agrees


def test_a_student_of_the_other_modality_is_refused_by_name(vit_teacher, tmp_path, make_classifier):
    """A text student under an image teacher failed inside transformers' Auto class ('Unrecognized configuration
    class BertConfig ...'); the other way round too. Image students without num_channels in their config (SigLIP,
    CLIP, timm) load as before."""
    from transformers import SiglipConfig, SiglipForImageClassification

    text_student = make_classifier(tmp_path / "text-student")
    run = recipe(vit_teacher, tmp_path / "run", [{"type": "cross_entropy"}], student={"model": str(text_student)})
    with pytest.raises(PairingError, match=r"student.model: .*text-student is a bert model, which transformers "
                                           r"cannot load as an image-classification model; pair models of one kind"):
        distill(run, progress=False)
    # a text teacher whose AutoModel would load the ViT anyway (and the run fail inside it on token ids)
    text_run = {**run, "teacher": {"model": str(text_student)}, "student": {"model": vit_teacher},
                "data": {"train": {"source": "stdlib-docstrings", "limit": 8}, "max_length": 16}}
    with pytest.raises(PairingError, match=r"student.model: .*vit-teacher is an image model \(vit\) and the teacher "
                                           r"a text model \(classification\)"):
        distill(text_run, progress=False)
    from kdistill.models.student import from_directory

    with pytest.raises(PairingError, match=r"student.model: .*vit-teacher is an image model \(vit\) and the teacher "
                                           r"a text model \(classification\)"):
        from_directory(vit_teacher, teacher=None, task="classification")
    siglip = SiglipConfig(vision_config={"image_size": 16, "patch_size": 4, "num_channels": 1, "hidden_size": 32,
                                         "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64},
                          **DIGITS)
    assert getattr(siglip, "num_channels", None) is None
    SiglipForImageClassification(siglip).save_pretrained(tmp_path / "siglip")
    loaded = from_directory(str(tmp_path / "siglip"), teacher=None, task="image-classification")
    assert type(loaded).__name__ == "SiglipForImageClassification"
