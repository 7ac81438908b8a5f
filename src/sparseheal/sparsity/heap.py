"""The C library's allocator and the loaded file's pages during a prune (Linux, glibc; elsewhere nothing).

A decoder layer's forward allocates and frees tensors of megabytes at every step. glibc's default hands
freed memory at the top of its heap back to the system once more than a (dynamically raised, at most
64 MiB) trim threshold is free, and serves blocks above its mmap threshold with fresh maps: either way
the next forward takes page faults on memory it just had (counted by ``benchmarks/prune.py``; see
benchmarks/README.md). :func:`heap_kept` keeps
freed memory in the heap for the length of the layer loop (the driver trims it after each parked layer
and on leaving, so the loop's peak holds one layer's working set), and restores thresholds afterwards.

A model loaded from safetensors on the CPU is a private memory map of its file. A prune reads each
linear's weight (its statistics, its scores) and then writes it in place, so every page is first
mapped read-only and then copied on its first write: two faults, the second with a TLB flush.
:func:`populate_writable` makes the private copies of a module's weights in one call
(``MADV_POPULATE_WRITE``, Linux 5.14) before anything reads them, which costs a
fifth of the two faults per page. The bytes are the file's either way.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import mmap
import sys
from collections.abc import Iterable, Iterator

import torch

__all__ = ["file_maps", "heap_kept", "populate_writable", "trim_heap", "libc"]

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (malloc.h)
_MADV_POPULATE_WRITE = 23  # Linux 5.14
# where glibc's dynamic thresholds settle once a process has freed a block of its mmap ceiling (64-bit)
_SETTLED_MMAP, _SETTLED_TRIM = 32 << 20, 64 << 20


@functools.cache
def libc() -> ctypes.CDLL | None:
    """The C library (Linux), ``madvise`` typed; None elsewhere."""
    if not sys.platform.startswith("linux"):
        return None
    lib = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    lib.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return lib


def _glibc() -> ctypes.CDLL | None:
    lib = libc()
    return lib if lib is not None and hasattr(lib, "mallopt") and hasattr(lib, "malloc_trim") else None


def trim_heap() -> None:
    """Returns the allocator's free heap memory to the system (glibc ``malloc_trim``; elsewhere nothing).

    The layers' temporaries (attention scores, MLP activations, the mask selection's sort) leave free
    blocks scattered over the heap that glibc keeps; trimming after each layer keeps them from adding up.
    """
    lib = _glibc()
    if lib is not None:
        lib.malloc_trim(0)


@contextlib.contextmanager
def heap_kept(keep_below: int = 1 << 30) -> Iterator[None]:
    """Inside the block, freed memory stays in the heap for reuse and blocks under ``keep_below`` bytes
    come from the heap: no page faults for memory the process had a moment ago. Only :func:`trim_heap`
    hands memory back.

    glibc's thresholds are dynamic until set once; on leaving, the heap is trimmed and they are set to the
    values the dynamic rule settles at (mmap 32 MiB, trim 64 MiB), so the rest of the process sees the
    allocator as a long-running default one does.
    """
    lib = _glibc()
    if lib is None:
        yield
        return
    lib.mallopt(_M_MMAP_THRESHOLD, min(keep_below, 2**31 - 1))
    lib.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)
    try:
        yield
    finally:
        lib.mallopt(_M_MMAP_THRESHOLD, _SETTLED_MMAP)
        lib.mallopt(_M_TRIM_THRESHOLD, _SETTLED_TRIM)
        trim_heap()


def file_maps() -> list[tuple[int, int]]:
    """(start, end) of this process's private memory maps of regular files."""
    maps = []
    with open("/proc/self/maps") as fh:
        for line in fh:
            fields = line.split(maxsplit=5)
            path = fields[5].strip() if len(fields) > 5 else ""
            if fields[1].endswith("p") and path.startswith("/"):
                start, end = (int(x, 16) for x in fields[0].split("-"))
                maps.append((start, end))
    return maps


def populate_writable(tensors: Iterable[torch.Tensor]) -> int:
    """Makes the private copies of the pages under ``tensors`` that lie in private file maps, in one call
    per tensor, before they are read and then written; returns the bytes populated (0 where the kernel
    or platform offers no ``MADV_POPULATE_WRITE``). The tensors' values do not change."""
    lib = libc()
    if lib is None:
        return 0
    page, maps, done = mmap.PAGESIZE, None, 0
    for tensor in tensors:
        if tensor.device.type != "cpu" or not tensor.is_contiguous() or tensor.numel() == 0:
            continue
        maps = file_maps() if maps is None else maps
        start = tensor.data_ptr() // page * page
        end = -(-(tensor.data_ptr() + tensor.numel() * tensor.element_size()) // page) * page
        if any(lo <= start and end <= hi for lo, hi in maps):
            if lib.madvise(start, end - start, _MADV_POPULATE_WRITE) != 0:
                return done  # an older kernel: the first writes make the copies, as without this call
            done += end - start
    return done
