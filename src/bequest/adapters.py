"""Bottleneck adapters (Houlsby et al. 2019; Pfeiffer et al. 2021) for every bequest family.

peft has none, and the `adapters` library pins transformers 4, so bequest keeps a small one. An adapter
maps a block writer's output y to y + up(act(down(y))), before the residual add (and, in post-norm
BERT-likes, before the LayerNorm that follows it): Pfeiffer after the FFN only (`mlp.down`), Houlsby
after attention as well (`attn.o`). `up` starts at zero, so a fresh adapter leaves the host unchanged.

Adapters hang off their writer module as a child named `adapter` (so their parameters travel with the
host through `.to()` and the optimizer) and act through a forward hook. A folder holds
`adapter_config.json` and `adapter_model.safetensors`, as peft's do; the classifier head, trained in
full beside the adapters, is saved with them under its own parameter names.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from safetensors.torch import load_file, save_file
from torch import nn

from bequest.anatomy import anatomy
from bequest.errors import BequestError

PEFT_TYPE = "BOTTLENECK"
STYLES = {"pfeiffer": ("mlp.down",), "houlsby": ("attn.o", "mlp.down")}
ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh}
CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"


class BottleneckConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    peft_type: Literal["BOTTLENECK"] = Field(PEFT_TYPE, description="marks the folder as a bequest bottleneck adapter")
    style: Literal["pfeiffer", "houlsby"] = Field("pfeiffer", description="pfeiffer: after the FFN; houlsby: after attention and FFN")
    size: int = Field(16, ge=1, description="bottleneck width: the down-projection's outputs")
    nonlinearity: Literal[tuple(ACTIVATIONS)] = Field("relu", description="activation between down and up")
    task_type: str | None = Field("SEQ_CLS", description="peft-style task type: which head the host carries")
    modules_to_save: list[str] = Field(default_factory=list, description="host modules trained in full and saved too (the classifier)")
    base_model_name_or_path: str | None = Field(None, description="the host the adapter was trained on")
    inference_mode: bool = Field(True, description="as peft: frozen once saved")


class Adapter(nn.Module):
    def __init__(self, width: int, size: int, nonlinearity: str):
        super().__init__()
        self.down = nn.Linear(width, size)
        self.act = ACTIVATIONS[nonlinearity]()
        self.up = nn.Linear(size, width)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return y + self.up(self.act(self.down(y)))

    def hook(self, module, args, output):
        return self(output)


def _writers(model, style: str) -> list[str]:
    """Module paths of the writers an adapter follows, block by block."""
    anat = anatomy(model)
    names = anat.names(n for n, _ in model.named_parameters() if ".adapter." not in n)
    return [names[f"layer.{i}.{role}.weight"].rpartition(".")[0] for i in range(anat.layers) for role in STYLES[style]]


def head_modules(model) -> list[str]:
    """The top modules of a classification head (trained in full beside any PEFT module)."""
    fam = anatomy(model).family
    return sorted({path.split(".")[0] for role, path in fam.heads.items() if role.startswith("classifier")})


def add_bottleneck(model, config: BottleneckConfig, *, trainable: bool = True):
    """Attach fresh adapters to `model` in place; with `trainable`, freeze everything else but the head."""
    if getattr(model, "bottleneck_config", None) is not None:
        raise BequestError("the model already carries bottleneck adapters; load the host afresh")
    anat = anatomy(model)
    like = next(model.parameters())
    for path in _writers(model, config.style):
        module = model.get_submodule(path)
        adapter = Adapter(anat.hidden, config.size, config.nonlinearity).to(like.device, like.dtype)
        module.add_module("adapter", adapter)
        adapter.handle = module.register_forward_hook(adapter.hook)
    model.bottleneck_config = config
    for name, p in model.named_parameters():
        p.requires_grad_(trainable and (".adapter." in name or name.split(".")[0] in config.modules_to_save))
    return model


def bottleneck_state(model) -> dict[str, torch.Tensor]:
    """The adapters' tensors and the saved head modules', under the model's parameter names."""
    keep = tuple(f"{m}." for m in model.bottleneck_config.modules_to_save)
    return {n: p.detach() for n, p in model.named_parameters() if ".adapter." in n or n.startswith(keep)}


def save_bottleneck(model, folder: str | Path) -> None:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / CONFIG).write_text(model.bottleneck_config.model_dump_json(indent=1))
    save_file(bottleneck_state(model), str(folder / WEIGHTS))


def read_config(folder: str | Path) -> BottleneckConfig:
    try:
        return BottleneckConfig(**json.loads((Path(folder) / CONFIG).read_text()))
    except (OSError, ValueError) as e:
        raise BequestError(f"{folder}: not a bottleneck adapter folder ({str(e).splitlines()[0]})") from None


def load_bottleneck(model, folder: str | Path, *, trainable: bool = False):
    """Attach the adapters saved in `folder`; every tensor must find its place and every place a tensor."""
    add_bottleneck(model, read_config(folder), trainable=trainable)
    tensors = load_file(str(Path(folder) / WEIGHTS))
    params = dict(model.named_parameters())
    want = bottleneck_state(model)
    extra, missing = sorted(set(tensors) - set(want)), sorted(set(want) - set(tensors))
    if extra or missing:
        what = f"tensor {extra[0]} has no place in the host" if extra else f"the host's {missing[0]} has no tensor"
        raise BequestError(f"{folder}: {what} ({len(extra)} unplaced, {len(missing)} missing); port it with `bequest port`")
    with torch.no_grad():
        for name, t in tensors.items():
            if params[name].shape != t.shape:
                raise BequestError(
                    f"{folder}: {name} is {list(t.shape)} but the host needs {list(params[name].shape)}; "
                    "port it with `bequest port`"
                )
            params[name].copy_(t)
    return model


def remove_bottleneck(model):
    """Detach every adapter: the host is as it was before `add_bottleneck`."""
    for path in _writers(model, model.bottleneck_config.style):
        module = model.get_submodule(path)
        module.adapter.handle.remove()
        del module.adapter
    model.bottleneck_config = None
    return model
