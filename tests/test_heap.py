"""The allocator and page settings of a prune: thresholds restored, values unchanged, nothing on failure."""

from __future__ import annotations

import mmap
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from sparseheal.sparsity import heap

linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc and madvise are Linux's")


class _Recorder:
    """Stands in for the C library: records mallopt and malloc_trim calls."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def mallopt(self, param: int, value: int) -> int:
        self.calls.append(("mallopt", param, value))
        return 1

    def malloc_trim(self, pad: int) -> int:
        self.calls.append(("trim", pad))
        return 1


def test_heap_kept_sets_thresholds_inside_and_settles_them_on_leaving(monkeypatch):
    lib = _Recorder()
    monkeypatch.setattr(heap, "libc", lambda: lib)
    with heap.heap_kept(keep_below=1 << 28):
        inside = list(lib.calls)
    assert inside == [("mallopt", -3, 1 << 28), ("mallopt", -1, 2**31 - 1)]
    assert lib.calls[2:] == [("mallopt", -3, 32 << 20), ("mallopt", -1, 64 << 20), ("trim", 0)]


def test_heap_kept_restores_when_the_block_raises(monkeypatch):
    lib = _Recorder()
    monkeypatch.setattr(heap, "libc", lambda: lib)
    with pytest.raises(RuntimeError), heap.heap_kept():
        raise RuntimeError("a layer failed")
    assert lib.calls[-3:] == [("mallopt", -3, 32 << 20), ("mallopt", -1, 64 << 20), ("trim", 0)]


@pytest.mark.parametrize("lib", [None, object()])  # no C library; one without mallopt (musl, macOS)
def test_heap_kept_and_trim_are_no_ops_without_glibc(monkeypatch, lib):
    monkeypatch.setattr(heap, "libc", lambda: lib)  # any call to mallopt or malloc_trim would raise
    with heap.heap_kept():
        x = torch.ones(1024, 1024) * 2
    heap.trim_heap()
    assert float(x.sum()) == 2 * 1024 * 1024


@linux
def test_populate_writable_copies_file_pages_without_changing_them(tmp_path):
    """A tensor loaded from safetensors (a private map of the file): populated, then written in place;
    the values before the write are the file's and the file itself is unchanged."""
    weights = {"a": torch.randn(256, 96), "b": torch.randn(3, 5)}
    path = tmp_path / "w.safetensors"
    save_file(weights, str(path))
    before = path.read_bytes()
    loaded = load_file(str(path))
    maps = heap.file_maps()
    assert any(lo <= loaded["a"].data_ptr() < hi for lo, hi in maps)  # the loaded tensor is file-mapped
    done = heap.populate_writable(loaded.values())
    assert done == 0 or done >= mmap.PAGESIZE  # 0 only on a kernel without MADV_POPULATE_WRITE
    assert all(torch.equal(loaded[k], weights[k]) for k in weights)
    loaded["a"].mul_(0)
    assert torch.equal(loaded["b"], weights["b"]) and path.read_bytes() == before


def test_populate_writable_skips_tensors_outside_file_maps():
    assert heap.populate_writable([torch.randn(64, 64), torch.empty(0)]) == 0
