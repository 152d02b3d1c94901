"""ViTKD and manifold distillation against slow references written out here with explicit loops."""
import math

import pytest
import torch

from kdistill.errors import PairingError
from kdistill.losses import LOSSES
from kdistill.losses.vision import ConvGenerator, random_token_mask, sample_patches
from kdistill.models.arch import ModelInfo

B, GRID, P = 3, 4, 16  # 3 images of a 4×4 patch grid
PIXELS = {"pixel_values": torch.zeros(B, 1, 16, 16), "labels": torch.zeros(B, dtype=torch.long)}


def info(layers=2, hidden=8, heads=2, prefix=1, patches=0):
    return ModelInfo(model_type="vit", task="image-classification", num_layers=layers, hidden_size=hidden,
                     num_heads=heads, num_kv_heads=heads, head_dim=hidden // heads, vocab_size=None,
                     is_decoder=False, layers_path="vit.encoder.layer", pooling="cls", prefix_tokens=prefix,
                     patches=patches)


def term(spec, s=None, t=None):
    cls = LOSSES.get(spec["type"])
    return cls(cls.Params.model_validate(spec), s or info(), t or info(), where="losses[0]")


def hidden(layers, width, prefix=1, patches=P, grad=False):
    return {f"hidden_states[{i}]": torch.randn(B, prefix + patches, width, requires_grad=grad) for i in layers}


# ---------------------------------------------------------------- vitkd

def test_vitkd_defaults_pick_the_first_layers_to_mimic_and_the_last_to_generate():
    tm = term({"type": "vitkd"}, info(layers=4, hidden=8), info(layers=6, hidden=12))
    assert tm.shallow == ((1, 1), (2, 2)) and tm.deep == (4, 6)
    assert tm.student_taps() == ["hidden_states[1]", "hidden_states[2]", "hidden_states[4]"]
    assert tm.teacher_taps() == ["hidden_states[1]", "hidden_states[2]", "hidden_states[6]"]
    # a 2-layer student keeps its last layer for the deep part
    assert term({"type": "vitkd"}, info(layers=2), info(layers=4)).shallow == ((1, 1),)
    assert term({"type": "vitkd"}, info(layers=1), info(layers=4)).shallow == ()
    assert term({"type": "vitkd"}).count(PIXELS) == B


def test_vitkd_refuses_bad_layers_and_ratios_naming_the_field():
    with pytest.raises(PairingError, match=r"losses\[0\]\.shallow"):
        term({"type": "vitkd", "shallow": [[1, 9]]})
    with pytest.raises(PairingError, match=r"losses\[0\]\.deep"):
        term({"type": "vitkd", "deep": [3, 2]})
    with pytest.raises(ValueError, match="mask_ratio"):
        term({"type": "vitkd", "mask_ratio": 1.0})


def test_vitkd_mimicking_is_a_projected_patch_mse_summed_over_pairs():
    s_info, t_info = info(layers=3, hidden=6), info(layers=3, hidden=8, prefix=2)  # ViT student, DeiT teacher
    tm = term({"type": "vitkd", "shallow": [[1, 1], [2, 3]]}, s_info, t_info)
    s, t = hidden([1, 2, 3], 6), hidden([1, 3], 8, prefix=2)
    got = tm.mimic_loss(s, t)
    ref = 0.0
    for k, (a, b) in enumerate(((1, 1), (2, 3))):
        lin = tm.mimic_projectors[k]
        per = [((lin.weight @ s[f"hidden_states[{a}]"][i, 1 + j] + lin.bias - t[f"hidden_states[{b}]"][i, 2 + j]) ** 2)
               .mean().item() for i in range(B) for j in range(P)]  # prefix tokens skipped on each side
        ref += sum(per) / len(per)
    assert got.item() == pytest.approx(ref, rel=1e-5)


