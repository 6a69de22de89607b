"""`bequest upgrade`'s settings, and the paths a source can take onto the successor."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from bequest.recipe import KDFields, ModelFolder, OutputFields, TaskFields, TrainFields, TuningFields, defaults

# How a source starts on NEW. Every start but `fresh` is then tuned with OLD+SOURCE as the teacher.
PATHS = {
    "reuse": "the source unchanged (a full fine-tune: its task delta added to NEW); NEW must have OLD's shape",
    "port": "carried along the growth maps of every `bequest grow` between OLD and NEW (exact on the grown model)",
    "transfer": "mapped into NEW's spaces, measured on text both models read (any shape, shared vocabulary)",
    "distill": "a fresh module of the same kind on NEW, taught by OLD+SOURCE on the task data alone",
    "fresh": "a fresh module of the same kind on NEW, tuned plainly (what users do today; the baseline)",
}
# The path `auto` takes for each relation of NEW to OLD (bequest.lineage).
AUTO = {"same": "reuse", "continued": "reuse", "grown": "port", "unrelated": "transfer"}
Method = Literal[("auto", *PATHS)]


@defaults(alpha=0.5, eval_every=10, save_every=50)
class UpgradeRecipe(TaskFields, TuningFields, KDFields, TrainFields, OutputFields):
    sources: list[str] = Field(
        ..., description="task weights of OLD: peft adapter folders (LoRA, IA3, prefix, prompt), bequest bottleneck "
        "adapters, full fine-tunes"
    )
    out: str = Field(..., description="output folder: one folder per source, and summary.{md,csv,json,png}")
    from_: ModelFolder = Field(..., description="the model the sources were tuned on (OLD): a folder or cached hub id")
    to: ModelFolder = Field(..., description="its successor (NEW): continued, grown or independently trained; a "
                           "folder or cached hub id")
    method: Method = Field("auto", description="path for every source; auto: reuse if continued, port if grown, "
                           "transfer if unrelated")
    data: list[str] = Field(
        default_factory=list,
        description="task data: one embedded task or labelled file for every source, one per source (in order), "
        "or a .yaml file mapping each source to its data (default: the data in each source's recipe.yaml)",
    )
    steps: int = Field(100, ge=0, description="tuning steps per source after the move (0: no tuning)")
    compare_fresh: bool = Field(False, description="also tune a fresh module of the same kind on NEW for the same "
                                "steps, the baseline the summary compares against")
