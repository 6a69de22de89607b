"""Bottleneck adapters (Houlsby et al. 2019; Pfeiffer et al. 2021) for every bequest family.

peft has none, and the `adapters` library pins transformers 4, so bequest keeps a small one. An adapter
maps a block writer's output y to y + up(act(down(y))), before the residual add (and, in post-norm
BERT-likes, before the LayerNorm that follows it): Pfeiffer after the FFN only (`mlp.down`), Houlsby
after attention as well (`attn.o`). `up` starts at zero, so a fresh adapter leaves the host unchanged.

Adapters hang off their writer module as a child named `adapter` (so their parameters travel with the
host through `.to()` and the optimizer) and act through a forward hook. A folder is in bequest's
bottleneck format (docs/bottleneck-format.md; `bequest.io.adapters` reads and writes it): the settings
below in `bottleneck_config.json`, the tensors in `bottleneck_model.safetensors` under the host's
parameter names, the classifier head (trained in full beside the adapters) among them.

On a grown host an adapter's down-projection reads the hidden space and its up-projection writes it;
a new block's adapter starts as a fresh one (random down, zero up).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from torch import nn

from bequest.anatomy import anatomy
from bequest.errors import BequestError
from bequest.io.adapters import BOTTLENECK
from bequest.peft.kind import READ, WRITE, Kind, saved_heads
from bequest.peft.lora import uniform_fan_in
from bequest.recipe import one_line

PEFT_TYPE = BOTTLENECK
STYLES = {"pfeiffer": ("mlp.down",), "houlsby": ("attn.o", "mlp.down")}
# identity makes an adapter linear, y + U(D y + b_d) + b_u, which `merge` folds into its writer.
ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh, "identity": nn.Identity}


class BottleneckConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    peft_type: Literal["BOTTLENECK"] = Field(PEFT_TYPE, description="the kind, in memory (the file says its format instead)")
    style: Literal["pfeiffer", "houlsby"] = Field("pfeiffer", description="pfeiffer: after the FFN; houlsby: after attention and FFN")
    size: int = Field(16, ge=1, description="bottleneck width: the down-projection's outputs")
    nonlinearity: Literal[tuple(ACTIVATIONS)] = Field("relu", description="activation between down and up")
    task_type: str | None = Field("SEQ_CLS", description="peft-style task type: which head the host carries")
    modules_to_save: list[str] = Field(default_factory=list, description="host modules trained in full and saved too (the classifier)")
    base_model_name_or_path: str | None = Field(None, description="the host the adapter was trained on")


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
        p.requires_grad_(trainable and (".adapter." in name or _saved(name, config)))
    return model


def bottleneck_state(model) -> dict[str, torch.Tensor]:
    """The adapters' tensors and the saved head modules', under the model's parameter names."""
    config = model.bottleneck_config
    return {n: p.detach() for n, p in model.named_parameters() if ".adapter." in n or _saved(n, config)}


def _saved(name: str, config: BottleneckConfig) -> bool:
    """Whether parameter `name` is in a module of modules_to_save (named as peft names them: by the
    module's own name, wherever it sits, like BERT's bert.pooler)."""
    return any(part in config.modules_to_save for part in name.split(".")[:-1])


def load_bottleneck(model, folder, *, trainable: bool = False):
    """Attach the adapters saved in `folder`; every tensor must find its place and every place a tensor."""
    from bequest.peft import attach, read_module

    return attach(model, read_module(folder), trainable=trainable)


def remove_bottleneck(model):
    """Detach every adapter: the host is as it was before `add_bottleneck`."""
    for path in _writers(model, model.bottleneck_config.style):
        module = model.get_submodule(path)
        module.adapter.handle.remove()
        del module.adapter
    model.bottleneck_config = None
    return model


class Bottleneck(Kind):
    name, peft_type, order = "bottleneck", PEFT_TYPE, 4
    library = "bequest"  # peft has no bottleneck adapters
    tensors = ("adapter.down.weight", "adapter.down.bias", "adapter.up.weight", "adapter.up.bias")

    def config(self, fam, task_type, s):
        heads = saved_heads(fam, task_type) or []
        return BottleneckConfig(size=s.bottleneck, style=s.style, nonlinearity=s.nonlinearity, task_type=task_type,
                                modules_to_save=heads).model_dump()

    def axes(self, what, shape, out, inp):
        # An adapter reads and writes what its writer outputs (for attn.o and mlp.down: the residual
        # stream); its own units are its own.
        return {"adapter.down.weight": [None, (out, READ)], "adapter.down.bias": [None],
                "adapter.up.weight": [(out, WRITE), None], "adapter.up.bias": [(out, WRITE)]}[what]

    def fresh(self, what, shape, gen):
        return uniform_fan_in(shape, gen) if what == "adapter.down.weight" else torch.zeros(shape)

    def wrap(self, model, config, trainable):
        config = {k: v for k, v in config.items() if k != "inference_mode"}  # `trainable` says it
        try:
            settings = BottleneckConfig(**config)
        except ValidationError as e:
            raise BequestError(one_line(e, "the bottleneck adapter's config")) from None
        return add_bottleneck(model, settings, trainable=trainable)

    def carried(self, model):
        config = getattr(model, "bottleneck_config", None)
        return None if config is None else config.model_dump()

    def state(self, model):
        return bottleneck_state(model)

    def load(self, carrier, tensors):
        params = dict(carrier.named_parameters())
        with torch.no_grad():
            for k, t in tensors.items():
                params[k].copy_(t)

    def unmergeable(self, config):
        if config.get("nonlinearity") == "identity":
            return None
        return (f"its {config.get('nonlinearity')} between down and up is not linear, so no change of the base's weights "
                "computes what it does; keep using the adapter through bequest (bequest.peft.attach), or train it with "
                "--nonlinearity identity")

    @torch.no_grad()
    def merge(self, carrier):
        """Each writer W x + b followed by a linear adapter becomes W' x + b' with M = I + U D:
        W' = M W and b' = M b + U b_d + b_u (the last two terms: the adapter's constant shift)."""
        anat = anatomy(carrier)
        folds = []
        for path in _writers(carrier, carrier.bottleneck_config.style):
            writer = carrier.get_submodule(path)
            down, up = writer.adapter.down, writer.adapter.up
            m = torch.eye(anat.hidden, dtype=torch.float64) + up.weight.double() @ down.weight.double()
            shift = up.weight.double() @ down.bias.double() + up.bias.double()
            if writer.bias is None and shift.any():
                raise BequestError(f"the adapter after {path} adds a constant shift (up of down's bias, plus up's bias) "
                                   f"and {path} has no bias to take it, so it cannot be folded into the base's weights; "
                                   "keep using the adapter through bequest")
            folds.append((writer, m, shift))
        for writer, m, shift in folds:  # every writer checked before the first changes
            w = writer.weight.double()
            writer.weight.copy_(w @ m.T if anat.family.conv1d else m @ w)  # Conv1D stores [in, out]
            if writer.bias is not None:
                writer.bias.copy_(m @ writer.bias.double() + shift)
        return remove_bottleneck(carrier)


KIND = Bottleneck()
