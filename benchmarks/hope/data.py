"""Data for the HOPE benchmark. Nothing is ever downloaded (BENCHMARKS.md "No download").

1. `stdlib`: a byte-level corpus made of the running Python's own standard-library `.py`
   files (every machine has them). The file list is sorted by relative path; test suites,
   IDLE tests and site-packages are left out; files are joined with a NUL byte (which never
   occurs in Python source, so it marks document boundaries unambiguously). The train/val
   split is *by file*, decided by a hash of the file's relative path, so it does not move when
   files are added elsewhere. A SHA-256 over (path, length, bytes) of every file is recorded:
   two runs are comparable when their hashes agree (different Python versions differ).
2. `mqar`: synthetic multi-query associative recall (Zoology, Arora et al. 2023): P
   key→value pairs, then queries of stored keys whose next token is the value to recall.
3. `file`: any text file of the user's, as bytes; the last `val_fraction` of it is validation.

Every source yields (x, y) int64 batches of shape (B, T) with y = next token, or −100 where
there is nothing to predict (MQAR outside the answers).
"""

from __future__ import annotations

import hashlib
import sys
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

EXCLUDED_DIRS = frozenset({"test", "tests", "idle_test", "site-packages", "__pycache__"})
DOC_SEPARATOR = b"\x00"  # never in Python source: an unambiguous document boundary
IGNORE = -100  # cross_entropy's ignore_index


# -----------------------------------------------------------------------------
# Byte corpora


@dataclass
class ByteCorpus:
    train: np.ndarray  # (N_train,) uint8
    val: np.ndarray  # (N_val,) uint8
    meta: dict = field(default_factory=dict)


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(root: Path | None = None) -> list[str]:
    """Relative posix paths of the stdlib's .py files (sorted; tests and site-packages out)."""
    root = Path(root) if root is not None else stdlib_root()
    rel = (p.relative_to(root) for p in root.rglob("*.py") if p.is_file())
    return sorted(r.as_posix() for r in rel if not EXCLUDED_DIRS & set(r.parts))


def is_val_file(rel_path: str, val_fraction: float) -> bool:
    """Deterministic by-file split: a hash of the path, not of the list position."""
    h = int.from_bytes(hashlib.sha256(rel_path.encode()).digest()[:8], "big")
    return (h % 1_000_000) < val_fraction * 1_000_000


def build_stdlib_corpus(root: Path | None = None, val_fraction: float = 0.05) -> ByteCorpus:
    root = Path(root) if root is not None else stdlib_root()
    files = stdlib_files(root)
    digest = hashlib.sha256()
    train, val, n_val = [], [], 0
    for rel in files:
        data = (root / rel).read_bytes()
        digest.update(rel.encode() + b"\0" + len(data).to_bytes(8, "big") + data)
        if is_val_file(rel, val_fraction):
            val.append(data + DOC_SEPARATOR)
            n_val += 1
        else:
            train.append(data + DOC_SEPARATOR)
    meta = dict(
        source="stdlib", root=str(root), python=sys.version.split()[0], n_files=len(files),
        n_val_files=n_val, sha256=digest.hexdigest(), val_fraction=val_fraction,
        excluded_dirs=sorted(EXCLUDED_DIRS),
    )
    corpus = ByteCorpus(_bytes(b"".join(train)), _bytes(b"".join(val)), meta)
    meta.update(train_bytes=int(corpus.train.size), val_bytes=int(corpus.val.size))
    return corpus


def build_file_corpus(path: str | Path, val_fraction: float = 0.1) -> ByteCorpus:
    data = Path(path).read_bytes()
    cut = int(len(data) * (1 - val_fraction))
    meta = dict(source="file", path=str(path), sha256=hashlib.sha256(data).hexdigest(),
                val_fraction=val_fraction, train_bytes=cut, val_bytes=len(data) - cut)
    return ByteCorpus(_bytes(data[:cut]), _bytes(data[cut:]), meta)


def _bytes(b: bytes) -> np.ndarray:
    return np.frombuffer(b, dtype=np.uint8).copy()


def random_windows(data: np.ndarray, batch: int, seq_len: int, gen: torch.Generator):
    """B random windows of T+1 bytes -> x, y: (B, T) int64 (y is x shifted by one)."""
    if data.size < seq_len + 1:
        raise ValueError(f"corpus of {data.size} bytes is shorter than seq_len + 1 = {seq_len + 1}")
    starts = torch.randint(0, data.size - seq_len, (batch,), generator=gen).numpy()
    rows = np.stack([data[s : s + seq_len + 1] for s in starts]).astype(np.int64)
    rows = torch.from_numpy(rows)
    return rows[:, :-1], rows[:, 1:]


