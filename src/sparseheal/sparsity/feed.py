"""Feeding each prunable matrix of a decoder layer the inputs it receives in a forward of that layer.

A linear's inputs come from a forward pre-hook. The experts of a fused mixture-of-experts tensor are not
modules: the layer's own forward (transformers' eager experts implementation) routes each token to its
experts and multiplies the tokens of expert ``e`` with ``W[e]`` (``F.linear(x, W[e])``, or ``x @ W[e]``
where the tensor is stored (E, in, out)). A torch function mode watches those products while the layer
runs and feeds ``x`` to the pruner of expert ``e``, so each expert's statistics come from exactly the
tokens the model's own router sends to it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from sparseheal.sparsity.base import LinearPruner
from sparseheal.sparsity.capture import StopForward

__all__ = ["Feeder", "eager_experts"]

# products of (x, W[e]) whose second operand is one expert's matrix: F.linear takes W (out, in), matmul
# takes W (in, out)
_LINEAR = {torch.nn.functional.linear, torch._C._nn.linear}
_MATMUL = {torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.mm, torch.Tensor.mm}


class _ExpertProducts(TorchFunctionMode):
    """Calls ``feed(name, x)`` for every product of an input with one expert's matrix of a fused tensor.

    Args:
        tensors: (parameter, {expert index: pruner name}) for each fused tensor of the layer.
        feed: called with the pruner's name and the input (n, in).
    """

    def __init__(self, tensors: list[tuple[nn.Parameter, dict[int, str]]],
                 feed: Callable[[str, torch.Tensor], None]) -> None:
        super().__init__()
        self.by_storage = {p.untyped_storage().data_ptr(): (p, names) for p, names in tensors}
        self.feed = feed

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if (func in _LINEAR or func in _MATMUL) and len(args) >= 2 and torch.is_tensor(args[1]):
            self._see(args[0], args[1])
        return func(*args, **(kwargs or {}))

    def _see(self, x: torch.Tensor, w: torch.Tensor) -> None:
        hit = self.by_storage.get(w.untyped_storage().data_ptr())
        if hit is None or w.dim() != 2:
            return
        param, names = hit
        expert = (w.storage_offset() - param.storage_offset()) // param.stride(0)
        if expert in names:
            self.feed(names[expert], x)


@contextlib.contextmanager
def eager_experts(model: nn.Module) -> Iterator[None]:
    """Runs fused experts with transformers' eager implementation (per expert products, which
    :class:`Feeder` can attribute) while the block is entered; the model's own setting is restored."""
    getter = getattr(model, "get_experts_implementation", None)
    setter = getattr(model, "set_experts_implementation", None)
    if getter is None or setter is None:
        yield
        return
    try:
        before = getter()
    except (AttributeError, ValueError):
        yield
        return
    if all(v in (None, "eager") for v in before.values()):
        yield
        return
    setter("eager")
    try:
        yield
    finally:
        setter(before)


class Feeder:
    """Feeds each distinct input of a layer's matrices to one pruner.

    Within one batch a linear whose input tensor is the very object an earlier linear received (q, k and
    v read the same normed hidden states; gate and up likewise) is not fed: after the pass it adopts
    the statistics of that earlier linear. Once every matrix has received its input the layer's forward
    is stopped, so the rest of the layer (whose outputs nothing reads: they are recomputed after
    pruning) is never computed. An expert that no token of a batch reaches is simply not fed by it.
    """

    def __init__(self, pruners: dict[str, LinearPruner], share: bool, stop: bool = True) -> None:
        self.pruners, self.share, self.stop = pruners, share, stop
        self.batch: list[tuple[torch.Tensor, str, str]] = []  # (input, matrix, matrix fed): inputs are held
        # for the whole batch, so an `is` comparison never meets a freed tensor's reused identity
        self.leaders: dict[str, str] | None = None  # follower -> the linear it shares an input with
        self.fed: set[str] = set()  # every matrix that received an input in some batch

    def feed(self, name: str, x: torch.Tensor) -> None:
        same = next((fed for seen, _, fed in self.batch if seen is x), None) if self.share else None
        if self.share or self.stop:  # held only to compare identities or to count, and only for one batch
            self.batch.append((x, name, name if same is None else same))
        if same is None:
            self.pruners[name].add_batch(x.detach())
        self.fed.add(name)
        if self.stop and len({fed_name for _, fed_name, _ in self.batch}) == len(self.pruners):
            raise StopForward

    def hook(self, name: str) -> Callable:
        def feed(_module: nn.Module, inputs: tuple) -> None:
            self.feed(name, inputs[0])
        return feed

    def end_batch(self) -> None:
        """Checks that every batch groups the linears alike (the adopted statistics cover every batch)."""
        leaders = {name: fed for _x, name, fed in self.batch if fed != name}
        if self.leaders is not None and leaders != self.leaders:
            raise RuntimeError(f"linears shared inputs differently between batches: {self.leaders} against "
                               f"{leaders}")
        self.leaders, self.batch = leaders, []

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        """Hooks on the linears and, for fused experts, the product watch, while the block is entered."""
        linears = {n: p for n, p in self.pruners.items() if p.slot.expert is None}
        tensors: dict[int, tuple[nn.Parameter, dict[int, str]]] = {}
        for name, pruner in self.pruners.items():
            if pruner.slot.expert is not None:
                param = pruner.slot.weight.param
                tensors.setdefault(id(param), (param, {}))[1][pruner.slot.expert] = name
        handles = [p.module.register_forward_pre_hook(self.hook(n)) for n, p in linears.items()]
        mode = _ExpertProducts(list(tensors.values()), self.feed) if tensors else contextlib.nullcontext()
        try:
            with mode:
                yield
        finally:
            for handle in handles:
                handle.remove()
