"""Model anatomy: which role every parameter plays, and the facts an operator needs.

Operators speak roles (`embed.token`, `layer.3.attn.q.weight`, `final_norm.weight`, ...) and ask the
anatomy for shapes and facts; only `families.py` knows a family's tensor names.

An anatomy works from a transformers config or from config.json read as plain data (`PlainConfig`):
it knows every parameter's name and shape from the config alone, so checking or growing a checkpoint
needs neither transformers' model code nor torch (transformers is imported only to build models).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING, Iterable, NamedTuple

from bequest.anatomy.families import FAMILIES, SHAPES, Family
from bequest.errors import BequestError

if TYPE_CHECKING:
    import transformers

# The suffix of config.architectures[0] says which head a checkpoint carries.
_TASK_SUFFIXES = (
    ("ForCausalLM", "causal_lm"),
    ("LMHeadModel", "causal_lm"),
    ("ForMaskedLM", "masked_lm"),
    ("ForSequenceClassification", "seq_cls"),
    ("Model", "base"),
)
AUTO_CLASSES = {
    "base": "AutoModel",
    "causal_lm": "AutoModelForCausalLM",
    "masked_lm": "AutoModelForMaskedLM",
    "seq_cls": "AutoModelForSequenceClassification",
}


# Roles a task adds on top of a pre-trained body (never pre-trained themselves).
TASK_ROLES = frozenset({"pooler", "classifier", "classifier.dense"})


class Slot(NamedTuple):
    """One parameter's place: role `attn.q`, layer 3 (None outside blocks), kind `weight`."""

    role: str
    layer: int | None
    kind: str

    def __str__(self) -> str:
        where = "" if self.layer is None else f"layer.{self.layer}."
        return f"{where}{self.role}.{self.kind}"


def supported() -> list[str]:
    return sorted(FAMILIES)


class PlainConfig:
    """A config.json as read, without transformers: its settings as attributes, like a transformers
    config's, and the family's defaults (`Family.defaults`) for the settings it leaves out."""

    def __init__(self, settings: dict):
        self.__dict__.update(settings)

    def __getattr__(self, name: str):  # only for settings the file does not have
        fam = next((f for f in FAMILIES.values() if self.__dict__.get("model_type") in f.model_types), None)
        if fam is None or name not in fam.defaults:
            raise AttributeError(name)
        return fam.defaults[name]

    @property
    def num_labels(self) -> int:
        return len(self.__dict__.get("id2label") or {}) or 2  # transformers' default: two labels

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def family_of(config) -> Family:
    model_type = getattr(config, "model_type", None)
    for fam in FAMILIES.values():
        if model_type in fam.model_types:
            return fam
    raise BequestError(
        f"unsupported architecture {model_type!r}; bequest supports: {', '.join(supported())}"
    )


def task_of(config) -> str:
    arch = (getattr(config, "architectures", None) or [""])[0]
    for suffix, task in _TASK_SUFFIXES:
        if arch.endswith(suffix):
            return task
    return "base"


