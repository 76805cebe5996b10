"""Whole training steps and evaluation chunks captured as CUDA graphs, replayed per batch.

A training step of these small models launches thousands of tiny kernels; on a GPU it is bound
by launching them, not by arithmetic (../shared/GPU_NOTES.md: 4,543 launches per step, GPU 20 %
busy). A CUDA graph replays the whole step (forward, deep-supervised loss, backward, per-member
clipping, both optimizers) as one launch. What changes between replays lives in static device
tensors: the batch's sample indices, the members' temperatures and entropy weights. What decides
the sequence of kernels picks the graph: the batch size (the last batch of an epoch is smaller)
and which members' controllers are frozen (a handful of variants per trial).

Capturing needs a few eager calls first (cuBLAS workspaces, optimizer state); they are real
steps, not extra ones, so a graphed run takes exactly the steps of an eager one. If a capture
fails, the function stays eager from then on, with one warning that names the reason.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Hashable, Sequence
from typing import Any

import torch

WARMUP_CALLS = 2  # eager calls of a variant before it is captured (the PyTorch docs use 3 on a side stream; 2 suffice for cuBLAS and lazily created optimizer state)


def _cuda_capture(fn: Callable[..., Any], static: Sequence[torch.Tensor], pool: Any):
    """Capture fn(*static) into a CUDA graph; returns (graph, outputs)."""
    graph = torch.cuda.CUDAGraph()
    torch.cuda.synchronize()
    with torch.cuda.graph(graph, pool=pool):
        out = fn(*static)
    return graph, out


class GraphedFunction:
    """fn(*tensors) run eagerly for its first calls of each variant, then captured and replayed.

    fn must do the same kernels for the same variant key and read its changing inputs only from
    the tensors it is given (they become static buffers: every call copies its arguments into
    them). Its outputs (tensors, or a dict/tuple of tensors) are static too: a replay overwrites
    them, so callers use them before the next call.

    Args:
        fn: the function.
        device: where it runs; graphs are used on CUDA only.
        enabled: False keeps everything eager.
        name: what the warning calls it.
        capture: the capture function (tests inject a failing one).
    """

    def __init__(self, fn: Callable[..., Any], device: torch.device, enabled: bool = True,
                 name: str = "step", capture: Callable | None = None):
        self.fn, self.name = fn, name
        self.enabled = enabled and (capture is not None or device.type == "cuda")
        self._capture = capture or _cuda_capture
        self._calls: dict[Hashable, int] = {}
        self._graphs: dict[Hashable, tuple[Any, list[torch.Tensor], Any]] = {}
        self._pool = torch.cuda.graph_pool_handle() if self.enabled and device.type == "cuda" \
            else None
        self.failure: str | None = None  # why graphs were turned off, once they were

    def reset(self) -> None:
        """Forget every captured graph and warm-up count: after the tensors a graph reads were
        replaced (a state dict loaded into the model or the optimizers), replaying it would read
        freed memory."""
        self._graphs.clear()
        self._calls.clear()

    @property
    def n_graphs(self) -> int:
        return len(self._graphs)

    def __call__(self, key: Hashable, *args: torch.Tensor) -> Any:
        if not self.enabled:
            return self.fn(*args)
        if key in self._graphs:
            graph, static, out = self._graphs[key]
            for buf, a in zip(static, args, strict=True):
                buf.copy_(a)
            graph.replay()
            return out
        calls = self._calls.get(key, 0)
        self._calls[key] = calls + 1
        if calls < WARMUP_CALLS:
            return self._eager_on_side_stream(args)
        static = [a.clone() for a in args]
        try:
            graph, out = self._capture(self.fn, static, self._pool)
        except Exception as e:  # noqa: BLE001 - any capture failure falls back to eager
            self._give_up(e)
            return self.fn(*args)
        self._graphs[key] = (graph, static, out)
        graph.replay()  # the capture recorded the kernels without running them
        return out

    def _eager_on_side_stream(self, args: Sequence[torch.Tensor]) -> Any:
        """Warm-up calls run on a side stream, as the PyTorch docs require before capture."""
        if not torch.cuda.is_available() or self._pool is None:
            return self.fn(*args)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            out = self.fn(*args)
        torch.cuda.current_stream().wait_stream(side)
        return out

    def _give_up(self, e: Exception) -> None:
        self.enabled = False
        self._graphs.clear()
        reason = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        self.failure = reason
        if torch.cuda.is_available():
            try:
                torch.cuda.synchronize()
            except Exception:  # noqa: BLE001 - the failed capture may have left an error behind
                pass
        warnings.warn(f"CUDA graph capture of the {self.name} failed ({reason}); "
                      f"training continues eagerly", RuntimeWarning, stacklevel=3)
