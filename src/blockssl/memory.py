"""Exact accounting of activation memory: the bytes each part of each block saves for backward.

Peak process or device memory mixes activations with weights, gradients, optimizer state, allocator caching and
temporaries, and it depends on the device. What the backward pass will need is exact and device-independent:
autograd hands every tensor it saves to ``torch.autograd.graph.saved_tensors_hooks``. ``SavedTensorAccounting``
counts each saved storage once while it is saved (a map saved by two operations, such as a ReLU's output read by
the next convolution, is one storage), excludes the model's parameters and buffers (they exist anyway), attributes
it to the part that was running when it was first saved, and follows the live total over time: a graph freed by
its backward releases what it saved, so the peak is the most that was ever held at once, the figure that
separates the execution strategies (all blocks' graphs alive together, or one at a time).

Parts are ``block{k}/backbone``, ``/noise`` (what runs between the block's stages and its head: the noise
injection), ``/head``, ``/projector`` and ``/loss``, blocks numbered from 1. Activations recomputed by
``torch.utils.checkpoint`` live in checkpoint's own frame, outside these hooks: with activation checkpointing
the accounting sees what is kept between the checkpointed stages, not the one stage recomputed during backward.
"""

from __future__ import annotations

import threading
import weakref
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from blockssl.method import BlockwiseSSL
from blockssl.names import block_name

PARTS = ("backbone", "noise", "head", "projector", "loss")


@dataclass
class SavedBytes:
    """Bytes that became saved for backward while each part ran, and the peak held at once."""

    parts: dict[str, int] = field(default_factory=dict)  # "block{k}/{part}" -> bytes
    peak: int = 0

    def blocks(self) -> dict[int, int]:
        """Bytes per block (numbered from 0), all of its parts together."""
        out: dict[int, int] = defaultdict(int)
        for name, value in self.parts.items():
            out[int(name.split("/")[0].removeprefix("block")) - 1] += value
        return dict(out)

    @property
    def total(self) -> int:
        return sum(self.parts.values())


class _Saved:
    """What autograd keeps instead of the tensor: the tensor itself, in an object whose end marks the release."""

    __slots__ = ("__weakref__", "tensor")

    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor = tensor


Name = str | Callable[[], str]


class SavedTensorAccounting:
    """Context manager that accounts every tensor saved for backward inside it (see the module docstring).

    ``scopes`` name modules: a tensor is attributed to the innermost one running when it is first saved, else to
    ``unscoped``; a name may be a function called at that moment. ``exclude`` (parameters, buffers) is never counted.
    ``model_accounting`` builds the per-block parts of a ``BlockwiseSSL``::

        with model_accounting(model) as saved:
            lean_step(trainer, x1, x2, step)
        saved.result().blocks()
    """

    def __init__(self, scopes: Iterable[tuple[nn.Module, Name]], exclude: Iterable[torch.Tensor] = (),
                 unscoped: Name = "other") -> None:
        self.scopes = list(scopes)
        self.excluded = {_storage_key(t) for t in exclude}
        self.unscoped = unscoped
        self.parts: dict[str, int] = defaultdict(int)
        self.live: dict[tuple[str, int], list[int]] = {}  # storage -> [holders alive, bytes]
        self.held = self.peak = 0  # bytes saved for backward and not yet released; the most ever held
        self.stack: list[str] = []
        self.lock = threading.Lock()  # backward may release on autograd's device threads
        self.handles: list[RemovableHandle] = []
        self.hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, _unpack)

    def __enter__(self) -> SavedTensorAccounting:
        for module, name in self.scopes:
            self.handles += [module.register_forward_pre_hook(self._push(name)),
                             module.register_forward_hook(self._pop)]
        self.hooks.__enter__()
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None
                 ) -> None:
        self.hooks.__exit__(kind, error, tb)
        for handle in self.handles:
            handle.remove()
        self.handles.clear()

    def result(self) -> SavedBytes:
        with self.lock:
            return SavedBytes(dict(self.parts), self.peak)

    def _push(self, name: Name) -> Callable[..., None]:
        def push(*_: Any) -> None:
            self.stack.append(resolve_name(name))
        return push

    def _pop(self, *_: Any) -> None:  # a forward hook returning something would replace the module's output
        self.stack.pop()

    def _pack(self, tensor: torch.Tensor) -> Any:
        key = _storage_key(tensor)
        if key in self.excluded:
            return tensor
        holder = _Saved(tensor)
        with self.lock:
            entry = self.live.get(key)
            if entry is None:
                size = tensor.untyped_storage().nbytes()
                self.live[key] = entry = [0, size]
                self.parts[self.stack[-1] if self.stack else resolve_name(self.unscoped)] += size
                self.held += size
                self.peak = max(self.peak, self.held)
            entry[0] += 1
        weakref.finalize(holder, self._release, key)
        return holder

    def _release(self, key: tuple[str, int]) -> None:
        with self.lock:
            entry = self.live[key]
            entry[0] -= 1
            if entry[0] == 0:
                self.held -= entry[1]
                del self.live[key]


def model_accounting(model: BlockwiseSSL) -> SavedTensorAccounting:
    """Accounting by ``block{k}/{part}`` (``PARTS``) of ``model``, its parameters and buffers excluded."""
    scopes, unscoped = model_scopes(model)
    return SavedTensorAccounting(scopes, [*model.parameters(), *model.buffers()], unscoped=unscoped)


def model_scopes(model: BlockwiseSSL) -> tuple[list[tuple[nn.Module, Name]], Name]:
    """The modules of each ``block{k}/{part}`` of ``model`` (``PARTS``), and the name of what runs outside them. The
    noise is no module: it belongs to the block whose module ran last."""
    current = [0]

    def part(k: int, name: str) -> Callable[[], str]:
        def enter() -> str:
            current[0] = k
            return f"{block_name(k)}/{name}"
        return enter

    scopes: list[tuple[nn.Module, Name]] = []
    for k in range(model.num_blocks):
        stages = [m for name in model.block_stages[k] for m in model.backbone.stage_modules(name)]
        scopes += [(m, part(k, "backbone")) for m in stages]
        scopes.append((model.heads[k], part(k, "head")))
        if str(k) in model.projectors:
            scopes.append((model.projectors[str(k)], part(k, "projector")))
            scopes.append((model.losses[str(k)], part(k, "loss")))
    return scopes, lambda: f"{block_name(current[0])}/noise"


def resolve_name(name: Name) -> str:
    """A scope's name as of now (a name may be a function of what ran before)."""
    return name() if callable(name) else name


def _unpack(saved: Any) -> torch.Tensor:
    return saved.tensor if isinstance(saved, _Saved) else saved


def _storage_key(tensor: torch.Tensor) -> tuple[str, int]:
    storage = tensor.untyped_storage()
    # Meta tensors (blockssl.cost) have no data: their storage object is the identity (torch keeps one per storage)
    return str(tensor.device), id(storage) if tensor.is_meta else storage.data_ptr()
