"""Measurements for run records: parameter counts, parameter updates, memory, throughput.

Everything here measures the real objects (modules, optimizers, autograd graph); nothing is
estimated from formulas. Formula-based counts for configs too large to allocate live next to
the methods (e.g. lamda_repro.methods.lamda) and in lamda_repro.recursive.counts.
"""

from __future__ import annotations

import contextlib
import os
import resource
import sys
import time
import weakref
from typing import Any, Callable, Iterable

import torch
from torch import nn

try:
    from transformers import TrainerCallback
except ImportError:  # pragma: no cover - transformers is a hard dependency
    TrainerCallback = object  # type: ignore[assignment,misc]


# -- parameters ----------------------------------------------------------------------------


def count_parameters(model: nn.Module) -> dict[str, int]:
    """Trainable and total parameter elements; tensors shared between modules count once; elements a
    module declares frozen (``frozen_trainable_elements()``) are not trainable."""
    seen: set[int] = set()
    trainable = total = 0
    for p in model.parameters():  # nn.Module.parameters() already de-duplicates objects
        key = id(p)
        if key in seen:
            continue
        seen.add(key)
        total += p.numel()
        if p.requires_grad:
            trainable += p.numel()
    # A module may hold elements of trainable Parameters that no longer train (LaMDA's frozen
    # columns of B, kept in one Parameter so data-parallel wrappers see a fixed set).
    trainable -= sum(
        m.frozen_trainable_elements() for m in model.modules() if hasattr(m, "frozen_trainable_elements")
    )
    return {"trainable": trainable, "total": total}


def whole_parameters(model: nn.Module, with_grads: bool = False):
    """A context in which ``model``'s parameters are whole: FSDP keeps only its shard of each
    parameter outside the forward, so for an FSDP root this is ``summon_full_params`` with write-back
    (a collective: every rank enters it); for any other model, nothing."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    if isinstance(model, FullyShardedDataParallel):
        return FullyShardedDataParallel.summon_full_params(model, writeback=True, with_grads=with_grads)
    return contextlib.nullcontext()


def _tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def memory_breakdown(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> dict[str, int]:
    """Bytes held by parameters, their gradients and the optimizer state, right now."""
    params = list({id(p): p for p in model.parameters()}.values())
    out = {
        "param_bytes": sum(_tensor_bytes(p) for p in params),
        "grad_bytes": sum(_tensor_bytes(p.grad) for p in params if p.grad is not None),
        "optimizer_state_bytes": optimizer_state_bytes(optimizer) if optimizer is not None else 0,
    }
    return out


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    total = 0
    for state in optimizer.state.values():
        for v in state.values():
            if torch.is_tensor(v):
                total += _tensor_bytes(v)
    return total


def optimizer_state_elements(optimizer: torch.optim.Optimizer, params: Iterable[torch.Tensor]) -> int:
    """Elements of optimizer state held for the given parameters (scalar step counters excluded)."""
    total = 0
    for p in params:
        for v in optimizer.state.get(p, {}).values():
            if torch.is_tensor(v) and v.dim() > 0:
                total += v.numel()
    return total


# -- activations saved for backward --------------------------------------------------------


def _storage_key(t: torch.Tensor) -> tuple[str, int]:
    s = t.untyped_storage()
    return (str(t.device), s.data_ptr())


def saved_for_backward_bytes(
    fn: Callable[[], torch.Tensor], model: nn.Module | None = None, backward: bool = True
) -> int:
    """Bytes of distinct storages that autograd saves for backward while ``fn()`` runs.

    ``fn`` runs a forward pass and returns a scalar loss. Storages of the model's parameters
    and buffers are excluded (they are held anyway), so the number is the activation memory
    of the training step. A saved view counts its whole storage, since that is what it
    keeps alive. Runs the backward pass afterwards unless ``backward=False``.
    """
    excluded: set[tuple[str, int]] = set()
    if model is not None:
        for t in list(model.parameters()) + list(model.buffers()):
            excluded.add(_storage_key(t))
    # storage -> (bytes, the saved tensors on it). A tensor saved by a part of the graph that the
    # forward pass itself drops (e.g. a weight norm computed and detached) is freed before the
    # step ends, and the allocator may hand its address to a later storage: only storages with
    # a saved tensor still alive at the end count, and a dead entry never hides a new storage
    # at the same address (otherwise the count depends on where the allocator put things).
    seen: dict[tuple[str, int], tuple[int, list[weakref.ref]]] = {}

    def alive(refs: list[weakref.ref]) -> bool:
        return any(r() is not None for r in refs)

    def pack(t: torch.Tensor) -> torch.Tensor:
        if isinstance(t, nn.Parameter) or (t._base is not None and isinstance(t._base, nn.Parameter)):
            return t
        key = _storage_key(t)
        if key in excluded:
            return t
        entry = seen.get(key)
        if entry is None or not alive(entry[1]):
            seen[key] = (t.untyped_storage().nbytes(), [weakref.ref(t)])
        else:
            entry[1].append(weakref.ref(t))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = fn()
    total = sum(nbytes for nbytes, refs in seen.values() if alive(refs))
    if backward:
        loss.backward()
    return int(total)


# -- peak memory ---------------------------------------------------------------------------


def _read_status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_rss_peak() -> bool:
    """Reset the kernel's RSS high-water mark of this process (Linux: clear_refs=5)."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


