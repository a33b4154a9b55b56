"""Memory bank of normal features and the difference information DI* (MAPL eqs. 7-8, MemSeg sec. 3.3).

The bank holds the level 1-3 encoder features of N normal images. For each input the nearest memory
sample is the one with the smallest sum over levels of the mean squared feature difference; each level
is scaled by ``1 / sqrt(C_l H_l W_l)`` before flattening, so this sum is exactly the squared L2
distance between the concatenated vectors and FAISS' ``IndexFlatL2`` finds the same sample. The
difference information is ``DI_l = (f_l - m_l)^2`` and DI* concatenates it with the input features.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from torch import nn

BACKENDS = ("auto", "faiss", "torch")
log = logging.getLogger("mapl_ray.model")


def faiss_available() -> tuple[bool, int]:
    """(faiss importable, number of GPUs FAISS can use)."""
    try:
        import faiss
    except ImportError:
        return False, 0
    try:
        return True, int(faiss.get_num_gpus())
    except AttributeError:  # CPU-only builds lack get_num_gpus in some versions
        return True, 0


def resolve_backend(requested: str, device: torch.device) -> str:
    """Choose the nearest-neighbour backend: ``faiss-gpu``, ``faiss-cpu`` or ``torch``.

    ``auto``: FAISS GPU index when the model is on a GPU and FAISS has GPUs; FAISS CPU index when the
    model is on the CPU; the batched torch path on a GPU without FAISS GPU support (a device-to-host
    copy per step would cost more than the search).

    Raises:
        ValueError: unknown backend, or ``faiss`` requested but not importable.
    """
    if requested not in BACKENDS:
        raise ValueError(f"model.memory_backend must be one of {BACKENDS}, got {requested!r}")
    has_faiss, n_gpu = faiss_available()
    if requested == "torch":
        return "torch"
    if requested == "faiss":
        if not has_faiss:
            raise ValueError("model.memory_backend=faiss but faiss is not installed (pip install faiss-cpu)")
        return "faiss-gpu" if device.type == "cuda" and n_gpu > 0 else "faiss-cpu"
    if device.type == "cuda":
        return "faiss-gpu" if has_faiss and n_gpu > 0 else "torch"
    return "faiss-cpu" if has_faiss else "torch"


def flatten_levels(feats: list[torch.Tensor]) -> torch.Tensor:
    """Concatenate levels into ``(B, D)`` float32 with each level scaled by 1/sqrt(numel per sample)."""
    parts = [f.float().flatten(1) / float(np.sqrt(f[0].numel())) for f in feats]
    return torch.cat(parts, dim=1)


def squared_distances(q: torch.Tensor, b: torch.Tensor, b_sq: torch.Tensor | None = None) -> torch.Tensor:
    """Squared L2 distances ``(M, N)`` between the rows of ``q`` ``(M, C)`` and ``b`` ``(N, C)``, same device.

    ``||q||^2 + ||b||^2 - 2 q.b``: one GEMM instead of an M x N loop; clamped at 0 (the GEMM form rounds an
    exact match to about -1e-6 relative). ``b_sq``: ``b``'s squared row norms ``(N,)`` when the caller
    reuses them across blocks of queries.
    """
    b_sq = b.pow(2).sum(1) if b_sq is None else b_sq
    return (q.pow(2).sum(1, keepdim=True) + b_sq[None] - 2.0 * q @ b.T).clamp_min_(0)


class MemoryBank(nn.Module):
    """Features of N normal images (levels 1-3) and the nearest-memory-sample search.

    Buffers ``level{l}`` hold float32 ``(N, C_l, H_l, W_l)``; they are part of the state dict, so the
    checkpoint carries the bank, and DDP broadcasts it from rank 0 (identical on every worker).
    """

    def __init__(self, backend: str = "auto"):
        super().__init__()
        self.requested_backend = backend
        self.backend = None  # resolved on first search
        self._index = None
        self._index_version = -1
        self._flat: dict[torch.device, torch.Tensor] = {}
        self._flat_version = -1
        # host-side copy of ``version``: reading the buffer would cost a device sync on every search
        self._generation = 0
        self.register_buffer("version", torch.zeros((), dtype=torch.long))
        # typical per-level mean DI between a memory sample and its nearest other memory sample: the
        # unit of the attention maps, so a normal image gives maps near 1 whatever the encoder's scale
        self.register_buffer("di_scale", torch.ones(3))
        self.num_levels = 0

    def __getstate__(self) -> dict:
        """The module's state without its search caches (a FAISS index cannot be copied or pickled; the
        flattened bank is rebuilt from the levels): a copy (``copy.deepcopy``, a pickle) rebuilds them on first use."""
        state = super().__getstate__()
        state.update(_index=None, _index_version=-1, _flat={}, _flat_version=-1)
        return state

    @property
    def generation(self) -> int:
        """Host-side counter that changes whenever the bank's contents change (set, load, broadcast)."""
        return self._generation

    @property
    def size(self) -> int:
        return 0 if self.num_levels == 0 else int(self.level0.shape[0])

    def levels(self) -> list[torch.Tensor]:
        return [getattr(self, f"level{i}") for i in range(self.num_levels)]

    def set(self, feats: list[torch.Tensor]) -> None:
        """Store ``feats`` (list of ``(N, C_l, H_l, W_l)``) as the bank; invalidates the search index."""
        if not feats or feats[0].shape[0] < 1:
            raise ValueError("memory bank needs at least one normal image")
        for i, f in enumerate(feats):
            name = f"level{i}"
            if hasattr(self, name) and getattr(self, name).shape == f.shape:
                getattr(self, name).copy_(f.detach().float())
            else:
                if hasattr(self, name):
                    delattr(self, name)
                self.register_buffer(name, f.detach().float().clone())
        self.num_levels = len(feats)
        self.version += 1
        self._generation += 1
        self.di_scale = self._normal_di_scale().to(self.version.device)

    @torch.no_grad()
    def _normal_di_scale(self) -> torch.Tensor:
        """Mean over memory samples of the channel-and-space mean DI_l to the nearest other sample ``(L,)``."""
        bank = self.levels()
        if self.size < 2:
            return torch.ones(len(bank))
        d = self.distances(bank)
        d.fill_diagonal_(float("inf"))
        nn_idx = d.argmin(1)
        return torch.stack([(m - m[nn_idx]).pow(2).mean() for m in bank]).clamp_min(1e-12).cpu()

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        # Buffers are created lazily by set(); create them from the checkpoint before loading.
        i = 0
        while f"{prefix}level{i}" in state_dict:
            t = state_dict[f"{prefix}level{i}"]
            if not hasattr(self, f"level{i}") or getattr(self, f"level{i}").shape != t.shape:
                if hasattr(self, f"level{i}"):
                    delattr(self, f"level{i}")
                self.register_buffer(f"level{i}", torch.empty_like(t, device=self.version.device))
            i += 1
        if i:
            self.num_levels = i
        self._generation += 1
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def _flat_bank(self, device: torch.device | None = None) -> torch.Tensor:
        """The bank flattened as in :func:`flatten_levels` on ``device``, cached until the bank changes."""
        if self._flat_version != self._generation:
            self._flat, self._flat_version = {}, self._generation
        device = torch.device(device) if device is not None else self.level0.device
        if device not in self._flat:
            self._flat[device] = flatten_levels(self.levels()).to(device)
        return self._flat[device]

    @torch.no_grad()
    def broadcast(self, src: int = 0) -> None:
        """Copy rank ``src``'s bank to every rank of the default ``torch.distributed`` group (DDP).

        The bank is not a DDP-synchronised buffer (broadcasting it every step would move hundreds of
        MB); this is called once after each refresh so every worker searches the same memory samples.
        No-op outside a distributed run.
        """
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
            return
        for t in [*self.levels(), self.di_scale]:
            dist.broadcast(t, src)
        self._generation += 1

    def _faiss_index(self):
        import faiss

        version = self._generation
        if self._index is None or self._index_version != version:
            flat_bank = self._flat_bank()
            index = faiss.IndexFlatL2(flat_bank.shape[1])
            if self.backend == "faiss-gpu":
                index = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, index)
            index.add(np.ascontiguousarray(flat_bank.cpu().numpy(), dtype=np.float32))
            # FAISS scans query by query below 20 queries; a training batch is 8: use its BLAS path
            faiss.cvar.distance_compute_blas_threshold = 1
            self._index, self._index_version = index, version
        return self._index

    @torch.no_grad()
    def nearest(self, feats: list[torch.Tensor], exclude_self: bool = True) -> torch.Tensor:
        """Index of the nearest memory sample for each input.

        Args:
            feats: level features of the inputs, list of ``(B, C_l, H_l, W_l)`` matching the bank.
            exclude_self: skip a memory sample at distance 0 (the input *is* that memory sample, as
                happens when a bank image is drawn as a training normal); DI would be all zero.

        Returns:
            int64 tensor ``(B,)`` on the inputs' device.

        Raises:
            RuntimeError: the bank is empty or its shapes do not match ``feats``.
        """
        if self.size == 0:
            raise RuntimeError("memory bank is empty: call set() (or load a checkpoint) first")
        bank = self.levels()
        for f, m in zip(feats, bank):
            if f.shape[1:] != m.shape[1:]:
                raise RuntimeError(f"memory bank features {tuple(m.shape[1:])} do not match input {tuple(f.shape[1:])}")
        if self.backend is None:
            self.backend = resolve_backend(self.requested_backend, feats[0].device)
        q = flatten_levels(feats)
        k = min(2, self.size) if exclude_self else 1
        if self.backend.startswith("faiss"):
            dist, idx = self._faiss_index().search(np.ascontiguousarray(q.cpu().numpy()), k)
            dist = torch.from_numpy(dist).to(q.device)
            idx = torch.from_numpy(idx).to(q.device)
        else:
            dist, idx = self.distances(feats).topk(k, dim=1, largest=False)
        if k == 2:
            # an exact self-match has distance ~0 up to the float32 rounding of the GEMM form
            # ||q||^2 + ||b||^2 - 2 q.b, which grows with the feature norm and dimension (~1e-6 relative):
            # take the second neighbour then
            self_match = dist[:, 0] <= 1e-5 * (q.pow(2).sum(1) + 1e-12)
            return torch.where(self_match, idx[:, 1], idx[:, 0])
        return idx[:, 0]

    def distances(self, feats: list[torch.Tensor]) -> torch.Tensor:
        """Squared L2 distances ``(B, N)`` float32 between inputs and memory samples (batched torch)."""
        q = flatten_levels(feats)
        return squared_distances(q, self._flat_bank(q.device))

    def difference(
        self, feats: list[torch.Tensor], exclude_self: bool = True
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """DI_l = (f_l - m_l)^2 per level for the nearest memory sample m (eq. 7).

        Returns:
            (list of float tensors ``(B, C_l, H_l, W_l)``, nearest indices ``(B,)`` int64).
        """
        idx = self.nearest(feats, exclude_self=exclude_self)
        di = []
        for f, m in zip(feats, self.levels()):
            mem = m.to(device=f.device, dtype=f.dtype).index_select(0, idx.to(f.device))
            di.append((f - mem).pow(2))
        return di, idx