def even_windows(data: np.ndarray, batch: int, seq_len: int, n_batches: int):
    """Deterministic evaluation batches: windows spread evenly over the whole split."""
    n = batch * n_batches
    starts = np.linspace(0, data.size - seq_len - 1, n).astype(np.int64)
    rows = torch.from_numpy(np.stack([data[s : s + seq_len + 1] for s in starts]).astype(np.int64))
    return [(r[:, :-1], r[:, 1:]) for r in rows.split(batch)]


# -----------------------------------------------------------------------------
# Multi-query associative recall


def mqar_batch(batch: int, seq_len: int, vocab: int, num_pairs: int, gen: torch.Generator):
    """MQAR sequences -> x, y: (B, T) int64, y = −100 except at query keys.

    Layout: k₁ v₁ k₂ v₂ … k_P v_P, then query pairs k v k v … with each query key drawn from
    the P stored keys and followed by its stored value; a trailing odd slot is 0 (padding).
    Keys are distinct and come from [1, vocab/2), values from [vocab/2, vocab), so a key and a
    value are never confused; token 0 is padding. The target at a query key's position is its
    value: answerable by recall alone.
    """
    n_keys = vocab // 2 - 1
    if num_pairs > n_keys:
        raise ValueError(f"{num_pairs} distinct keys need vocab >= {2 * (num_pairs + 1)}")
    if seq_len < 2 * num_pairs + 2:
        raise ValueError(f"seq_len must be >= 2 * num_pairs + 2 = {2 * num_pairs + 2}")
    keys = torch.rand(batch, n_keys, generator=gen).argsort(dim=1)[:, :num_pairs] + 1  # (B, P) distinct
    values = torch.randint(vocab // 2, vocab, (batch, num_pairs), generator=gen)  # (B, P)
    n_query = (seq_len + 1 - 2 * num_pairs) // 2  # query pairs in the T+1 token stream
    pick = torch.randint(0, num_pairs, (batch, n_query), generator=gen)
    q_keys, q_values = keys.gather(1, pick), values.gather(1, pick)
    stream = torch.cat([torch.stack([keys, values], -1).flatten(1), torch.stack([q_keys, q_values], -1).flatten(1)], 1)
    stream = torch.nn.functional.pad(stream, (0, seq_len + 1 - stream.shape[1]))  # (B, T+1)
    x, y = stream[:, :-1].clone(), stream[:, 1:].clone()
    is_query = torch.zeros(seq_len, dtype=torch.bool)
    is_query[2 * num_pairs :: 2] = True  # positions of query keys (inputs)
    y[:, ~is_query] = IGNORE
    return x, y


# -----------------------------------------------------------------------------
# One interface for the harness


class DataSource:
    """train_batch(gen) -> (x, y); val_batches -> fixed list of (x, y); vocab_size; meta."""

    def __init__(self, kind: str, seq_len: int, batch: int, path: str | None = None,
                 mqar_vocab: int = 64, mqar_pairs: int = 8, val_batches: int = 8, seed: int = 0):
        self.kind, self.seq_len, self.batch = kind, seq_len, batch
        if kind in ("stdlib", "file"):
            if kind == "file" and not path:
                raise ValueError("--data file needs --data-path")
            self.corpus = build_stdlib_corpus() if kind == "stdlib" else build_file_corpus(path)
            self.vocab_size, self.unit = 256, "byte"
            self.meta = dict(self.corpus.meta)
            self.val_batches = even_windows(self.corpus.val, batch, seq_len, val_batches)
        elif kind == "mqar":
            self.vocab_size, self.unit = mqar_vocab, "token"
            self.mqar = (mqar_vocab, mqar_pairs)
            self.meta = dict(source="mqar", vocab=mqar_vocab, pairs=mqar_pairs, seq_len=seq_len)
            val_gen = torch.Generator().manual_seed(10_000 + seed)  # disjoint from train's stream
            self.val_batches = [mqar_batch(batch, seq_len, *self.mqar, val_gen) for _ in range(val_batches)]
        else:
            raise ValueError(f"unknown data kind {kind!r}: stdlib | mqar | file")

    def train_batch(self, gen: torch.Generator):
        if self.kind == "mqar":
            return mqar_batch(self.batch, self.seq_len, *self.mqar, gen)
        return random_windows(self.corpus.train, self.batch, self.seq_len, gen)