@dataclass
class Anatomy:
    family: Family
    config: transformers.PretrainedConfig | PlainConfig
    task: str

    def _get(self, key: str, default=None):
        attr = self.family.config_keys.get(key)
        value = getattr(self.config, attr, None) if attr else None
        return default if value is None else value

    @property
    def hidden(self) -> int:
        return self._get("hidden")

    @property
    def layers(self) -> int:
        return self._get("layers")

    @property
    def heads(self) -> int:
        return self._get("heads")

    @property
    def kv_heads(self) -> int:
        return self._get("kv_heads", self.heads)

    @property
    def head_dim(self) -> int:
        return self._get("head_dim", self.hidden // self.heads)

    @property
    def ffn(self) -> int:
        return self._get("ffn", 4 * self.hidden)

    @property
    def vocab(self) -> int:
        return self._get("vocab")

    @property
    def positions(self) -> int:
        return self._get("positions", 0)

    @property
    def usable_positions(self) -> int:
        """Tokens one sequence can hold (RoBERTa's table keeps two slots for its offset); 0: unbounded."""
        return max(self.positions - self.family.position_offset, 0) if self.positions else 0

    @property
    def inverse_layer_scale(self) -> bool:
        """GPT-2's scale_attn_by_inverse_layer_idx: attention scores divided by the layer number, so a
        block that moves to another depth must rescale its queries to compute what it did."""
        return bool(getattr(self.config, "scale_attn_by_inverse_layer_idx", False))

    @property
    def eps(self) -> float:
        return getattr(self.config, self.family.eps_key)

    @property
    def tied(self) -> bool:
        return bool(getattr(self.config, "tie_word_embeddings", False))

    @cached_property
    def _table(self) -> dict[str, Slot]:
        """Every parameter name this family can have, prefixed or not, mapped to its slot."""
        table: dict[str, Slot] = {}

        def add(path: str, role: str, layer: int | None, prefixes: tuple[str, ...]):
            head, _, kind = role.rpartition(".")
            if kind in ("weight", "bias"):  # the key names one parameter, not a module
                table.update({p + path: Slot(head, layer, kind) for p in prefixes})
                return
            for kind in ("weight", "bias"):
                table.update({f"{p}{path}.{kind}": Slot(role, layer, kind) for p in prefixes})

        fam = self.family
        base = ("", fam.base_prefix + ".")
        for role, path in {**fam.embed, **fam.final}.items():
            add(path, role, None, base)
        for i in range(self.layers):
            block = fam.layer_path.format(i=i)
            for role, path in fam.layer.items():
                add(f"{block}.{path}", role, i, base)
        for role, path in fam.heads.items():
            add(path, role, None, ("",))
        return table

    def size(self, name: str) -> int:
        """One of the shape names of `families.SHAPES`."""
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        sizes = {"hidden": self.hidden, "ffn": self.ffn, "vocab": self.vocab, "positions": self.positions,
                 "q": q, "kv": kv, "qkv": q + 2 * kv}
        if name == "types":
            return self.config.type_vocab_size
        if name == "labels":
            return self.config.num_labels
        return sizes[name]

    def parameters(self) -> dict[str, tuple[int, ...]]:
        """Every parameter of this model (a tied one once, under its owner's name) with its shape, in the
        model's parameter order; from the config alone."""
        fam, out = self.family, {}
        inner = "" if self.task == "base" else fam.base_prefix + "."
        kept = fam.tasks[self.task]

        def add(key: str, path: str, layer: int | None):
            role, _, kind = key.rpartition(".")
            if kind in ("weight", "bias"):  # one parameter, not a module
                out[path] = tuple(self.size(n) for n in SHAPES[role][: 1 if kind == "bias" else None])
                return
            if key == "lm_head" and self.tied:  # the token embedding
                return
            dims = tuple(self.size(n) for n in SHAPES[key])
            out[path + ".weight"] = dims[::-1] if fam.conv1d and layer is not None and len(dims) == 2 else dims
            bias = fam.biases.get(key, False)
            if bias is True or (bias and getattr(self.config, bias, False)):
                out[path + ".bias"] = dims[:1]

        for key, path in fam.embed.items():
            add(key, inner + path, None)
        for i in range(self.layers):
            for key, path in fam.layer.items():
                add(key, f"{inner}{fam.layer_path.format(i=i)}.{path}", i)
        for key, path in fam.final.items():
            if key in kept:
                add(key, inner + path, None)
        for key, path in fam.heads.items():
            if key in kept:
                add(key, path, None)
        return out

    def slots(self, names: Iterable[str]) -> dict[str, Slot]:
        """Map parameter names to slots; an unknown name is an error, not a silent skip."""
        out = {}
        for name in names:
            slot = self._table.get(name)
            if slot is None:
                raise BequestError(
                    f"parameter {name!r} has no role in the {self.family.name} anatomy; "
                    "the checkpoint does not match its config.json"
                )
            out[name] = slot
        return out

    def names(self, names: Iterable[str]) -> dict[str, str]:
        """Inverse of `slots`: 'layer.3.attn.q.weight' -> this model's parameter name."""
        return {str(slot): name for name, slot in self.slots(names).items()}

    def summary(self) -> dict:
        fam = self.family
        return {
            "family": fam.name,
            "task": self.task,
            "layers": self.layers,
            "hidden": self.hidden,
            "heads": self.heads,
            "kv_heads": self.kv_heads,
            "head_dim": self.head_dim,
            "ffn": self.ffn,
            "vocab": self.vocab,
            "positions": self.usable_positions,
            "norm": f"{fam.norm_position}-norm {fam.norm}, eps {self.eps:g}",
            "tied_embeddings": self.tied,
            "fused_qkv": fam.fused_qkv,
            "conv1d": fam.conv1d,
            "gated_mlp": fam.gated_mlp,
        }


def anatomy(model_or_config, task: str | None = None) -> Anatomy:
    """The anatomy of a model or config; the task comes from `config.architectures` if not given."""
    config = getattr(model_or_config, "config", model_or_config)
    fam = family_of(config)
    if task is None:
        task = task_of(config)
    if task not in fam.tasks:
        raise BequestError(
            f"{fam.name} has no {task} head in bequest; use one of: {', '.join(fam.tasks)}"
        )
    return Anatomy(fam, config, task)


def make_config(
    family: str,
    *,
    layers: int,
    hidden: int,
    heads: int,
    ffn: int | None = None,
    kv_heads: int | None = None,
    vocab: int,
    positions: int = 256,
    **extra,
) -> transformers.PretrainedConfig:
    """A fresh config of `family` in bequest's shape names; `extra` goes to the config as is."""
    import transformers

    if family not in FAMILIES:
        raise BequestError(f"unknown family {family!r}; bequest supports: {', '.join(supported())}")
    fam = FAMILIES[family]
    if hidden % heads:
        raise BequestError(f"--hidden {hidden} is not a multiple of --heads {heads}; pick heads that divide it")
    shape = {
        "layers": layers,
        "hidden": hidden,
        "heads": heads,
        "ffn": ffn or 4 * hidden,
        "vocab": vocab,
        "positions": positions + fam.position_offset,
    }
    if "kv_heads" in fam.config_keys:
        shape["kv_heads"] = kv_heads or heads
        shape["head_dim"] = hidden // heads
        if heads % shape["kv_heads"]:
            raise BequestError(f"--kv-heads {kv_heads} must divide --heads {heads}")
    elif kv_heads not in (None, heads):
        raise BequestError(f"{family} has no grouped KV heads; drop --kv-heads")
    kwargs = {fam.config_keys[k]: v for k, v in shape.items()}
    # Special-token ids come from the tokenizer (pass them in `extra`); a family's defaults (GPT-2's
    # 50256) would point outside a small vocabulary.
    kwargs.update(bos_token_id=None, eos_token_id=None)
    kwargs.update(fam.tiny)
    kwargs.update(extra)
    return getattr(transformers, fam.config_class)(**kwargs)


def build_model(config, task: str):
    """A randomly initialised model of `config` with the `task` head."""
    import transformers

    auto = getattr(transformers, AUTO_CLASSES[task])
    model = auto.from_config(config)
    model.config.architectures = [type(model).__name__]
    return model


def name_labels(config, names: list[str]) -> None:
    """A classifier's config saying its classes by name (id2label, label2id), so `pipeline()` and the
    hub show them instead of LABEL_0, LABEL_1, ..."""
    config.id2label = dict(enumerate(names))
    config.label2id = {name: i for i, name in enumerate(names)}


def label_names(config) -> list[str]:
    """A classifier config's classes in id order."""
    return [config.id2label.get(i, f"LABEL_{i}") for i in range(config.num_labels)]
