"""Forward passes without gradients replayed as CUDA graphs, one per input shape.

Eagerly, a MAPL forward pass is hundreds of small kernels, each launched from Python: on an H200 the
launches, not the arithmetic, bound a small batch. A captured graph launches them together. Used by
inference (:class:`~mapl_ray.inference.Predictor`) and the pseudo-labeler's features at each refit
(:meth:`~mapl_ray.pseudo.labeler.PseudoLabeler.features`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Hashable
from typing import Any

import torch

log = logging.getLogger("mapl_ray.model")

Outputs = dict[str, torch.Tensor]


class GraphedForward:
    """``fn(x, cache)`` replayed as a captured ``torch.cuda.CUDAGraph`` per input shape (PyTorch's
    "whole-network capture"), eager where it cannot be.

    ``fn`` takes a device tensor ``x`` and ``cache`` (autocast's weight-cast cache: False inside a
    capture, where the cache must not outlive it) and returns a dict of tensors. A graph reads the
    tensors ``fn`` read when it was captured: weights and buffers updated in place (an optimizer step,
    BatchNorm statistics) are seen by later replays; tensors *replaced* by new ones are not, so the
    caller names what it replaces in ``key`` (e.g. the memory banks' versions): a new key drops the graphs.

    Args:
        fn: the forward pass (no gradients are recorded: it runs under ``torch.no_grad``).
        device: the CUDA device of ``x``; on another device every call runs eagerly.
        enabled: False runs every call eagerly (e.g. a FAISS memory search, which copies to the host).
        max_graphs: input shapes captured at most (each holds its own memory pool); other shapes run eagerly.
        warmup: eager runs on a side stream before a capture (lazy initialisation, cuDNN's algorithm choice).
    """

    def __init__(
        self,
        fn: Callable[[torch.Tensor, bool], Outputs],
        device: torch.device | str,
        enabled: bool = True,
        max_graphs: int = 8,
        warmup: int = 2,
    ):
        self.fn, self.device = fn, torch.device(device)
        self.enabled = bool(enabled and self.device.type == "cuda")
        self.max_graphs, self.warmup = max_graphs, warmup
        self.graphs: dict[tuple, tuple[Any, torch.Tensor, Outputs]] = {}
        self.key: Hashable = None
        self.captures = 0
        self.failed: str | None = None  # why a capture failed: every call then runs eagerly

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, key: Hashable = None) -> Outputs:
        """``fn(x)`` (through the graph captured for ``x``'s shape and dtype when there is one or room for
        one). The outputs are copies: valid after the next call."""
        if not self.enabled:
            return self.fn(x, True)
        if key != self.key:
            self.graphs.clear()  # they read tensors that the caller replaced
            self.key = key
        shape = (tuple(x.shape), x.dtype, x.stride())
        if shape not in self.graphs:
            if len(self.graphs) >= self.max_graphs:
                return self.fn(x, True)
            try:
                self.graphs[shape] = self._capture(x)
            except RuntimeError as e:  # nothing ran during the capture: run eagerly from now on
                self.failed = f"{type(e).__name__}: {e}".splitlines()[0]
                log.warning("CUDA-graph capture of a forward pass failed (%s); it runs eagerly", self.failed)
                self.enabled, self.graphs = False, {}
                torch.cuda.synchronize(self.device)
                return self.fn(x, True)
        graph, static_in, static_out = self.graphs[shape]
        static_in.copy_(x)
        graph.replay()
        return {k: v.clone() for k, v in static_out.items()}  # the static outputs are overwritten by the next replay

    def _capture(self, x: torch.Tensor) -> tuple[Any, torch.Tensor, Outputs]:
        static_in = x.clone(memory_format=torch.preserve_format)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(self.warmup):
                self.fn(static_in, False)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # thread_local: a training loader's pin-memory thread may allocate pinned memory during the capture
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            static_out = self.fn(static_in, False)
        self.captures += 1
        return graph, static_in, static_out
