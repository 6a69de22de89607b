"""PEFT modules as bequest handles them: a type, a config (adapter_config.json) and named tensors.

One interface over peft's LoRA, IA3, prefix and prompt tuning and bequest's own bottleneck adapters:
read and write a module folder, list the tensors a host expects (from a weightless skeleton of it),
build a fresh module on a host, and attach a saved one, refusing any load that would leave a tensor
unplaced or a place without its tensor (peft loads what matches and is silent about the rest).
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from bequest import adapters
from bequest.anatomy import anatomy, build_model
from bequest.errors import BequestError
from bequest.io import read_header, save_recipe, write_model

TYPES = {"LORA": "lora", "IA3": "ia3", "PREFIX_TUNING": "prefix", "PROMPT_TUNING": "prompt", "BOTTLENECK": "bottleneck"}
KINDS = tuple(TYPES.values())
HOST_TASKS = {"SEQ_CLS": "seq_cls", "CAUSAL_LM": "causal_lm", "FEATURE_EXTRACTION": "base", None: "base"}
PEFT_TASKS = {"seq_cls": "SEQ_CLS", "causal_lm": "CAUSAL_LM", "base": "FEATURE_EXTRACTION", "masked_lm": None}
# Prompt-learning configs record their host's shape; every host refills them from its own config.
HOST_FIELDS = ("num_layers", "token_dim", "num_attention_heads", "encoder_hidden_size")
CONFIG, WEIGHTS = adapters.CONFIG, adapters.WEIGHTS


@dataclass
class Module:
    kind: str  # one of KINDS
    config: dict  # adapter_config.json
    tensors: dict[str, torch.Tensor]  # adapter_model.safetensors

    @property
    def task(self) -> str:
        """The head the host needs: a classifier for SEQ_CLS modules, an LM head for CAUSAL_LM ones."""
        return HOST_TASKS.get(self.config.get("task_type"), "base")

    def num_labels(self, family) -> int | None:
        """Labels of the classifier saved with the module (None without one)."""
        path = family.heads.get("classifier")
        for key, t in self.tensors.items():
            if path and (key == f"{path}.weight" or key.endswith(f".{path}.weight")):
                return t.shape[0]
        return None


# ---------------------------------------------------------------- folders


def _json(value):
    return sorted(value) if isinstance(value, set) else str(value)


def read_module(folder: str | Path) -> Module:
    """A module folder, validated: a known type, a readable config, safetensors only (never unpickled)."""
    folder = Path(folder)
    if not (folder / CONFIG).exists():
        raise BequestError(f"{folder}: no {CONFIG}; point --adapter at a peft or bequest adapter folder")
    try:
        config = json.loads((folder / CONFIG).read_text())
    except ValueError as e:
        raise BequestError(f"{folder / CONFIG}: not valid JSON ({e}); re-save the adapter") from None
    kind = TYPES.get(config.get("peft_type"))
    if kind is None:
        raise BequestError(
            f"{folder}: peft type {config.get('peft_type')!r} cannot be ported; bequest ports "
            + ", ".join(TYPES)
        )
    weights = folder / WEIGHTS
    if not weights.exists():
        pickled = " (only adapter_model.bin: bequest never unpickles, re-save with safe_serialization=True)"
        raise BequestError(f"{folder}: no {WEIGHTS}{pickled if (folder / 'adapter_model.bin').exists() else ''}")
    read_header(weights)  # a truncated file fails here with a clear message, not inside safetensors
    return Module(kind, config, load_file(str(weights)))


def write_module(folder: str | Path, module: Module) -> None:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / CONFIG).write_text(json.dumps(module.config, indent=1, default=_json))
    save_file({k: t.contiguous() for k, t in module.tensors.items()}, str(folder / WEIGHTS))


# ---------------------------------------------------------------- configs


def _peft_config(config: dict, host_config, inference: bool):
    """The peft (or bottleneck) config object for `host_config`, its host-shape fields refilled."""
    config = {k: v for k, v in config.items() if k not in ("peft_version", "auto_mapping")}
    config["inference_mode"] = inference
    if config["peft_type"] == adapters.PEFT_TYPE:
        return adapters.BottleneckConfig(**config)
    from peft import PeftConfig

    for field in HOST_FIELDS:
        if field in config:
            config[field] = None
    return PeftConfig.from_peft_type(**config)


def targets(fam, roles) -> str:
    """A peft target regex naming exactly these roles' modules in every block (peft's suffix matching
    would take BERT's attention.output.dense along when asked for output.dense)."""
    block = re.escape(fam.layer_path).replace(r"\{i\}", r"\d+")
    names = "|".join(re.escape(fam.layer[r]) for r in roles if r in fam.layer)
    return rf"(.*\.)?{block}\.({names})"


