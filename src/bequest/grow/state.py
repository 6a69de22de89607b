"""Role-keyed state: a model's tensors under their anatomy roles, in one canonical layout.

Every operator sees `{"layer.3.attn.q.weight": tensor}` with linear weights as [out, in] and the fused
QKV split into `attn.q/k/v`, whatever the family stores. Only this module converts back and forth.
(torch is imported where tensors are: keys and configs, all that planning a growth needs, go without.)
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING

from bequest.anatomy import Anatomy, anatomy, build_model
from bequest.errors import BequestError

if TYPE_CHECKING:
    import torch

QKV = ("attn.q", "attn.k", "attn.v")  # the roles a fused attn.qkv tensor is split into


def split_key(key: str) -> tuple[int | None, str, str]:
    """'layer.3.attn.q.weight' -> (3, 'attn.q', 'weight'); 'final_norm.bias' -> (None, 'final_norm', 'bias')."""
    layer = None
    if key.startswith("layer."):
        _, i, key = key.split(".", 2)
        layer = int(i)
    role, _, kind = key.rpartition(".")
    return layer, role, kind


def join_key(layer: int | None, role: str, kind: str) -> str:
    return f"{role}.{kind}" if layer is None else f"layer.{layer}.{role}.{kind}"


def to_roles(named: dict[str, torch.Tensor], anat: Anatomy) -> dict[str, torch.Tensor]:
    """HF-named tensors -> canonical role state (fp32 CPU copies; the caller's tensors are untouched)."""
    import torch

    fam = anat.family
    state = {}
    for name, slot in anat.slots(named).items():
        t = named[name].detach().to("cpu", torch.float32, copy=True)
        # Conv1D keeps [in, out]; only block linears are Conv1D (embeddings and heads are not).
        if fam.conv1d and slot.layer is not None and t.ndim == 2:
            t = t.t().contiguous()
        if slot.role == "attn.qkv":
            for role, part in zip(QKV, t.chunk(3, dim=0)):
                state[join_key(slot.layer, role, slot.kind)] = part.clone()
        else:
            state[str(slot)] = t
    return state


def from_roles(state: dict[str, torch.Tensor], anat: Anatomy, names) -> dict[str, torch.Tensor]:
    """Canonical role state -> tensors under the HF `names` of a model with anatomy `anat`."""
    import torch

    fam = anat.family
    out = {}
    for key, name in anat.names(names).items():
        layer, role, kind = split_key(key)
        if role == "attn.qkv":
            t = torch.cat([state[join_key(layer, r, kind)] for r in QKV])
        else:
            t = state[key]
        if fam.conv1d and layer is not None and t.ndim == 2:
            t = t.t().contiguous()
        out[name] = t
    return out


def grown_config(anat: Anatomy, shape: dict, eps_factor: float, sources: list[int]):
    """The source config with new shape keys; per-layer lists follow each new layer's source layer."""
    fam = anat.family
    config = copy.deepcopy(anat.config)
    for key, value in shape.items():
        if key in fam.config_keys:
            setattr(config, fam.config_keys[key], value)
    setattr(config, fam.eps_key, anat.eps * eps_factor)
    types = getattr(config, "layer_types", None)
    if isinstance(types, list) and len(types) == anat.layers:
        config.layer_types = [types[s] for s in sources]
    return config


def build_grown(anat: Anatomy, config, state: dict[str, torch.Tensor], like: torch.Tensor):
    """A fresh model of `config` with the role state copied in, on the device and in the dtype of
    `like` (a source parameter); every parameter must be covered."""
    import torch

    model = build_model(config, anat.task)
    params = dict(model.named_parameters())
    named = from_roles(state, anatomy(model, anat.task), params)
    missing = set(params) - set(named)
    if missing:  # an operator forgot a role: a bug, never a user error
        raise BequestError(f"internal: grown state lacks {sorted(missing)[0]}; please report this")
    with torch.no_grad():
        for name, p in params.items():
            if tuple(p.shape) != tuple(named[name].shape):
                raise BequestError(
                    f"internal: grown {name} has shape {tuple(named[name].shape)}, config implies {tuple(p.shape)}"
                )
            p.copy_(named[name])
    return model.to(device=like.device, dtype=like.dtype)
