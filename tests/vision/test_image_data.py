"""Image data: the digits corpus, image folders, the collator and seeded views that replay exactly."""
import numpy as np
import pytest
import torch

from kdistill.config import ImageAugment
from kdistill.data import load_corpus, load_records
from kdistill.data.images import ImageCollator, affine_views, view_params, view_seed
from kdistill.engine.batches import BatchPlan
from kdistill.errors import DataError


def test_digits_splits_are_disjoint_deterministic_and_cover_the_corpus():
    splits = {s: load_corpus("digits", s) for s in ("train", "eval", "test")}
    ids = [set(r["id"] for r in records) for records in splits.values()]
    assert sum(len(i) for i in ids) == 1797  # sklearn's bundled digits, each image in one split
    assert not (ids[0] & ids[1] or ids[0] & ids[2] or ids[1] & ids[2])
    assert [r["id"] for r in load_corpus("digits", "test")] == [r["id"] for r in splits["test"]]
    record = splits["train"][0]
    assert record["image"].shape == (1, 8, 8) and 0 <= record["image"].min() and record["image"].max() <= 1
    assert {r["label"] for r in splits["test"]} == {str(i) for i in range(10)}


def write_png(path, value, size=(6, 5), mode="L"):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    array = np.full(size[::-1] + ((3,) if mode == "RGB" else ()), value, dtype=np.uint8)
    Image.fromarray(array, mode=mode).save(path)


def test_an_image_folder_with_split_folders_becomes_labelled_records(tmp_path):
    write_png(tmp_path / "train" / "cat" / "a.png", 255)
    write_png(tmp_path / "train" / "dog" / "b.png", 0, mode="RGB")
    write_png(tmp_path / "test" / "cat" / "c.png", 255)
    train = load_records({"path": str(tmp_path)}, "train")
    assert [(r["label"], r["id"]) for r in train] == [("cat", "train/cat/a.png"), ("dog", "train/dog/b.png")]
    assert [r["label"] for r in load_records({"path": str(tmp_path), "split": "test"}, "test")] == ["cat"]
    with pytest.raises(DataError, match="split 'eval'"):
        load_records({"path": str(tmp_path), "split": "dev"}, "eval")
    batch = ImageCollator(8, 1, {"cat": 0, "dog": 1})(train)
    assert batch["pixel_values"].shape == (2, 1, 8, 8)
    # white is 1.0, black 0.0, then normalised by mean 0.5, std 0.5 (an RGB image is averaged to grey)
    assert batch["pixel_values"][0].allclose(torch.tensor(1.0)) and batch["pixel_values"][1].allclose(torch.tensor(-1.0))
    assert batch["labels"].tolist() == [0, 1]


def test_a_table_of_image_paths_gives_image_records_relative_to_its_folder(tmp_path):
    write_png(tmp_path / "pics" / "a.png", 255)
    write_png(tmp_path / "pics" / "b.png", 0)
    (tmp_path / "t.csv").write_text("file,y\npics/a.png,cat\n" + f"{tmp_path / 'pics' / 'b.png'},dog\n")
    records = load_records({"path": str(tmp_path / "t.csv"), "image": "file", "label": "y"})
    assert [(r["image_path"], r["label"]) for r in records] == [
        (str(tmp_path / "pics" / "a.png"), "cat"), (str(tmp_path / "pics" / "b.png"), "dog")]
    batch = ImageCollator(8, 1, {"cat": 0, "dog": 1})(records)
    assert batch["pixel_values"][0].allclose(torch.tensor(1.0)) and batch["labels"].tolist() == [0, 1]
    # without `image:` the text field is missing, and the message names the field that holds images
    with pytest.raises(DataError, match=r"'file' holds image files: give `image: file`"):
        load_records({"path": str(tmp_path / "t.csv"), "label": "y"})
    (tmp_path / "t.jsonl").write_text('{"file": "pics/gone.png", "y": "cat"}\n')
    with pytest.raises(DataError, match=r"field 'file' at .*t.jsonl line 1: image file not found: .*pics/gone.png"):
        load_records({"path": str(tmp_path / "t.jsonl"), "image": "file", "label": "y"})


def test_a_folder_of_images_without_class_folders_says_where_classes_go(tmp_path):
    write_png(tmp_path / "flat" / "a.png", 255)
    with pytest.raises(DataError, match=r"flat holds 1 image files but no class folders: put each class's images in"):
        load_records({"path": str(tmp_path / "flat")})


def test_a_dataset_image_column_gives_image_records(tmp_path):
    datasets = pytest.importorskip("datasets")
    from PIL import Image

    pictures = [Image.fromarray(np.full((5, 6, 3), v, dtype=np.uint8)) for v in (255, 0)]
    data = datasets.Dataset.from_dict({"img": pictures, "y": ["cat", "dog"]}).cast_column("img", datasets.Image())
    data.save_to_disk(str(tmp_path / "saved"))
    records = load_records({"path": str(tmp_path / "saved"), "image": "img", "label": "y"})
    assert records[0]["image"].shape == (3, 5, 6) and records[0]["image"].min() == 1.0 and records[1]["image"].max() == 0
    assert ImageCollator(8, 1, {"cat": 0, "dog": 1})(records)["pixel_values"].shape == (2, 1, 8, 8)


