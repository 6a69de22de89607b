"""Recipes: every verb's settings as one pydantic model, filled from YAML and/or CLI flags.

A verb's recipe is composed of the field groups below, so a setting has one name, one default and one
help text wherever it appears; a verb that needs another default says so with `@defaults`. The model
is the single source of defaults and help text: the CLI builds its options from it, and the resolved
recipe is saved beside every output so a run can be repeated exactly.

A renamed setting keeps its old spelling for one release: list it in the recipe's `OLD_NAMES`
({old: new}); recipes accept it, and the CLI adds it as a hidden flag.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Annotated, ClassVar, Literal, TypeVar

import yaml
from pydantic import (
    AfterValidator, BaseModel, ConfigDict, Field, PlainSerializer, ValidationError, model_serializer, model_validator,
)

from bequest.errors import BequestError

R = TypeVar("R", bound=BaseModel)


class Recipe(BaseModel):
    """Base of every recipe and field group: unknown settings are errors, old spellings still work."""

    model_config = ConfigDict(extra="forbid")
    OLD_NAMES: ClassVar[dict[str, str]] = {}

    @classmethod
    def old_names(cls) -> dict[str, str]:
        """{old spelling: setting} over the recipe and every group it is made of."""
        out = {}
        for base in reversed(cls.__mro__):
            out.update(base.__dict__.get("OLD_NAMES", {}))
        return out

    @model_validator(mode="before")
    @classmethod
    def _renamed(cls, values):
        if not isinstance(values, dict):
            return values
        for name in cls.model_fields:  # a setting named after a Python keyword (from_) is spelt `from` outside Python
            if name.endswith("_") and name[:-1] in values:
                values[name] = values.pop(name[:-1])
        for old, new in cls.old_names().items():
            if old in values:
                value = values.pop(old)
                if values.get(new, value) != value:
                    raise ValueError(f"{old} is the old name of {new}; give only {new}")
                values[new] = value
        return values


def defaults(**values):
    """Class decorator: this recipe's own defaults for settings it takes from a field group."""

    def apply(cls):
        for name, value in values.items():
            info = copy.copy(cls.__pydantic_fields__[name])  # the group's own field stays as it is
            info.default = value
            cls.__pydantic_fields__[name] = info
        cls.model_rebuild(force=True)
        return cls

    return apply


def without(*names):
    """Class decorator: settings of a field group this recipe has no use for, left out (no flag, no
    YAML key: a recipe that gives one is refused, as any unknown setting is)."""

    def apply(cls):
        for name in names:
            del cls.__pydantic_fields__[name]
        cls.model_rebuild(force=True)
        return cls

    return apply


def _model_folder(value: str) -> str:
    from bequest.io.hub import model_folder

    return model_folder(value)


def _as_given(value: str) -> str:
    from bequest.io.hub import hub_id

    return hub_id(value) or value


# A model argument: a folder, or the id of a model in the local Hugging Face cache (`gpt2`, `org/name`), which
# the verb sees as its snapshot folder; saved recipes name the id again, so they read back the same way.
ModelFolder = Annotated[str, AfterValidator(_model_folder), PlainSerializer(_as_given)]


# ---------------------------------------------------------------- field groups


# The pip package of a --report-to integration, where its name is not that.
_PACKAGES = {"comet_ml": "comet-ml", "azure_ml": "azureml-core", "flyte": "flytekit"}


class TrainFields(Recipe):
    """Training settings shared by every verb that trains."""

    steps: int = Field(200, ge=1, description="optimizer steps to train")
    batch_size: int = Field(16, ge=1, description="examples per step per process")
    grad_accum: int = Field(1, ge=1, description="micro-batches accumulated per optimizer step")
    lr: float = Field(1e-3, gt=0, description="peak learning rate (AdamW)")
    warmup: int = Field(20, ge=0, description="linear warm-up steps before cosine decay")
    weight_decay: float = Field(0.01, ge=0, description="AdamW weight decay")
    eval_every: int = Field(50, ge=1, description="evaluate every N steps")
    save_every: int = Field(50, ge=1, description="write a resumable checkpoint every N steps")
    seed: int = Field(0, description="seed for initialisation and data order")
    bf16: bool = Field(
        False, description="bf16 mixed precision (the weights stay fp32): on GPUs that have bf16, and on CPU, where most "
        "processors run it slower than fp32",
    )
    fp16: bool = Field(False, description="fp16 mixed precision with loss scaling; needs a CUDA GPU")
    gradient_checkpointing: bool = Field(
        False, description="recompute each block's activations in the backward pass: less memory for about a third "
        "more compute",
    )
    report_to: str = Field(
        "none", description="where the Trainer also logs: 'none', 'tensorboard' (event files in each trained folder's "
        "runs/), 'all' (every installed integration) or any integration transformers knows (wandb, mlflow, ...), "
        "comma-separated",
    )

    @model_validator(mode="after")
    def _possible_here(self):
        """Settings this machine cannot honour are refused before any work (as a BequestError, which pydantic
        passes through as the one line it is)."""
        if self.bf16 and self.fp16:
            raise BequestError("--bf16 and --fp16 both ask for mixed precision; give one of them")
        if self.fp16:
            import torch

            if not torch.cuda.is_available():  # on CPU the Trainer would train in fp32 and say nothing
                raise BequestError("--fp16 needs a CUDA GPU and this machine has none; use --bf16 on CPU or drop --fp16")
        self.report_targets()
        return self

    def report_targets(self) -> str | list[str]:
        """--report-to as TrainingArguments takes it; an unknown or uninstalled integration is refused."""
        names = [n.strip() for n in getattr(self, "report_to", "none").split(",") if n.strip()]
        if names in ([], ["none"], ["all"]):
            return names[0] if names else "none"
        from transformers.integrations import INTEGRATION_TO_CALLBACK, get_available_reporting_integrations

        for name in names:
            if name not in INTEGRATION_TO_CALLBACK:
                raise BequestError(f"--report-to {name} is not an integration transformers knows; choose none, all "
                                   f"or some of: {', '.join(INTEGRATION_TO_CALLBACK)}")
            if name not in get_available_reporting_integrations():
                package = _PACKAGES.get(name, name)
                raise BequestError(f"--report-to {name} needs the {package} package, which is not installed; "
                                   f"`pip install {package}`, or drop --report-to {name}")
        return names


