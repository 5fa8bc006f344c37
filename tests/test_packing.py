"""Packing (clora_ds.batches.pack_row_indices) against the first-fit packer it replaced, and its cache (clora_ds.plan):
packed once, on rank 0, read back by every later plan of the same data."""
import importlib.util

import numpy as np
import pytest

from conftest import DATA, ROOT

from clora_ds.batches import PACKER_VERSION, pack_examples, pack_row_indices
from clora_ds.plan import cached_packing, packing_cache_path, read_packing, write_packing

MAX_LEN = 2048


def _bench():
    """bench/bench_data.py: the first-fit baseline and the MetaMathQA-like lengths live there, once."""
    spec = importlib.util.spec_from_file_location("bench_data", ROOT / "bench" / "bench_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


BENCH = _bench()


def _lengths(kind: str, n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    if kind == "metamath":  # two lognormals, GSM8K- and MATH-derived (bench/bench_data.py says which)
        return BENCH.metamath_like_lengths(n, seed)
    if kind == "commonsense":  # commonsense_170k: short prompts and one-word answers, a narrow spread
        return np.clip(np.rint(130 * np.exp(0.3 * rng.standard_normal(n))), 40, MAX_LEN).astype(np.int64)
    # skewed: 90% short chat turns, 10% long documents up to the row length
    long = rng.random(n) < 0.1
    return np.where(long, rng.integers(512, MAX_LEN + 1, n), rng.integers(16, 257, n)).astype(np.int64)


def _fill(rows, lengths, max_len=MAX_LEN):
    return sum(int(lengths[i]) for row in rows for i in row) / (len(rows) * max_len)


def _check_rows(rows, lengths, max_len=MAX_LEN):
    flat = [i for row in rows for i in row]
    assert sorted(flat) == list(range(len(lengths))), "every example exactly once"
    assert all(row for row in rows), "no empty row"
    over = [sum(int(lengths[i]) for i in row) for row in rows if sum(int(lengths[i]) for i in row) > max_len]
    assert not over, f"rows over {max_len} tokens: {over[:5]}"


@pytest.mark.parametrize("kind", ["metamath", "commonsense", "skewed"])
def test_rows_as_full_as_first_fit_or_fuller(kind):
    lengths = _lengths(kind, 4000)
    new, old = pack_row_indices(lengths, MAX_LEN, seed=1), BENCH.first_fit_rows(lengths, MAX_LEN, seed=1)
    _check_rows(new, lengths)
    _check_rows(old, lengths)
    new_fill, old_fill = _fill(new, lengths), _fill(old, lengths)
    assert len(new) <= len(old) and new_fill >= old_fill, (
        f"{kind}: best-fit decreasing {len(new)} rows, fill {new_fill:.4f}; first-fit {len(old)} rows, fill {old_fill:.4f}")


def test_deterministic_by_seed_and_mixed_lengths_per_batch():
    lengths = _lengths("metamath", 3000)
    a, b, c = (pack_row_indices(lengths, MAX_LEN, seed) for seed in (5, 5, 6))
    assert a == b
    assert a != c and {tuple(sorted(r)) for r in a} != {tuple(sorted(r)) for r in c}, "another seed, other rows"
    # rows are shuffled: the row order is not the packing order (long-first rows, then the short-only tail)
    firsts = [int(lengths[row[0]]) for row in a]
    assert firsts != sorted(firsts, reverse=True)
    # equal lengths only: the seed still decides which examples share a row
    same = np.full(200, 100)
    assert pack_row_indices(same, 1000, 0) != pack_row_indices(same, 1000, 1)


def _examples(lengths):
    return [{"input_ids": [7] * int(n), "labels": [7] * int(n)} for n in lengths]


def test_pack_examples_keeps_its_signature_and_every_example():
    examples = _examples([i % 47 + 2 for i in range(300)])
    rows = pack_examples(examples, 64, seed=0)
    assert sorted(id(ex) for row in rows for ex in row) == sorted(id(ex) for ex in examples)
    assert all(sum(len(ex["input_ids"]) for ex in row) <= 64 for row in rows)
    assert rows == pack_examples(examples, 64, seed=0)
    with pytest.raises(ValueError, match="65 tokens"):
        pack_row_indices([10, 65], 64, 0)


def test_cache_is_written_read_back_and_rebuilt_when_damaged(tmp_path):
    lengths = _lengths("skewed", 2000)
    examples = _examples(lengths)
    rows, note = cached_packing(examples, MAX_LEN, 3, tmp_path)
    path = packing_cache_path(lengths, MAX_LEN, 3, tmp_path)
    assert path.is_file() and "cached in" in note and f"packed-v{PACKER_VERSION}-" in path.name
    expected = pack_row_indices(lengths, MAX_LEN, 3)
    assert [[id(ex) for ex in row] for row in rows] == [[id(examples[i]) for i in row] for row in expected]

    # the second call reads the file and does not pack: a different valid packing planted there comes back
    planted = [row[::-1] for row in expected[::-1]]
    write_packing(path, planted, lengths, MAX_LEN, 3)
    again, note = cached_packing(examples, MAX_LEN, 3, tmp_path)
    assert "read from the cache" in note
    assert [[id(ex) for ex in row] for row in again] == [[id(examples[i]) for i in row] for row in planted]

    # two examples swapped between rows, the file otherwise intact: the checksum catches it, the packing is rebuilt
    # and the file repaired
    with np.load(path) as saved:
        flat, offsets, meta = saved["rows"].copy(), saved["offsets"], saved["meta"]
    flat[[0, -1]] = flat[[-1, 0]]
    with open(path, "wb") as f:
        np.savez(f, rows=flat, offsets=offsets, meta=meta)
    assert read_packing(path, lengths, MAX_LEN, 3) == (None, "corrupt (checksum mismatch)")
    rebuilt, note = cached_packing(examples, MAX_LEN, 3, tmp_path)
    assert "rebuilt" in note and [[id(ex) for ex in row] for row in rebuilt] == [[id(examples[i]) for i in row] for row in expected]
    assert read_packing(path, lengths, MAX_LEN, 3) == (expected, None)

    # a truncated file, and another seed's file under this name: both refused and rebuilt
    path.write_bytes(path.read_bytes()[:100])
    assert read_packing(path, lengths, MAX_LEN, 3)[1].startswith("unreadable")
    assert "unreadable" in cached_packing(examples, MAX_LEN, 3, tmp_path)[1]
    cached_packing(examples, MAX_LEN, 4, tmp_path)
    path.write_bytes(packing_cache_path(lengths, MAX_LEN, 4, tmp_path).read_bytes())
    assert read_packing(path, lengths, MAX_LEN, 3)[1] == "written for other data or settings"
    # a valid-looking file (checksum recomputed) whose rows hold an example twice is refused too
    bad = [list(row) for row in expected]
    bad[0][0] = bad[1][0]
    write_packing(path, bad, lengths, MAX_LEN, 3)
    assert read_packing(path, lengths, MAX_LEN, 3) == (None, "not a packing of these examples")

    # other lengths (one example one token shorter): another key, another file
    shorter = lengths.copy()
    shorter[0] -= 1
    assert packing_cache_path(shorter, MAX_LEN, 3, tmp_path) != path


def test_plan_run_packs_once_and_reads_the_cache_after(tiny_model_dir, tmp_path):
    from clora_ds.arguments import parse_train_arguments
    from clora_ds.plan import plan_run

    cache = tmp_path / "cache"

    def plan(out, **over):
        args = {"model_name_or_path": tiny_model_dir, "train_file": DATA / "alpaca_tiny.jsonl", "output_dir": out,
                "deepspeed": ROOT / "ds_configs" / "zero2.json", "packing": "true", "max_seq_length": 256,
                "cache_dir": cache, "per_device_train_batch_size": 2, "seed": 3, "lora_r": 4, "clora_k": 4, **over}
        return plan_run(*parse_train_arguments([f"--{k}={v}" for k, v in args.items()]), world=1)

    first, second = plan(tmp_path / "a"), plan(tmp_path / "b")
    note = lambda p: next(n for n in p.notes if n.startswith("packed "))  # noqa: E731
    assert "cached in" in note(first) and "read from the cache" in note(second), (note(first), note(second))
    assert len(list(cache.glob("packed-*.npz"))) == 1
    assert first.identity["data"]["fingerprint"] == second.identity["data"]["fingerprint"]
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists(), "planning writes nothing in --output_dir"
    # a cache directory inside --output_dir is refused before anything is written there
    from clora_ds.errors import RunProblems

    with pytest.raises(RunProblems, match="--cache_dir .* is inside --output_dir"):
        plan(tmp_path / "c", cache_dir=tmp_path / "c" / "cache")
    assert not (tmp_path / "c").exists()
