"""Parquet shards without Ray: the schema round trip, row building, spec checks and random row reads."""

from __future__ import annotations

import hashlib

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import SCREW, needs_data

from mapl_ray.data.io import image_size, load_image, load_mask
from mapl_ray.data.layout import LayoutError
from mapl_ray.data.pose import PoseEstimator
from mapl_ray.data.shards import (
    ShardSpec,
    decode_batch,
    images_from_arrow,
    images_from_column,
    open_shard_set,
    pose_from_json,
    read_list_file,
    read_rows,
    shard_paths,
    source_kind,
    source_records,
    write_shard,
)

pytestmark = needs_data


def _defect_record():
    img = sorted((SCREW / "test" / "scratch_head").glob("*.png"))[0]
    mask = SCREW / "ground_truth" / "scratch_head" / f"{img.stem}_mask.png"
    return {"path": str(img), "split": "test", "defect_type": "scratch_head", "label": 1, "mask_path": str(mask)}


def test_schema_round_trip_with_pose_and_mask(tmp_path):
    align = PoseEstimator(threshold=60, inverse=False)  # screw: a bright part on a dark background
    spec = ShardSpec.of(48, align)
    rec = _defect_record()
    normal = {"path": sorted(str(p) for p in (SCREW / "train" / "good").glob("*.png"))[0], "label": 0}
    rows, rejected = decode_batch([rec, normal], spec.image_size, align)
    assert rejected == []
    shard = write_shard(rows, tmp_path, spec)
    files, read_spec = open_shard_set(tmp_path, expect=spec)
    assert files == [str(shard)] and read_spec == spec
    table = pq.read_table(shard)
    assert table.schema.equals(spec.schema(), check_metadata=True)
    got = table.to_pylist()
    images = images_from_column([r["image"] for r in got], (48, 48))
    image, pose = load_image(rec["path"], 48, align=align, return_pose=True)
    np.testing.assert_array_equal(images[0], image)
    np.testing.assert_array_equal(
        images_from_column([got[0]["mask"]], (48, 48), channels=0)[0], load_mask(rec["mask_path"], 48, pose=pose)
    )
    assert pose_from_json(got[0]["pose"]) == pose
    assert got[1]["mask"] is None and got[1]["label"] == 0
    assert got[0]["hash"] == hashlib.sha256(open(rec["path"], "rb").read()).hexdigest()
    assert (got[0]["orig_height"], got[0]["orig_width"]) == image_size(rec["path"])


def test_bad_files_are_rejected_with_their_reason_and_the_rest_kept(tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG not really")
    good = sorted(str(p) for p in (SCREW / "train" / "good").glob("*.png"))[:2]
    records = [{"path": p, "label": -1} for p in [good[0], str(bad), str(tmp_path / "missing.png"), good[1]]]
    rows, rejected = decode_batch(records, (32, 32), None)
    assert [r["path"] for r in rows] == good
    assert [r["path"] for r in rejected] == [str(bad), str(tmp_path / "missing.png")]
    assert "FileNotFoundError" in rejected[1]["reason"] and rejected[0]["reason"]


def test_spec_mismatch_and_foreign_parquet_are_named(tmp_path):
    rows, _ = decode_batch([{"path": _defect_record()["path"], "label": 1}], (32, 32), None)
    write_shard(rows, tmp_path / "a", ShardSpec.of(32, None))
    with pytest.raises(LayoutError, match="32x32 with data.align=none.*needs 64x64"):
        open_shard_set(tmp_path / "a", expect=ShardSpec.of(64, None))
    from mapl_ray.data.pose import PoseEstimator

    aligned = ShardSpec.of(32, PoseEstimator(threshold=130, inverse=True))  # named as a user writes data.align
    with pytest.raises(
        LayoutError, match=r"needs 32x32 with data.align=principal_axis \(object threshold 130, inverse\)"
    ):
        open_shard_set(tmp_path / "a", expect=aligned)
    (tmp_path / "b").mkdir()
    pq.write_table(
        pq.read_table(next((tmp_path / "a").glob("*.parquet"))).replace_schema_metadata(None),
        tmp_path / "b" / "x.parquet",
    )
    with pytest.raises(LayoutError, match="not a mapl shard"):
        open_shard_set(tmp_path / "b")


def test_a_shard_row_without_a_path_is_named_by_file_and_row(tmp_path):
    """mapl score routes score rows by path and streamed training finds its images by path: a shard row with a
    null or empty path is an error naming the file and the row, not a nameless score or a silent miss."""
    from mapl_ray.pipelines.ray_data import StreamSources

    paths = sorted(str(p) for p in (SCREW / "train" / "good").glob("*.png"))[:4]
    spec = ShardSpec.of(16, None)
    rows, _ = decode_batch([{"path": p, "label": 0} for p in paths], (16, 16), None)
    good = write_shard(rows, tmp_path / "good", spec)
    assert shard_paths(str(good)) == paths
    rows[2]["path"], rows[3]["path"] = "", None
    (tmp_path / "bad").mkdir()
    bad = tmp_path / "bad" / "part-0.parquet"  # written with a nullable path, as another writer may
    schema = spec.schema().set(0, pa.field("path", pa.string()))
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), bad)
    with pytest.raises(
        LayoutError, match=rf"shard {bad}: row 2 \(counting from 0\) \(and 1 more row\(s\)\) has no path"
    ):
        shard_paths(str(bad))
    sources = StreamSources(([paths[0]], [], []), [])
    assert sources.with_shards([tmp_path / "good"], spec).locations[0].tolist() == [[0, 0]]
    with pytest.raises(LayoutError, match=rf"--shards \(data.shards\): shard {bad}: row 2 "):
        sources.with_shards([tmp_path / "bad"], spec)


