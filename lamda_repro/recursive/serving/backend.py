"""The real scheduler backend: runs the schedulers' calls on a model through DepthBatchedModel.

Per slot it keeps the token in flight (its hidden state, its index, the next input id) and the
request's generated ids. The decode clock is wall time with the prefill calls taken out (the
paper's throughput counts decoding only). Greedy decoding (argmax) throughout.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from lamda_repro.recursive.early_exit import check_threshold
from lamda_repro.recursive.serving.engine import DepthBatchedModel, EngineError, timer
from lamda_repro.recursive.serving.scheduler import ScheduleResult, Workload, run_schedule


class EngineBackend:
    """Greedy decoding of ``prompts`` (one id list per request) on ``model``."""

    def __init__(
        self,
        model: nn.Module,
        prompts: Sequence[Sequence[int]],
        max_batch: int,
        max_len: int,
        threshold: float | None = None,
        kv_policy: str = "copy_state",
    ):
        self.engine = DepthBatchedModel(model, max_batch, max_len, kv_policy)
        self.num_loops = self.engine.geometry.num_loops
        self.threshold = None if threshold is None else check_threshold(threshold, "threshold")
        device = self.engine.device
        self.device = device
        self.prompts = [torch.tensor(list(p), dtype=torch.long, device=device) for p in prompts]
        self.generated: list[list[int]] = [[] for _ in prompts]
        self.request_of = np.full(max_batch, -1, dtype=np.int64)
        self.next_input = torch.zeros(max_batch, dtype=torch.long, device=device)
        self.chosen = torch.zeros(max_batch, dtype=torch.long, device=device)
        self.token_pos = torch.zeros(max_batch, dtype=torch.long, device=device)
        self.hidden = torch.zeros(
            max_batch, self.engine.geometry.hidden_size, dtype=self.engine.dtype, device=device
        )
        self.prefill_s = 0.0
        self.call_s = {"embed": 0.0, "block": 0.0, "head": 0.0, "fill": 0.0}
        self.clock, self.clock_name = timer(device)
        self._own = 0.0  # decode-clock time accumulated while paused/resumed (interleaved runs)
        self._since: float | None = self.clock()  # running since (None = paused)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _idx(self, slots: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(slots, dtype=np.int64)).to(self.device)

    def _timed(self, name: str, start: float) -> None:
        self._sync()
        self.call_s[name] += self.clock() - start

    @torch.no_grad()
    def admit(self, slot: int, request: int) -> None:
        start = self.clock()
        prompt = self.prompts[request]
        if prompt.numel() + 1 > self.engine.max_len:
            raise EngineError(
                f"request {request}: prompt of {prompt.numel()} tokens leaves no room to decode"
            )
        token = int(self.engine.prefill(prompt, slot).argmax())
        self.generated[request] = [token]
        self.request_of[slot] = request
        self.next_input[slot] = token
        self.token_pos[slot] = prompt.numel()
        self._sync()
        self.prefill_s += self.clock() - start

    @torch.no_grad()
    def embed(self, slots: np.ndarray) -> None:
        start = self.clock()
        idx = self._idx(slots)
        self.hidden[idx] = self.engine.embed(self.next_input[idx])
        self._timed("embed", start)

    @torch.no_grad()
    def block(self, slots: np.ndarray, loops: np.ndarray) -> None:
        start = self.clock()
        idx = self._idx(slots)
        self.hidden[idx] = self.engine.block(self.hidden[idx], self._idx(loops), idx, self.token_pos[idx])
        self._timed("block", start)

    @torch.no_grad()
    def head(self, slots: np.ndarray, loops: np.ndarray, early_exit: bool) -> np.ndarray:
        start = self.clock()
        idx = self._idx(slots)
        logits = self.engine.head(self.hidden[idx])
        self.chosen[idx] = logits.argmax(dim=-1)
        if early_exit:
            if self.threshold is None:
                raise EngineError("early exit needs a confidence threshold")
            ready = (torch.softmax(logits.float(), dim=-1).amax(dim=-1) >= self.threshold).cpu().numpy()
        else:
            ready = np.zeros(len(slots), dtype=bool)
        self._timed("head", start)
        return ready

    @torch.no_grad()
    def fill(self, slots: np.ndarray, loops: np.ndarray) -> None:
        start = self.clock()
        idx = self._idx(slots)
        self.engine.fill(self.hidden[idx], self._idx(loops), idx, self.token_pos[idx])
        self._timed("fill", start)

    def emit(self, slots: np.ndarray) -> None:
        idx = self._idx(slots)
        tokens = self.chosen[idx].tolist()
        for slot, token in zip(slots.tolist(), tokens, strict=True):
            self.generated[int(self.request_of[slot])].append(token)
        self.next_input[idx] = self.chosen[idx]
        self.token_pos[idx] += 1

    def step(self) -> None:
        pass

    def pause(self) -> None:
        """Stop the decode clock (another run takes the machine in an interleaved benchmark)."""
        if self._since is not None:
            self._sync()
            self._own += self.clock() - self._since
            self._since = None

    def resume(self) -> None:
        if self._since is None:
            self._since = self.clock()

    def now(self) -> float:
        self._sync()
        running = self.clock() - self._since if self._since is not None else 0.0
        return self._own + running - self.prefill_s

    def wait_until(self, t: float) -> None:
        """Idle until decode-clock time ``t``: the idle span is added to the clock, not slept."""
        delay = t - self.now()
        if delay > 0:
            self._own += delay


def serve(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    workload: Workload,
    scheduler: str,
    max_batch: int,
    threshold: float | None = None,
    kv_policy: str = "copy_state",
    trace: bool = False,
) -> tuple[ScheduleResult, list[list[int]], dict[str, Any]]:
    """Decode the workload's requests (prompts given as ids) on ``model``: early exit when a
    ``threshold`` is given. Returns the schedule result, the generated ids per request and timings."""
    if len(prompts) != workload.num_requests:
        raise EngineError(f"{len(prompts)} prompts for {workload.num_requests} requests")
    for i, (prompt, length) in enumerate(zip(prompts, workload.prompt_lens, strict=True)):
        if len(prompt) != length:
            raise EngineError(f"request {i}: prompt of {len(prompt)} ids, workload says {length}")
    backend = EngineBackend(model, prompts, max_batch, workload.max_context, threshold, kv_policy)
    early_exit = threshold is not None and backend.num_loops > 1
    result = run_schedule(scheduler, workload, backend, max_batch, early_exit, trace)
    timings = {"prefill_s": backend.prefill_s, **{f"{k}_s": v for k, v in backend.call_s.items()}}
    timings["clock"] = backend.clock_name
    timings["bookkeeping_s"] = result.decode_time_s - sum(backend.call_s.values())
    return result, backend.generated, timings


__all__ = ["EngineBackend", "serve"]
