"""How far a grown model's function moved: max |Δ logits| against its source on a fixed probe batch.

On saved models the probe never holds a model. Each runs on the probe batch module by module, each
weight read from the shards just before it is used (grow/forward.py: numpy, so neither torch nor
transformers' model code is imported). The source's pass, most of the work, needs only the source: it
runs in a thread while the grown model is written, reading each tensor just after the writer did, and
keeps each block's input and output. A block of the grown model that holds the very bytes of a source
block and gets the very input that block got has that block's output: the probe takes it instead of
computing it again (depth growth's copied blocks). Their bytes are compared in full: as each copied tensor is written (the writer tells the
probe, and both copies are still in the page cache), or once the model is written for any tensor the
writer did not report. For configs the numpy forward does not cover, transformers' own modules run
instead, one at a time from the shards as well, once the grown model is written.
"""

from __future__ import annotations

import contextlib
import ctypes
import math
import os
import threading
import warnings
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator

import numpy as np

from bequest.anatomy import anatomy, build_model, task_of
from bequest.errors import BequestError
from bequest.grow.forward import Model, one_blas_thread, place, same_bytes
from bequest.io import StoredTensor, TensorReader, load_config, stored_tensors, weight_files

PROBE = (2, 16)  # sequences x tokens of the fixed probe batch


def probe_folders(src: Path, grown: Path, ids: np.ndarray) -> float:
    """max |Δ outputs| of two saved models on `ids`, module by module from their shards."""
    with probing(src, ids) as probe:
        return probe.against(grown)


@contextlib.contextmanager
def probing(src: Path, ids: np.ndarray) -> Iterator[Probe]:
    """A Probe of `src` on `ids`, its source pass started. Leaving early stops the pass at its next block."""
    with contextlib.ExitStack() as stack, one_blas_thread():
        yield Probe(src, ids, stack)


class Probe:
    """The source's pass on the probe batch, run in a thread from the start; `read` hears from the writer
    which source tensors it has read (and compares a copy while both are fresh); `against` measures the
    written grown model."""

    def __init__(self, src: Path, ids: np.ndarray, stack: contextlib.ExitStack):
        self.src, self.ids, self.stack = src, ids, stack
        self.arrived, self.writing = threading.Condition(), True
        self.read_by_writer: set[tuple] = set()
        self.old, self.stop = Model(src, ids, stack, before_read=self._after_the_writer), threading.Event()
        self.pool = stack.enter_context(ThreadPoolExecutor(2, "probe", initializer=_yield_to_the_writer))
        # Leaving (before the pool waits for its threads) stops the pass at its next block, and wakes it.
        stack.callback(self._writing_ended)
        stack.callback(self.stop.set)
        self.pass_ = None if self.old.unsupported() else self.pool.submit(source_pass, self.old, self.stop)
        self.reader, self.checks, self.equal = TensorReader(stack), [], set()

    def read(self, source: StoredTensor, copy: StoredTensor | None = None) -> None:
        """The writer has read `source` (and wrote its bytes as `copy`, compared here in the probe's other
        thread, in order)."""
        with self.arrived:
            self.read_by_writer.add(place(source))
            self.arrived.notify_all()
        if copy is not None:
            self.checks.append(self.pool.submit(self._compare, source, copy))

    def _after_the_writer(self, s: StoredTensor) -> None:
        """The source's pass reads a tensor once the writer has read it, from the page cache: running
        ahead, it would read from disk beside the writer and make the disk seek between the two."""
        with self.arrived:
            self.arrived.wait_for(lambda: not self.writing or place(s) in self.read_by_writer)

    def _writing_ended(self) -> None:
        with self.arrived:
            self.writing = False
            self.arrived.notify_all()

    def _compare(self, source: StoredTensor, copy: StoredTensor) -> None:
        if same_bytes(self.reader, source, copy):
            self.equal.add((place(copy), place(source)))

    def against(self, grown: Path) -> float:
        """max |Δ outputs| of the grown folder, once written, against the source."""
        self._writing_ended()
        new = Model(grown, self.ids, self.stack)
        if self.pass_ is None or new.unsupported():
            return worst_change(folder_outputs(self.src, self.ids), folder_outputs(grown, self.ids))
        for check in self.checks:
            check.result()
        trace, outputs = self.pass_.result()
        return worst_change(outputs, grown_pass(new, self.old, trace, self.equal))


def _yield_to_the_writer() -> None:
    """Lower this thread's priority (and its own threads'): the writer waits on the disk most of the
    time and the probe on the CPU, so the writer should never wait for the probe to give up a CPU."""
    with contextlib.suppress(AttributeError, OSError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), min(19, os.getpriority(os.PRIO_PROCESS, 0) + 10))


def source_pass(old: Model, stop: threading.Event) -> tuple[list, list]:
    """The source's outputs, and each block's (input, output) on the way."""
    h, trace = old.embed(), []
    for i in range(old.layers):
        if stop.is_set():
            raise BequestError("the probe was stopped")
        trace.append((h, old.block(h, i)))
        h = trace[-1][1]
    return trace, old.outputs(h)


