"""Small torch helpers shared by training and inference: image arrays to tensors, device choice, autocast,
deterministic kernels."""

from __future__ import annotations

import os

import numpy as np
import torch


def use_native_depthwise(module: torch.nn.Module) -> int:
    """Run the depthwise convolutions of ``module`` (``nn.Conv2d`` with ``groups == in_channels > 1``, timm's
    same-padding ones included) on PyTorch's own kernels, cuDNN off for those calls only (forward passes;
    the frozen encoder has no backward). Why: cuDNN >= 9.10 compiles its depthwise engines at run time (NVRTC),
    about 1.5 s per new input shape in every fresh process (cudnn-frontend issue #1066). Each module's class
    is swapped for a subclass, so parameters, state-dict keys and copies (EMA) are unchanged. Returns the
    number of convolutions switched."""
    count = 0
    for mod in module.modules():
        cls = type(mod)
        if isinstance(mod, torch.nn.Conv2d) and mod.groups > 1 and mod.groups == mod.in_channels:
            if not getattr(cls, "_native_depthwise", False):
                mod.__class__ = _native_class(cls)
            count += 1
    return count


_NATIVE_CLASSES: dict[type, type] = {}


def _native_class(cls: type) -> type:
    if cls not in _NATIVE_CLASSES:

        def forward(self, x):
            with torch.backends.cudnn.flags(enabled=False):
                return cls.forward(self, x)

        _NATIVE_CLASSES[cls] = type(f"Native{cls.__name__}", (cls,), {"forward": forward, "_native_depthwise": True})
    return _NATIVE_CLASSES[cls]


def use_deterministic_kernels() -> None:
    """Ask PyTorch for deterministic kernels in this process (``train.deterministic``): cuDNN's deterministic
    algorithms without benchmarking, ``torch.use_deterministic_algorithms(True, warn_only=True)`` (an op
    with no deterministic CUDA kernel warns once and runs as before, so a run never stops for it) and
    cuBLAS's fixed workspace (``CUBLAS_WORKSPACE_CONFIG``, read when cuBLAS starts: call this before the
    first CUDA matrix product). Source: PyTorch's "Reproducibility" notes. Slower on the GPU; no effect on
    CPU runs, which are repeatable already."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
    torch.use_deterministic_algorithms(True, warn_only=True)


def parse_device(device: str | torch.device | None) -> torch.device | None:
    """The device a ``--device`` value names, without looking for it on this machine; None for ``auto``.

    Raises:
        ConfigError: a name torch does not know.
    """
    from .config import ConfigError

    if device in (None, "auto"):
        return None
    try:
        return torch.device(device)
    except RuntimeError as e:
        raise ConfigError(f"--device {device!r} is not a device name: expected auto, cpu, cuda or cuda:N") from e


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """``auto`` -> CUDA when available, else CPU.

    Raises:
        ConfigError: a CUDA device asked for where torch sees no GPU, or a name torch does not know.
    """
    from .config import ConfigError

    dev = parse_device(device)
    if dev is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {device}: no CUDA GPU is available here (use --device cpu or auto)")
    return dev


def to_tensor(images: np.ndarray | torch.Tensor, device: torch.device | str = "cpu") -> torch.Tensor:
    """uint8 ``(N, H, W, 3)`` (numpy, or a possibly pinned tensor) -> float32 ``(N, 3, H, W)`` in [0, 1]
    on ``device``, copied non-blocking; the NHWC storage makes the result channels-last."""
    t = images if isinstance(images, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(images))
    return t.to(device, non_blocking=True).permute(0, 3, 1, 2).float().div_(255.0)


def to_host(
    tensors: dict[str, torch.Tensor], stream: torch.cuda.Stream | None = None
) -> tuple[dict[str, torch.Tensor], torch.cuda.Event | None]:
    """Host copies of ``tensors`` (any shapes and dtypes).

    With ``stream`` (their CUDA stream, current when called) the copies go into pinned memory, queued on it
    without waiting: the returned event marks them complete (``event.synchronize()`` before reading them; it
    releases the GIL). Without, they are made now (a device sync on CUDA; CPU tensors are returned as they are)
    and the event is None.
    """
    if stream is None:
        return {k: v.cpu() for k, v in tensors.items()}, None
    host = {}
    for k, v in tensors.items():
        host[k] = torch.empty(v.shape, dtype=v.dtype, pin_memory=True)
        host[k].copy_(v, non_blocking=True)
    ready = torch.cuda.Event(blocking=True)  # its waiter sleeps instead of spinning on a CPU core
    ready.record(stream)
    return host, ready


def pad_rows(x: np.ndarray | torch.Tensor, size: int) -> np.ndarray | torch.Tensor:
    """``x`` (numpy array or tensor, rows first) padded to ``size`` rows with copies of its last row; ``x``
    itself when it has ``size`` rows or more (or none).

    Eval-mode passes of one input shape share one CUDA graph and one set of cuDNN convolution plans (a new
    shape costs seconds of planning in a fresh process). Each image's result does not depend on the others
    (BatchNorm in eval mode), so the caller keeps the first ``len(x)`` rows of the output."""
    n = len(x)
    if n >= size or n == 0:
        return x
    if isinstance(x, torch.Tensor):
        return torch.cat([x, x[-1:].expand(size - n, *x.shape[1:])])
    return np.concatenate([x, np.repeat(x[-1:], size - n, axis=0)])


def autocast_context(device: torch.device, amp: str, cache_enabled: bool = True):
    """bf16 autocast where asked (``amp='bf16'``, or ``auto`` on CUDA); a no-op context otherwise.

    ``cache_enabled=False`` inside CUDA-graph capture (autocast's weight-cast cache must not outlive it).
    """
    if amp not in ("auto", "off", "bf16"):
        raise ValueError(f"train.amp must be auto, off or bf16, got {amp!r}")
    enabled = amp == "bf16" or (amp == "auto" and device.type == "cuda")
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled, cache_enabled=cache_enabled)