def test_vitkd_mimicking_is_zero_for_equal_features_of_equal_width():
    vit, deit = info(hidden=8, prefix=1), info(hidden=8, prefix=2)
    tm = term({"type": "vitkd", "shallow": [[1, 1]]}, vit, deit)
    assert isinstance(tm.mimic_projectors[0], torch.nn.Identity)  # no projector where widths agree
    patches = torch.randn(B, P, 8)
    s = {"hidden_states[1]": torch.cat([torch.randn(B, 1, 8), patches], 1)}
    t = {"hidden_states[1]": torch.cat([torch.randn(B, 2, 8), patches], 1)}  # prefix tokens differ, patches equal
    assert tm.mimic_loss(s, t).item() == 0.0
    correlation = term({"type": "vitkd", "shallow": [[1, 1]], "projector": "correlation"}, vit, deit)
    assert correlation.mimic_loss(s, t).item() == 0.0


def softmax_map(rows):
    """softmax(F·Fᵀ/√D) of one image, rows: its patch feature vectors (prefix already dropped)."""
    d = len(rows[0])
    out = []
    for u in rows:
        logits = [sum(a * b for a, b in zip(u, w)) / math.sqrt(d) for w in rows]
        top = max(logits)
        e = [math.exp(v - top) for v in logits]
        out.append([v / sum(e) for v in e])
    return out


def test_vitkd_correlation_mimicking_compares_token_maps_of_any_width():
    tm = term({"type": "vitkd", "shallow": [[1, 1]], "projector": "correlation"}, info(hidden=6), info(hidden=8))
    assert tm.mimic_projectors is None
    s, t = hidden([1], 6), hidden([1], 8)
    ref = 0.0
    for i in range(B):
        ms, mt = softmax_map(s["hidden_states[1]"][i, 1:].tolist()), softmax_map(t["hidden_states[1]"][i, 1:].tolist())
        ref += sum((ms[a][c] - mt[a][c]) ** 2 for a in range(P) for c in range(P))
    assert tm.mimic_loss(s, t).item() == pytest.approx(ref / (B * P * P), rel=1e-4)


def test_random_token_mask_has_the_exact_ratio_per_image_and_is_seeded():
    torch.manual_seed(0)
    mask = random_token_mask(64, P, 0.5)
    assert (mask.sum(1) == 8).all()
    assert len({tuple(row.tolist()) for row in mask}) > 1  # drawn per image, not once per batch
    assert (random_token_mask(8, 10, 0.75).sum(1) == 8).all()  # round(7.5) = 8
    assert (random_token_mask(8, 4, 0.9).sum(1) == 3).all()  # one token always stays visible
    torch.manual_seed(1)
    first = random_token_mask(4, P, 0.3)
    torch.manual_seed(1)
    assert torch.equal(first, random_token_mask(4, P, 0.3))


def reference_generation(tm, fs, ft, mask):
    """Replace masked positions by the mask token, run the generator, MSE over masked positions only."""
    b, p = mask.shape
    x = tm.align(fs[:, 1:]).detach().clone()
    for i in range(b):
        for j in range(p):
            if mask[i, j]:
                x[i, j] = tm.mask_token.detach()
    out = tm.generator(x, (GRID, GRID)).detach()
    per = [((out[i, j] - ft[i, 1 + j]) ** 2).mean().item() for i in range(b) for j in range(p) if mask[i, j]]
    return sum(per) / len(per)


@pytest.mark.parametrize("generator", ["conv", "attention"])
def test_vitkd_generation_matches_the_reference_and_scores_masked_positions_only(generator):
    tm = term({"type": "vitkd", "generator": generator, "mask_ratio": 0.5}, info(hidden=6), info(hidden=8))
    with torch.no_grad():
        tm.mask_token.normal_()  # zero at init; a random token shows whether it lands where it should
    s, t = hidden([1, 2], 6), hidden([1, 2], 8)
    torch.manual_seed(5)
    got = tm.generation_loss(s, t, PIXELS)
    torch.manual_seed(5)
    mask = random_token_mask(B, P, 0.5)
    assert got.item() == pytest.approx(reference_generation(tm, s["hidden_states[2]"], t["hidden_states[2]"], mask),
                                       rel=1e-5)
    changed = t["hidden_states[2]"].clone()
    changed[:, 1:][~mask] += 100.0  # teacher features at visible positions do not count
    torch.manual_seed(5)
    again = tm.generation_loss(s, {**t, "hidden_states[2]": changed}, PIXELS)
    assert again.item() == pytest.approx(got.item(), rel=1e-6)


