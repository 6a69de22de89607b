"""Everything bequest reads from or writes to disk.

- `safetensors`: tensor headers and shards, read without loading or unpickling; single tensors read
  and written at their offsets; sizes like '2GB' and the free-disk check.
- `models`: model and tokenizer loading (checked against the config first), model folders with a
  lineage card.
- `folders`: atomic output folders and the hidden work folder of a run.
- `adapters`: the layouts of a PEFT module folder (peft's, bequest's bottleneck format) and the one
  reader and writer of their configs.
- `hub`: hub ids as model folders (their snapshots in the local Hugging Face cache) and back.
"""

from bequest.io.adapters import is_adapter, read_adapter_config, write_adapter_config
from bequest.io.folders import atomic_dir, check_output, hold, let_go, make_dir, partial_dir
from bequest.io.hub import cached_snapshot, hub_id, model_folder
from bequest.io.models import (
    check_checkpoint, check_model, load_config, load_lm, load_model, load_tokenizer, model_card, read_config, read_lineage,
    reference, save_model, save_recipe, save_tokenizer, write_card, write_model,
)
from bequest.io.safetensors import (
    DTYPES, MARGIN, UNITS, StoredTensor, TensorReader, check_disk, create_file, encode_header, parse_size, pwrite,
    read_header, shard_names, stored_tensors, torch_dtype, weight_files, write_index,
)

__all__ = [
    "DTYPES",
    "MARGIN",
    "UNITS",
    "StoredTensor",
    "TensorReader",
    "atomic_dir",
    "cached_snapshot",
    "check_checkpoint",
    "check_model",
    "check_disk",
    "check_output",
    "hold",
    "hub_id",
    "is_adapter",
    "let_go",
    "make_dir",
    "create_file",
    "encode_header",
    "load_config",
    "load_lm",
    "load_model",
    "load_tokenizer",
    "model_card",
    "model_folder",
    "parse_size",
    "partial_dir",
    "pwrite",
    "read_adapter_config",
    "read_config",
    "read_header",
    "read_lineage",
    "reference",
    "save_model",
    "save_recipe",
    "save_tokenizer",
    "shard_names",
    "stored_tensors",
    "torch_dtype",
    "weight_files",
    "write_adapter_config",
    "write_card",
    "write_index",
    "write_model",
]
