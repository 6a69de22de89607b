"""What a PEFT kind is: everything bequest knows about one method, behind one interface.

A kind module (`lora.py`, `ia3.py`, ...) defines a subclass of `Kind` and registers one instance as
`KIND`; `bequest.peft` finds it there, so adding a kind is one new file. By default a kind is one of
peft's methods (its module built and read through the peft library); a kind bequest implements
itself (`bottleneck`) overrides the host methods below.

Porting speaks in the host's unit spaces (`bequest.port.follow`): each axis of a tensor READS a space
(copies divide by their count), WRITES it (copies copy) or SCALES it (copies copy, new units get 1).
"""

from __future__ import annotations

import json
import re
import warnings

import torch

from bequest.anatomy import TASK_ROLES
from bequest.errors import BequestError

READ, WRITE, SCALE = "read", "write", "scale"


def _json(value):
    return sorted(value) if isinstance(value, set) else str(value)


def as_dict(config) -> dict:
    """A peft config object as adapter_config.json holds it (sets as sorted lists, enums as names)."""
    return json.loads(json.dumps(config if isinstance(config, dict) else config.to_dict(), default=_json))


def head_modules(fam) -> list[str]:
    """The top modules of the family's classification head: the classifier and, for BERT, the pooler it
    reads (which a masked-LM checkpoint lacks, so it starts fresh). Trained in full beside any PEFT
    module and saved with it (peft's modules_to_save), so every loader, plain peft too, gets them back."""
    paths = {**fam.final, **fam.heads}
    return sorted({paths[r].split(".")[0] for r in fam.tasks.get("seq_cls", ()) if r in TASK_ROLES and r in paths})


def saved_heads(fam, task_type: str | None) -> list[str] | None:
    """modules_to_save for a module of this task type: the head's modules for a classifier (peft would
    add the classifier alone), none otherwise."""
    return head_modules(fam) if task_type == "SEQ_CLS" else None


def target_regex(fam, roles) -> str:
    """A peft target regex naming exactly these roles' modules in every block (peft's suffix matching
    would take BERT's attention.output.dense along when asked for output.dense)."""
    block = re.escape(fam.layer_path).replace(r"\{i\}", r"\d+")
    names = "|".join(re.escape(fam.layer[r]) for r in roles if r in fam.layer)
    return rf"(.*\.)?{block}\.({names})"