def test_conv_generator_reads_tokens_row_major_on_the_grid():
    gen = ConvGenerator(2)
    tokens = torch.randn(1, 6, 2)  # a 2×3 grid
    image = torch.stack([tokens[0, :, k].view(2, 3) for k in range(2)])[None]
    assert torch.allclose(gen(tokens, (2, 3)), gen.net(image).flatten(2).transpose(1, 2))


def test_vitkd_total_weights_both_parts_and_trains_every_part():
    tm = term({"type": "vitkd", "alpha": 2.0, "beta": 0.5}, info(layers=3, hidden=6), info(layers=3, hidden=8))
    s, t = hidden([1, 2, 3], 6, grad=True), hidden([1, 2, 3], 8)
    torch.manual_seed(2)
    loss = tm(s, t, PIXELS)
    torch.manual_seed(2)
    expected = 2.0 * tm.mimic_loss(s, t) + 0.5 * tm.generation_loss(s, t, PIXELS)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    loss.backward()
    for name in ("hidden_states[1]", "hidden_states[2]", "hidden_states[3]"):
        assert s[name].grad[:, 1:].abs().sum() > 0, name
        assert s[name].grad[:, 0].abs().sum() == 0  # the CLS token is not compared
    for name, param in tm.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name


def test_vitkd_pairing_errors_name_the_field_and_the_fix():
    tm = term({"type": "vitkd"})
    with pytest.raises(PairingError, match=r"losses\[0\].*16 patch tokens.*9.*patch grid"):
        tm(hidden([1, 2], 8), hidden([1, 2], 8, patches=9), PIXELS)
    with pytest.raises(PairingError, match=r"losses\[0\].*teacher gave no hidden_states\[2\].*teacher.source: live"):
        tm(hidden([1, 2], 8), {"logits": torch.randn(B, 3)}, PIXELS)
    with pytest.raises(PairingError, match="pixel_values"):
        tm(hidden([1, 2], 8), hidden([1, 2], 8), {"input_ids": torch.zeros(B, 4, dtype=torch.long)})


def test_models_that_cut_an_image_into_other_tokens_are_refused_when_the_term_is_built():
    # the patch grid differs (16 against 4 patches): terms pairing patches say so before a batch is read
    for spec in ({"type": "vitkd"}, {"type": "manifoldkd"}, {"type": "cka", "tokens": "patches"}):
        with pytest.raises(PairingError, match=r"losses\[0\].*16 patch tokens per image, the teacher 4.*patch grid"):
            term(spec, info(patches=16), info(patches=4))
    # whole-sequence terms: a DeiT student's two prefix tokens against a ViT teacher's one (torch: a shape mismatch)
    deit, vit = info(prefix=2, patches=16), info(prefix=1, patches=16)
    for spec in ({"type": "hidden_mse"}, {"type": "hidden_cosine"}, {"type": "attention_kl"},
                 {"type": "attention_mse"}, {"type": "value_relation"}, {"type": "qkv_relation"}):
        with pytest.raises(PairingError, match=r"losses\[0\]: the student's \w+\[\d\] has 18 tokens per image and "
                                               r"the teacher's \w+\[\d\] 17 \(student 2 prefix \+ 16 patches"):
            term(spec, deit, vit)
    # the same patches, compared as patches, pair; text models (no patches) are not checked here
    term({"type": "hidden_mse", "student_tap": "patches[2]", "teacher_tap": "patches[2]"}, deit, vit)
    term({"type": "manifoldkd"}, deit, vit)
    term({"type": "hidden_mse"}, info(prefix=0), info(prefix=0))
    convnet = ModelInfo(model_type="resnet", task="image-classification", num_layers=0, hidden_size=8, num_heads=0,
                        num_kv_heads=0, head_dim=0, vocab_size=None, is_decoder=False, layers_path="", pooling="mean")
    for spec in ({"type": "vitkd"}, {"type": "manifoldkd"}):  # it said "layer 1 is out of range"
        with pytest.raises(PairingError, match=r"losses\[0\]: this term reads the student's patch tokens, and resnet "
                                               r"has no transformer layers.*use a ViT or DeiT student"):
            term(spec, convnet, info())


