"""Parquet shards of decoded images: what ``mapl prepare`` writes and ``mapl score`` / streamed training read.

A shard set is a folder of Parquet files (pyarrow) plus ``_manifest.json``, ``_rejected.jsonl`` and
``_duplicates.jsonl``. Each row is one image, decoded and resized once (:mod:`mapl_ray.data.io`'s
decoders, pose normalisation included), so readers never touch Pillow again:

=============  ============  =====================================================================
column         Arrow type    meaning
=============  ============  =====================================================================
path           string        the source file (absolute), or the name a source Parquet gave it
split          string        ``train`` / ``test`` (MVTec layout), ``unlabeled`` (folder), ``list``,
                             or what a source Parquet said
defect_type    string        ``good``, the MVTec defect folder, or ``unknown``
label          int8          0 normal, 1 anomalous, -1 unknown
image          binary        raw RGB pixels, uint8, row-major ``(height, width, 3)``
height, width  int32         stored size (the run's ``data.image_size``)
mask           binary        raw uint8 ``(height, width)`` in {0, 1}; null where there is no mask
orig_height,   int32         the file's size before resizing
orig_width
hash           string        SHA-256 (hex) of the file's bytes: equal hashes are duplicate files
pose           string        JSON of the :class:`~mapl_ray.data.pose.Pose` applied (``data.align``),
                             null when none was
=============  ============  =====================================================================

The schema's metadata (``mapl_ray.shards``) records the image size and the pose normalisation the set
was decoded with; readers check it against the run that uses it (:func:`open_shard_set`). Rows are
grouped :data:`ROW_GROUP_ROWS` per Parquet row group, so one row can be read without its neighbours.

Nothing here imports Ray; the Ray Data wiring is :mod:`mapl_ray.pipelines.ray_data`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .io import DecodeLimits, decode_image, load_mask, normalize_size
from .layout import (
    LABEL_UNKNOWN,
    ImageReadError,
    LayoutError,
    find_non_images,
    is_image_file,
    not_image_reason,
    scan_category,
    scan_folder,
)
from .pose import Aligner, Pose

__all__ = [
    "ShardSpec",
    "content_hash",
    "decode_batch",
    "images_from_arrow",
    "images_from_column",
    "open_shard_set",
    "read_rows",
    "shard_paths",
    "source_kind",
    "source_records",
    "source_rejected",
    "write_shard",
]

META_KEY = b"mapl_ray.shards"
FORMAT_VERSION = 1
MANIFEST_FILE = "_manifest.json"
REJECTED_FILE = "_rejected.jsonl"
DUPLICATES_FILE = "_duplicates.jsonl"
#: Rows per Parquet row group. Streamed training reads single rows at random (a whole group each);
#: scoring reads whole files. 8 rows: a random row costs ~4 ms, a sequential one ~0.5 ms (256 x 256).
ROW_GROUP_ROWS = 8

#: Columns of a source record (what is known about an image before it is decoded).
RECORD_FIELDS = ("path", "split", "defect_type", "label", "mask_path")


@dataclass(frozen=True)
class ShardSpec:
    """How a shard set was decoded: ``image_size`` ``(H, W)`` and ``align`` (``"none"`` or the
    estimator's repr, :data:`~mapl_ray.data.pose.Aligner`). Stored in the Parquet schema's metadata."""

    image_size: tuple[int, int]
    align: str = "none"

    @classmethod
    def of(cls, image_size: int | tuple[int, int], align: Aligner | None) -> ShardSpec:
        """The spec of images decoded at ``image_size`` with pose estimator ``align`` (None: no alignment)."""
        return cls(normalize_size(image_size, "image_size"), "none" if align is None else repr(align))

    def schema(self) -> pa.Schema:
        """The shard schema (module docstring) with this spec in its metadata."""
        meta = {"version": FORMAT_VERSION, "image_size": list(self.image_size), "align": self.align}
        return SHARD_SCHEMA.with_metadata({META_KEY: json.dumps(meta).encode()})

    def align_text(self) -> str:
        """:attr:`align` as ``data.align`` names it, for messages: ``none``, ``landscape``, or
        ``principal_axis (object threshold 130, inverse)`` for a pose estimator's repr."""
        m = re.fullmatch(r"PoseEstimator\(threshold=([^,]+), inverse=(True|False)\)", self.align)
        if m is None:
            return self.align
        return f"principal_axis (object threshold {m[1]}{', inverse' if m[2] == 'True' else ''})"

    @classmethod
    def from_schema(cls, schema: pa.Schema, where: str) -> ShardSpec:
        """Read the spec back. Raises LayoutError (naming ``where``) when the file is not a mapl shard."""
        raw = (schema.metadata or {}).get(META_KEY)
        if raw is None:
            raise LayoutError(
                f"{where} is not a mapl shard file (no {META_KEY.decode()} schema metadata); write shards with `mapl prepare`"
            )
        meta = json.loads(raw)
        if meta.get("version") != FORMAT_VERSION:
            raise LayoutError(
                f"{where} has shard format version {meta.get('version')}, this mapl-ray reads {FORMAT_VERSION}"
            )
        return cls(tuple(meta["image_size"]), meta["align"])


SHARD_SCHEMA = pa.schema(
    [
        pa.field("path", pa.string(), nullable=False),
        pa.field("split", pa.string()),
        pa.field("defect_type", pa.string()),
        pa.field("label", pa.int8()),
        pa.field("image", pa.binary(), nullable=False),
        pa.field("height", pa.int32()),
        pa.field("width", pa.int32()),
        pa.field("mask", pa.binary()),
        pa.field("orig_height", pa.int32()),
        pa.field("orig_width", pa.int32()),
        pa.field("hash", pa.string()),
        pa.field("pose", pa.string()),
    ]
)


def content_hash(data: bytes) -> str:
    """SHA-256 (hex) of a file's bytes (:mod:`hashlib`): two files with equal hashes hold the same image."""
    return hashlib.sha256(data).hexdigest()


# -- sources --------------------------------------------------------------------------------------
def source_kind(src: str | os.PathLike[str]) -> str:
    """What ``mapl prepare`` reads from ``src``: ``parquet`` (a .parquet file or a folder of them),
    ``category`` (an MVTec-layout category folder, ``SRC/train/good``), ``folder`` (images, searched
    recursively), ``image`` (one image file, by its extension: :data:`IMAGE_EXTENSIONS`) or ``list`` (any
    other file: a text file of image paths).

    Raises:
        LayoutError: ``src`` does not exist.
    """
    p = Path(src)
    if p.is_file():
        return "parquet" if p.suffix.lower() == ".parquet" else "image" if is_image_file(p.name) else "list"
    if not p.is_dir():
        raise LayoutError(f"source {os.fspath(src)!r} does not exist (expected a folder, a list file or Parquet)")
    if (p / "train" / "good").is_dir():
        return "category"
    if any(f.suffix.lower() == ".parquet" for f in p.iterdir() if f.is_file()):
        return "parquet"
    return "folder"


def _record(path: str, split: str, defect_type: str, label: int, mask_path: str | None = None) -> dict[str, Any]:
    return {"path": path, "split": split, "defect_type": defect_type, "label": label, "mask_path": mask_path}


def _list_entries(path: str | os.PathLike[str]) -> list[tuple[int, str]]:
    """``(line number from 1, absolute image path)`` of every entry of a list file (:func:`read_list_file`)."""
    base = Path(path).resolve().parent
    try:
        lines = Path(path).read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise LayoutError(f"cannot read list file {os.fspath(path)!r}: {e}") from e
    entries = [(i, s) for i, s in enumerate((ln.strip() for ln in lines), 1) if s and not s.startswith("#")]
    if not entries:
        raise LayoutError(f"list file {os.fspath(path)!r} names no image (expected one path per line)")
    return [(i, str((base / s).resolve())) for i, s in entries]


def read_list_file(path: str | os.PathLike[str]) -> list[str]:
    """Image paths of a list file: one per line, relative ones taken from the list file's folder; blank
    lines and lines starting with ``#`` are skipped; a path listed again is taken once (the repeats are
    :func:`source_rejected`'s: two rows of one path would make it ambiguous in the shards).

    Raises:
        LayoutError: the file cannot be read or names no file.
    """
    return list(dict.fromkeys(p for _, p in _list_entries(path)))


def _list_repeats(path: str | os.PathLike[str]) -> list[dict[str, str]]:
    """``{"path", "reason", "kind": "listed_again"}`` of each entry of a list file that names a path an earlier
    line named."""
    first: dict[str, int] = {}
    out = []
    for line, p in _list_entries(path):
        if p in first:
            reason = f"listed again (line {line} of {os.fspath(path)}; first on line {first[p]})"
            out.append({"path": p, "reason": reason, "kind": "listed_again"})
        first.setdefault(p, line)
    return out


def source_records(src: str | os.PathLike[str], kind: str | None = None) -> list[dict[str, Any]]:
    """The images of a file source (``category``, ``folder`` or ``list``, see :func:`source_kind`) as
    records (:data:`RECORD_FIELDS`), sorted by path within each split. Nothing is opened.

    An MVTec category gives ``train/good`` (split ``train``, label 0) and ``test/*`` (split ``test``,
    label 0 for ``good``, 1 with its mask for a defect type; a defect image without a mask keeps
    ``mask_path`` None). A folder gives unlabeled images (label -1); so does a list file, whose missing
    files are rejected when decoded rather than here.

    Raises:
        LayoutError: the layout's own errors (:func:`~mapl_ray.data.layout.scan_category`,
            :func:`~mapl_ray.data.layout.scan_folder`), an empty list file, or a Parquet ``src``.
    """
    kind = kind or source_kind(src)
    if kind == "category":
        p = Path(src).resolve()
        index = scan_category(p.parent, p.name, require_masks=False)
        return [_record(r.path, "train", r.defect_type, r.label) for r in index.train_good] + [
            _record(r.path, "test", r.defect_type, r.label, r.mask_path) for r in index.test
        ]
    if kind == "folder":
        return [_record(r.path, "unlabeled", "unknown", LABEL_UNKNOWN) for r in scan_folder(src, "image folder")]
    if kind == "list":
        return [_record(p, "list", "unknown", LABEL_UNKNOWN) for p in read_list_file(src)]
    if kind == "image":
        return [_record(str(Path(src).resolve()), "list", "unknown", LABEL_UNKNOWN)]
    raise LayoutError(f"{os.fspath(src)!r} is a {kind} source, not a folder or list of image files")


def source_rejected(src: str | os.PathLike[str], kind: str | None = None) -> list[dict[str, str]]:
    """``{"path", "reason", "kind"}`` of what :func:`source_records` leaves out of a source
    (:func:`source_kind`): ``mapl prepare`` lists them in ``_rejected.jsonl`` beside the unreadable ones.

    Of a ``folder``, the files without an image extension (kind ``no_image_extension``,
    :func:`~mapl_ray.data.layout.not_image_reason`), sorted by path; hidden files and folders are skipped
    without a word, as they are when images are listed. Of a ``list`` file, the lines that name a path again
    (kind ``listed_again``). Other kinds give none: a category's folders are MVTec's."""
    kind = kind or source_kind(src)
    if kind == "list":
        return _list_repeats(src)
    if kind != "folder":
        return []
    return [
        {"path": p, "reason": not_image_reason(p), "kind": "no_image_extension"}
        for p in find_non_images(os.path.abspath(os.fspath(src)))
    ]


def parquet_files(src: str | os.PathLike[str]) -> list[str]:
    """The ``.parquet`` files of a Parquet source (the file itself, or those directly in the folder), sorted."""
    p = Path(src)
    if not p.exists():
        raise LayoutError(f"{os.fspath(src)!r} does not exist (expected a mapl prepare folder or a .parquet file)")
    files = [p] if p.is_file() else sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower() == ".parquet")
    if not files:
        raise LayoutError(f"{os.fspath(src)!r} holds no .parquet file")
    return [str(f.resolve()) for f in files]


