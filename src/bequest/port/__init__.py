"""Portability of PEFT modules between host models (METHODS.md section 4; Sabry & Belz, EACL 2024).

- `modules`: LoRA, IA3, prefix and prompt tuning (peft) and bottleneck adapters (`bequest.adapters`)
  behind one interface: read, write, attach (strictly), build fresh, list a host's expected tensors.
- `follow`: grow a module along a grown host's index maps, exactly where growth itself is exact.
- `command`: `bequest port`, and the two baselines (scratch, sampled).
- `study`: `bequest study port`, the grid of PEFT type x host pair x init x seed, resumable.
"""

from bequest.port.command import PortRecipe, port, port_module, sampled
from bequest.port.modules import KINDS, Module, attach, load_host, module_of, new_config, read_module, with_module, write_module

__all__ = [
    "KINDS",
    "Module",
    "PortRecipe",
    "attach",
    "load_host",
    "module_of",
    "new_config",
    "port",
    "port_module",
    "read_module",
    "sampled",
    "with_module",
    "write_module",
]