class OutputFields(Recipe):
    overwrite: bool = Field(False, description="replace an existing output folder")


def _families(task: str | None = None) -> tuple[str, ...]:
    from bequest.anatomy import FAMILIES

    return tuple(name for name, fam in FAMILIES.items() if task is None or task in fam.tasks)


Family = Literal[_families()]
CausalFamily = Literal[_families("causal_lm")]


class ShapeFields(Recipe):
    """The shape of a model built from scratch."""

    family: Family = Field("gpt2", description="model family")
    layers: int = Field(2, ge=1, description="transformer blocks")
    hidden: int = Field(64, ge=8, description="hidden size")
    heads: int = Field(4, ge=1, description="attention heads (hidden / heads = head size)")
    kv_heads: int | None = Field(None, ge=1, description="KV heads for grouped-query attention (Llama-like)")
    ffn: int | None = Field(None, ge=1, description="MLP width (default 4 x hidden)")
    vocab: int = Field(8000, ge=300, description="tokenizer vocabulary size, trained locally on the corpus")


class SizeFields(Recipe):
    """A shape derived from another model's: unset sizes keep its head size, KV grouping and ratios."""

    layers: int | None = Field(None, ge=1, description="transformer blocks (default: the source model's)")
    hidden: int | None = Field(None, ge=8, description="hidden size (default: the source model's)")
    heads: int | None = Field(None, ge=1, description="attention heads (default: hidden / the source's head size)")
    kv_heads: int | None = Field(None, ge=1, description="KV heads, Llama-like (default: keep the source's group size)")
    ffn: int | None = Field(
        None, ge=1, description="MLP width (default: the source model's; inherit and lifelong keep its ratio to hidden)"
    )

    def sizes(self) -> dict:
        return {k: getattr(self, k) for k in SizeFields.model_fields}


def _operators(kind: str) -> tuple[str, ...]:
    from bequest.grow import DEPTH, WIDTH

    return tuple({"width": WIDTH, "depth": DEPTH}[kind])


class GrowFields(Recipe):
    """How a model grows: the operators (`bequest.grow`'s registries) and their settings."""

    width: Literal[_operators("width")] = Field("exact", description="width operator")
    depth: Literal[_operators("depth")] = Field("identity", description="depth operator")
    placement: str = Field(
        "even", description="where identity/interleave blocks go: 'even', 'top', or old layer indices like '0,0,1'"
    )
    noise: float = Field(0.0, ge=0.0, description="std of symmetry-breaking noise added to expanded tensors")


class BlockFields(Recipe):
    """Language-model text cut into blocks."""

    seq_len: int = Field(128, ge=8, description="tokens per training block")
    eval_blocks: int = Field(64, ge=1, description="validation blocks evaluated each time")


class FileFields(Recipe):
    """How bequest reads your own data files (the embedded corpus and tasks ignore these)."""

    text_column: str = Field("text", description="column holding the text in your .jsonl/.csv/.parquet files")
    validation_fraction: float = Field(
        0.1, gt=0.0, lt=1.0, description="share of your rows held out for validation when no validation file is given"
    )


