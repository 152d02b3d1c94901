"""Ways to create the student, keyed by the recipe's `student:` field."""
from __future__ import annotations

import copy

import torch

from kdistill.errors import ConfigError, PairingError, did_you_mean
from kdistill.models.arch import find_layers, layer_count
from kdistill.models.blueprints import is_blueprint
from kdistill.models.layer_map import LayerMap
from kdistill.models.loading import detect_task, load_config, load_model, model_class
from kdistill.models.narrow import narrow_config, narrow_state
from kdistill.registry import Registry

INITS = Registry("student init")


def choose_layers(spec, num_layers: int | None, teacher_layers: int, where: str) -> list[int]:
    """Teacher layer numbers (1..N) to copy. `uniform` spreads them and keeps the top layer: student layer m copies
    teacher layer max(1, ⌊m·N/n⌋), the layer a `layers: uniform` loss term compares it with (TinyBERT's g(m))."""
    if spec == "every_other":
        return list(range(teacher_layers % 2 or 2, teacher_layers + 1, 2))
    if spec == "uniform":
        n = num_layers or teacher_layers // 2
        if not 1 <= n <= teacher_layers:
            raise ConfigError(f"{where}.num_layers: {n} must be between 1 and the teacher's {teacher_layers} layers")
        return [m for _, m in LayerMap.uniform(n, teacher_layers).pairs]
    if isinstance(spec, str):
        raise ConfigError(f"{where}.layers: unknown choice {spec!r}; valid: uniform, every_other, or a list of layer numbers")
    layers = [teacher_layers + 1 + x if x < 0 else x for x in spec]
    bad = [x for x, y in zip(spec, layers) if not 1 <= y <= teacher_layers]
    if bad or not layers:
        raise PairingError(
            f"{where}.layers: {bad or 'empty list'} out of range; the teacher has layers 1..{teacher_layers} "
            f"(numbered from 1, negative numbers count from the last)"
        )
    twice = sorted({x for x in layers if layers.count(x) > 1})
    if twice:
        raise ConfigError(f"{where}.layers: teacher layer {', '.join(map(str, twice))} given twice (counting negative "
                          f"numbers from the last); each student layer is a copy of a different teacher layer")
    return layers


# Each init takes (spec, teacher, **context); context holds task, head (classifier labels) and steps.

@INITS.register("from_teacher")
def from_teacher(spec, teacher, where="student.from_teacher", **context):
    """Copy the embeddings, the head and the chosen layers of the teacher (DistilBERT/TinyBERT init); with
    `hidden_size`, every copied weight is cut to that width (kdistill.models.narrow).

    With `model:` the layers come from that model instead (DistilBERT initialises from the pretrained,
    not the fine-tuned, teacher); the student keeps the teacher's class, so a task head starts fresh."""
    if spec.layers_from is not None and (spec.model is not None or spec.hidden_size is not None):
        raise ConfigError(f"{where}.layers_from replaces only the layers; it does not combine with model or "
                          f"hidden_size")
    if spec.model is not None:
        teacher = same_architecture(spec.model, teacher, f"{where}.model", context, same_depth=False)
    config = teacher.config
    n_teacher = layer_count(config)
    layers = choose_layers(spec.layers, spec.num_layers, n_teacher, where)
    path, _ = find_layers(teacher, n_teacher)
    student_config = (copy.deepcopy(config) if spec.hidden_size is None else
                      narrow_config(config, spec.hidden_size, spec.intermediate_size, where))
    student_config.num_hidden_layers = len(layers)
    if isinstance(getattr(student_config, "layer_types", None), list):
        student_config.layer_types = [config.layer_types[i - 1] for i in layers]
    student = type(teacher)(student_config)
    new_index = {str(t - 1): str(s) for s, t in enumerate(layers)}
    prefix = path + "."
    source = teacher.state_dict()
    if spec.layers_from is not None:  # the donor's layers, the teacher's embeddings and head
        donor = same_architecture(spec.layers_from, teacher, f"{where}.layers_from", context)
        source.update((key, value) for key, value in donor.state_dict().items() if key.startswith(prefix))
    state = {}
    for key, value in source.items():
        if key.startswith(prefix):
            index, rest = key[len(prefix):].split(".", 1)
            if index not in new_index:
                continue
            key = f"{prefix}{new_index[index]}.{rest}"
        state[key] = value.clone()
    if spec.hidden_size is not None:
        state = narrow_state(state, student, config.num_attention_heads)
    student.load_state_dict(state, strict=True)
    return student


def same_architecture(ref: str, teacher, where: str, context: dict, same_depth: bool = True):
    """A model whose layers can stand in for the teacher's: the same class, and (`same_depth`, where its layers
    take the teacher's places between its embeddings and head) the same layer count and width."""
    source = load_model(ref, context.get("task", "auto"), **(context.get("head") or {})).model
    if type(source) is not type(teacher):
        raise PairingError(f"{where}: {ref} is a {type(source).__name__}, the teacher a {type(teacher).__name__}; "
                           f"layers can only be copied between the same architecture")
    if same_depth and layer_count(source.config) != layer_count(teacher.config):
        raise PairingError(f"{where}: {ref} has {layer_count(source.config)} layers, the teacher "
                           f"{layer_count(teacher.config)}; its layers must take the teacher's places one for one")
    widths = [getattr(m.config.get_text_config(), "hidden_size", None) for m in (source, teacher)]
    if same_depth and widths[0] != widths[1]:
        raise PairingError(f"{where}: {ref} is {widths[0]} wide, the teacher {widths[1]}; its layers must fit "
                           f"between the teacher's embeddings and head: give a model of the teacher's width")
    return source


