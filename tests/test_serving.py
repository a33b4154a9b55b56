"""The Ray-free parts of the HTTP service: decode errors as 4xx, request parsing, defect regions,
settings, token; no Ray cluster needed."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os

import numpy as np
import pytest
from PIL import Image
from test_decoding import encode, upright

from mapl_ray.data.io import DecodeLimits, ImageLimitError, decode_upload
from mapl_ray.data.layout import ImageReadError
from mapl_ray.serving.auth import check_bearer, load_token, token_digest
from mapl_ray.serving.errors import ApiError, decode_error
from mapl_ray.serving.inputs import parse_uploads, read_body
from mapl_ray.serving.maps import defect_regions, encode_map_png
from mapl_ray.serving.model_info import training_metrics
from mapl_ray.serving.settings import ServeSettings


def test_decode_errors_map_to_4xx_kinds():
    png = encode(Image.fromarray(upright()))
    cases = [
        (b"", 400, "empty_image"),
        (b"hello, not an image", 400, "not_an_image"),
        (png[: len(png) // 2], 400, "corrupt_image"),
    ]
    jpeg = encode(Image.fromarray(upright()), "JPEG")
    cases.append((jpeg[: len(jpeg) // 2], 400, "corrupt_image"))
    for data, status, kind in cases:
        with pytest.raises(ImageReadError) as e:
            decode_upload(data, "x.png")
        err = decode_error(e.value)
        assert (err.status, err.kind) == (status, kind) and "x.png" in err.detail
    with pytest.raises(ImageLimitError) as e:
        decode_upload(png, "x.png", limits=DecodeLimits(max_pixels=10))
    err = decode_error(e.value)
    assert err.status == 413 and err.body()["limit"] == {"name": "max_pixels", "value": 2400, "allowed": 10}


# ------------------------------------------------------------------------------------ request bodies
async def _chunks(parts):
    for p in parts:
        yield p


class _Endless:
    """A body that never ends; counts what was read from it."""

    def __init__(self):
        self.read = 0

    def __aiter__(self):
        return self

    async def __anext__(self):
        self.read += 65536
        return b"\0" * 65536


def test_read_body_refuses_a_declared_size_over_the_limit_before_reading():
    body = _Endless()
    with pytest.raises(ApiError) as e:
        asyncio.run(read_body(body, str(2**30), 1000))
    assert e.value.status == 413 and body.read == 0 and e.value.body()["limit"]["allowed"] == 1000


def test_read_body_stops_a_long_chunked_body_at_the_limit():
    body = _Endless()
    with pytest.raises(ApiError) as e:
        asyncio.run(read_body(body, None, 200_000))
    assert e.value.status == 413 and body.read <= 200_000 + 65536
    assert asyncio.run(read_body(_chunks([b"ab", b"cd"]), "4", 4)) == b"abcd"
    with pytest.raises(ApiError, match="not a byte count"):
        asyncio.run(read_body(_chunks([b""]), "-3", 10))


def test_parse_uploads_by_content_type():
    png = encode(Image.fromarray(upright()))
    assert parse_uploads("image/png", png, "a.png", 4)[0].data == png
    assert parse_uploads("application/octet-stream", png, None, 4)[0].name == "upload"
    batch = json.dumps(
        {
            "images": [
                {"data": base64.b64encode(png).decode(), "name": "a"},
                {"data": "data:image/png;base64," + base64.b64encode(png).decode()},
            ]
        }
    )
    ups = parse_uploads("application/json", batch.encode(), None, 4)
    assert [u.name for u in ups] == ["a", "images[1]"] and all(u.data == png for u in ups)
    boundary = "XyZ"
    mp = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="note"\r\n\r\nhello\r\n'
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="p.png"\r\n'
            f"Content-Type: image/png\r\n\r\n"
        ).encode()
        + png
        + f"\r\n--{boundary}--\r\n".encode()
    )
    ups = parse_uploads(f"multipart/form-data; boundary={boundary}", mp, None, 4)
    assert [(u.name, u.data) for u in ups] == [("p.png", png)]  # binary bytes intact, the text field ignored


@pytest.mark.parametrize(
    "ctype,body,status,kind",
    [
        ("text/plain", b"x", 415, "unsupported_media_type"),
        (None, b"x", 415, "unsupported_media_type"),
        ("application/x-www-form-urlencoded", b"a=b", 415, "unsupported_media_type"),
        ("image/png", b"", 400, "empty_image"),
        ("application/json", b"{not json", 400, "bad_json"),
        ("application/json", b'{"pictures": []}', 422, "invalid_request"),
        ("application/json", b'{"images": []}', 422, "invalid_request"),
        ("application/json", b'{"images": [{"data": "@@@"}]}', 400, "bad_base64"),
        ("application/json", json.dumps({"images": [{"data": "AAAA"}] * 5}).encode(), 413, "batch_too_large"),
        ("multipart/form-data", b"--x\r\n", 400, "bad_multipart"),
        (
            "multipart/form-data; boundary=x",
            b'--x\r\nContent-Disposition: form-data; name="a"\r\n\r\nv\r\n--x--\r\n',
            400,
            "bad_multipart",
        ),
    ],
)
def test_parse_uploads_refusals(ctype, body, status, kind):
    with pytest.raises(ApiError) as e:
        parse_uploads(ctype, body, None, 4)
    assert (e.value.status, e.value.kind) == (status, kind) and e.value.detail


# ---------------------------------------------------------------------------------- regions and maps
def test_defect_regions_boxes_in_image_pixels():
    amap = np.zeros((64, 64), np.float32)
    amap[10:20, 30:34] = 0.9  # region A: rows 10-19, cols 30-33
    amap[50, 5] = 0.7  # region B: one pixel
    amap[40, 40] = 0.4  # under the threshold
    regions, total = defect_regions(amap, 0.5, (128, 256))  # image twice as tall, four times as wide
    assert total == 2 and [r["max_score"] for r in regions] == pytest.approx([0.9, 0.7])
    a, b = regions
    assert (a["x"], a["y"], a["width"], a["height"]) == (120, 20, 16, 20)
    assert (b["x"], b["y"], b["width"], b["height"]) == (20, 100, 4, 2)
    assert a["area_fraction"] == pytest.approx(40 / 64**2) and a["mean_score"] == pytest.approx(0.9)
    assert defect_regions(amap, 0.5, (128, 256), max_regions=1)[0] == [a]
    assert defect_regions(amap, 0.95) == ([], 0)
    diag = np.zeros((8, 8), np.float32)
    diag[[1, 2, 3], [1, 2, 3]] = 1.0  # diagonal pixels touch at corners: one 8-connected region
    assert defect_regions(diag, 0.5)[1] == 1


def test_encode_map_png_round_trip_at_the_image_size():
    amap = np.linspace(0, 1, 32 * 32, dtype=np.float32).reshape(32, 32)
    png = Image.open(io.BytesIO(base64.b64decode(encode_map_png(amap))))
    assert png.mode == "L" and np.abs(np.asarray(png) / 255.0 - amap).max() <= 0.5 / 255 + 1e-6
    assert Image.open(io.BytesIO(base64.b64decode(encode_map_png(amap, (50, 70))))).size == (70, 50)


# --------------------------------------------------------------------------- settings, token, metrics
def test_settings_resolve_batching_by_device_and_validate():
    # layout=two_tier resolves as it did when it was the default
    s = ServeSettings.from_args({"run_dir": "r", "layout": "two_tier", "max_batch_size": "auto", "num_replicas": "2"})
    cpu, gpu = s.resolve(cluster_has_gpu=False, image_size=256), s.resolve(cluster_has_gpu=True, image_size=256)
    assert (cpu.gpus_per_replica, cpu.max_batch_size) == (0.0, 1) and (gpu.gpus_per_replica, gpu.max_batch_size) == (
        1.0,
        32,
    )
    assert (
        cpu.min_side == 32
        and (cpu.max_ongoing_requests, gpu.max_ongoing_requests) == (32, 64)
        and cpu.num_replicas == 2
    )
    assert s.resolve(True, 256).decode_limits() == DecodeLimits(40_000_000, 32, 4.0, "first")
    assert ServeSettings(run_dir="r", layout="two_tier", device="cpu").resolve(True, 64).gpus_per_replica == 0.0
    assert ServeSettings(run_dir="r", max_batch_size=8).resolve(False, 64).max_batch_size == 8  # explicit wins
    # front replicas decode the uploads: with GPU model replicas, half the CPUs (2..8); on CPU one
    assert [s.resolve(True, 256, cluster_cpus=c).ingress_replicas for c in (2, 8, 16, 64)] == [2, 4, 8, 8]
    assert s.resolve(False, 256, cluster_cpus=16).ingress_replicas == 1
    assert (
        ServeSettings(run_dir="r", layout="two_tier", ingress_replicas=3).resolve(True, 256, 16).ingress_replicas == 3
    )
    # two_tier fronts send their images in batches of the model's size unless told otherwise
    assert (gpu.front_batch_size, cpu.front_batch_size) == (32, 1)
    assert ServeSettings(run_dir="r", layout="two_tier", front_batch_size=4).resolve(True, 256).front_batch_size == 4
    with pytest.raises(ValueError, match="front_batch_size applies to layout=two_tier only"):
        ServeSettings(run_dir="r", front_batch_size=8)
    # layout=single: the model replicas are the fronts
    single = ServeSettings.from_args({"run_dir": "r", "layout": "single", "num_replicas": "4"})
    assert single.resolve(True, 256, cluster_cpus=16).ingress_replicas == 4
    for bad, match in [
        ({"run_dir": "r", "max_pixels": "many"}, "max_pixels"),
        ({"run_dir": "r", "colour": 1}, "colour"),
        ({"max_pixels": 5}, "run_dir"),
        ({"run_dir": "r", "max_aspect": 0.5}, "max_aspect"),
        ({"run_dir": "r", "animated": "loop"}, "animated"),
        ({"run_dir": "r", "request_timeout_s": 0}, "request_timeout_s"),
        ({"run_dir": "r", "layout": "two_tier", "front_batch_size": 0}, "front_batch_size must be > 0"),
        ({"run_dir": "r", "ingress_cpus": -1}, "ingress_cpus"),
        ({"run_dir": "r", "ingress_cpus": "nan"}, "ingress_cpus must be a number"),  # was a traceback in Ray
        ({"run_dir": "r", "cpus_per_replica": "inf"}, "cpus_per_replica must be a finite"),
        ({"run_dir": "r", "request_timeout_s": "nan"}, "request_timeout_s"),
        ({"run_dir": "r", "max_aspect": float("nan")}, "max_aspect"),
        ({"run_dir": "r", "layout": "one_hop"}, "layout must be one of two_tier, single"),
        ({"run_dir": "r", "layout": "single", "ingress_replicas": 8}, "do not apply to layout=single"),
        ({"run_dir": "r", "layout": "single", "ingress_cpus": 1}, "do not apply to layout=single"),
        ({"run_dir": "r", "ingress_replicas": 8}, "do not apply to layout=single, the default"),  # no layout given
        ({"run_dir": "r", "num_replicas": 0}, "num_replicas must be > 0, got 0"),
        ({"run_dir": "r", "num_replicas": "many"}, "num_replicas must be an integer or auto"),
        ({"run_dir": "r", "cpus_per_replica": -1}, "cpus_per_replica must be >= 0"),
        ({"run_dir": "r", "gpus_per_replica": "half"}, "gpus_per_replica must be a number or auto"),
        ({"run_dir": "r", "adaptive_batch_wait": "maybe"}, "adaptive_batch_wait must be true or false, got 'maybe'"),
        ({"run_dir": "r", "graph_batch_sizes": "all"}, "graph_batch_sizes must be one of pow2, fine, got 'all'"),
    ]:
        with pytest.raises(ValueError, match=match):
            ServeSettings.from_args(bad)


def _shape(s: ServeSettings) -> tuple:
    return s.layout, s.num_replicas, s.gpus_per_replica, s.cpus_per_replica, s.torch_threads, s.ingress_replicas


def test_settings_default_to_the_single_layout_sized_from_the_cluster():
    """``single`` is the default layout; replicas, GPU share and CPUs left to auto come from the cluster's
    GPUs and CPUs (issue 18): one GPU and 16 CPUs give the H200 runs' 4 replicas at 0.25 GPU and 3 CPUs
    each, the 2-core CPU machine one replica with 1 CPU; values the user gives are kept."""
    auto = ServeSettings(run_dir="r")
    assert (auto.layout, auto.num_replicas, auto.gpus_per_replica, auto.cpus_per_replica) == (
        "single",
        None,
        None,
        None,
    )
    gpu = auto.resolve(cluster_has_gpu=True, image_size=256, cluster_cpus=16, cluster_gpus=1)
    assert _shape(gpu) == ("single", 4, 0.25, 3.0, 3, 4) and gpu.max_batch_size == 32
    assert _shape(auto.resolve(True, 256, cluster_cpus=16)) == _shape(gpu)  # cluster_gpus defaults to 1 with a GPU
    assert 4 * gpu.gpus_per_replica <= 1 and 4 * gpu.cpus_per_replica <= 16 - 2  # fits, 2 CPUs left to Ray
    # the CPU-only test machine (2 cores): one replica, one CPU, one image at a time
    cpu = auto.resolve(cluster_has_gpu=False, image_size=256, cluster_cpus=2)
    assert _shape(cpu) == ("single", 1, 0.0, 1.0, 1, 1) and cpu.max_batch_size == 1
    assert _shape(auto.resolve(False, 256)) == _shape(cpu)  # build_app without a Ray connection: 2 CPUs assumed
    # a bigger CPU-only machine: still one replica, with the cores Ray's processes leave (torch threads)
    assert _shape(auto.resolve(False, 256, cluster_cpus=16)) == ("single", 1, 0.0, 14.0, 14, 1)
    # device=cpu or gpus_per_replica=0 on a GPU cluster: CPU replicas
    assert _shape(ServeSettings(run_dir="r", device="cpu").resolve(True, 256, 16, 1))[1:3] == (1, 0.0)
    assert _shape(ServeSettings(run_dir="r", gpus_per_replica=0).resolve(True, 256, 16, 1))[1:3] == (1, 0.0)
    # several GPUs: 4 per GPU, each a quarter of one; the CPUs cap the count at one each beyond Ray's 2
    assert _shape(auto.resolve(True, 256, cluster_cpus=48, cluster_gpus=3)) == ("single", 12, 0.25, 3.0, 3, 12)
    assert _shape(auto.resolve(True, 256, cluster_cpus=4, cluster_gpus=1)) == ("single", 2, 0.5, 1.0, 1, 2)
    # explicit values win, and the others follow them
    two = ServeSettings(run_dir="r", num_replicas=2).resolve(True, 256, 16, 1)
    assert _shape(two) == ("single", 2, 0.5, 7.0, 7, 2)
    assert _shape(ServeSettings(run_dir="r", num_replicas=4).resolve(True, 256, 16, 3))[:3] == ("single", 4, 0.5)
    assert _shape(ServeSettings(run_dir="r", gpus_per_replica=0.5).resolve(True, 256, 16, 1))[:3] == ("single", 2, 0.5)
    mine = ServeSettings(run_dir="r", num_replicas=3, gpus_per_replica=0.2, cpus_per_replica=1.5, torch_threads=4)
    assert _shape(mine.resolve(True, 256, 16, 1)) == ("single", 3, 0.2, 1.5, 4, 3)
    assert ServeSettings(run_dir="r", cpus_per_replica=2).resolve(True, 256, 16, 1).torch_threads == 2
    # strings from a config file or --set: auto is None
    from_file = ServeSettings.from_args({"run_dir": "r", "num_replicas": "auto", "cpus_per_replica": "auto"})
    assert _shape(from_file.resolve(True, 256, 16, 1)) == _shape(gpu)
    # layout=two_tier keeps its old defaults: one model replica with the GPU and 1 CPU, 2-8 fronts
    tier = ServeSettings(run_dir="r", layout="two_tier")
    assert _shape(tier.resolve(True, 256, 16, 1)) == ("two_tier", 1, 1.0, 1.0, 1, 8)
    assert _shape(tier.resolve(False, 256, 2)) == ("two_tier", 1, 0.0, 1.0, 1, 1)
    assert _shape(tier.resolve(True, 256, 64, 8)) == ("two_tier", 1, 1.0, 1.0, 1, 8)
    with pytest.raises(ValueError, match="cluster_cpus >= 0"):
        auto.resolve(True, 256, cluster_cpus=-1)


def test_token_from_file_or_environment(tmp_path, monkeypatch):
    monkeypatch.delenv("MAPL_TEST_TOKEN", raising=False)
    assert load_token("MAPL_TEST_TOKEN") is None
    monkeypatch.setenv("MAPL_TEST_TOKEN", " s3cret \n")
    assert load_token("MAPL_TEST_TOKEN") == "s3cret"
    for blank in ("", "  \n"):  # a secret that did not arrive must not leave the server open
        monkeypatch.setenv("MAPL_TEST_TOKEN", blank)
        with pytest.raises(ValueError, match=r"\$MAPL_TEST_TOKEN is set but empty"):
            load_token("MAPL_TEST_TOKEN")
    monkeypatch.setenv("MAPL_TEST_TOKEN", "s3cret")
    f = tmp_path / "token"
    f.write_text("from-file\n")
    assert load_token("MAPL_TEST_TOKEN", str(f)) == "from-file"  # the file wins
    f.write_text("  \n")
    with pytest.raises(ValueError, match="empty"):
        load_token("MAPL_TEST_TOKEN", str(f))
    with pytest.raises(ValueError, match="cannot read"):
        load_token("MAPL_TEST_TOKEN", str(tmp_path / "missing"))
    assert token_digest("a") != token_digest("b") and token_digest(None) is None


def test_check_bearer():
    check_bearer(None, None)  # no token configured: open
    check_bearer("Bearer abc", "abc")
    check_bearer("bearer abc", "abc")
    for header in (None, "", "Bearer abd", "Basic abc", "abc"):
        with pytest.raises(ApiError) as e:
            check_bearer(header, "abc")
        assert e.value.status == 401 and e.value.headers == {"WWW-Authenticate": "Bearer"}


def test_training_metrics_keep_numbers_and_drop_paths(tmp_path):
    (tmp_path / "metrics.json").write_text(
        json.dumps(
            {
                "overall": {"image_auroc": 0.9, "note": "x"},
                "per_defect": {"crack": {"image_auroc": 0.8}},
                "run": {"data_root": "/somewhere/private"},
            }
        )
    )
    got = training_metrics(tmp_path)
    assert got == {"overall": {"image_auroc": 0.9}, "per_defect": {"crack": {"image_auroc": 0.8}}}
    assert training_metrics(tmp_path / "none") == {}


def test_ray_serve_env_is_set_where_unset_and_a_users_value_wins(monkeypatch):
    from mapl_ray.serving.settings import RAY_SERVE_ENV, apply_ray_serve_env

    for key in RAY_SERVE_ENV:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("RAY_SERVE_THROUGHPUT_OPTIMIZED", "0")
    got = apply_ray_serve_env()
    assert got["RAY_SERVE_THROUGHPUT_OPTIMIZED"] == "0" and os.environ["RAY_SERVE_THROUGHPUT_OPTIMIZED"] == "0"
    monkeypatch.delenv("RAY_SERVE_THROUGHPUT_OPTIMIZED")
    got = apply_ray_serve_env()
    assert got["RAY_SERVE_THROUGHPUT_OPTIMIZED"] == "1"
    # a two_tier front's call of 32 decoded 1024 px images fits one gRPC message (gRPC's default is 4 MiB)
    assert int(got["RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH"]) >= 32 * 1024 * 1024 * 3


def test_regions_default_cut_is_the_map_part_of_the_decision_threshold():
    """With the image head in the score (``q_weight`` > 0, chosen on validation), the run's threshold is on
    top-k mean + q_weight * q, not on the map: cut at the threshold itself, an image labelled anomalous had
    no region (and a threshold above 1 none ever); cut at threshold - q_weight * q it has one."""
    from mapl_ray.data.io import DecodedUpload
    from mapl_ray.serving.results import image_result

    amap = np.zeros((32, 32), np.float32)
    amap[4:12, 20:28] = 0.55  # top-k mean 0.55 with k <= 64
    q, q_weight, threshold = 0.6, 1.0, 1.0
    score = 0.55 + q_weight * q  # 1.15: anomalous
    record = {"path": "a.png", "score": score, "normalised_score": 3.0, "q": q, "label": int(score >= threshold)}
    decoded = DecodedUpload(np.zeros((32, 32, 3), np.uint8), (64, 64), None, "PNG", "L", 1, 1)
    opts = {"regions": True, "region_threshold": None}
    out = image_result(record, amap, decoded, opts, threshold, "v", 10, q_weight)
    assert out["anomalous"] and out["region_threshold"] == pytest.approx(threshold - q_weight * q)
    assert out["regions_total"] == 1
    assert out["regions"][0]["x"] == 40 and out["regions"][0]["width"] == 16  # the block, in image pixels
    normal = {**record, "q": 0.1, "score": 0.65, "label": 0}  # cut 0.9: above every map value
    assert image_result(normal, amap, decoded, opts, threshold, "v", 10, q_weight)["regions_total"] == 0
    chosen = image_result(record, amap, decoded, {**opts, "region_threshold": 0.6}, threshold, "v", 10, q_weight)
    assert (chosen["region_threshold"], chosen["regions_total"]) == (0.6, 0)  # a client's cut is kept
