"""Decoding as training, predict and serve do it: EXIF orientation applied everywhere, and the limits
that refuse untrusted images on their header (pixels, size, aspect, animation)."""

from __future__ import annotations

import io
import pickle
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from mapl_ray.data.io import DecodeLimits, ImageLimitError, decode_upload, image_size, load_image, load_records
from mapl_ray.data.layout import ImageRecord

# (EXIF orientation, the transpose that makes the stored pixels from the upright image)
ORIENTATIONS = [
    (2, Image.Transpose.FLIP_LEFT_RIGHT),
    (3, Image.Transpose.ROTATE_180),
    (4, Image.Transpose.FLIP_TOP_BOTTOM),
    (5, Image.Transpose.TRANSPOSE),
    (6, Image.Transpose.ROTATE_90),
    (7, Image.Transpose.TRANSVERSE),
    (8, Image.Transpose.ROTATE_270),
]


def upright() -> np.ndarray:
    """A 40x60 RGB image without any symmetry (a wrong turn or flip changes it)."""
    yy, xx = np.mgrid[0:40, 0:60]
    return np.stack([xx * 4, yy * 6, (xx * yy) % 251], -1).astype(np.uint8)


def encode(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def with_orientation(up: np.ndarray, orientation: int, transpose, fmt: str = "PNG") -> bytes:
    """``up`` stored as a camera would: pixels turned, plus the EXIF tag that turns them back."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    extra = {"lossless": True} if fmt == "WEBP" else {}
    return encode(Image.fromarray(up).transpose(transpose), fmt, exif=exif.tobytes(), **extra)


# ------------------------------------------------------------------------------ EXIF and decode limits
@pytest.mark.parametrize("fmt", ["PNG", "TIFF", "WEBP"])
@pytest.mark.parametrize("orientation,transpose", ORIENTATIONS)
def test_exif_orientation_gives_the_upright_image(orientation, transpose, fmt, tmp_path):
    up = upright()
    data = with_orientation(up, orientation, transpose, fmt)
    if fmt != "TIFF":  # the file really holds turned pixels (Pillow turns a TIFF by its tag itself)
        stored = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
        assert stored.shape != up.shape or not np.array_equal(stored, up)
    d = decode_upload(data, "cam.png")
    assert d.orientation == orientation and d.original_size == (40, 60)
    np.testing.assert_array_equal(d.image, up)
    path = tmp_path / f"cam.{fmt.lower()}"
    path.write_bytes(data)  # the file path: training, evaluate and predict decode files with load_image
    np.testing.assert_array_equal(load_image(path), up)
    assert image_size(path) == (40, 60)
    np.testing.assert_array_equal(load_records([ImageRecord(str(path), 0, "good")], (40, 60)).images[0], up)


def test_jpeg_with_exif_orientation_is_turned(tmp_path):
    up = upright()
    d = decode_upload(with_orientation(up, 6, Image.Transpose.ROTATE_90, "JPEG"), "cam.jpg")
    err = np.abs(d.image.astype(int) - up).mean()  # JPEG is lossy: compare with the image turned wrongly
    assert d.original_size == (40, 60) and err < np.abs(d.image.astype(int) - up[::-1, ::-1]).mean() / 3


def test_decode_limits_refuse_on_the_header_and_name_the_limit():
    big = encode(Image.new("L", (3000, 2000)))  # 6 Mpx of zeros: a few kB of PNG
    with pytest.raises(ImageLimitError, match=r"max_pixels=1,000,000") as e:
        decode_upload(big, "bomb.png", limits=DecodeLimits(max_pixels=1_000_000))
    assert (e.value.limit, e.value.value, e.value.allowed) == ("max_pixels", 6_000_000, 1_000_000)
    assert "bomb.png" in str(e.value)
    with pytest.raises(ImageLimitError, match="min_side=8") as e:
        decode_upload(encode(Image.new("RGB", (1, 1))), "dot.png", limits=DecodeLimits(min_side=8))
    assert e.value.limit == "min_side"
    with pytest.raises(ImageLimitError, match="max_aspect=4") as e:
        decode_upload(encode(Image.new("RGB", (1000, 10))), "line.png", limits=DecodeLimits(max_aspect=4))
    assert e.value.limit == "max_aspect" and e.value.value == pytest.approx(100)
    # an error crosses process boundaries (Ray) with its fields
    again = pickle.loads(pickle.dumps(e.value))
    assert type(again) is ImageLimitError and again.limit == "max_aspect" and str(again) == str(e.value)


def _claiming_size(png: bytes, width: int, height: int) -> bytes:
    """``png`` with its IHDR chunk rewritten to claim ``width`` x ``height`` (the pixel data stays small)."""
    ihdr = png[12:29]  # b"IHDR" + width, height, depth, colour, compression, filter, interlace
    ihdr = ihdr[:4] + struct.pack(">II", width, height) + ihdr[12:]
    return png[:12] + ihdr + struct.pack(">I", zlib.crc32(ihdr)) + png[33:]


def test_a_header_past_pillows_own_bomb_limit_is_refused_with_the_pixel_count():
    """Pillow refuses 50000 x 50000 on opening, before our check sees the size: the error still names the
    pixels and the limit as ours do, not Pillow's DOS-attack text."""
    bomb = _claiming_size(encode(Image.new("L", (8, 8))), 50_000, 50_000)
    with pytest.raises(ImageLimitError, match=r"2,500,000,000 pixels, more than the limit max_pixels=1,000,000") as e:
        decode_upload(bomb, "bomb.png", limits=DecodeLimits(max_pixels=1_000_000))
    assert (e.value.limit, e.value.value, e.value.allowed) == ("max_pixels", 2_500_000_000, 1_000_000)


def test_animated_image_first_frame_or_refused():
    frames = [Image.new("RGB", (32, 32), c) for c in ((200, 0, 0), (0, 200, 0), (0, 0, 200))]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:])
    d = decode_upload(buf.getvalue(), "anim.gif", limits=DecodeLimits(animated="first"))
    assert d.frames == 3 and d.image[0, 0, 0] > 150 and d.image[0, 0, 1] < 50  # frame 1 (red)
    with pytest.raises(ImageLimitError, match="3 frames") as e:
        decode_upload(buf.getvalue(), "anim.gif", limits=DecodeLimits(animated="refuse"))
    assert e.value.limit == "animated"


def test_sixteen_bit_and_palette_decode_like_their_8_bit_rgb():
    grey = (np.arange(64 * 64).reshape(64, 64) % 256).astype(np.uint8)
    rgb8 = decode_upload(encode(Image.fromarray(grey, "L")), "g8.png").image
    sixteen = Image.fromarray(grey.astype(np.uint16) * 257)  # 16-bit PNG holding the same grey levels
    d16 = decode_upload(encode(sixteen), "g16.png")
    assert d16.mode.startswith("I") and np.array_equal(d16.image, rgb8)
    pal = Image.fromarray(grey, "L").convert("P")  # 256 grey levels fit a palette exactly
    dp = decode_upload(encode(pal), "p.png")
    assert dp.mode == "P" and np.array_equal(dp.image, rgb8)


def test_decode_limits_validate_their_fields():
    for bad in ({"max_pixels": 0}, {"min_side": -1}, {"max_aspect": 0.5}, {"animated": "all"}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            DecodeLimits(**bad)