def test_a_broken_image_file_is_a_clear_error(tmp_path):
    write_png(tmp_path / "cat" / "a.png", 255)
    (tmp_path / "cat" / "b.png").write_bytes(b"not a png")
    records = load_records({"path": str(tmp_path)}, "train")
    with pytest.raises(DataError, match="cannot read image .*b.png"):
        ImageCollator(8, 1)(records)


def test_a_png_cut_short_is_named_before_the_first_step(tmp_path):
    from kdistill.data.images import check_images_open

    write_png(tmp_path / "cat" / "a.png", 255, size=(40, 40))
    whole = (tmp_path / "cat" / "a.png").read_bytes()
    (tmp_path / "cat" / "b.png").write_bytes(whole[: len(whole) // 2])  # its header alone still reads
    records = load_records({"path": str(tmp_path)}, "train")
    with pytest.raises(DataError, match=r"cannot read image .*b.png .*remove or replace the file"):
        check_images_open(records, "")
    check_images_open(records[:1], "")


def test_a_jpeg_cut_short_is_named_before_the_first_step_and_trailing_metadata_is_not(tmp_path):
    from PIL import Image

    from kdistill.data.images import check_images_open

    (tmp_path / "cat").mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "cat" / "a.jpg", quality=95)
    whole = (tmp_path / "cat" / "a.jpg").read_bytes()
    (tmp_path / "cat" / "b.jpg").write_bytes(whole + bytes(6000))  # zeros past the tail searched
    records = load_records({"path": str(tmp_path)}, "train")
    check_images_open(records, "")  # complete files, one with data after its end marker (decoded to make sure)
    (tmp_path / "cat" / "c.jpg").write_bytes(whole[: len(whole) * 2 // 3])
    with pytest.raises(DataError, match=r"cannot read image .*c.jpg .*truncated.*remove or replace the file"):
        check_images_open(load_records({"path": str(tmp_path)}, "train"), "")


def test_a_missing_split_folder_says_what_to_add(tmp_path):
    write_png(tmp_path / "train" / "cat" / "a.png", 255)
    with pytest.raises(DataError, match=r"none for split 'test' \(looked for test\): add a test/ folder of class "
                                        r"folders, which `kdistill compare` scores students on"):
        load_records({"path": str(tmp_path), "split": "test"}, "test")


def test_identity_view_leaves_the_image_unchanged_and_a_rotation_moves_it():
    image = torch.rand(1, 1, 12, 12)
    assert affine_views(image, [(0.0, 0.0, 0.0, 1.0)]).allclose(image, atol=1e-5)
    quarter = affine_views(image, [(np.pi / 2, 0.0, 0.0, 1.0)])
    assert quarter.allclose(torch.rot90(image, 1, (2, 3)), atol=1e-4) or quarter.allclose(
        torch.rot90(image, -1, (2, 3)), atol=1e-4)


def test_views_are_a_function_of_the_seed_alone():
    augment = ImageAugment(shift=0.2, rotate=30, scale=(0.8, 1.2))
    collate = ImageCollator(16, 1, augment=augment)
    records = load_corpus("digits", "train")[:4]
    seeded = [dict(r, view_seed=view_seed(0, r["id"], epoch=3)) for r in records]
    first, again = collate(seeded)["pixel_values"], collate(list(reversed(seeded)))["pixel_values"]
    assert torch.equal(first, again.flip(0))  # the same view whatever batch an image lands in
    other_epoch = collate([dict(r, view_seed=view_seed(0, r["id"], epoch=4)) for r in records])["pixel_values"]
    plain = collate(records)["pixel_values"]  # no seed (eval): no augmentation
    assert not torch.equal(first, other_epoch) and not torch.equal(first, plain)
    angle, tx, ty, scale = view_params(seeded[0]["view_seed"], 0.2, 30, (0.8, 1.2))
    assert abs(angle) <= np.radians(30) and abs(tx) <= 0.4 and abs(ty) <= 0.4 and 0.8 <= scale <= 1.2


def test_micro_epochs_name_the_epoch_each_record_is_drawn_in():
    plan = BatchPlan(10, 4, grad_accum=2, world=1, rank=0, seed=0)
    for step in range(6):
        flat = [(i, e) for idx, eps in zip(plan.micro_batches(step), plan.micro_epochs(step)) for i, e in zip(idx, eps)]
        for k, (index, epoch) in enumerate(flat):
            position = step * 4 + k  # the record's place in the stream of reshuffled epochs
            assert epoch == position // 10 and index == plan._epoch(epoch)[position % 10]
    # every record appears exactly once per epoch: (index, epoch) pairs never repeat
    pairs = [(i, e) for step in range(10) for idx, eps in zip(plan.micro_batches(step), plan.micro_epochs(step))
             for i, e in zip(idx, eps)]
    assert len(pairs) == len(set(pairs)) == 40


def test_models_and_records_that_cannot_meet_are_named_before_training():
    from transformers import ResNetConfig, ResNetForImageClassification, ViTConfig, ViTForImageClassification

    from kdistill.data.images import check_image_fits
    from kdistill.errors import PairingError

    def vit(size, channels):
        return ViTForImageClassification(ViTConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                                   intermediate_size=32, image_size=size, patch_size=4,
                                                   num_channels=channels))

    images = {"train": [{"image": np.zeros((1, 8, 8), dtype=np.float32), "label": "0"}], "eval": []}
    collator = ImageCollator(16, 1)
    check_image_fits({"teacher": vit(16, 1), "student": vit(16, 1)}, collator, images)
    convnet = ResNetForImageClassification(ResNetConfig(num_channels=1, embedding_size=8, hidden_sizes=[8],
                                                        depths=[1], layer_type="basic"))
    check_image_fits({"teacher": convnet, "student": vit(16, 1)}, collator, images)  # a convnet takes any size
    with pytest.raises(PairingError, match="teacher takes 32×32 images, but they are resized to 16×16.*set "
                                           "data.image_size to 32"):
        check_image_fits({"teacher": vit(32, 1), "student": vit(32, 1)}, collator, images)
    with pytest.raises(PairingError, match="student reads 3-channel images and the data is made 1-channel"):
        check_image_fits({"student": vit(16, 3)}, collator, images)
    # teacher and student fixed to different inputs: no data.image_size serves both, a student built from the teacher does
    for teacher, student, said in [((32, 1), (16, 1), "32×32 images and student 16×16"),
                                   ((16, 3), (16, 1), "3-channel images and student 1-channel")]:
        with pytest.raises(PairingError, match=f"teacher takes {said}: they cannot read the same batch.*"
                                               f"student: {{config: "):
            check_image_fits({"teacher": vit(*teacher), "student": vit(*student)}, collator, images)
    with pytest.raises(DataError, match="data.train: an image model trains on images .* 'a gloss'"):
        check_image_fits({"teacher": vit(16, 1)}, collator,
                         {"train": images["train"] + [{"text": "a gloss", "label": "0"}]})
    with pytest.raises(DataError, match="data.eval: an image model is scored on images .* 'a gloss'"):
        check_image_fits({"teacher": vit(16, 1)}, collator, {**images, "eval": [{"text": "a gloss", "label": "0"}]})


def test_a_student_of_another_modality_than_the_teachers_task_is_named():
    from transformers import ViTConfig

    from kdistill.errors import PairingError
    from kdistill.models.loading import new_model

    with pytest.raises(PairingError, match="a vit model cannot be built as a classification model"):
        new_model(ViTConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32),
                  "classification")
    from kdistill.errors import article

    assert (article("embedding"), article("image-classification"), article("causal-lm")) == \
        ("an embedding", "an image-classification", "a causal-lm")


def test_a_large_image_is_shrunk_as_the_saved_processor_shrinks_it(tmp_path):
    # PIL's bilinear resize antialiases; without it ours gave other pixels (0.36 apart) and other predictions
    import numpy as np
    from PIL import Image

    from kdistill.data.images import ImageCollator, image_processor

    path = tmp_path / "big.png"
    Image.fromarray((np.random.default_rng(0).random((60, 60)) * 255).astype(np.uint8), mode="L").save(path)
    ours = ImageCollator(16, 1)([{"image_path": str(path)}])["pixel_values"][0, 0].numpy()
    theirs = image_processor(16, 1)(Image.open(path).convert("L"), return_tensors="np")["pixel_values"][0, 0]
    assert np.abs(ours - theirs).max() < 0.02  # PIL rounds to 8 bits: 1/255 in [0, 1] is 0.008 after the std


def test_a_16_bit_grey_image_keeps_its_range():
    # PIL's convert("L") clips 16-bit values at 255: a gradient read as nearly all white before
    import tempfile

    import numpy as np
    from PIL import Image

    from kdistill.data.images import read_image

    gradient = np.tile(np.linspace(0, 65535, 64), (64, 1)).astype(np.uint16)
    with tempfile.TemporaryDirectory() as folder:
        Image.fromarray(gradient).save(f"{folder}/g16.png")
        grey, colour = read_image(f"{folder}/g16.png", 1), read_image(f"{folder}/g16.png", 3)
    assert grey.shape == (1, 64, 64) and colour.shape == (3, 64, 64)
    np.testing.assert_allclose(grey[0], gradient / 65535.0, atol=1e-6)


def test_a_colour_image_turns_the_same_grey_from_a_file_and_from_a_dataset_column(tmp_path):
    from PIL import Image

    from kdistill.data.images import image_array

    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8), "RGB")
    img.save(tmp_path / "x.png")
    collator = ImageCollator(12, 1)
    from_file = collator.images([{"image_path": str(tmp_path / "x.png")}])  # PIL's convert("L")
    from_column = collator.images([{"image": image_array(img)}])  # `datasets` decodes a PIL image, kept RGB
    assert from_column.shape == from_file.shape == (1, 1, 12, 12)
    assert (from_column - from_file).abs().max() <= 1 / 255  # PIL rounds its luma to 8 bits
