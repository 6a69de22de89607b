"""The user's own local data: .txt, .jsonl/.json, .csv and .parquet files.

`path` is one file or a directory of files in one format. In a directory, files named
like validation/valid/val/dev/eval hold the validation split (test files do when there is
none of those, and are left out otherwise), all others the train split. With no such
file, or for a single file, rows go to validation by a stable hash of their text, so the
split is the same on every run and machine and a repeated text never straddles both.

Returned datasets have the columns `text` (and `label`) only. Labels are ids into
sorted label names, stored as a `datasets.ClassLabel`: `ds.features["label"].names`
gives the names, as for the built-in tasks.
"""

from __future__ import annotations

import re
from contextlib import contextmanager
from pathlib import Path

from bequest.data.cache import cache_root
from bequest.data.corpus import SPLITS, check_split, stable_fraction
from bequest.errors import BequestError

BUILDERS = {".txt": "text", ".text": "text", ".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
VALIDATION_WORDS = {"validation", "valid", "val", "dev", "eval"}
BATCH = 10_000


def _role(file: Path) -> str:
    words = set(re.split(r"[^a-z0-9]+", file.stem.lower()))
    return "validation" if words & VALIDATION_WORDS else "test" if "test" in words else "train"


def _find(path: str | Path) -> tuple[str, dict[str, list[Path]]]:
    """The datasets builder name and the files of each split (validation may be empty)."""
    path = Path(path).expanduser()
    if not path.exists():
        raise BequestError(f"{path} does not exist; pass a data file or a directory of them")
    if path.is_file():
        files = [path]
    else:
        hidden = lambda f: any(part.startswith(".") for part in f.relative_to(path).parts)  # noqa: E731
        files = sorted(f for f in path.rglob("*") if f.is_file() and f.suffix.lower() in BUILDERS and not hidden(f))
        if not files:
            raise BequestError(f"{path} holds no data files; add {', '.join(BUILDERS)} files")
    builders = {BUILDERS.get(f.suffix.lower()) for f in files}
    if None in builders:
        raise BequestError(f"{path} has an unsupported extension; use one of {', '.join(BUILDERS)}")
    if len(builders) > 1:
        raise BequestError(f"{path} mixes formats ({', '.join(sorted(builders))}); keep one format per directory")
    for f in files:
        if f.stat().st_size == 0:
            raise BequestError(f"{f} is empty; add data to it or remove it")
    if len(files) == 1:  # a lone file is all the data, whatever its name
        return builders.pop(), {"train": files, "validation": []}
    roles = {f: _role(f) for f in files}
    validation = [f for f in files if roles[f] == "validation"] or [f for f in files if roles[f] == "test"]
    train = [f for f in files if roles[f] == "train"]
    if not train:
        raise BequestError(f"{path} has validation files but no training files; add e.g. train{files[0].suffix}")
    return builders.pop(), {"train": train, "validation": validation}


@contextmanager
def _quiet():
    """No progress bars from datasets for the few seconds we use it."""
    import datasets

    was_quiet = datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if not was_quiet:
            datasets.enable_progress_bars()


def _load(builder: str, files: list[Path]):
    import datasets

    # Packaged builders with local files never go online; keep their Arrow cache with ours.
    cache = str(cache_root() / "datasets")
    try:
        with _quiet():
            return datasets.load_dataset(builder, data_files=[str(f) for f in files], split="train", cache_dir=cache)
    except datasets.exceptions.DatasetGenerationError as e:
        cause = (str(e.__cause__ or e).strip().splitlines() or ["unreadable"])[0]
        raise BequestError(f"could not read {', '.join(map(str, files))}: {cause}") from e


def _check_column(ds, column: str, files: list[Path], what: str) -> None:
    if column not in ds.column_names:
        raise BequestError(
            f"{files[0]} has no column {column!r} (it has: {', '.join(ds.column_names)}); choose one with {what}"
        )


def _rows(ds, text_column: str, split: str, fraction: float | None) -> list[int]:
    """Indices of the rows with text that belong to `split` (`fraction` None: all of them)."""
    keep, i = [], 0
    for batch in ds.select_columns([text_column]).iter(batch_size=BATCH):
        for text in batch[text_column]:
            if isinstance(text, str) and text.strip():
                if fraction is None or (stable_fraction(text) < fraction) == (split == "validation"):
                    keep.append(i)
            i += 1
    return keep


def _split(path, split: str, text_column: str, fraction: float, label_column: str | None):
    """Both splits' datasets (text column checked) and the row indices of `split`."""
    check_split(split)
    if not 0 < fraction < 1:
        raise BequestError(f"--validation-fraction must be between 0 and 1, not {fraction}")
    builder, files = _find(path)
    if builder == "text" and label_column is not None:
        raise BequestError(f"{path}: .txt files hold no labels; use .jsonl, .csv or .parquet with a label column")
    text_column = "text" if builder == "text" else text_column  # .txt files have one column
    loaded = {}
    for sp in SPLITS:
        if files[sp]:
            ds = loaded[sp] = _load(builder, files[sp])
            _check_column(ds, text_column, files[sp], "--text-column")
            if label_column is not None:
                _check_column(ds, label_column, files[sp], "--label-column")
            if getattr(ds.features[text_column], "dtype", None) not in ("string", "large_string"):
                raise BequestError(f"column {text_column!r} of {files[sp][0]} is not text; choose one with --text-column")
    own_file = bool(files["validation"])
    source = loaded[split] if own_file else loaded["train"]
    rows = _rows(source, text_column, split, None if own_file else fraction)
    if not rows:
        fix = "raise" if split == "validation" else "lower"
        raise BequestError(f"no {split} rows with text in {path}; add data or {fix} --validation-fraction")
    return loaded, source, text_column, rows


def load_text_files(
    path: str | Path, split: str = "train", text_column: str = "text", validation_fraction: float = 0.1
):
    """Unlabeled text for language modelling: a `datasets.Dataset` with one column, text."""
    import datasets

    _, source, text_column, rows = _split(path, split, text_column, validation_fraction, None)
    texts = source.select(rows).select_columns([text_column])
    if text_column != "text":
        texts = texts.rename_column(text_column, "text")
    with _quiet():  # datasets reads .csv/.json text as large_string; match the corpus
        return texts.cast(datasets.Features({"text": datasets.Value("string")}))


def _label_names(values: list, path, label_column: str) -> list:
    if any(v is None for v in values):
        raise BequestError(f"{path}: some rows have no {label_column!r}; fill them in or drop those rows")
    if not (all(isinstance(v, str) for v in values) or all(isinstance(v, int) for v in values)):
        raise BequestError(f"{path}: {label_column!r} must hold all strings or all integers; fix that column")
    names = sorted(set(values))
    if len(names) < 2:
        raise BequestError(f"{path}: every row has the label {names[0]!r}; a classifier needs at least two labels, "
                           "add examples of another class or pick another column with --label-column")
    return names


def load_labeled_files(
    path: str | Path,
    split: str = "train",
    text_column: str = "text",
    label_column: str = "label",
    validation_fraction: float = 0.1,
):
    """Labeled text for classification: a `datasets.Dataset` with columns text and label."""
    import datasets

    loaded, source, text_column, rows = _split(path, split, text_column, validation_fraction, label_column)
    # Names come from both splits, so a label id means the same class in each.
    values = [v for ds in loaded.values() for v in ds[label_column]]  # in Python: a JSON column may mix types
    names = _label_names(values, path, label_column)
    index = {v: i for i, v in enumerate(names)}
    picked = source.select(rows)
    features = datasets.Features(
        {"text": datasets.Value("string"), "label": datasets.ClassLabel(names=[str(n) for n in names])}
    )
    return datasets.Dataset.from_dict(
        {"text": list(picked[text_column]), "label": [index[v] for v in picked[label_column]]}, features=features
    )