def new_config(kind: str, model, settings=None, **overrides) -> dict:
    """A fresh module's config for `model`, its targets named through the anatomy roles.

    `settings`: a recipe carrying `PeftFields` (default: their defaults); `overrides` replace its values."""
    from bequest.recipe import PeftFields

    given = settings.model_dump(include=set(PeftFields.model_fields)) if settings is not None else {}
    s = PeftFields(**{**given, **overrides})
    rank, alpha, virtual_tokens, bottleneck, style = s.lora_rank, s.lora_alpha, s.virtual_tokens, s.bottleneck, s.style
    anat = anatomy(model)
    fam, task = anat.family, PEFT_TASKS[anat.task]
    if kind == "lora":
        from peft import LoraConfig

        linears = [role for role in fam.layer if role.startswith(("attn.", "mlp."))]
        config = LoraConfig(task_type=task, r=rank, lora_alpha=alpha, lora_dropout=0.0,
                            target_modules=targets(fam, linears), fan_in_fan_out=fam.conv1d)
    elif kind == "ia3":
        from peft import IA3Config

        # IA3's vectors: keys and values (GPT-2's fused qkv as a whole) and the FFN's hidden units.
        config = IA3Config(task_type=task, target_modules=targets(fam, ["attn.qkv", "attn.k", "attn.v", "mlp.down"]),
                           feedforward_modules=targets(fam, ["mlp.down"]), fan_in_fan_out=fam.conv1d)
    elif kind == "prefix":
        from peft import PrefixTuningConfig

        config = PrefixTuningConfig(task_type=task, num_virtual_tokens=virtual_tokens)
    elif kind == "prompt":
        from peft import PromptTuningConfig

        # Sampled vocabulary embeddings start where real tokens live (N(0, 1) would be far off-scale).
        config = PromptTuningConfig(task_type=task, num_virtual_tokens=virtual_tokens, prompt_tuning_init="SAMPLE_VOCAB")
    elif kind == "bottleneck":
        heads = adapters.head_modules(model) if anat.task == "seq_cls" else []
        return adapters.BottleneckConfig(size=bottleneck, style=style, task_type=task, modules_to_save=heads).model_dump()
    else:
        raise BequestError(f"unknown PEFT type {kind!r}; choose one of: {', '.join(KINDS)}")
    return json.loads(json.dumps(config.to_dict(), default=_json))


# ---------------------------------------------------------------- modules on hosts


def with_module(model, config: dict, *, trainable: bool = True):
    """`model` carrying a freshly initialised module of `config` (peft's PeftModel, or the host itself
    with bottleneck adapters hooked in). Seed the global RNG first for a reproducible init."""
    cfg = _peft_config(config, model.config, inference=not trainable)
    if isinstance(cfg, adapters.BottleneckConfig):
        return adapters.add_bottleneck(model, cfg, trainable=trainable)
    from peft import get_peft_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft's notes on Conv1D layouts and unused heads are not news
        return get_peft_model(model, cfg)


def _copy(t: torch.Tensor) -> torch.Tensor:
    return t.detach().clone() if t.is_meta else t.detach().cpu().clone()  # a skeleton's stay shapes


