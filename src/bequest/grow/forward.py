"""A saved model's forward pass in numpy, each weight read from the shards just before it is used.

The growth probe runs it on a few tokens of the source and the grown checkpoint. It is the block math
of bequest's families as transformers computes it in fp32 (written from their modeling code), without
transformers' model code or torch: their imports alone take longer than growing a 2 GB checkpoint.
Weights become fp32 a slice at a time (bf16 is the top half of an fp32), so memory holds a slice, a
few tokens' activations.

`Model.unsupported` names what a config asks for that this does not do (another RoPE kind, a sliding
window shorter than the probe, an activation it lacks); the probe then runs transformers' modules.
"""

from __future__ import annotations

import contextlib
import ctypes
import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from math import prod
from pathlib import Path

import numpy as np

from bequest.anatomy import anatomy
from bequest.errors import BequestError
from bequest.io import DTYPES, StoredTensor, TensorReader, read_config, stored_tensors, weight_files

CHUNK = 2**22  # weight entries turned into fp32 at a time (16 MB)
# Threads a big product is split over (each converts and multiplies its own rows): the products of a
# few tokens are as slow as reading their weights, which one thread cannot do at the memory's speed.
THREADS = max(1, min(4, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1))
FLOATS = {"F32": np.float32, "F16": np.float16, "F64": np.float64}  # and BF16, which numpy lacks


def _erf(x: np.ndarray) -> np.ndarray:
    """numpy has no erf: Numerical Recipes' erfc (fractional error below 1.2e-7, fp32's own), in fp64."""
    z = np.abs(x.astype(np.float64))
    t = 1 / (1 + 0.5 * z)
    poly = 0.17087277
    for c in (-0.82215223, 1.48851587, -1.13520398, 0.27886807, -0.18628806, 0.09678418, 0.37409196, 1.00002368):
        poly = c + t * poly
    erfc = t * np.exp(-z * z - 1.26551223 + t * poly)
    return np.where(x >= 0, 1 - erfc, erfc - 1)


def _tanh_gelu(x):
    return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


def _silu(x):
    with np.errstate(over="ignore"):  # exp(-x) is inf for very negative x, and x / inf the right 0
        return x / (1 + np.exp(-x))


ACTS = {  # transformers' ACT2FN, the ones bequest's families use
    "gelu": lambda x: (0.5 * x * (1 + _erf(x / math.sqrt(2)))).astype(np.float32),
    "gelu_new": _tanh_gelu,
    "gelu_pytorch_tanh": _tanh_gelu,
    "relu": lambda x: np.maximum(x, 0),
    "silu": _silu,
    "swish": _silu,
    "tanh": np.tanh,
}


def _fp32(raw: np.ndarray, dtype: str, out: np.ndarray | None = None) -> np.ndarray:
    """Stored bytes as fp32 values, into `out` (fp32, big enough) when given; fp32 bytes are only viewed.
    A bf16 value is the top half of an fp32 one: it goes into the top halves of `out`, whose bottom
    halves must be (and stay) zero (faster than shifting every value into place)."""
    if dtype == "F32":
        return raw.view(np.float32)
    n = len(raw) // DTYPES[dtype].size
    out = np.zeros(n, dtype=np.float32) if out is None else out[:n]
    if dtype == "BF16":
        np.copyto(out.view(np.uint16)[1::2], raw.view(np.uint16))  # little-endian, as safetensors and numpy here
    else:
        np.copyto(out, raw.view(FLOATS[dtype]), casting="unsafe")
    return out


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


@contextlib.contextmanager
def one_blas_thread():
    """numpy's OpenBLAS on one thread, where it can be told (Linux): the probe's products of a few tokens
    gain little from more, and idle BLAS threads spin between them, taking the CPU the conversions need
    (on a busy 2-core machine the probe of a 1.7 GB checkpoint took 43-53 s with two, 9 s with one)."""
    restore = []
    with contextlib.suppress(OSError):
        maps = Path("/proc/self/maps").read_text().splitlines()
        for path in sorted({line.split()[-1] for line in maps if "openblas" in line.lower()}):
            lib = ctypes.CDLL(path)  # the copy already loaded
            for prefix, suffix in (("", ""), ("scipy_", "64_"), ("", "64_")):
                get = getattr(lib, f"{prefix}openblas_get_num_threads{suffix}", None)
                put = getattr(lib, f"{prefix}openblas_set_num_threads{suffix}", None)
                if get and put:
                    restore.append((put, get()))
                    put(1)
                    break
    try:
        yield
    finally:
        for put, n in restore:
            put(n)