def parquet_source_record(row: dict[str, Any], where: str) -> tuple[dict[str, Any], bytes | None]:
    """(record, encoded bytes) of one row of a source Parquet that holds encoded images (PNG, JPEG...).

    The image is the ``image`` column: bytes, or a struct with ``bytes`` and ``path`` (the Hugging Face
    ``datasets`` image layout; a struct with a path and no bytes names a file, read when decoded: the bytes
    are then None). ``path``, ``split``, ``defect_type`` and ``label`` (0 normal, 1 anomalous, -1 or null
    unknown) columns are used when present; without a path (null or empty) the row is named
    ``sha256:<hash>``. Masks are not read from Parquet. ``where``: the row's place in the source, e.g.
    ``row 7 of /data/a.parquet``, which names a row that has no name of its own.

    Raises:
        ImageReadError: the row has neither image bytes nor a file path, or a label other than 0, 1, -1
            (names the row's path, or ``where``): :func:`decode_batch`'s callers list it as rejected.
    """
    image = row.get("image")
    name = row.get("path")
    if isinstance(image, dict):
        name = name or image.get("path")
        image = image.get("bytes")
    label = row.get("label")
    if label is not None and label not in (0, 1, LABEL_UNKNOWN):
        raise ImageReadError(name or where, f"label {label!r} (expected 0 normal, 1 anomalous, -1 or null unknown)")
    if not isinstance(image, (bytes, bytearray)) and not name:
        raise ImageReadError(
            where,
            f"its 'image' holds no encoded bytes and no file path (got {type(image).__name__}), and its 'path' is empty",
        )
    data = bytes(image) if isinstance(image, (bytes, bytearray)) else None
    record = _record(
        name or f"sha256:{content_hash(data)}",
        row.get("split") or "parquet",
        row.get("defect_type") or "unknown",
        LABEL_UNKNOWN if label is None else int(label),
    )
    return record, data


