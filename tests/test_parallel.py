"""ordered_map's hand-over of results through shared memory: the same results as pickled whole, nothing left behind
however the caller stops, and the files of a killed caller swept."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pytest

from desctune.data import parallel


def _result(i: int, n: int) -> dict:
    """A result like clean's: Arrow arrays (one sliced, so with an offset), numpy hashes, plain Python values."""
    texts = pa.array([f"row {i}-{k} " + "x" * (k % 50) for k in range(n)]).slice(1)
    return {"i": i, "texts": texts, "hashes": np.arange(n, dtype=np.uint64) * np.uint64(i + 1), "names": ["a", None]}


def _fails_on(i: int, n: int, bad: int) -> dict:
    if i == bad:
        raise ValueError(f"item {i}")
    return _result(i, n)


def _ours(folder) -> list[str]:
    return [f for f in os.listdir(folder) if f.startswith(f"desctune-result-{os.getpid()}-")]


@pytest.fixture
def shared(tmp_path, monkeypatch):
    monkeypatch.setattr(parallel, "shared_dir", lambda: str(tmp_path))
    return tmp_path


@pytest.mark.parametrize("n", [10, 40_000])  # under and over SHARED_MIN_BYTES: pickled whole, and through a file
def test_results_equal_those_made_in_this_process_and_no_file_remains(shared, n, monkeypatch):
    files = []
    unpack = parallel._unpack
    monkeypatch.setattr(parallel, "_unpack", lambda packed: files.append(packed[0]) or unpack(packed))
    got = list(parallel.ordered_map(_result, ((i, n) for i in range(6)), workers=2))
    for i, r in enumerate(got):
        want = _result(i, n)
        assert r["i"] == i and r["names"] == want["names"] and r["texts"].equals(want["texts"])
        assert np.array_equal(r["hashes"], want["hashes"])
    assert files == (["shared"] if n > 10 else ["whole"]) * 6
    assert _ours(shared) == []


def test_a_caller_that_stops_early_or_a_failing_item_leaves_no_file(shared):
    gen = parallel.ordered_map(_result, ((i, 40_000) for i in range(8)), workers=2)
    next(gen)
    gen.close()  # the results in flight were made, never taken
    assert _ours(shared) == []
    with pytest.raises(ValueError, match="item 3"):
        list(parallel.ordered_map(_fails_on, ((i, 40_000, 3) for i in range(8)), workers=2))
    assert _ours(shared) == []


def test_a_full_or_missing_folder_falls_back_to_pickling_whole(tmp_path, monkeypatch):
    monkeypatch.setattr(parallel, "shared_dir", lambda: str(tmp_path / "gone"))
    got = list(parallel.ordered_map(_result, ((i, 40_000) for i in range(3)), workers=2))
    assert [r["texts"].equals(_result(i, 40_000)["texts"]) for i, r in enumerate(got)] == [True] * 3


def test_files_of_a_killed_caller_are_swept_and_those_of_a_live_one_kept(shared):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    left = shared / f"desctune-result-{dead_pid}-{'0' * 32}"
    live = shared / f"desctune-result-{os.getpid()}-{'1' * 32}"
    other = shared / "someone-elses-file"
    for p in (left, live, other):
        p.write_bytes(b"x")
    assert parallel.sweep_shared(str(shared)) == [left.name]
    assert not left.exists() and live.exists() and other.exists()


def test_a_shared_file_is_its_owners_alone_and_taken_once(shared):
    import stat

    packed = parallel._pack(_result(0, 40_000), str(shared))
    assert packed[0] == "shared" and stat.S_IMODE(os.stat(packed[2]).st_mode) == 0o600
    assert parallel._unpack(packed)["texts"].equals(_result(0, 40_000)["texts"])
    assert not os.path.exists(packed[2])
