"""The embedded data (the default stdlib corpus, and the larger packages corpus from the installed packages'
docstrings), the default corpus's tasks, tokenizers, and user files."""

from bequest.data.corpus import DOMAINS, load_corpus
from bequest.data.files import load_labeled_files, load_text_files
from bequest.data.tasks import TASKS, load_task, task_labels
from bequest.data.tokenizer import same_tokenizer, tokenizer_kind, train_tokenizer

__all__ = [
    "DOMAINS",
    "load_corpus",
    "TASKS",
    "load_task",
    "task_labels",
    "train_tokenizer",
    "same_tokenizer",
    "tokenizer_kind",
    "load_text_files",
    "load_labeled_files",
]