# -- decoding into rows ---------------------------------------------------------------------------
def pose_to_json(pose: Pose | None) -> str | None:
    """JSON of a :class:`Pose` (None stays None)."""
    return None if pose is None else json.dumps(dataclasses.asdict(pose))


def pose_from_json(text: str | None) -> Pose | None:
    """Inverse of :func:`pose_to_json`."""
    if text is None:
        return None
    d = json.loads(text)
    return Pose(**{**d, "size": tuple(d["size"]) if d.get("size") else None, "fill": tuple(d["fill"])})


def decode_record(
    record: dict[str, Any],
    hw: tuple[int, int],
    align: Aligner | None,
    data: bytes | None = None,
    limits: DecodeLimits | None = None,
) -> dict[str, Any]:
    """One shard row (module docstring) from a source record, decoded with :func:`~mapl_ray.data.io.decode_image`
    and :func:`~mapl_ray.data.io.load_mask` at ``hw`` ``(H, W)``, turned by ``align`` when given.

    ``data``: the file's bytes when the caller has them (a Parquet source); otherwise ``record["path"]``
    is read. ``limits``: refuse, on the header, what these :class:`~mapl_ray.data.io.DecodeLimits` do not
    allow (None: Pillow's decompression-bomb limit only).

    Raises:
        ImageReadError: the file is missing, unreadable or not an image (also its mask), or ``limits``
            refused it (:class:`~mapl_ray.data.io.ImageLimitError`).
        LayoutError: the mask's size differs from its image's.
    """
    path = record["path"]
    if data is None:
        try:
            with open(path, "rb") as fh:
                data = fh.read()
        except OSError as e:
            raise ImageReadError(path, f"{type(e).__name__}: {e.strerror or e}") from e
    image, orig_hw, pose = decode_image(
        data, path, hw, return_original_size=True, align=align, return_pose=True, limits=limits
    )
    mask = None
    if record.get("mask_path"):
        mask = load_mask(record["mask_path"], hw, expected_hw=orig_hw, pose=pose).tobytes()
    return {
        "path": path,
        "split": record.get("split"),
        "defect_type": record.get("defect_type"),
        "label": int(record["label"]) if record.get("label") is not None else LABEL_UNKNOWN,
        "image": image.tobytes(),
        "height": hw[0],
        "width": hw[1],
        "mask": mask,
        "orig_height": orig_hw[0],
        "orig_width": orig_hw[1],
        "hash": content_hash(data),
        "pose": pose_to_json(pose),
    }