class Model:
    """A saved model run on `ids` ([batch, tokens]) one module at a time, its weights read from the shards."""

    def __init__(self, folder: Path, ids: np.ndarray, stack: contextlib.ExitStack, before_read=None):
        self.before_read = before_read  # called with a stored tensor before its bytes are read
        self.config = read_config(folder)
        self.anat = anat = anatomy(self.config)
        self.fam, self.ids, self.layers = anat.family, ids, anat.layers
        self.stored = {}
        for file in weight_files(Path(folder)):
            for name, s in stored_tensors(file).items():
                with contextlib.suppress(BequestError):  # a buffer saved with the weights
                    self.stored[str(anat.slots([name])[name])] = s
        self.reader = TensorReader(stack)
        self.pool = stack.enter_context(ThreadPoolExecutor(THREADS - 1, "forward")) if THREADS > 1 else None
        # Per thread, one slice's fp32 values, reused: a fresh buffer for every slice would leave the heap
        # as big as the biggest mix of them (glibc keeps freed pages). bf16 slices have their own, zeros below.
        self._local = threading.local()
        self.causal = "causal_lm" in self.fam.tasks  # decoders attend backwards and pool their last token
        self.rope = "embed.position" not in self.fam.embed  # families without a position table rotate
        self.act = getattr(self.config, self.fam.act_key, None)
        # What a block computes besides its weights; equal blocks of two models must agree on all of it.
        self.math = (self.fam.name, anat.hidden, anat.heads, anat.kv_heads, anat.head_dim, anat.eps, self.act,
                     self._theta() if self.rope else None, getattr(self.config, "scale_attn_weights", True))

    # ------------------------------------------------------------ what it runs

    def _theta(self) -> float | None:
        """RoPE's base for transformers' default kind (older config.json: rope_theta and rope_scaling); None
        for any other kind."""
        params = dict(getattr(self.config, "rope_parameters", None) or {})
        scaling = getattr(self.config, "rope_scaling", None) or {}
        kind = params.pop("rope_type", None) or scaling.get("rope_type") or scaling.get("type") or "default"
        theta = params.pop("rope_theta", None) or getattr(self.config, "rope_theta", None) or 10000.0
        if kind != "default" or params or getattr(self.config, "partial_rotary_factor", 1.0) != 1.0:
            return None
        return float(theta)

    def unsupported(self) -> str | None:
        """What this config asks for that the numpy forward does not do, or None."""
        tokens = self.ids.shape[1]
        window = getattr(self.config, "sliding_window", None)
        odd = [s.dtype for s in self.stored.values() if s.dtype not in FLOATS and s.dtype != "BF16"]
        if odd:
            return f"{odd[0]} weights"
        for act in (self.act, self.fam.mlm_act or self.act):
            if act not in ACTS:
                return f"activation {act!r}"
        if self.rope and self._theta() is None:
            return "a RoPE kind other than the default"
        if window is not None and window < tokens and getattr(self.config, "use_sliding_window", True):
            return f"a sliding window of {window} tokens"
        if getattr(self.config, "is_decoder", False) and not self.causal:
            return "an encoder run as a decoder"
        return None

    # ------------------------------------------------------------ weights

    def _slices(self, key: str, raw: np.ndarray, rows: range | None = None):
        """(first row, rows as fp32) of the stored tensor `key`, whose bytes are `raw`, about CHUNK entries
        at a time (of `rows` only, when given)."""
        s = self.stored[key]
        rows = range(s.shape[0]) if rows is None else rows
        row, size = prod(s.shape[1:]), DTYPES[s.dtype].size
        step = max(1, CHUNK // max(row, 1))
        if not hasattr(self._local, "floats"):
            self._local.floats = {dtype: np.zeros(CHUNK, dtype=np.float32) for dtype in ("BF16", "F16", "F64")}
        out = self._local.floats.get(s.dtype)
        if out is not None and step * row > len(out):  # rows longer than a slice
            out = self._local.floats[s.dtype] = np.zeros(step * row, dtype=np.float32)
        for first in range(rows.start, rows.stop, step):
            n = min(step, rows.stop - first)
            part = raw[first * row * size : (first + n) * row * size]
            yield first, _fp32(part, s.dtype, out).reshape(n, *s.shape[1:])

    def _raw(self, key: str) -> np.ndarray:
        """The stored bytes of `key`, mapped from the shard (read by one thread, in one pass over the file:
        threads reading parts of it side by side would make the disk seek between them)."""
        if self.before_read is not None:
            self.before_read(self.stored[key])
        return np.frombuffer(self.reader.mapped(self.stored[key]), dtype=np.uint8)

    def vector(self, key: str) -> np.ndarray:
        return np.concatenate([rows.copy() for _, rows in self._slices(key, self._raw(key))])

    def rows(self, key: str, index: np.ndarray) -> np.ndarray:
        """Rows `index` of a table (embeddings), read one by one: the probe needs a few of many."""
        s = self.stored[key]
        width = prod(s.shape[1:]) * DTYPES[s.dtype].size
        raw = np.frombuffer(self.reader.mapped(s, whole=False), dtype=np.uint8)  # only their pages are read
        picked = np.stack([raw[int(i) * width : (int(i) + 1) * width] for i in index.reshape(-1)])
        return _fp32(picked.reshape(-1), s.dtype).reshape(*index.shape, -1)

    def linear(self, x: np.ndarray, role: str) -> np.ndarray:
        """x @ W^T + b of the linear `role` ('layer.3.attn.q'); a tied lm_head is the token embedding."""
        key = f"{role}.weight"
        if key not in self.stored and role == "lm_head":
            key = "embed.token.weight"
        s, raw = self.stored[key], self._raw(key)
        if self.fam.conv1d and role.startswith("layer."):  # Conv1D keeps [in, out]: slices are inputs

            def part(rows: range) -> np.ndarray:
                y = np.zeros((x.shape[0], s.shape[1]), dtype=np.float32)
                for first, w in self._slices(key, raw, rows):
                    y += x[:, first : first + len(w)] @ w
                return y

            y = sum(self._split(part, s))  # the parts in a fixed order: the same sums every time
        else:
            y = np.empty((x.shape[0], s.shape[0]), dtype=np.float32)

            def part(rows: range) -> None:
                for first, w in self._slices(key, raw, rows):
                    y[:, first : first + len(w)] = x @ w.T

            self._split(part, s)
        if f"{role}.bias" in self.stored:
            y += self.vector(f"{role}.bias")
        return y

    def _split(self, part, s: StoredTensor) -> list:
        """part(rows) over THREADS ranges of the rows of `s` side by side (one range when `s` is a
        slice or less), in order of the rows."""
        n = THREADS if self.pool is not None and prod(s.shape) > CHUNK else 1
        cuts = [s.shape[0] * k // n for k in range(n + 1)]
        ranges = [range(a, b) for a, b in zip(cuts, cuts[1:])]
        others = [self.pool.submit(part, r) for r in ranges[1:]]
        return [part(ranges[0]), *(f.result() for f in others)]

    def norm(self, x: np.ndarray, role: str) -> np.ndarray:
        eps = self.anat.eps
        if self.fam.norm == "rmsnorm":
            return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * self.vector(f"{role}.weight")
        x = x - x.mean(-1, keepdims=True)
        x = x / np.sqrt((x * x).mean(-1, keepdims=True) + eps)
        return x * self.vector(f"{role}.weight") + self.vector(f"{role}.bias")

    # ------------------------------------------------------------ the model

    def embed(self) -> np.ndarray:
        """The hidden states entering the first block, [batch * tokens, hidden]."""
        ids, fam = self.ids, self.fam
        x = self.rows("embed.token.weight", ids)
        if "embed.type" in fam.embed:  # every token of type 0
            x = x + self.rows("embed.type.weight", np.zeros_like(ids))
        if "embed.position" in fam.embed:
            positions = np.broadcast_to(np.arange(ids.shape[1]), ids.shape)
            if fam.position_offset:  # RoBERTa numbers non-pad tokens from pad + 1; pads sit at pad
                pad = self.config.pad_token_id
                real = ids != pad
                positions = np.cumsum(real, axis=1) * real + pad
            x = x + self.rows("embed.position.weight", positions)
        x = x.reshape(-1, x.shape[-1]).astype(np.float32)
        return self.norm(x, "embed.norm") if "embed.norm" in fam.embed else x

    def block(self, h: np.ndarray, i: int) -> np.ndarray:
        at = f"layer.{i}."
        if self.fam.norm_position == "pre":
            h = h + self.attention(self.norm(h, at + "norm.attn"), i)
            return h + self.mlp(self.norm(h, at + "norm.mlp"), i)
        h = self.norm(h + self.attention(h, i), at + "norm.attn")
        return self.norm(h + self.mlp(h, i), at + "norm.mlp")

    def attention(self, x: np.ndarray, i: int) -> np.ndarray:
        anat, at = self.anat, f"layer.{i}.attn."
        batch, tokens = self.ids.shape
        hd, q_size, kv_size = anat.head_dim, anat.heads * anat.head_dim, anat.kv_heads * anat.head_dim
        if self.fam.fused_qkv:
            q, k, v = np.split(self.linear(x, at + "qkv"), [q_size, q_size + kv_size], axis=1)
        else:
            q, k, v = (self.linear(x, at + r) for r in "qkv")
        q, k, v = (t.reshape(batch, tokens, -1, hd).transpose(0, 2, 1, 3) for t in (q, k, v))
        if self.rope:
            q, k = self._rotate(q), self._rotate(k)
        k, v = (np.repeat(t, anat.heads // anat.kv_heads, axis=1) for t in (k, v))  # q head s reads KV s // group
        scores = q @ k.transpose(0, 1, 3, 2) * self._scale(i)
        if self.causal:
            scores = np.where(np.tril(np.ones((tokens, tokens), dtype=bool)), scores, -np.inf)
        out = (_softmax(scores) @ v).transpose(0, 2, 1, 3).reshape(batch * tokens, -1)
        return self.linear(out, at + "o")

    def _scale(self, i: int) -> float:
        scale = self.anat.head_dim**-0.5 if getattr(self.config, "scale_attn_weights", True) else 1.0
        return scale / (i + 1) if self.anat.inverse_layer_scale else scale  # GPT-2's per-layer option

    def _rotate(self, t: np.ndarray) -> np.ndarray:
        """RoPE at positions 0.. (transformers' default kind, computed in fp32 as there)."""
        hd = t.shape[-1]
        inv = 1.0 / (np.float32(self._theta()) ** (np.arange(0, hd, 2, dtype=np.float32) / np.float32(hd)))
        angles = np.arange(t.shape[2], dtype=np.float32)[:, None] * inv
        angles = np.concatenate([angles, angles], axis=-1)
        half = np.concatenate([-t[..., hd // 2 :], t[..., : hd // 2]], axis=-1)
        return t * np.cos(angles) + half * np.sin(angles)

    def mlp(self, x: np.ndarray, i: int) -> np.ndarray:
        at, act = f"layer.{i}.mlp.", ACTS[self.act]
        if self.fam.gated_mlp:
            return self.linear(act(self.linear(x, at + "gate")) * self.linear(x, at + "up"), at + "down")
        return self.linear(act(self.linear(x, at + "up")), at + "down")

    def outputs(self, h: np.ndarray) -> list[np.ndarray]:
        """What the model returns for each sequence: logits (LMs, classifiers) or its last hidden states."""
        batch, tokens = self.ids.shape
        fam, task = self.fam, self.anat.task
        if "final_norm" in fam.final:
            h = self.norm(h, "final_norm")
        if task == "causal_lm":
            h = self.linear(h, "lm_head")
        elif task == "masked_lm":
            h = ACTS[fam.mlm_act or self.act](self.linear(h, "lm_head.dense"))
            h = self.linear(self.norm(h, "lm_head.norm"), "lm_head")
        elif task == "seq_cls":
            h = h.reshape(batch, tokens, -1)
            if self.causal:  # the last token that is not padding (transformers: the rightmost one)
                pad = getattr(self.config, "pad_token_id", None)
                last = np.full(batch, tokens - 1) if pad is None else (np.arange(tokens) * (self.ids != pad)).argmax(1)
                h = h[np.arange(batch), last]
            else:
                h = h[:, 0]
            for role in [r for r in fam.tasks[task] if r != "final_norm"]:
                # BERT's pooler or RoBERTa's dense layer (tanh), then the classifier
                h = self.linear(h, role) if role == "classifier" else np.tanh(self.linear(h, role))
            return [row[None] for row in h]
        return list(h.reshape(batch, 1, tokens, -1))

    def same_block(self, j: int, other: Model, i: int, known: frozenset | set = frozenset()) -> bool:
        """Whether block j computes what block i of `other` computes: the same math and the same stored
        bytes, compared in full (`known`: pairs of places already found equal)."""
        if (self.math, self._scale(j)) != (other.math, other._scale(i)):
            return False
        mine = {k.split(".", 2)[2]: s for k, s in self.stored.items() if k.startswith(f"layer.{j}.")}
        theirs = {k.split(".", 2)[2]: s for k, s in other.stored.items() if k.startswith(f"layer.{i}.")}
        if mine.keys() != theirs.keys() or any((s.dtype, s.shape) != (theirs[k].dtype, theirs[k].shape)
                                               for k, s in mine.items()):
            return False
        return all((place(s), place(theirs[k])) in known or same_bytes(self.reader, s, theirs[k])
                   for k, s in mine.items())


def place(s: StoredTensor) -> tuple:
    """Where the bytes of `s` lie: (file, first byte, bytes)."""
    return str(s.file), s.start, s.nbytes


def same_bytes(reader: TensorReader, a: StoredTensor, b: StoredTensor) -> bool:
    """Whether `a` and `b` hold the same bytes, compared in full a slice at a time (8 bytes at a time: a
    third of the time byte by byte takes)."""
    if a.nbytes != b.nbytes:
        return False
    mine, theirs = (np.frombuffer(reader.mapped(t), dtype=np.uint8) for t in (a, b))
    step = CHUNK * 8
    for begin in range(0, a.nbytes, step):
        x, y = mine[begin : begin + step], theirs[begin : begin + step]
        whole = len(x) - len(x) % 8
        if not (np.array_equal(x[:whole].view(np.uint64), y[:whole].view(np.uint64))
                and np.array_equal(x[whole:], y[whole:])):
            return False
    return True
