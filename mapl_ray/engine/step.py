"""The training step: recorded once as a CUDA graph and replayed on one GPU, device learning rates,
and loss values reduced across DDP ranks."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch

log = logging.getLogger("mapl_ray.train")


class CudaGraphStep:
    """The training step recorded once as a CUDA graph and replayed (``torch.cuda.CUDAGraph``, "whole-network
    capture" in the PyTorch CUDA-graphs notes).

    ``step_fn(x, masks, kind, label, capturing)`` runs forward, losses, backward and ``optimizer.step()``
    and returns the loss dict; the caller's optimizer must be built with ``capturable=True`` and a
    device tensor learning rate (:func:`device_lr`), so replays follow the LR schedule. Eagerly launched,
    the step's many small kernels kept the H200 waiting on the host (about 26 ms per step at batch 8);
    a replay launches them together.

    What a graph bakes in is named by ``key`` (the pseudo-labeler's fit step and the memory-bank version):
    when it changes, the next step runs eagerly (which also builds any new device tensors outside the
    capture) and the one after is captured anew. The first ``warmup`` steps run eagerly on a side stream
    (lazy initialisation, cuDNN algorithm choice, optimizer state) before the first capture. A batch of
    another shape than the captured one is captured anew (the loop's batches all have one shape).
    If a capture fails, the step runs eagerly and so does the rest of the run (``failed`` says why).
    """

    def __init__(
        self,
        step_fn: Callable[..., dict[str, torch.Tensor]],
        optimizer: torch.optim.Optimizer,
        device: torch.device,
        warmup: int = 3,
    ):
        self.step_fn, self.optimizer, self.device, self.warmup = step_fn, optimizer, device, warmup
        self.graph: torch.cuda.CUDAGraph | None = None
        self.key: Any = object()  # baked-in state of the last step (of the graph, once captured)
        self.static_in: tuple[torch.Tensor, ...] = ()
        self.static_out: dict[str, torch.Tensor] = {}
        self.eager_steps = 0
        self.captures = 0
        self.failed: str | None = None  # why capture failed: the run then stays eager
        self._side = torch.cuda.Stream(device)

    def _eager(self, inputs: tuple[torch.Tensor, ...]) -> dict[str, torch.Tensor]:
        self.eager_steps += 1
        self.optimizer.zero_grad(set_to_none=True)
        self._side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self._side):
            out = self.step_fn(*inputs, capturing=False)
        torch.cuda.current_stream(self.device).wait_stream(self._side)
        return out

    def __call__(self, key: Any, *inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        """One training step on ``inputs`` (device tensors); returns the loss dict (valid until the next call)."""
        shapes = tuple(t.shape for t in inputs)
        same_shape = bool(self.static_in) and shapes == tuple(t.shape for t in self.static_in)
        if self.graph is not None and key == self.key and same_shape:
            for dst, src in zip(self.static_in, inputs):
                dst.copy_(src, non_blocking=True)
            self.graph.replay()
            return self.static_out
        if self.failed or self.eager_steps < self.warmup or key != self.key:
            self.key = key  # new baked-in state: one eager step first, capture on the next
            self.graph = None
            return self._eager(inputs)
        self.graph, self.static_out = None, {}  # free the old graph's memory pool before capturing again
        self.static_in = tuple(t.clone() for t in inputs)
        self.optimizer.zero_grad(set_to_none=True)  # gradients are allocated inside the graph's pool
        graph = torch.cuda.CUDAGraph()
        try:
            # thread_local: the loader's pin-memory thread may allocate pinned memory during the capture
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                self.static_out = self.step_fn(*self.static_in, capturing=True)
        except RuntimeError as e:  # nothing ran during the capture: the step is redone eagerly
            self.failed = f"{type(e).__name__}: {e}".splitlines()[0]
            log.warning("CUDA-graph capture of the training step failed (%s); training continues eagerly", self.failed)
            self.static_in, self.static_out = (), {}
            torch.cuda.synchronize(self.device)
            return self._eager(inputs)
        self.graph = graph
        self.captures += 1
        graph.replay()  # capture records without running: this replay is the step itself
        return self.static_out


def device_lr(optimizer: torch.optim.Optimizer, device: torch.device) -> None:
    """Make every param group's learning rate a 0-dim float32 tensor on ``device`` (in place).

    A captured optimizer step reads the LR from that tensor, and the torch LR schedulers update a tensor
    LR in place; a float LR would be frozen into the graph. Called after building the optimizer and
    again after ``load_state_dict`` (which brings back the saved value).
    """
    for group in optimizer.param_groups:
        lr = group["lr"]
        value = float(lr.item()) if isinstance(lr, torch.Tensor) else float(lr)
        group["lr"] = torch.tensor(value, dtype=torch.float32, device=device)


LOSS_KEYS = ("loss", "l1", "focal", "l_yl", "l_yu")


def reduce_losses(losses: dict[str, torch.Tensor], world_size: int) -> dict[str, float]:
    """Loss values averaged over the DDP ranks (one all-reduce), as floats on the host."""
    vals = torch.stack([losses[k].detach().float() for k in LOSS_KEYS])
    if world_size > 1:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(vals)
            vals /= world_size
    return dict(zip(LOSS_KEYS, vals.tolist()))