class PeakMemory:
    """Context manager measuring the peak memory of the code inside it.

    CUDA: ``torch.cuda.max_memory_allocated`` / ``max_memory_reserved`` after a reset, minus
    the allocation at entry (``peak_kind = "cuda_allocated"``). CPU: the process resident-set
    high-water mark (VmHWM after resetting it; ``ru_maxrss`` where /proc is missing), which
    includes the interpreter and libraries (``peak_kind = "cpu_rss"``); ``peak_delta_bytes``
    is the growth over the resident set at entry.
    """

    def __init__(self, device: str | torch.device | None = None):
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self._result: dict[str, Any] = {}

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base_alloc = torch.cuda.memory_allocated(self.device)
            self._base_reserved = torch.cuda.memory_reserved(self.device)
        else:
            self._reset_ok = _reset_rss_peak()
            rss = _read_status_kib("VmRSS")
            self._base_rss = rss * 1024 if rss is not None else None
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak_alloc = torch.cuda.max_memory_allocated(self.device)
            peak_res = torch.cuda.max_memory_reserved(self.device)
            self._result = {
                "device": str(self.device),
                "peak_kind": "cuda_allocated",
                "peak_bytes": int(peak_alloc - self._base_alloc),
                "cuda_peak_allocated_bytes": int(peak_alloc),
                "cuda_reserved_bytes": int(peak_res - self._base_reserved),
                "cuda_peak_reserved_bytes": int(peak_res),
            }
        else:
            hwm = _read_status_kib("VmHWM")
            if hwm is not None and self._reset_ok:
                peak = hwm * 1024
            else:
                ru = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
                peak = ru if sys.platform == "darwin" else ru * 1024
            self._result = {
                "device": "cpu",
                "peak_kind": "cpu_rss",
                "peak_bytes": int(peak),
                "peak_delta_bytes": int(peak - self._base_rss) if self._base_rss is not None else None,
            }

    def result(self) -> dict[str, Any]:
        return dict(self._result)


# -- parameter updates and throughput during training ---------------------------------------


def default_updated_elements(optimizer: torch.optim.Optimizer) -> int:
    """Elements of the optimizer's parameters that have a gradient at this step."""
    n = 0
    seen: set[int] = set()
    for group in optimizer.param_groups:
        for p in group["params"]:
            if id(p) in seen:
                continue
            seen.add(id(p))
            if p.requires_grad and p.grad is not None:
                n += p.numel()
    return n


class UpdateCounter(TrainerCallback):
    """Counts parameter updates: the sum over optimizer steps of elements that were updated.

    ``updated_fn(model, optimizer)`` may return a method-specific count (e.g. LaMDA excludes
    frozen components of B); None falls back to ``default_updated_elements``.
    """

    def __init__(self, updated_fn: Callable[[nn.Module, Any], int | None] | None = None):
        self.updated_fn = updated_fn
        self.total = 0
        self.steps = 0

    def on_optimizer_step(self, args, state, control, model=None, optimizer=None, **kwargs):
        opt = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps the optimizer
        n = self.updated_fn(model, opt) if self.updated_fn is not None else None
        if n is None:
            n = default_updated_elements(opt)
        self.total += int(n)
        self.steps += 1


class TokenCounter(TrainerCallback):
    """Counts real (non-padding) tokens and samples of the training batches, and train time."""

    def __init__(self):
        self.tokens = 0
        self.samples = 0
        self._t0: float | None = None
        self.train_time_s = 0.0

    def count_batch(self, batch: dict[str, Any]) -> None:
        mask = batch.get("attention_mask")
        ids = batch.get("input_ids")
        if mask is not None:
            self.tokens += int(mask.sum().item())
            self.samples += int(mask.shape[0])
        elif ids is not None:
            self.tokens += int(ids.numel())
            self.samples += int(ids.shape[0])

    def on_train_begin(self, args, state, control, **kwargs):
        self._t0 = time.perf_counter()

    def on_train_end(self, args, state, control, **kwargs):
        if self._t0 is not None:
            self.train_time_s = time.perf_counter() - self._t0


def set_threads(n: int) -> None:
    if n and n > 0:
        torch.set_num_threads(n)
        os.environ.setdefault("OMP_NUM_THREADS", str(n))