@INITS.register("config")
def from_config(overrides: dict, teacher, where="student.config", **context):
    """A randomly initialised model of the teacher's class with some config fields changed."""
    base = teacher.config.to_dict()
    family = [k for k in ("model_type", "architectures") if k in overrides]
    if family:  # the model is built as the teacher's class, whatever these say
        raise ConfigError(f"{where}.{family[0]}: a student from config keeps the teacher's architecture "
                          f"({teacher.config.model_type}); for another, give student.model: DIR or a blueprint "
                          f"(student.model: blueprint:NAME)")
    unknown = [k for k in overrides if k not in base and not hasattr(teacher.config, k)]
    if unknown:
        hints = [f"{name!r}" + (f" ({hint[2:]})" if (hint := did_you_mean(name, base, cutoff=0.75)) else "")
                 for name in unknown]
        raise ConfigError(f"{where}: {', '.join(hints)} {'is not a field' if len(unknown) == 1 else 'are not fields'} "
                          f"of the teacher's {type(teacher.config).__name__}")
    check_config_values(overrides, base, where)
    config = type(teacher.config).from_dict({**base, **overrides})
    if isinstance(getattr(config, "layer_types", None), list) and len(config.layer_types) != config.num_hidden_layers:
        config.layer_types = config.layer_types[: config.num_hidden_layers]
    try:
        return type(teacher)(config)
    except (ValueError, AssertionError, RuntimeError) as err:
        raise ConfigError(f"{where}: the teacher's model class refuses these settings: {err}") from None


def is_size(key: str) -> bool:
    return key.startswith(("num_", "n_")) or key.endswith(("_size", "_layers", "_heads", "_dim"))


def check_config_values(overrides: dict, base: dict, where: str) -> None:
    """Each changed field keeps its type, and sizes and counts stay positive: transformers otherwise fails deep
    inside (a validation error of its config dataclass, torch's 'negative dimension') or builds a 0-layer model."""
    for key, value in overrides.items():
        was = base.get(key)
        if value is None:  # null lets transformers derive it (head_dim after narrowing, n_inner = 4 * n_embd)
            continue
        whole = isinstance(value, int) and not isinstance(value, bool)
        if isinstance(was, int) and not isinstance(was, bool) and not whole:
            raise ConfigError(f"{where}.{key}: {value!r} is {type(value).__name__}, and the field is a whole number "
                              f"(the teacher's is {was}); write it without quotes")
        if isinstance(was, int) and was > 0 and is_size(key) and isinstance(value, int) and value < 1:
            raise ConfigError(f"{where}.{key}: {value} is not a size or count; give 1 or more")


@INITS.register("model")
def from_directory(ref: str, teacher, task: str = "auto", head: dict | None = None, **context):
    """A saved model; `blueprint:NAME` is an architecture, so it starts from a fresh seeded random init
    (each seed of a comparison is then a different student, as with `config:`)."""
    if is_blueprint(ref):
        from kdistill.models.loading import new_model

        config = load_config(ref)[1]
        for key, value in (head or {}).items():
            setattr(config, key, value)
        task = task if task != "auto" else detect_task(config)
        return new_model(config, task)
    config = load_config(ref)[1]
    if task not in ("auto", "image-classification") and reads_only_images(config):
        # AutoModel loads a ViT as an embedding model too, and the run then fails inside it on token ids
        raise PairingError(f"student.model: {ref} is an image model ({config.model_type}) and the teacher a text "
                           f"model ({task}); pair models of one kind (text or image)")
    try:
        return load_model(ref, task, **(head or {})).model
    except PairingError as err:  # named by its field: a recipe may load several models
        raise PairingError(f"student.model: {err}") from None


def reads_only_images(config) -> bool:
    """A model type transformers has as an image classifier and in no text-task form (ViT, DeiT, ResNet; not
    Perceiver, which reads both)."""
    from transformers.models.auto import modeling_auto as auto

    text = (auto.MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES, auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
            auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES)
    kind = config.model_type
    return kind in auto.MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES and not any(kind in names for names in text)


@INITS.register("theseus")
def theseus(spec, teacher, steps: int = 0, **context):
    from kdistill.models.theseus import build_theseus

    donor = (same_architecture(spec.layers_from, teacher, "student.theseus.layers_from", context)
             if spec.layers_from is not None else None)
    return build_theseus(spec, teacher, steps, donor)  # the replacement schedule needs the stage length


def build_student(student_cfg, teacher, task: str, seed: int, previous_dir: str | None = None,
                  head: dict | None = None, steps: int = 0, trust_remote_code: bool = False):
    """The student for a stage: the previous stage's student, or the one the recipe describes.

    `head` (num_labels, id2label, ...) gives a student loaded from a directory the task's classifier
    head, e.g. when a task stage follows a task-agnostic one; `trust_remote_code`, that a previous stage's
    student built from a teacher with its own code is loaded with that code."""
    torch.manual_seed(seed)  # random init (config:) is part of what a seed reproduces
    if previous_dir is not None:
        return load_model(previous_dir, task, trust_remote_code, **(head or {})).model
    kind, spec = student_cfg.kind()
    return INITS.get(kind, "student")(spec, teacher, task=task, head=head, steps=steps)


__all__ = ["INITS", "build_student", "choose_layers", "model_class"]
