"""Portability of PEFT modules between host models (docs/methods.md, section 4; Sabry & Belz, EACL 2024).

The modules themselves (read, write, attach, build fresh, one file per kind) are `bequest.peft`'s.

- `follow`: grow a module along a grown host's index maps, exactly where growth itself is exact.
- `carry`: a module onto a host, as is or along the maps, or one of the two baselines (scratch, sampled).
- `command`: `bequest port`.
- `study`: `bequest study port`, the grid of PEFT type x host pair x init x seed, resumable.
- `report`: the study's tables, verdicts, plot and report.md.
"""

from bequest.port.carry import port_module, sampled

__all__ = ["port_module", "sampled"]
