"""Parking finished decoder layers on disk while the prune goes on.

After the driver has pruned a layer and passed its outputs on, nothing reads that layer's weights until
the pruned model is written. On the CPU they would stay resident (as private copies of the loaded
file's pages), so the peak of a prune would hold the whole model beside the calibration activations.
:class:`LayerParking` writes each parameter of a finished layer to a file and re-points it at a
private, read-on-demand memory map of it (``torch.from_file(shared=False)``); the file is unlinked at
once, so it occupies disk only while the model lives and nothing is left behind by a killed process.
The bits are the same: the parked tensors are the bytes that were written.

A model loaded from safetensors is itself one private memory map of the weights file, whose pages the
prune's in-place writes turned into private copies; those stay resident while any tensor of the file
lives. So after re-pointing, the pages that lie wholly inside the layer's old tensors are handed back
(``madvise(MADV_DONTNEED)``, Linux, file-backed private maps only): nothing reads them any more.
"""

from __future__ import annotations

import logging
import mmap
import os
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

from sparseheal.checks import existing_parent
from sparseheal.sparsity.heap import file_maps, libc

__all__ = ["LayerParking", "parking_for", "release_pages"]

log = logging.getLogger(__name__)

_MADV_DONTNEED = 4  # Linux


def _merged(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """(start, end) address ranges, touching or overlapping ones merged."""
    merged: list[tuple[int, int]] = []
    for start, end in sorted(ranges):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(end, merged[-1][1]))
        else:
            merged.append((start, end))
    return merged


def release_pages(ranges: list[tuple[int, int]]) -> int:
    """Hands back the pages wholly inside ``ranges`` (addresses no live tensor reads) that belong to a
    private map of a file; returns the bytes released (0 where the platform offers no ``madvise``)."""
    lib = libc()
    if lib is None:
        return 0
    page, maps, released = mmap.PAGESIZE, file_maps(), 0
    for start, end in _merged(ranges):
        first, last = -(-start // page) * page, end // page * page  # whole pages only
        if last > first and any(lo <= first and last <= hi for lo, hi in maps):
            if lib.madvise(first, last - first, _MADV_DONTNEED) == 0:
                released += last - first
    return released


class LayerParking:
    """Moves the CPU parameters of finished layers into unlinked, memory-mapped files in ``directory``.

    Args:
        directory: where the files are written (the output's file system: it needs the layer's bytes).
    """

    def __init__(self, directory: str | os.PathLike) -> None:
        self.directory = Path(directory)
        self.parked_bytes = 0
        self.released_bytes = 0

    @torch.no_grad()
    def __call__(self, layer: nn.Module) -> None:
        params = [p for p in layer.parameters() if p.device.type == "cpu" and p.is_contiguous()]
        old = [(p.data_ptr(), p.data_ptr() + p.numel() * p.element_size()) for p in params]
        for param in params:  # one file and one storage each: a save sees no tensors sharing memory
            param.data = self._park(param.detach())
            self.parked_bytes += param.numel() * param.element_size()
        self.released_bytes += release_pages(old)

    def _park(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor``'s bytes written to an unlinked file, as a private memory map of it."""
        raw = tensor.reshape(-1).view(torch.uint8)  # (nbytes,)
        fd, name = tempfile.mkstemp(prefix=".sparseheal-parked-", dir=self.directory)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(raw.numpy().data)
            mapped = torch.from_file(name, shared=False, size=raw.numel(), dtype=torch.uint8)  # read lazily
        finally:
            os.unlink(name)
        return mapped.view(tensor.dtype).view(tensor.shape)


def parking_for(output: str | os.PathLike, model_bytes: int, device: torch.device) -> LayerParking | None:
    """A parking in ``output``'s parent directory when layers live on the CPU and that file system holds
    the model twice (the parked layers, then the written output) with room to spare; else None."""
    if device.type != "cpu":
        return None
    parent = existing_parent(Path(output).expanduser().absolute().parent)
    free = shutil.disk_usage(parent).free
    if free < 2 * model_bytes + 2**30:
        log.info("finished layers stay in memory: %s has %.1f GiB free, parking them needs %.1f GiB more",
                 parent, free / 2**30, model_bytes / 2**30)
        return None
    return LayerParking(parent)