def grown_pass(new: Model, old: Model, trace: list, known: set = frozenset()) -> list:
    """The grown model's outputs; a block that has a source block's bytes and input takes its output."""
    h = new.embed()
    for j in range(new.layers):
        same = next((out for i, (x, out) in enumerate(trace)
                     if np.array_equal(x, h) and new.same_block(j, old, i, known)), None)
        h = new.block(h, j) if same is None else same
    return new.outputs(h)


def max_abs_logit_change(old, new, probe_ids) -> float:
    """max |logits_new - logits_old| over `probe_ids`, in eval mode, one sequence at a time
    (sequence classifiers without a pad token refuse batches). Models without a head compare their
    last hidden states on the old model's coordinates."""
    import torch

    modes = old.training, new.training
    old.eval()
    new.eval()
    try:
        with torch.no_grad():
            rows = torch.as_tensor(probe_ids).to(next(old.parameters()).device)
            return worst_change([_outputs(old, r[None]).float() for r in rows],
                                [_outputs(new, r[None]).float() for r in rows])
    finally:
        old.train(modes[0])
        new.train(modes[1])


def worst_change(old: list, new: list) -> float:
    """max |a - b| over pairs of outputs (torch or numpy), b on a's coordinates."""
    worst = 0.0
    for a, b in zip(old, new):
        change = float(abs(a - b[..., : a.shape[-1]]).max())
        if not math.isfinite(change):  # max() would keep the old value past a NaN
            raise BequestError("the grown model's outputs are not finite on the probe; its weights are broken "
                               "(a noise std too large for the checkpoint's dtype?)")
        worst = max(worst, change)
    return worst


def probe_ids(model_or_config, seed: int = 0) -> np.ndarray:
    """A fixed batch of random token ids that fits the model's vocabulary and positions: torch's
    randint(0, vocab) under manual_seed(seed), drawn from the same Mersenne Twister without torch."""
    anat = anatomy(model_or_config)
    length = PROBE[1]
    if anat.positions:
        length = min(length, anat.usable_positions)
    draws = np.random.RandomState(seed).randint(0, 2**32, size=PROBE[0] * length, dtype=np.uint64)
    return (draws % anat.vocab).astype(np.int64).reshape(PROBE[0], length)


def folder_outputs(folder: Path, ids) -> list:
    """The outputs of a saved model on each row of `ids` (fp32) by transformers' modules, its weights read
    one module at a time: the probe's way for configs the numpy forward does not cover."""
    import torch
    from accelerate import init_empty_weights

    ids = torch.as_tensor(ids)
    config = load_config(folder)
    task = task_of(config)
    with init_empty_weights(include_buffers=False), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = build_model(config, task)  # parameters on the meta device; buffers (rotary tables) real
    model.tie_weights()  # so a tied head finds its tensor under the embedding's name
    model.eval()
    anat = anatomy(model, task)
    stored = {str(slot): s for file in weight_files(Path(folder)) for name, s in stored_tensors(file).items()
              if (slot := _slot(anat, name)) is not None}
    aliases = defaultdict(list)  # a tied weight has two names; the checkpoint holds one of them
    for name, p in model.named_parameters(remove_duplicate=False):
        aliases[id(p)].append(name)
    where = {}
    for module in model.modules():
        for local, p in module.named_parameters(recurse=False):
            held = [stored[s] for s in (_slot(anat, n) for n in aliases[id(p)]) if s in stored]
            if not held:
                raise BequestError(f"{folder}: no tensor for {aliases[id(p)][0]}; the checkpoint is incomplete")
            where[(id(module), local)] = held[0]
    with contextlib.ExitStack() as stack, torch.no_grad():
        reader = TensorReader(stack)

        def load(module, _args):
            for local, _ in list(module.named_parameters(recurse=False)):
                t = reader.float32(where[(id(module), local)])
                module._parameters[local] = torch.nn.Parameter(t, requires_grad=False)

        def drop(module, _args, _out):
            for local, p in list(module.named_parameters(recurse=False)):
                module._parameters[local] = torch.nn.Parameter(torch.empty(p.shape, device="meta"), requires_grad=False)
            _trim()

        for module in model.modules():
            if next(module.parameters(recurse=False), None) is not None:
                module.register_forward_pre_hook(load)
                module.register_forward_hook(drop)
        if task == "seq_cls":  # a classifier without a pad token refuses batches
            return [_outputs(model, row[None]).float() for row in ids]
        return list(_outputs(model, ids).float()[:, None])  # every module's weights read once for all rows


def _trim() -> None:
    """Hand freed memory back to the system. glibc keeps the heap pages of freed tensors for reuse, and
    modules of ever-changing sizes then leave the process as big as all the modules it read."""
    libc = ctypes.CDLL(None)
    if hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


def _slot(anat, name: str) -> str | None:
    try:
        return str(anat.slots([name])[name])
    except BequestError:  # a buffer saved with the weights
        return None


def _outputs(model, ids):
    out = model(input_ids=ids)
    return out.logits if "logits" in out else out.last_hidden_state
