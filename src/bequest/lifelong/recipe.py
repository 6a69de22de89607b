"""The `bequest lifelong` recipe, and what each method does."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from bequest import data
from bequest.lifelong.schedule import parse_schedule
from bequest.recipe import (
    BlockFields, CausalFamily, FileFields, GrowFields, OutputFields, ShapeFields, TrainFields, defaults,
)

# What each method does at every stage after the first.
METHODS = {
    "elle": {"grow": True, "recover": True, "replay": True, "prompts": True},
    "naive": {"grow": False, "recover": False, "replay": False, "prompts": False},
    "replay": {"grow": False, "recover": False, "replay": True, "prompts": False},
    "grow": {"grow": True, "recover": False, "replay": False, "prompts": False},
}
Method = Literal[tuple(METHODS)]


@defaults(seq_len=64, eval_blocks=32)
class LifelongRecipe(ShapeFields, GrowFields, BlockFields, FileFields, TrainFields, OutputFields):
    out: str = Field(..., description="output folder: one model folder per stage, metrics.json, ap.png, domains.png")
    family: CausalFamily = Field("gpt2", description="model family (a causal LM: the stream is pre-trained left to right)")
    steps: int = Field(200, ge=1, description="optimizer steps of training on each new domain")
    domains: str = Field(
        ",".join(data.DOMAINS),
        description="the stream, comma-separated: embedded corpus domains and/or paths to text/jsonl/csv/parquet",
    )
    method: Method = Field("elle", description="elle, or a baseline: naive, replay (replay only), grow (growth only)")
    base: str | None = Field(None, description="start from this causal LM folder (default: a fresh model, shape below)")
    grow_schedule: str = Field(
        "hidden+32,layers+1",
        description="growth before each new domain: 'hidden+32,layers+1' every time, or one per growth separated "
        "by ';' (the last repeats); 'key=N' sets a size; keys: hidden, heads, kv_heads, ffn, layers",
    )
    warmup_steps: int = Field(
        10, ge=0, description="function-recovering warm-up: steps on memory of earlier domains after growth (elle)"
    )
    replay_fraction: float = Field(
        0.1, ge=0.0, lt=1.0, description="share of every batch drawn from memory (elle, replay)"
    )
    memory_size: int = Field(64, ge=1, description="training blocks kept in memory per domain")
    prompts: bool = Field(True, description="learn a domain prompt token per domain (elle only)")
    budget_flops: float | None = Field(
        None, gt=0, description="training FLOPs per domain (warm-up included); sets each stage's steps over --steps"
    )

    @field_validator("grow_schedule")
    @classmethod
    def _check_schedule(cls, value):
        parse_schedule(value)
        return value