def test_patches_per_image_come_from_the_config():
    from transformers import BertConfig, BertModel, ViTConfig, ViTModel

    from kdistill.models.arch import model_info

    vit = ViTModel(ViTConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                             image_size=16, patch_size=4, num_channels=1))
    bert = BertModel(BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                                vocab_size=50))
    assert model_info(vit, "embedding").patches == 16 and model_info(bert, "embedding").patches == 0


# ---------------------------------------------------------------- manifoldkd

def cos_map(rows):
    unit = [[v / math.sqrt(sum(u * u for u in row)) for v in row] for row in rows]
    return [[sum(a * b for a, b in zip(u, w)) for w in unit] for u in unit]


def map_gap(ms, mt):
    n = len(ms) * len(ms[0])
    return sum((ms[i][j] - mt[i][j]) ** 2 for i in range(len(ms)) for j in range(len(ms[0]))) / n


def manifold_reference(fs, ft, picked):
    """fs, ft: B×P lists of feature vectors (prefix already dropped)."""
    b, p = len(fs), len(fs[0])
    intra = sum(map_gap(cos_map(fs[i]), cos_map(ft[i])) for i in range(b)) / b
    inter = sum(map_gap(cos_map([fs[i][j] for i in range(b)]), cos_map([ft[i][j] for i in range(b)]))
                for j in range(p)) / p
    flat_s = [fs[k // p][k % p] for k in picked]
    flat_t = [ft[k // p][k % p] for k in picked]
    return intra, inter, map_gap(cos_map(flat_s), cos_map(flat_t))


def test_manifoldkd_maps_match_the_loop_reference_across_widths_and_prefixes():
    spec = {"type": "manifoldkd", "layers": [[1, 1], [2, 3]], "intra": 4.0, "inter": 0.1, "random": 0.2, "samples": 10}
    tm = term(spec, info(layers=2, hidden=6, prefix=1), info(layers=3, hidden=8, prefix=2))
    s, t = hidden([1, 2], 6), hidden([1, 3], 8, prefix=2)
    torch.manual_seed(7)
    got = tm(s, t, PIXELS)
    torch.manual_seed(7)
    ref = 0.0
    for a, b in ((1, 1), (2, 3)):
        picked = sample_patches(B * P, 10).tolist()
        assert len(set(picked)) == 10
        fs = [[s[f"hidden_states[{a}]"][i, 1 + j].tolist() for j in range(P)] for i in range(B)]
        ft = [[t[f"hidden_states[{b}]"][i, 2 + j].tolist() for j in range(P)] for i in range(B)]
        intra, inter, rand = manifold_reference(fs, ft, picked)
        ref += 4.0 * intra + 0.1 * inter + 0.2 * rand
    assert got.item() == pytest.approx(ref / 2, rel=1e-5)  # averaged over the two layer pairs


def test_manifoldkd_is_zero_for_scaled_copies_and_positive_otherwise():
    tm = term({"type": "manifoldkd", "layers": [[2, 2]]}, info(hidden=8), info(hidden=8, prefix=2))
    patches = torch.randn(B, P, 8)
    s = {"hidden_states[2]": torch.cat([torch.randn(B, 1, 8), patches], 1)}
    t = {"hidden_states[2]": torch.cat([torch.randn(B, 2, 8), 3.0 * patches], 1)}  # normalisation removes the scale
    assert tm(s, t, PIXELS).item() == pytest.approx(0.0, abs=1e-10)
    assert tm(hidden([2], 8), t, PIXELS).item() > 1e-3


def test_manifoldkd_samples_every_patch_when_k_exceeds_the_batch_and_backpropagates():
    tm = term({"type": "manifoldkd", "layers": "last", "intra": 0.0, "inter": 0.0, "samples": 1000})
    s, t = hidden([2], 8, grad=True), hidden([2], 8)
    loss = tm(s, t, PIXELS)
    fs = [[s["hidden_states[2]"][i, 1 + j].tolist() for j in range(P)] for i in range(B)]
    ft = [[t["hidden_states[2]"][i, 1 + j].tolist() for j in range(P)] for i in range(B)]
    # with every patch drawn the map is a permutation of the full one; its mean gap does not depend on the order
    assert loss.item() == pytest.approx(0.2 * manifold_reference(fs, ft, list(range(B * P)))[2], rel=1e-5)
    loss.backward()
    assert s["hidden_states[2]"].grad[:, 1:].abs().sum() > 0


def test_manifoldkd_pairing_errors():
    tm = term({"type": "manifoldkd"})
    assert tm.count(PIXELS) == B
    with pytest.raises(PairingError, match=r"losses\[0\].*16 patch tokens.*teacher 4"):
        tm(hidden([1, 2], 8), hidden([1, 2], 8, patches=4), PIXELS)
    with pytest.raises(ValueError, match=r"(?s)layers.*at least 1 item"):  # refused with the recipe (test_config)
        term({"type": "manifoldkd", "layers": []})
    with pytest.raises(PairingError, match="no transformer layers.*use a transformer teacher .*a convnet has no"):
        term({"type": "manifoldkd"}, info(), info(layers=0))  # a convnet: the fix is another teacher, not 'live'
    with pytest.raises(PairingError, match="no transformer layers.*use a transformer teacher .*a convnet has no"):
        term({"type": "vitkd"}, info(), info(layers=0))


# ---------------------------------------------------------------- with real tiny ViTs
# The references below write the default layers out rather than reading them from the term, so a term that
# read other layers or tokens of the 2-layer student / 4-layer teacher (one CLS token each) fails the test.

def tiny_vitkd_reference(tm, s, t, seed):
    """(mimicking, generation) for the defaults: student layer 1 mimics teacher layer 1 (a 2-layer student keeps
    layer 2 for the deep part), student layer 2 generates teacher layer 4."""
    fs, ft = s["hidden_states[1]"][:, 1:].detach(), t["hidden_states[1]"][:, 1:]
    b, p = fs.shape[:2]
    if tm.mimic_projectors is None:
        mimic = sum(map_gap(softmax_map(fs[i].tolist()), softmax_map(ft[i].tolist())) for i in range(b)) / b
    else:
        # the projector, align and generator are learned and randomly initialised: the reference runs the term's
        # own modules, and checks what feeds them (layers, tokens, mask) and how their output is scored
        lin = tm.mimic_projectors[0]
        per = [((lin.weight @ fs[i, j] + lin.bias - ft[i, j]) ** 2).mean().item() for i in range(b) for j in range(p)]
        mimic = sum(per) / len(per)
    torch.manual_seed(seed)
    mask = random_token_mask(b, p, 0.5)
    return mimic, reference_generation(tm, s["hidden_states[2]"], t["hidden_states[4]"], mask)


def tiny_manifoldkd_reference(s, t, seed):
    """Default (uniform) pairs: student layer 1 with teacher layer 2, 2 with 4; weights 4, 0.1, 0.2; 20 samples."""
    torch.manual_seed(seed)
    ref = 0.0
    for a, b in ((1, 2), (2, 4)):
        fs, ft = s[f"hidden_states[{a}]"][:, 1:].tolist(), t[f"hidden_states[{b}]"][:, 1:].tolist()
        intra, inter, rand = manifold_reference(fs, ft, sample_patches(len(fs) * len(fs[0]), 20).tolist())
        ref += 4.0 * intra + 0.1 * inter + 0.2 * rand
    return ref / 2


@pytest.mark.parametrize("spec", [{"type": "vitkd"},
                                  {"type": "vitkd", "generator": "attention", "projector": "correlation"},
                                  {"type": "manifoldkd", "samples": 20}])
def test_term_on_tiny_vits_matches_its_reference_and_trains_the_student(tiny_vits, spec):
    (student, s_info, s_reader), (teacher, t_info, t_reader) = tiny_vits
    tm = term(spec, s_info, t_info)
    batch = {"pixel_values": torch.randn(4, 1, 16, 16), "labels": torch.tensor([0, 1, 2, 0])}
    with torch.no_grad():
        t = t_reader(batch, tm.teacher_taps())
    student.zero_grad()
    s = s_reader(batch, tm.student_taps())
    torch.manual_seed(3)  # vitkd's mask and manifoldkd's sampled patches come from torch's global RNG
    loss = tm(s, t, batch)
    assert torch.isfinite(loss) and loss.item() > 0
    if spec["type"] == "vitkd":
        mimic, generation = tiny_vitkd_reference(tm, s, t, 3)
        # each part on its own too: on these near-init ViTs the correlation maps are close to uniform and that part
        # is ~1e-6 of the total, so the total alone would not notice it reading a wrong layer
        assert tm.mimic_loss(s, t).item() == pytest.approx(mimic, rel=1e-5)
        torch.manual_seed(3)
        assert tm.generation_loss(s, t, batch).item() == pytest.approx(generation, rel=1e-5)
        ref = 1.0 * mimic + 0.1 * generation  # default weights α = 1, β = 0.1
    else:
        ref = tiny_manifoldkd_reference(s, t, 3)
    assert loss.item() == pytest.approx(ref, rel=1e-5)
    loss.backward()
    grads = [p.grad for p in student.get_submodule(s_info.layers_path).parameters() if p.grad is not None]
    assert grads and sum(g.abs().sum() for g in grads) > 0


# ---------------------------------------------------------------- text_alignment (GPT4Image)

def test_text_alignment_against_a_loop_reference(tmp_path, monkeypatch):
    import json

    import kdistill.losses.text_alignment as text_alignment

    classes = ["cat", "dog", "owl"]
    (tmp_path / "texts.json").write_text(json.dumps({"owl": ["a bird"], "cat": ["a cat", "a pet"], "dog": ["a dog"]}))
    targets = torch.nn.functional.normalize(torch.randn(3, 5), dim=-1)
    asked = []
    monkeypatch.setattr(text_alignment, "embed_texts", lambda encoder, texts: asked.append(texts) or targets)
    student = ModelInfo(**{**info().__dict__, "labels": classes})
    labels = torch.tensor([2, 0, 0])
    pooled = torch.randn(B, 8)
    for mode in ("cosine", "contrastive"):
        tm = term({"type": "text_alignment", "texts": str(tmp_path / "texts.json"), "mode": mode,
                   "temperature": 0.5}, student)
        assert asked[-1] == [["a cat", "a pet"], ["a dog"], ["a bird"]]  # in the student's class order
        got = tm({"pooled": pooled}, {}, {**PIXELS, "labels": labels})
        per_image = []
        for i in range(B):
            f = tm.projector(pooled[i]).tolist()
            norm = math.sqrt(sum(x * x for x in f))
            cos = [sum(a / norm * b for a, b in zip(f, targets[c].tolist())) for c in range(3)]
            y = int(labels[i])
            if mode == "cosine":
                per_image.append(1 - cos[y])
            else:
                logits = [c / 0.5 for c in cos]
                per_image.append(-(logits[y] - math.log(sum(math.exp(v) for v in logits))))
        assert got.item() == pytest.approx(sum(per_image) / B, rel=1e-5), mode


def test_text_alignment_needs_named_classes_and_labels(monkeypatch):
    import kdistill.losses.text_alignment as text_alignment

    monkeypatch.setattr(text_alignment, "embed_texts", lambda encoder, texts: torch.eye(3, 5))
    with pytest.raises(PairingError, match="classifier student with named classes"):
        term({"type": "text_alignment"})
    tm = term({"type": "text_alignment"}, ModelInfo(**{**info().__dict__, "labels": ["0", "1", "2"]}))
    with pytest.raises(PairingError, match="needs labels"):
        tm({"pooled": torch.randn(B, 8)}, {}, {"pixel_values": PIXELS["pixel_values"]})
