"""HOPE benchmark data (benchmarks/hope/data.py): determinism, splits, MQAR answerability."""

import hashlib
import re

import numpy as np
import pytest
import torch

from benchmarks.hope.data import (
    DOC_SEPARATOR,
    IGNORE,
    OVERLAP_BYTES,
    DataSource,
    build_file_corpus,
    build_stdlib_corpus,
    even_windows,
    is_val_file,
    mqar_batch,
    random_windows,
    stdlib_files,
    stdlib_root,
)


@pytest.fixture(scope="module")
def corpus():
    return build_stdlib_corpus()


def test_stdlib_corpus_is_deterministic(corpus):
    again = build_stdlib_corpus()
    assert again.meta["sha256"] == corpus.meta["sha256"]
    assert np.array_equal(again.train, corpus.train) and np.array_equal(again.val, corpus.val)


def test_stdlib_hash_matches_an_independent_recomputation(corpus):
    root = stdlib_root()
    skip = {"test", "tests", "idle_test", "site-packages", "__pycache__", "encodings", "pydoc_data"}
    files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*.py")
                   if not skip & set(p.relative_to(root).parts)
                   and not re.search(rb"auto-?generated|automatically generated|this file is generated|do not edit"
                                     rb"|with gencodec\.py|generated and used by the sysconfig",
                                     p.read_bytes()[:1024].lower()))
    assert files == stdlib_files()
    h = hashlib.sha256()
    for rel in files:
        data = (root / rel).read_bytes()
        h.update(rel.encode() + b"\0" + len(data).to_bytes(8, "big") + data)
    assert h.hexdigest() == corpus.meta["sha256"]
    assert corpus.meta["n_files"] == len(files) > 100


def test_stdlib_split_is_by_file(corpus):
    files = stdlib_files()
    val = [f for f in files if is_val_file(f, 0.05)]
    assert 0 < len(val) < len(files) // 5 and corpus.meta["n_val_files"] == len(val)
    # the val split is exactly the concatenation of the val files, each closed by a separator
    root = stdlib_root()
    expected = b"".join((root / f).read_bytes() + DOC_SEPARATOR for f in val)
    assert corpus.val.tobytes() == expected
    assert corpus.train.size + corpus.val.size == sum((root / f).stat().st_size + 1 for f in files)
    assert (corpus.train == 0).sum() == len(files) - len(val)  # NUL only as separator


def test_windows_are_next_byte_pairs(corpus):
    gen = torch.Generator().manual_seed(0)
    x, y = random_windows(corpus.train, 4, 32, gen)
    assert x.shape == y.shape == (4, 32) and x.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    batches = even_windows(corpus.val, 4, 32, 3)
    again = even_windows(corpus.val, 4, 32, 3)
    assert len(batches) == 3 and all(torch.equal(a[0], b[0]) for a, b in zip(batches, again))


def test_file_corpus(tmp_path):
    p = tmp_path / "t.txt"
    p.write_bytes(bytes(range(256)) * 4)
    c = build_file_corpus(p, val_fraction=0.25)
    assert c.train.tobytes() + c.val.tobytes() == p.read_bytes()
    assert c.val.size == 256 and c.meta["sha256"] == hashlib.sha256(p.read_bytes()).hexdigest()


@pytest.mark.parametrize("vocab,pairs,seq_len", [(64, 8, 64), (32, 15, 40), (128, 4, 17)])
def test_mqar_queries_are_answerable(vocab, pairs, seq_len):
    gen = torch.Generator().manual_seed(0)
    x, y = mqar_batch(16, seq_len, vocab, pairs, gen)
    assert x.shape == y.shape == (16, seq_len)
    assert x.max() < vocab and x.min() >= 0
    n_answers = 0
    for row_x, row_y in zip(x.tolist(), y.tolist()):
        keys, values = row_x[0 : 2 * pairs : 2], row_x[1 : 2 * pairs : 2]
        assert len(set(keys)) == pairs  # distinct keys: one right answer per key
        assert all(1 <= k < vocab // 2 <= v < vocab for k, v in zip(keys, values))
        store = dict(zip(keys, values))
        for t, target in enumerate(row_y):
            if target == IGNORE:
                continue
            assert t >= 2 * pairs  # only queries are supervised
            assert store[row_x[t]] == target  # the value stored for this key, seen earlier
            n_answers += 1
    assert n_answers >= 16 * ((seq_len + 1 - 2 * pairs) // 2)


def test_mqar_source_val_is_fixed_and_differs_from_train():
    src = DataSource("mqar", seq_len=48, batch=4, mqar_vocab=64, mqar_pairs=6, seed=3)
    again = DataSource("mqar", seq_len=48, batch=4, mqar_vocab=64, mqar_pairs=6, seed=3)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(src.val_batches, again.val_batches))
    x, _ = src.train_batch(torch.Generator().manual_seed(3))
    assert not torch.equal(x, src.val_batches[0][0])


def test_no_generated_tables_in_the_corpus():
    files = stdlib_files()
    assert not [f for f in files if f.startswith(("encodings/", "pydoc_data/"))]
    assert "stringprep.py" not in files and "token.py" not in files  # "generated ... do not edit"
    assert "argparse.py" in files and "json/decoder.py" in files


def test_validation_is_64_kib_and_no_window_starts_with_train_text(corpus):
    from benchmarks.hope.presets import PRESETS

    train_cfg = PRESETS["cpu-tiny"]["train"]
    src = DataSource("stdlib", train_cfg["seq_len"], train_cfg["batch"], val_batches=train_cfg["val_batches"])
    n_tokens = sum(y.numel() for _, y in src.val_batches)
    assert n_tokens >= 64 * 1024
    train_bytes = corpus.train.tobytes()
    heads = [bytes(row[:OVERLAP_BYTES].to(torch.uint8).tolist()) for x, _ in src.val_batches for row in x]
    assert len(set(heads)) == len(heads)  # distinct windows
    assert not [h for h in heads if h in train_bytes]  # checked by plain substring search
    # the check is not vacuous: plain even spacing does start windows with train text
    plain = even_windows(corpus.val, train_cfg["batch"], train_cfg["seq_len"], train_cfg["val_batches"])
    assert any(bytes(row[:OVERLAP_BYTES].to(torch.uint8).tolist()) in train_bytes for x, _ in plain for row in x)