def module_of(model) -> Module:
    """The module a model carries, as it would be saved."""
    if getattr(model, "bottleneck_config", None) is not None:
        config = model.bottleneck_config.model_dump()
        tensors = {k: _copy(t) for k, t in adapters.bottleneck_state(model).items()}
    else:
        from peft import get_peft_model_state_dict

        cfg = model.peft_config["default"]
        config = json.loads(json.dumps({**cfg.to_dict(), "inference_mode": True}, default=_json))
        tensors = {k: _copy(t) for k, t in get_peft_model_state_dict(model).items()}
    config["base_model_name_or_path"] = getattr(model.config, "_name_or_path", None) or config.get("base_model_name_or_path")
    return Module(TYPES[config["peft_type"]], config, tensors)


def _skeleton_config(config: dict) -> dict:
    """Inits that need real weights (sampled vocabulary, SVD-based LoRA) are no business of a skeleton."""
    config = dict(config)
    if config.get("peft_type") == "PROMPT_TUNING":
        config["prompt_tuning_init"] = "RANDOM"
    if config.get("peft_type") == "LORA":
        config["init_lora_weights"] = True
    return config


def expected(config: dict, host_config, task: str, num_labels: int | None) -> tuple[dict, dict[str, tuple]]:
    """(the config refilled for this host, {tensor name: shape} a module of `config` has on it).

    Built on a weightless (meta) skeleton of the host: nothing is loaded or allocated.
    """
    host_config = copy.deepcopy(host_config)
    if task == "seq_cls" and num_labels:
        host_config.num_labels = num_labels
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = with_module(build_model(host_config, task), _skeleton_config(config), trainable=False)
        module = module_of(model)
    refilled = {**config, **{k: module.config[k] for k in HOST_FIELDS if k in config}}
    return refilled, {k: tuple(t.shape) for k, t in module.tensors.items()}


def misfits(tensors: dict[str, torch.Tensor], want: dict[str, tuple]) -> list[str]:
    """Every way `tensors` fails to fill the places `want` lists, one line each (empty: a perfect fit)."""
    lines = [f"{k} is {list(t.shape)}, the host needs {list(want[k])}"
             for k, t in tensors.items() if k in want and tuple(t.shape) != want[k]]
    lines += [f"{k} has no place on the host" for k in tensors if k not in want]
    lines += [f"the host's {k} has no tensor in the module" for k in want if k not in tensors]
    return lines


def attach(model, module: Module, *, trainable: bool = False):
    """`model` carrying the saved `module`; refuses a partial fit instead of loading what matches."""
    carrier = with_module(model, module.config, trainable=trainable)
    want = {k: tuple(t.shape) for k, t in module_of(carrier).tensors.items()}
    problems = misfits(module.tensors, want)
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise BequestError(f"the {module.kind} module does not fit this host: {problems[0]}{more}; port it with `bequest port`")
    if module.kind == "bottleneck":
        params = dict(carrier.named_parameters())
        with torch.no_grad():
            for k, t in module.tensors.items():
                params[k].copy_(t)
        return carrier
    from peft import set_peft_model_state_dict

    result = set_peft_model_state_dict(carrier, module.tensors)
    # misfits() said every tensor has a place; peft must agree (prompt encoders load on their own).
    left = [k for k in result.unexpected_keys if k != "prompt_embeddings"]
    if left:
        raise BequestError(f"internal: peft left {left[0]} unloaded; please report this")
    return carrier


def save_tuned(folder: Path, model, tokenizer, *, parent: str, operation: str, recipe: dict) -> None:
    """A full fine-tune as a model folder; a PEFT module as an adapter folder (tokenizer beside it)."""
    shutil.rmtree(folder / "checkpoints", ignore_errors=True)
    if hasattr(model, "peft_config") or getattr(model, "bottleneck_config", None) is not None:
        module = module_of(model)
        module.config["base_model_name_or_path"] = str(parent)
        write_module(folder, module)
        if tokenizer is not None:
            tokenizer.save_pretrained(folder)
        save_recipe(folder, recipe)
    else:
        write_model(folder, model, tokenizer, operation=operation, parent=str(parent), recipe=recipe)