class Kind:
    name: str  # bequest's name: --peft, study types, tables
    peft_type: str  # adapter_config.json's peft_type
    order: int  # place in listings (study grids and tables)
    library: str = "peft"  # what loads its folders (a model card's library_name)
    host_fields: tuple[str, ...] = ()  # config fields the host's shape fills in
    takes_positions: bool = False  # puts virtual tokens before the text (they take sequence positions)
    tensors: tuple[str, ...] = ()  # names of its tensors on a host module (lora_A.weight: ...)
    query_rows: tuple[str, ...] = ()  # of those, the ones writing queries into fused qkv outputs
    # Its prompt_embeddings are every block's keys and values for its virtual tokens,
    # [tokens, layers x (key, value) x KV heads x head_dim] (prefix tuning), not input embeddings.
    virtual_kv: bool = False

    # ------------------------------------------------------------ a fresh module

    def config(self, fam, task_type: str | None, s) -> dict:
        """A fresh module's adapter_config.json on a host of family `fam`; `s` carries `PeftFields`."""
        raise NotImplementedError

    def skeleton(self, config: dict) -> dict:
        """The config a weightless (meta) host takes: inits that read real weights replaced."""
        return config

    # ------------------------------------------------------------ porting along growth maps

    def axes(self, what: str, shape: tuple, out: tuple, inp: tuple) -> list:
        """Per dimension of its tensor `what` on a linear writing spaces `out` and reading `inp`:
        None or (space names, READ/WRITE/SCALE)."""
        raise NotImplementedError(f"{self.name} has no tensors on host modules")

    def free_axes(self, key: str) -> list | None:
        """The axes of a tensor on no host module and no block (None: not one of this kind's)."""
        return None

    def grow(self, key: str, t: torch.Tensor, maps: dict) -> torch.Tensor | None:
        """A tensor the kind carries along the growth maps itself (None: follow its axes)."""
        return None

    def fresh(self, what: str, shape: tuple, gen: torch.Generator) -> torch.Tensor:
        """Its tensor `what` in a new block, as a fresh module would hold it."""
        return torch.zeros(shape)

    # ------------------------------------------------------------ on a host (peft's by default)

    def wrap(self, model, config: dict, trainable: bool):
        """`model` carrying a fresh module of `config` (already cleaned of saved-only fields)."""
        from peft import PeftConfig, get_peft_model

        config = {k: None if k in self.host_fields else v for k, v in config.items()}
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # peft's notes on Conv1D layouts and unused heads are not news
                return get_peft_model(model, PeftConfig.from_peft_type(**config))
        except (ValueError, TypeError) as e:  # e.g. target_modules that name nothing in this host
            reason = str(e).strip().splitlines()[0][:200]
            raise BequestError(f"the {self.name} module's config does not fit this host ({reason}); "
                               "check its target_modules or port it with `bequest port`") from None

    def carried(self, model) -> dict | None:
        """The config of this kind's module that `model` carries (None: it carries none)."""
        cfg = (getattr(model, "peft_config", None) or {}).get("default")
        if cfg is None or cfg.peft_type != self.peft_type:
            return None
        config = as_dict({**cfg.to_dict(), "inference_mode": True})
        if config.get("modules_to_save"):
            # peft adds its classifier names to the list each time a SEQ_CLS module is wrapped, even when
            # they are there: read back once each, a module ported and recycled keeps the list it had.
            config["modules_to_save"] = list(dict.fromkeys(config["modules_to_save"]))
        return config

    def state(self, model) -> dict[str, torch.Tensor]:
        """The carried module's tensors, as they are saved."""
        from peft import get_peft_model_state_dict

        return get_peft_model_state_dict(model)

    def load(self, carrier, tensors: dict[str, torch.Tensor]) -> None:
        """Fill a carrier's module with `tensors` (each already known to have its place)."""
        from peft import set_peft_model_state_dict

        result = set_peft_model_state_dict(carrier, tensors)
        # Every tensor has a place; peft must agree (prompt encoders load on their own).
        left = [k for k in result.unexpected_keys if k != "prompt_embeddings"]
        if left:
            raise BequestError(f"internal: peft left {left[0]} unloaded; please report this")

    # ------------------------------------------------------------ folded into the host's weights

    def unmergeable(self, config: dict) -> str | None:
        """Why a module of `config` cannot be folded into its host's weights, and what to do instead
        (None: `merge` folds it)."""
        return None

    def merge(self, carrier):
        """The host of `carrier` with the module folded into its weights and the saved head modules in
        place: a plain transformers model computing what the carrier computes. The carrier is used up."""
        from peft.utils import ModulesToSaveWrapper

        # The saved head goes in first, by hand: peft's IA3 unloading trips over a head with no weight of
        # its own (RoBERTa's classifier), LoRA's does not.
        for name, wrapper in [(n, m) for n, m in carrier.named_modules() if isinstance(m, ModulesToSaveWrapper)]:
            parent, _, child = name.rpartition(".")
            head = wrapper.unload_and_optionally_merge_module(merge=True, safe_merge=True, adapter_names=None)
            setattr(carrier.get_submodule(parent), child, head)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return carrier.merge_and_unload(safe_merge=True)
        except ValueError as e:  # e.g. safe_merge finding NaNs in the merged weights
            raise BequestError(f"peft cannot fold it into the base's weights ({str(e).splitlines()[0][:200]})") from None


class PromptLearning(Kind):
    """peft's prompt-learning methods: virtual tokens before the text, and a config that records its
    host's shape (every host refills those fields from its own config)."""

    host_fields = ("num_layers", "token_dim", "num_attention_heads", "encoder_hidden_size")
    takes_positions = True

    def unmergeable(self, config):
        return (f"its {config.get('num_virtual_tokens')} virtual tokens are extra positions the model attends to, not "
                "a change of any weight; keep loading it as an adapter with peft's PeftModel")