class CorpusChoice(Recipe):
    """Which text a run reads. On the packages corpus every dump of the recipe (the one saved beside an
    output) records the versions of the packages whose text it saw, as `corpus_versions`; read back,
    that record is dropped, since it describes a run and sets nothing."""

    corpus: str = Field(
        "default",
        description="'default' (embedded stdlib corpus), 'packages' (docstrings of the installed packages, a "
        "domain each; built once and cached) or a path to your text/jsonl/csv/parquet",
    )

    def corpus_domains(self) -> list[str] | None:
        """The packages corpus domains the run reads (None: all)."""
        return None

    @model_validator(mode="before")
    @classmethod
    def _drop_versions(cls, values):
        if isinstance(values, dict) and "corpus_versions" in values:
            return {k: v for k, v in values.items() if k != "corpus_versions"}  # the caller's dict stays whole
        return values

    @model_serializer(mode="wrap")
    def _record_versions(self, handler):
        dumped = handler(self)
        if self.corpus == "packages" and isinstance(dumped, dict):
            from bequest.data.packages import versions

            dumped["corpus_versions"] = versions(self.corpus_domains())
        return dumped


class CorpusFields(BlockFields, FileFields, CorpusChoice):
    domain: str | None = Field(None, description="one domain of the embedded corpus (default: all)")

    def corpus_domains(self) -> list[str] | None:
        return None if self.domain is None else [self.domain]


class ExampleFields(Recipe):
    """Labelled examples: how long, and how many are evaluated."""

    max_len: int = Field(64, ge=8, description="tokens per example (texts are truncated)")
    eval_examples: int = Field(200, ge=1, description="validation examples per task in each evaluation")


class TuningFields(ExampleFields):
    train_examples: int | None = Field(None, ge=1, description="training examples per task (default: all)")


def _tasks() -> str:
    from bequest.data.tasks import TASKS

    return ", ".join(TASKS)


class TaskFields(ExampleFields, FileFields):
    data: str = Field("domain", description=f"embedded task ({_tasks()}) or a labelled data file or folder")
    label_column: str = Field("label", description="column holding the label in your data files")


class LoraFields(Recipe):
    lora_rank: int = Field(8, ge=1, description="rank of the LoRA matrices")
    lora_alpha: float = Field(16.0, gt=0, description="LoRA scaling numerator (the update is scaled by alpha / rank)")


def _kinds() -> tuple[str, ...]:
    """The PEFT kinds' names: those of `bequest.peft`'s kind modules, which its registry checks are the same.
    Read from the package's files, not imported: a kind imports torch, and every command would pay for it."""
    import importlib.util
    import pkgutil

    spec = importlib.util.find_spec("bequest.peft")
    return tuple(sorted(m.name for m in pkgutil.iter_modules(spec.submodule_search_locations) if m.name != "kind"))


PeftKind = Literal[_kinds()]


class PeftFields(LoraFields):
    """The settings of a fresh PEFT module, whatever its kind (each kind reads its own)."""

    virtual_tokens: int = Field(8, ge=1, description="virtual tokens of prefix and prompt tuning")
    bottleneck: int = Field(16, ge=1, description="bottleneck adapter width")
    style: Literal["pfeiffer", "houlsby"] = Field(
        "pfeiffer", description="bottleneck adapter placement: after the FFN (pfeiffer) or after attention too (houlsby)"
    )
    nonlinearity: Literal["relu", "gelu", "silu", "tanh", "identity"] = Field(
        "relu", description="bottleneck adapter activation between down and up (identity: a linear adapter, which "
        "`bequest export` can fold into the base's weights)"
    )
    OLD_NAMES: ClassVar[dict[str, str]] = {"rank": "lora_rank"}


class KDFields(Recipe):
    """Distillation towards a teacher: (1 - alpha) CE + alpha tau^2 KL."""

    alpha: float = Field(1.0, ge=0.0, le=1.0, description="weight of the KL term towards the teacher (0: no teacher)")
    tau: float = Field(2.0, gt=0.0, description="softmax temperature of the KL term")


# ---------------------------------------------------------------- reading


def one_line(e: ValidationError, source: str) -> str:
    err = e.errors()[0]
    where = ".".join(str(x) for x in err["loc"]) or "recipe"
    more = f" (and {e.error_count() - 1} more)" if e.error_count() > 1 else ""
    got = f", not {err['input']!r}" if isinstance(err.get("input"), (str, int, float)) else ""
    return f"{source}: {where}: {err['msg']}{got}{more}; fix that value"


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as e:
        raise BequestError(f"{path}: cannot read recipe ({e.strerror})") from None
    except UnicodeDecodeError:
        raise BequestError(f"{path}: not UTF-8 text; save the recipe as UTF-8 YAML") from None
    except yaml.YAMLError as e:
        raise BequestError(f"{path}: not valid YAML ({str(e).splitlines()[0]}); fix the recipe") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise BequestError(f"{path}: a recipe must be a mapping of setting: value")
    return data


def resolve(cls: type[R], recipe_file: str | Path | None = None, **flags) -> R:
    """Recipe file values, overridden by the flags that were given (None = not given)."""
    values = read_yaml(recipe_file) if recipe_file else {}
    values.update({k: v for k, v in flags.items() if v is not None})
    try:
        return cls(**values)
    except ValidationError as e:
        raise BequestError(one_line(e, str(recipe_file or "options"))) from None
