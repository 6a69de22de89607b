"""`bequest export ADAPTER OUT [--base MODEL]`: fold a PEFT module into its base model's weights.

The output is a plain transformers model folder (config, safetensors, tokenizer, a lineage card) that
`AutoModelFor*.from_pretrained` loads with neither bequest nor peft installed, and that computes what
the base carrying the module computes. A module is folded only where the math is exact, and its kind
says where that is (`Kind.unmergeable`, `Kind.merge`): LoRA (W + scale B A) and IA3 (a scaling of a
linear's inputs or outputs) always; a bottleneck adapter only with the identity activation, and only
into writers with a bias; prefix and prompt tuning never. Before anything is written, the base with the
module and the exported model are run on the same tokens, and a change beyond rounding is an error.
"""

from __future__ import annotations

from pathlib import Path

import torch
from pydantic import Field

from bequest.anatomy import anatomy, task_of
from bequest.errors import BequestError
from bequest.grow.probe import probe_ids
from bequest.io import atomic_dir, check_model, check_output, load_model, model_folder, write_model
from bequest.peft import KINDS, attach, read_module
from bequest.recipe import ModelFolder, OutputFields

# Rounding allowance for the exported model's logits against the adapter's, relative to their size:
# folding in fp32 moved them by at most ~2e-6 of it in the tests; far beyond is a wrong fold, not rounding.
TOLERANCE = 1e-4


class ExportRecipe(OutputFields):
    adapter: str = Field(..., description="adapter folder to fold into its base: LoRA, IA3, or a bottleneck adapter "
                         "with the identity activation")
    out: str = Field(..., description="output: a plain transformers model folder")
    base: ModelFolder | None = Field(None, description="base model folder or cached hub id (default: the host the "
                                     "adapter records)")
    seed: int = Field(0, description="seed of the tokens the exported model is checked on")


def export(r: ExportRecipe) -> dict:
    """Fold a PEFT module into its base model's weights and save a plain transformers model."""
    check_output(r.out, r.overwrite)
    module = read_module(r.adapter)
    kind = KINDS[module.kind]
    reason = kind.unmergeable(module.config)
    if reason:
        raise BequestError(f"{r.adapter}: a {module.kind} module cannot be folded into its base's weights: {reason}")
    base = r.base or module.config.get("base_model_name_or_path")
    base = base and model_folder(base)  # a recorded hub id is its snapshot in the local cache
    if not base or not Path(base).is_dir():
        raise BequestError(f"{r.adapter} records {'no base' if not base else f'base {base!r}, not a local folder'}; "
                           "give the base model folder with --base")
    config = check_model(base)
    task = module.host_task(config)
    shape = anatomy(config, task)
    labels = module.num_labels(shape.family)
    if task == "seq_cls" and labels is None and task_of(config) != "seq_cls":
        raise BequestError(f"{r.adapter} saves no classifier head and {base} has none: the exported classifier would "
                           "be untrained; give the classifier it was tuned with as --base")
    host, tokenizer = load_model(base, task, num_labels=labels)
    carrier = attach(host, module).eval()  # refuses a module that does not fit the base, in one line
    ids = torch.as_tensor(probe_ids(config, r.seed)[:1])  # one row: a classifier without a pad token takes no batch
    with torch.no_grad():
        before = carrier(input_ids=ids).logits
        try:
            model = kind.merge(carrier).eval()
        except BequestError as e:
            raise BequestError(f"{r.adapter}: {e}") from None
        after = model(input_ids=ids).logits
    change = (after - before).abs().max().item()
    if not change <= TOLERANCE * max(1.0, before.abs().max().item()):
        raise BequestError(f"internal: the folded {module.kind} module moved the logits by {change:.3g}; please report this")
    with atomic_dir(r.out, r.overwrite) as folder:
        write_model(folder, model, tokenizer, operation="export", parent=str(base), recipe=r.model_dump(exclude={"overwrite"}),
                    lineage={"source": str(r.adapter), "max_abs_logit_change": change})
    print(f"saved {r.out}: the {module.kind} module folded into {base}; max |Δ logits| {change:.2g} against the module on it")
    return {"kind": module.kind, "base": str(base), "max_abs_logit_change": change}

