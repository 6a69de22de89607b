"""`bequest port --adapter DIR --to HOST OUT`: carry a PEFT module trained on one host onto another.

Three cases, decided from shapes alone: the module fits HOST as it is (it loads unchanged; every
tensor must find its place); HOST was grown by `bequest grow` from a host the module fits (the module
grows along HOST's growth maps, found in HOST's lineage); or neither (an error naming the mismatch).
The paper's two baselines replace the ported tensors: `scratch` (a fresh module of the same config)
and `sampled` (each tensor redrawn i.i.d. from N(its mean, its std)).
"""

from __future__ import annotations

import json

from pydantic import Field

from bequest.io import atomic_dir, check_output, load_config
from bequest.peft import read_module, write_adapter
from bequest.port.carry import Init, port_module
from bequest.recipe import ModelFolder, OutputFields


class PortRecipe(OutputFields):
    adapter: str = Field(..., description="PEFT module folder: peft's (LoRA, IA3, prefix, prompt) or a bequest bottleneck adapter")
    to: ModelFolder = Field(..., description="host model folder (or cached hub id) to port the module onto")
    out: str = Field(..., description="output module folder")
    init: Init = Field(
        "ported",
        description="ported: the module carried over; scratch: a fresh module of the same config on the host; "
        "sampled: every ported tensor redrawn i.i.d. from N(its mean, its std) (the last two are the paper's baselines)",
    )
    seed: int = Field(0, description="seed for new blocks' fresh module, the scratch module and the sampled tensors")


def port(r: PortRecipe) -> dict:
    """Port a PEFT module onto another host: as is, or grown along the host's growth maps."""
    check_output(r.out, r.overwrite)
    module = read_module(r.adapter)
    ported, report = port_module(module, r.to, init=r.init, seed=r.seed)
    report["source"] = str(r.adapter)
    with atomic_dir(r.out, r.overwrite) as folder:
        write_adapter(folder, ported, load_config(r.to), operation="port", parent=r.to,
                      recipe=r.model_dump(exclude={"overwrite"}), lineage={"source": str(r.adapter)})
        (folder / "port.json").write_text(json.dumps(report, indent=1))
    n = report["tensors"]
    how = (f"all {n['total']} tensors matched" if report["mode"] == "same-shape"
           else f"grown {report['grown_from']} -> {report['host_shape']}: {n['grown']} grown, {n['fresh']} fresh, "
                f"{n['matched']} unchanged of {n['total']}")
    print(f"saved {r.out}: {module.kind} module, {how}; init {r.init}")
    return report