def test_read_rows_returns_the_rows_asked_in_order(tmp_path):
    paths = sorted(str(p) for p in (SCREW / "train" / "good").glob("*.png"))[:19]
    rows, _ = decode_batch([{"path": p, "label": 0} for p in paths], (16, 16), None)
    shard = write_shard(rows, tmp_path, ShardSpec.of(16, None))
    want = [18, 3, 3, 9, 0, 17]
    got = read_rows(str(shard), want, ["path", "image"])
    assert got.column("path").to_pylist() == [paths[i] for i in want]
    np.testing.assert_array_equal(
        images_from_column(got.column("image").to_pylist(), (16, 16)),
        np.stack([load_image(paths[i], 16) for i in want]),
    )


def test_sources_are_recognised(tmp_path):
    assert source_kind(SCREW) == "category"
    recs = source_records(SCREW)
    test_defects = [r for r in recs if r["split"] == "test" and r["label"] == 1]
    assert test_defects and all(r["mask_path"] for r in test_defects)
    assert {r["split"] for r in recs} == {"train", "test"}
    assert source_kind(SCREW / "train") == "folder"
    lst = tmp_path / "list.txt"
    lst.write_text(f"# images\n{SCREW / 'train' / 'good' / '000.png'}\n\nrelative.png\n")
    assert source_kind(lst) == "list"
    assert read_list_file(lst) == [str(SCREW / "train" / "good" / "000.png"), str(tmp_path / "relative.png")]
    one = SCREW / "train" / "good" / "000.png"  # one image: read as itself, not as a list file of paths
    assert source_kind(one) == "image"
    assert [r["path"] for r in source_records(one)] == [str(one.resolve())]
    with pytest.raises(LayoutError, match="does not exist"):
        source_kind(tmp_path / "nope")


def test_images_from_arrow_reads_the_value_buffer_like_cell_by_cell_decoding():
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, (7, 5, 4, 3), dtype=np.uint8)
    cells = [im.tobytes() for im in imgs]
    for typ in (pa.binary(), pa.large_binary()):
        col = pa.chunked_array([pa.array(cells[:3], typ), pa.array(cells[3:], typ)])
        np.testing.assert_array_equal(images_from_arrow(col, (5, 4)), imgs)
        # a slice and a take (offsets not starting at 0) read the right rows
        np.testing.assert_array_equal(images_from_arrow(col.slice(2, 4), (5, 4)), imgs[2:6])
        np.testing.assert_array_equal(images_from_arrow(col.take([6, 1, 4]), (5, 4)), imgs[[6, 1, 4]])
    masks = rng.integers(0, 2, (3, 5, 4), dtype=np.uint8)
    got = images_from_arrow(pa.array([m.tobytes() for m in masks]), (5, 4), channels=0)
    np.testing.assert_array_equal(got, masks)
    assert images_from_arrow(pa.array([], pa.binary()), (5, 4)).shape == (0, 5, 4, 3)
    # one short and one long cell of the same total size must not pass as two images
    bad = pa.array([cells[0][:-1], cells[1] + b"x"])
    with pytest.raises(LayoutError, match="holds 59 bytes, expected 60"):
        images_from_arrow(bad, (5, 4))
    with pytest.raises(LayoutError, match="null image"):
        images_from_arrow(pa.array([cells[0], None]), (5, 4))
