"""Perlin noise for the anomaly mask of the simulation (MemSeg / DRAEM practice; MAPL eq. 1).

All randomness comes from the ``numpy.random.Generator`` passed in, so a seed reproduces a sample.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["perlin_noise_2d"]


def _fade(t: np.ndarray, out: np.ndarray) -> np.ndarray:
    """Perlin's "improved noise" quintic ``6t^5 - 15t^4 + 10t^3`` (zero 1st/2nd derivative at 0, 1),
    evaluated as ``t*t*t * (t*(t*6 - 15) + 10)`` into ``out`` (a buffer of ``t``'s shape, not ``t``)."""
    a = t * np.float32(6.0)
    a -= np.float32(15.0)
    a *= t
    a += np.float32(10.0)
    np.multiply(t, t, out=out)
    out *= t
    out *= a
    return out


def lattice_coordinates(
    ys: np.ndarray, xs: np.ndarray, shape: tuple[int, int], res: tuple[int, int], angle: float
) -> tuple[np.ndarray, np.ndarray]:
    """Lattice coordinates ``(u, v)`` (new float32 ``(len(ys), len(xs))`` arrays) of pixel rows ``ys`` x
    columns ``xs`` of an ``shape`` image with ``res`` lattice cells, the pattern rotated by ``angle`` degrees
    about the image centre (see :func:`perlin_noise_2d`)."""
    h, w = shape
    ry, rx = res
    yy = ys.astype(np.float32)[:, None]
    xx = xs.astype(np.float32)[None, :]
    if angle:
        a = math.radians(float(angle))
        ca, sa = np.float32(math.cos(a)), np.float32(math.sin(a))
        cy, cx = np.float32((h - 1) / 2.0), np.float32((w - 1) / 2.0)
        dy, dx = yy - cy, xx - cx
        yy, xx = cy + ca * dy - sa * dx, cx + sa * dy + ca * dx
    u, v = np.broadcast_arrays(yy * np.float32(ry / h), xx * np.float32(rx / w))
    return np.ascontiguousarray(u), np.ascontiguousarray(v)


def _perlin_at(
    ys: np.ndarray,
    xs: np.ndarray,
    shape: tuple[int, int],
    res: tuple[int, int],
    rng: np.random.Generator,
    angle: float,
) -> np.ndarray:
    """Perlin noise of an ``shape`` image sampled at pixel rows ``ys`` x columns ``xs``.

    Works in place where it can: fresh full-size float32 temporaries cost more than the arithmetic at
    256 x 256 (each is new memory to fault in); every value is computed by the same float32 operations
    in the same order as the plain expressions in the comments, so the noise is the same bit for bit.
    """
    u, v = lattice_coordinates(ys, xs, shape, res, angle)
    iu, iv = np.floor(u), np.floor(v)
    fu, fv = u, v
    fu -= iu  # fu = u - iu
    fv -= iv
    umin, vmin = iu.min(), iv.min()
    gh, gw = int(iu.max() - umin) + 2, int(iv.max() - vmin) + 2
    # Flat index of each sample's top-left lattice corner, (iu - umin) * gw + (iv - vmin) (exact small
    # integers in float32); the lattice only spans the samples.
    iu -= umin
    iu *= gw
    iv -= vmin
    iu += iv
    i00 = iu.astype(np.intp)
    theta = rng.uniform(0.0, 2.0 * np.pi, size=gh * gw)
    grad = np.exp(1j * theta).astype(np.complex64)  # unit gradient (x = real, y = imag)
    gy, gx = np.ascontiguousarray(grad.imag), np.ascontiguousarray(grad.real)
    fu1, fv1 = fu - np.float32(1.0), fv - np.float32(1.0)

    def corner(idx: np.ndarray, du: np.ndarray, dv: np.ndarray, buf: np.ndarray) -> np.ndarray:
        # gradient . offset = gy * du + gx * dv (buf takes the x term)
        n = np.take(gy, idx)
        n *= du
        np.take(gx, idx, out=buf)
        buf *= dv
        n += buf
        return n

    n00 = corner(i00, fu, fv, iv)  # iv is free now
    i00 += gw
    n10 = corner(i00, fu1, fv, iv)
    i00 -= gw - 1
    n01 = corner(i00, fu, fv1, iv)
    i00 += gw
    n11 = corner(i00, fu1, fv1, iv)
    t, s = _fade(fu, out=fu1), _fade(fv, out=fv1)
    # In-place bilinear blend of the 4 corner contributions.
    n10 -= n00
    n10 *= t
    n00 += n10
    n11 -= n01
    n11 *= t
    n01 += n11
    n01 -= n00
    n01 *= s
    n00 += n01
    n00 *= np.float32(math.sqrt(2.0))
    return n00


def _sample_positions(n: int, step: int) -> np.ndarray:
    """0, step, 2*step, ... and always the last pixel ``n - 1`` (so the sampled box equals the
    image box and the lattice, hence the noise, is the same as for exact evaluation)."""
    pos = np.arange(0, n, step)
    return pos if pos[-1] == n - 1 else np.append(pos, n - 1)


def _interp_axis(a: np.ndarray, pos: np.ndarray, n: int, axis: int) -> np.ndarray:
    """Linear interpolation of samples ``a`` taken at pixel positions ``pos`` to 0..n-1:
    ``a[k] + (a[k + 1] - a[k]) * wgt``, with the differences taken once on the samples."""
    x = np.arange(n)
    k = np.clip(np.searchsorted(pos, x, side="right") - 1, 0, max(len(pos) - 2, 0))
    if len(pos) == 1:
        return np.repeat(a, n, axis=axis)
    wgt = ((x - pos[k]) / (pos[k + 1] - pos[k])).astype(np.float32)
    step = np.diff(a, axis=axis)
    out = np.take(step, k, axis=axis)
    out *= wgt[:, None] if axis == 0 else wgt
    out += np.take(a, k, axis=axis)
    return out


def perlin_noise_2d(
    shape: tuple[int, int],
    res: tuple[int, int],
    rng: np.random.Generator,
    angle: float = 0.0,
    samples_per_cell: int | None = None,
) -> np.ndarray:
    """Classic 2-D gradient (Perlin) noise.

    Random unit gradients sit on a lattice with ``res[0]`` x ``res[1]`` cells across the image;
    pixel ``(y, x)`` is at lattice coordinate ``(y * res[0] / H, x * res[1] / W)`` (as
    ``rand_perlin_2d_np`` of DRAEM/MemSeg), so ``shape`` need not be divisible by ``res``.
    Noise is evaluated per pixel on that continuous coordinate, which is also how a rotation
    by ``angle`` (degrees, about the image centre) is applied without the empty corners an
    image rotation would leave. Scaled by sqrt(2) like the reference code, so thresholds such
    as MemSeg's 0.5 carry over.

    Args:
        shape: output ``(H, W)``, both >= 1.
        res: lattice cells ``(ry, rx)`` along H and W, both >= 1.
        rng: source of the gradient angles.
        angle: rotation of the noise pattern in degrees.
        samples_per_cell: None -> exact evaluation at every pixel. An int ``k`` evaluates the
            noise every ``step = 2**floor(log2(cell / k))`` pixels (``cell`` = smaller lattice
            cell side in pixels; step 1 = exact) and interpolates bilinearly, a speed-up for
            coarse lattices. The lattice (hence the noise) is the same as for exact evaluation;
            the interpolation error measured on 256x256 over res 1..32 and several angles was
            <= 0.04 for ``k = 8`` (about 1% of thresholded-mask pixels flip) and <= 0.14 for
            ``k = 4``.

    Returns:
        ``float32`` array ``[H, W]``, values within [-1, 1] (typically about +-0.9).

    Raises:
        ValueError: non-positive ``shape``, ``res`` or ``samples_per_cell``.
    """
    h, w = (int(shape[0]), int(shape[1]))
    ry, rx = (int(res[0]), int(res[1]))
    if h < 1 or w < 1:
        raise ValueError(f"perlin shape must be >= 1 in both dimensions, got {shape!r}")
    if ry < 1 or rx < 1:
        raise ValueError(f"perlin res must be >= 1 in both dimensions, got {res!r}")
    step = 1
    if samples_per_cell is not None:
        if int(samples_per_cell) < 1:
            raise ValueError(f"samples_per_cell must be >= 1, got {samples_per_cell!r}")
        cell = min(h / ry, w / rx) / int(samples_per_cell)
        step = 1 << max(0, int(math.floor(math.log2(cell)))) if cell >= 1 else 1
    if step == 1:
        return _perlin_at(np.arange(h), np.arange(w), (h, w), (ry, rx), rng, angle)
    ys, xs = _sample_positions(h, step), _sample_positions(w, step)
    coarse = _perlin_at(ys, xs, (h, w), (ry, rx), rng, angle)
    return _interp_axis(_interp_axis(coarse, ys, h, axis=0), xs, w, axis=1)
