"""Finished layers parked on disk during a prune: the same masks and weights, file-backed parameters,
nothing left on disk, and memory kept when the file system has no room."""

from __future__ import annotations

import shutil
import sys
from collections import namedtuple

import pytest
import torch
from transformers import AutoModelForCausalLM

import sparseheal
from sparseheal.models import decoder_layers
from sparseheal.sparsity import prune_model
from sparseheal.sparsity.parking import LayerParking, parking_for
from sparseheal.sparsity.sparsegpt import SparseGPTPruner, SparseGPTSettings
from sparseheal.sparsity.wanda import WandaPruner


def _mapped_file(address: int) -> str:
    """The path of the memory map of this process that holds ``address`` ("" for anonymous memory)."""
    with open("/proc/self/maps") as fh:
        for line in fh:
            fields = line.split(maxsplit=5)
            start, end = (int(x, 16) for x in fields[0].split("-"))
            if start <= address < end:
                return fields[5].strip() if len(fields) > 5 else ""
    raise AssertionError(f"{address:#x} is in no mapping")


def _tokens() -> torch.Tensor:
    return torch.randint(0, 200, (4, 24), generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("pruner, options", [(WandaPruner, None), (SparseGPTPruner, SparseGPTSettings())],
                         ids=["wanda", "sparsegpt"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_parked_prune_equals_the_resident_one(llama_dir, tmp_path, pruner, options, dtype):
    resident = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=dtype).eval()
    parked = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=dtype).eval()
    masks = prune_model(resident, pruner, _tokens(), None, 0.5, batch_size=2, options=options)
    parking = LayerParking(tmp_path)
    parked_masks = prune_model(parked, pruner, _tokens(), None, 0.5, batch_size=2, options=options,
                               park=parking)
    assert all(torch.equal(masks[k].bits, parked_masks[k].bits) for k in masks)
    reference = dict(resident.named_parameters())
    for name, param in parked.named_parameters():
        assert param.dtype == dtype and torch.equal(param, reference[name]), name
    _, layers = decoder_layers(parked)
    layer_bytes = sum(p.numel() * p.element_size() for p in layers.parameters())
    assert parking.parked_bytes == layer_bytes
    storages = {p.untyped_storage().data_ptr() for p in layers.parameters()}
    assert len(storages) == len(list(layers.parameters()))  # one storage each: nothing shared at the save
    for param in layers.parameters():  # memory maps of files already unlinked
        path = _mapped_file(param.data_ptr())
        assert path.startswith(str(tmp_path / ".sparseheal-parked-")) and path.endswith("(deleted)")
    assert "sparseheal-parked" not in _mapped_file(parked.get_input_embeddings().weight.data_ptr())
    assert list(tmp_path.iterdir()) == []
    if sys.platform.startswith("linux"):  # float32: the weights file's own pages, handed back; bfloat16: a
        assert (parking.released_bytes > 0) == (dtype == torch.float32)  # converted copy, never madvised


def test_a_parked_parameter_can_be_written_without_touching_others(llama_dir, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32)
    layer = decoder_layers(model)[1][0]
    before = {n: p.detach().clone() for n, p in layer.named_parameters()}
    LayerParking(tmp_path)(layer)
    params = dict(layer.named_parameters())
    first, *rest = params
    with torch.no_grad():
        params[first].fill_(1.5)  # a private map: copy on write
    assert torch.all(params[first] == 1.5)
    assert all(torch.equal(params[n], before[n]) for n in rest)


Usage = namedtuple("Usage", "total used free")


def test_parking_needs_room_for_the_model_twice(tmp_path, monkeypatch):
    monkeypatch.setattr(shutil, "disk_usage", lambda _p: Usage(0, 0, 3 * 2**30))
    assert parking_for(tmp_path / "out", 2**30 // 2, torch.device("cpu")) is not None
    assert parking_for(tmp_path / "out", 2**30 + 1, torch.device("cpu")) is None  # twice + 1 GiB spare
    assert parking_for(tmp_path / "a" / "b" / "out", 2**20, torch.device("meta")) is None  # not the CPU


def test_a_prune_leaves_no_parked_file(llama_dir, data_dir, tmp_path):
    out = tmp_path / "pruned"
    sparseheal.prune(str(llama_dir), str(out), method="wanda", nsamples=4, seqlen=32, data_dir=str(data_dir))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pruned"]
    assert (out / "sparsity_masks.safetensors").is_file()


def test_the_heap_is_trimmed_once_the_activations_are_freed(llama_dir, data_dir, tmp_path, monkeypatch):
    """When the layer loop is left, the calibration activations are already freed, so the heap that held
    them is handed back before the record and the save read the parked layers back in (the peak of a
    prune is then its end, not its sum)."""
    import weakref

    import sparseheal.sparsity.calibrate as calibrate
    import sparseheal.sparsity.heap as heap
    import sparseheal.sparsity.pipeline as pipeline

    events, captured = [], []
    real_capture, real_save, real_trim = calibrate.capture_layer_inputs, pipeline.save_model, heap.trim_heap

    def capture(*args, **kwargs):
        batches = real_capture(*args, **kwargs)
        captured.extend(weakref.ref(hidden) for hidden, _ in batches)
        return batches

    def trim():
        events.append(("trimmed", sum(ref() is not None for ref in captured)))
        real_trim()

    monkeypatch.setattr(calibrate, "capture_layer_inputs", capture)
    monkeypatch.setattr(heap, "trim_heap", trim)  # the trim on leaving the loop (not the per-layer ones)
    monkeypatch.setattr(pipeline, "save_model", lambda *a: events.append(("saved",)) or real_save(*a))
    sparseheal.prune(str(llama_dir), str(tmp_path / "pruned"), method="wanda", nsamples=4, seqlen=32,
                     data_dir=str(data_dir))
    assert captured and events == [("trimmed", 0), ("saved",)]