def decode_batch(
    records: Sequence[dict[str, Any]],
    hw: tuple[int, int],
    align: Aligner | None,
    data: Sequence[bytes | None] | None = None,
    limits: DecodeLimits | None = None,
) -> tuple[list[dict[str, Any]], list[dict[str, str]]]:
    """Decode many records (:func:`decode_record`, with ``limits``); one bad file never stops the others.

    Returns:
        (rows of the readable images, in order; ``{"path", "reason"}`` of each image that could not be
        read: missing, unreadable, not an image, or a mask that does not fit it).
    """
    rows, rejected = [], []
    for i, rec in enumerate(records):
        try:
            rows.append(decode_record(rec, hw, align, None if data is None else data[i], limits))
        except LayoutError as e:  # ImageReadError included: the file is reported, the job goes on
            rejected.append({"path": rec["path"], "reason": getattr(e, "reason", str(e))})
    return rows, rejected


def shard_name(rows: Sequence[dict[str, Any]]) -> str:
    """``part-<16 hex>.parquet``, from the rows' paths and hashes: the same rows get the same name."""
    h = hashlib.sha1()
    for r in rows:
        h.update(f"{r['path']}\0{r['hash']}\n".encode())
    return f"part-{h.hexdigest()[:16]}.parquet"


def write_shard(rows: Sequence[dict[str, Any]], folder: str | os.PathLike[str], spec: ShardSpec) -> Path:
    """Write ``rows`` as one Parquet shard (zstd, :data:`ROW_GROUP_ROWS` rows per row group) named by
    :func:`shard_name`; written to a temporary name and renamed, so a shard is whole or absent."""
    table = pa.Table.from_pylist(list(rows), schema=spec.schema())
    Path(folder).mkdir(parents=True, exist_ok=True)
    out = Path(folder) / shard_name(rows)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    pq.write_table(table, tmp, row_group_size=ROW_GROUP_ROWS, compression="zstd")
    os.replace(tmp, out)
    return out


