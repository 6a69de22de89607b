"""Portability of PEFT modules between host models (METHODS.md section 4; Sabry & Belz, EACL 2024).

- `modules`: LoRA, IA3, prefix and prompt tuning (peft) and bottleneck adapters (`bequest.adapters`)
  behind one interface: read, write, attach (strictly), build fresh, list a host's expected tensors.
- `follow`: grow a module along a grown host's index maps, exactly where growth itself is exact.
- `command`: `bequest port`, and the two baselines (scratch, sampled).
- `study`: `bequest study port`, the grid of PEFT type x host pair x init x seed, resumable.
"""

_EXPORTS = {
    "bequest.port.command": ("PortRecipe", "port", "port_module", "sampled"),
    "bequest.port.modules": ("KINDS", "Module", "attach", "module_of", "new_config", "read_module", "with_module",
                             "write_module"),
}


def __getattr__(name: str):
    # Imported on first use: the recipe field groups read KINDS without loading the port verb.
    import importlib

    for module, names in _EXPORTS.items():
        if name in names:
            return getattr(importlib.import_module(module), name)
    raise AttributeError(name)
