"""Everything bequest reads from or writes to disk.

- `safetensors`: tensor headers and shards, read without loading or unpickling.
- `models`: model and tokenizer loading (checked against the config first), model folders with a
  lineage card.
- `folders`: atomic output folders and the hidden work folder of a run.
"""

from bequest.io.folders import atomic_dir, check_output, partial_dir, release
from bequest.io.models import (
    check_checkpoint, load_config, load_lm, load_model, load_tokenizer, model_card, read_lineage, save_model, save_recipe,
    write_model,
)
from bequest.io.safetensors import read_header, weight_files

__all__ = [
    "atomic_dir",
    "check_checkpoint",
    "check_output",
    "load_config",
    "load_lm",
    "load_model",
    "load_tokenizer",
    "model_card",
    "partial_dir",
    "read_header",
    "read_lineage",
    "release",
    "save_model",
    "save_recipe",
    "weight_files",
    "write_model",
]