# -- reading --------------------------------------------------------------------------------------
def open_shard_set(folder: str | os.PathLike[str], expect: ShardSpec | None = None) -> tuple[list[str], ShardSpec]:
    """The Parquet files of a shard set (sorted) and the spec they were written with.

    Args:
        folder: a ``mapl prepare`` output folder (or one shard file).
        expect: the image size and pose normalisation of the run that will read them.

    Raises:
        LayoutError: no shard file; a file that is not a mapl shard; shards written with a different
            size or pose normalisation than ``expect`` (the message says how to re-prepare them).
    """
    files = parquet_files(folder)
    spec = ShardSpec.from_schema(pq.read_schema(files[0]), files[0])
    for f in files[1:]:
        other = ShardSpec.from_schema(pq.read_schema(f), f)
        if other != spec:
            raise LayoutError(f"shard {f} was written with {other}, but {files[0]} with {spec}: one set, one spec")
    if expect is not None and spec != expect:
        raise LayoutError(
            f"the shards in {os.fspath(folder)!r} hold images at {spec.image_size[0]}x{spec.image_size[1]} with "
            f"data.align={spec.align_text()}, but the run needs {expect.image_size[0]}x{expect.image_size[1]} with "
            f"data.align={expect.align_text()}: prepare them again with `mapl prepare SRC --out DIR --config RUN/config.yaml`"
        )
    return files, spec


