"""The `bequest lifelong` recipe, and what each method does."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from bequest.data import corpus as embedded
from bequest.grow.spec import parse_schedule
from bequest.recipe import (
    BlockFields, CausalFamily, CorpusChoice, FileFields, GrowFields, ModelFolder, OutputFields, ShapeFields, TrainFields,
    defaults,
)

# What each method does at every stage after the first; `rewarm` sets the learning-rate schedule of every stage.
METHODS = {
    "elle": {"grow": True, "recover": True, "replay": True, "prompts": True, "rewarm": False},
    "naive": {"grow": False, "recover": False, "replay": False, "prompts": False, "rewarm": False},
    "replay": {"grow": False, "recover": False, "replay": True, "prompts": False, "rewarm": False},
    "grow": {"grow": True, "recover": False, "replay": False, "prompts": False, "rewarm": False},
    "rewarm": {"grow": False, "recover": False, "replay": True, "prompts": False, "rewarm": True},
}
Method = Literal[tuple(METHODS)]


@defaults(seq_len=64, eval_blocks=32)
class LifelongRecipe(ShapeFields, GrowFields, BlockFields, FileFields, TrainFields, OutputFields, CorpusChoice):
    out: str = Field(..., description="output folder: one model folder per stage, metrics.json, ap.png, domains.png")
    family: CausalFamily = Field("gpt2", description="model family (a causal LM: the stream is pre-trained left to right)")
    steps: int = Field(200, ge=1, description="optimizer steps of training on each new domain")
    corpus: Literal[embedded.CORPORA] = Field(
        "default", description="the embedded corpus whose domains --domains names: 'default' (stdlib) or 'packages' "
        "(docstrings of the installed packages, a domain each; built once and cached)",
    )
    domains: str | None = Field(
        None, description="the stream, comma-separated: domains of --corpus ('a+b' trains on two as one) and/or paths to "
        "text/jsonl/csv/parquet (default: every domain of --corpus)",
    )
    method: Method = Field(
        "elle", description="elle, or a baseline: naive, replay (replay only), grow (growth only), rewarm (replay, "
        "and a learning rate re-warmed from --lr-floor and re-decayed to it at every domain)",
    )
    base: ModelFolder | None = Field(None, description="start from this causal LM folder or cached hub id (default: a "
                                  "fresh model, shape below)")
    grow_schedule: str = Field(
        "hidden+32,layers+1",
        description="growth before each new domain: 'hidden+32,layers+1' every time, or one per growth separated "
        "by ';' (the last repeats); 'key*N' multiplies a size, 'key=N' sets it; keys: hidden, heads, kv_heads, ffn, "
        "layers",
    )
    warmup_steps: int = Field(
        10, ge=0, description="function-recovering warm-up: steps on memory of earlier domains after growth (elle)"
    )
    replay_fraction: float = Field(
        0.1, ge=0.0, lt=1.0, description="share of every batch drawn from memory (elle, replay, rewarm)"
    )
    lr_floor: float = Field(
        0.1, ge=0.0, le=1.0, description="rewarm: every stage re-warms from lr_floor x --lr to --lr over --warmup steps, "
        "then decays back to lr_floor x --lr by its last step",
    )
    memory_size: int = Field(64, ge=1, description="training blocks kept in memory per domain")
    prompts: bool = Field(True, description="learn a domain prompt token per domain (elle only)")
    budget_flops: float | None = Field(
        None, gt=0, description="training FLOPs per domain (warm-up included); sets each stage's steps over --steps"
    )

    def stream(self) -> list[str]:
        """The domains in order: --domains, or every domain of --corpus."""
        given = self.domains if self.domains is not None else ",".join(embedded.domains(self.corpus))
        return [s.strip() for s in given.split(",") if s.strip()]

    def corpus_domains(self) -> list[str] | None:
        return [d for s in self.stream() for d in embedded.named_domains(s, self.corpus) or ()]

    @field_validator("grow_schedule")
    @classmethod
    def _check_schedule(cls, value):
        parse_schedule(value)
        return value
