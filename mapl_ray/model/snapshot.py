"""A frozen copy of a model's weights that passes beside training read while the optimizer moves the original.

The pseudo-labeler's refit features are computed with the model *as it is at the refit step*
(:meth:`~mapl_ray.pseudo.labeler.PseudoLabeler.start_fit`). On a CUDA device they run on a stream of their own,
overlapping the next training steps, so they cannot read the live weights, which those steps update in place:
they read a :class:`WeightSnapshot`, refreshed at each refit by one fused device copy.
"""

from __future__ import annotations

import copy
import time

import torch

from .memory import MemoryBank
from .network import MAPLModel


class WeightSnapshot:
    """A second instance of a model (eval mode, no gradients) whose tensors follow the original on demand.

    :meth:`of` copies every parameter and buffer of the live model but the memory banks' into the snapshot's
    own tensors (``torch._foreach_copy_``, ordered on the current stream after the work already queued there),
    so the snapshot keeps one set of storages: a CUDA graph captured on it stays valid from one refit to the
    next. The banks (most of the model's memory) change only with their ``generation``: when one was refilled,
    or the live model's tensors changed shape, the snapshot is copied whole again (``copy.deepcopy``; search
    indexes are rebuilt on first use, :meth:`~mapl_ray.model.memory.MemoryBank.__getstate__`), and
    :attr:`rebuilds` counts it and :attr:`rebuild_s` sums its host seconds.
    """

    def __init__(self) -> None:
        self.model: MAPLModel | None = None
        self.rebuilds = 0
        self.rebuild_s = 0.0
        self._signature: list | None = None
        self._keys: list[str] = []  # the state keys copied at each call: all but the memory banks'
        self._tensors: list[torch.Tensor] = []

    @staticmethod
    def _signature_of(model: MAPLModel, state: dict[str, torch.Tensor]) -> list:
        return [(k, v.shape, v.dtype, v.device) for k, v in state.items()] + [b.generation for b in model.banks]

    @torch.no_grad()
    def of(self, model: MAPLModel) -> MAPLModel:
        """The snapshot holding ``model``'s weights, buffers and memory banks as they are now (eval mode).

        Args:
            model: the live model (unwrapped from DDP), on any device.

        Returns:
            the snapshot model: the same object from call to call unless a shape or a memory bank changed.
        """
        state = model.state_dict()
        signature = self._signature_of(model, state)
        if self.model is None or signature != self._signature:
            t0 = time.perf_counter()
            self.model = copy.deepcopy(model).eval().requires_grad_(False)
            for param in self.model.parameters():
                param.grad = None
            banks = tuple(f"{name}." for name, m in model.named_modules() if isinstance(m, MemoryBank))
            self._keys = [k for k in state if not k.startswith(banks)]
            copied = self.model.state_dict()
            self._tensors = [copied[k] for k in self._keys]
            self._signature = signature
            self.rebuilds += 1
            self.rebuild_s += time.perf_counter() - t0
        else:  # the same keys and shapes (the signature)
            torch._foreach_copy_(self._tensors, [state[k] for k in self._keys])
        return self.model


__all__ = ["WeightSnapshot"]