def shard_paths(file: str) -> list[str]:
    """The ``path`` column of one shard file, in row order: the names ``mapl score`` routes its score rows by
    and streamed training finds its images by.

    Raises:
        LayoutError: a row's path is null or empty (names the file, the first such row, counted from 0, and
            how many there are): ``mapl prepare`` names every row, so the file was written otherwise.
    """
    paths = pq.read_table(file, columns=["path"]).column("path").to_pylist()
    bad = [i for i, p in enumerate(paths) if not p]
    if bad:
        more = f" (and {len(bad) - 1} more row(s))" if len(bad) > 1 else ""
        raise LayoutError(
            f"shard {file}: row {bad[0]} (counting from 0){more} has no path (null or empty); every shard row "
            "names its image: write shards with `mapl prepare`"
        )
    return paths


def images_from_column(values: Sequence[bytes], hw: tuple[int, int], channels: int = 3) -> np.ndarray:
    """Raw ``image`` (or, with ``channels=0``, ``mask``) cells -> a new uint8 array ``(B, H, W, 3)``
    (``(B, H, W)``).

    Raises:
        LayoutError: a cell does not hold ``H * W * channels`` bytes.
    """
    shape = (*hw, channels) if channels else tuple(hw)
    out = np.empty((len(values), *shape), np.uint8)
    for i, v in enumerate(values):
        cell = np.frombuffer(v, np.uint8)
        if cell.size != out[i].size:
            raise LayoutError(f"shard cell holds {cell.size} bytes, expected {out[i].size} for shape {shape}")
        out[i] = cell.reshape(shape)
    return out


def images_from_arrow(column: pa.Array | pa.ChunkedArray, hw: tuple[int, int], channels: int = 3) -> np.ndarray:
    """A binary Arrow column of raw image cells -> uint8 ``(B, H, W, 3)`` (``(B, H, W)`` with
    ``channels=0``), read from the column's value buffer in one copy when every cell holds exactly one
    image (no per-cell Python objects); otherwise cell by cell as :func:`images_from_column`.

    Raises:
        LayoutError: a null cell, or a cell that does not hold ``H * W * channels`` bytes.
    """
    shape = (*hw, channels) if channels else tuple(hw)
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if arr.null_count:
        raise LayoutError(f"{arr.null_count} null image cell(s): expected {int(np.prod(shape))} bytes each")
    cell = int(np.prod(shape))
    if pa.types.is_binary(arr.type) or pa.types.is_large_binary(arr.type):
        width = np.int64 if pa.types.is_large_binary(arr.type) else np.int32
        _, offsets_buf, data_buf = arr.buffers()
        offsets = np.frombuffer(offsets_buf, width)[arr.offset : arr.offset + len(arr) + 1]
        if len(arr) and bool(np.all(np.diff(offsets) == cell)):
            data = np.frombuffer(data_buf, np.uint8)[offsets[0] : offsets[-1]]
            return data.reshape((len(arr), *shape)).copy()
    return images_from_column(arr.to_pylist(), hw, channels)


def read_rows(
    file: str, rows: Sequence[int], columns: Sequence[str], parquet: pq.ParquetFile | None = None
) -> pa.Table:
    """Rows ``rows`` (positions in ``file``, any order, repeats allowed) of one shard, reading only their
    row groups; returned in the order asked."""
    pf = parquet or pq.ParquetFile(file)
    per_group = pf.metadata.row_group(0).num_rows if pf.metadata.num_row_groups else ROW_GROUP_ROWS
    rows = np.asarray(rows, dtype=np.int64)
    groups = np.unique(rows // per_group)
    table = pf.read_row_groups([int(g) for g in groups], columns=list(columns))
    # position of each asked row inside the concatenated groups
    offset = {int(g): i * per_group for i, g in enumerate(groups)}
    take = [offset[int(r // per_group)] + int(r % per_group) for r in rows]
    return table.take(pa.array(take, pa.int64()))


def rejected_line(path: str, reason: str) -> str:
    """A ``_rejected.jsonl`` line."""
    return json.dumps({"path": path, "reason": reason})
