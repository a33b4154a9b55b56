"""The Ray Serve application over real HTTP: scores equal `mapl predict`'s, every bad input is a 4xx JSON
and the server keeps serving, token auth, queue bound, time limit, replica crash, schema, metrics.

One Ray cluster and one Serve instance per layout (``two_tier``: HTTP fronts and a model deployment;
``single``: the model replica is the HTTP front), each with three applications of the tiny trained run:
``main`` at ``/`` (small limits, batching on), ``strict`` at ``/strict`` (bearer token, a queue of one,
animated images refused) and ``slow`` at ``/slow`` (a 20 ms scoring time limit). Every app-level test
runs against both layouts.
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import os
import signal
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from conftest import SCREW, needs_data
from PIL import Image

pytestmark = needs_data

TOKEN = "test-token-5f2c"
MAIN = {
    "device": "cpu",
    "cpus_per_replica": 0.5,
    "torch_threads": 1,
    "max_batch_size": 4,
    "max_body_bytes": 2_000_000,
    "max_pixels": 4_000_000,
    "max_batch_images": 4,
    "request_timeout_s": 60,
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def png(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", **kw)
    return buf.getvalue()


def screw(kind: str = "good", i: int = 0) -> Path:
    return sorted((SCREW / "test" / kind).glob("*.png"))[i]


@pytest.fixture(scope="module", params=["two_tier", "single"])
def layout(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def served(layout, trained_run, tmp_path_factory):
    """(base URL, metrics URL) of the three apps in ``layout``, on one local Ray cluster."""
    ray = pytest.importorskip("ray")
    from ray import serve

    from mapl_ray.pipelines.serve import build_app

    token_file = tmp_path_factory.mktemp("secret") / "token"
    token_file.write_text(TOKEN + "\n")
    mp = pytest.MonkeyPatch()
    mp.delenv("MAPL_SERVE_TOKEN", raising=False)  # the main app is the one without a token
    metrics_port = _free_port()
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, _metrics_export_port=metrics_port)
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    main = {**MAIN, "layout": layout}
    apps = {
        "main": (build_app(trained_run, **main), "/"),
        "strict": (
            build_app(
                trained_run,
                **{
                    **main,
                    "token_file": str(token_file),
                    "animated": "refuse",
                    "max_batch_size": 1,
                    "max_ongoing_requests": 1,
                    "max_queued_requests": 1,
                    "retry_after_s": 2,
                },
            ),
            "/strict",
        ),
        "slow": (
            build_app(
                trained_run,
                **{**main, "request_timeout_s": 0.02, "max_pixels": 40_000_000, "max_body_bytes": 20 * 2**20},
            ),
            "/slow",
        ),
    }
    for name, (app, prefix) in apps.items():
        serve.run(app, name=name, route_prefix=prefix, blocking=False)
    deadline = time.monotonic() + 300
    while any(serve.status().applications[n].status != "RUNNING" for n in apps):
        assert time.monotonic() < deadline, f"Serve apps did not start: {serve.status()}"
        time.sleep(0.5)
    yield f"http://127.0.0.1:{port}", f"http://127.0.0.1:{metrics_port}/metrics"
    serve.shutdown()
    ray.shutdown()
    mp.undo()


def post(url: str, data: bytes, ctype: str | None = "image/png", token: str | None = None, **params):
    import requests

    headers = {} if ctype is None else {"Content-Type": ctype}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    return requests.post(url, params=params, data=data, headers=headers, timeout=120)


def assert_error(r, status: int, kind: str) -> dict:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    body = r.json()
    assert body["error"] == kind and body["status"] == status and body["detail"], body
    return body


def assert_still_serving(base: str) -> None:
    r = post(f"{base}/v1/predict", screw().read_bytes())
    assert r.status_code == 200, r.text


# ------------------------------------------------------------------------------- scores and schema
def test_served_scores_equal_mapl_predict(served, trained_run, tmp_path, capsys):
    from mapl_ray.cli import main
    from mapl_ray.inference import Predictor

    base, _ = served
    paths = [screw("good", 3), screw("thread_top", 3), screw("scratch_head", 1)]
    assert main(["predict", str(trained_run), *map(str, paths), "--device", "cpu", "--heatmaps", str(tmp_path)]) == 0
    expected = {rec["path"]: rec for rec in map(json.loads, capsys.readouterr().out.splitlines())}
    _, _, maps = Predictor(trained_run, device="cpu").predict_paths(paths)
    for path, amap in zip(paths, maps):
        r = post(f"{base}/v1/predict", path.read_bytes(), name=str(path), heatmap="true")
        assert r.status_code == 200, r.text
        (got,) = r.json()["results"]
        exp = expected[str(path)]
        assert got["name"] == str(path) and got["label"] == exp["label"]
        for key in ("score", "normalised_score", "q"):
            assert got[key] == pytest.approx(exp[key], abs=1e-5)
        heat = Image.open(io.BytesIO(base64.b64decode(got["heatmap_png_base64"])))
        with Image.open(path) as src:
            assert got["image_size"] == [src.height, src.width] and heat.size == src.size  # at the upload's size
        small = np.asarray(heat.resize(amap.shape[::-1], Image.Resampling.BILINEAR)) / 255.0
        assert np.abs(small - amap).mean() < 0.02  # the same map, resampled


def test_response_schema_regions_and_no_paths(served, trained_run):
    import requests

    from mapl_ray.serving.schema import ErrorResponse, ModelInfo, PredictResponse

    base, _ = served
    info = requests.get(f"{base}/v1/model", timeout=60)
    assert info.status_code == 200, info.text
    model = ModelInfo.model_validate(info.json())
    assert model.run_id == trained_run.name and model.category == "screw" and model.image_size == 64
    assert model.model_version.startswith("sha256:") and "image_auroc" in model.metrics["overall"]
    assert model.limits["max_pixels"] == MAIN["max_pixels"] and model.limits["min_side"] == 8
    assert model.limits["adaptive_batch_wait"] is True  # the batching in force can be checked from outside
    texts = [info.text]
    paths = [screw("good", 0), screw("scratch_head", 0), screw("thread_top", 1)]
    for path in paths:
        r = post(f"{base}/v1/predict", path.read_bytes(), name=path.name, regions="true", region_threshold="0.3")
        texts.append(r.text)
        res = PredictResponse.model_validate(r.json()).results[0]
        assert res.model_version == model.model_version and res.threshold == pytest.approx(model.threshold)
        assert res.anomalous == (res.score >= model.threshold) and res.label == int(res.anomalous)
        assert res.region_threshold == 0.3 and res.heatmap_png_base64 is None  # heatmap not asked for
        assert res.source.format == "PNG" and res.source.frames == 1 and res.warnings == []
        assert len(res.regions) == min(res.regions_total, 50)
        h, w = res.image_size
        for reg in res.regions:
            assert 0 <= reg.x < reg.x + reg.width <= w and 0 <= reg.y < reg.y + reg.height <= h
            assert 0.3 <= reg.mean_score <= reg.max_score <= 1.0
        assert set(r.json()["results"][0]) >= {"regions", "regions_total", "region_threshold"}
        assert "heatmap_png_base64" not in r.json()["results"][0]
    # by default the map is cut at the map part of the run's threshold (image score = top-k mean + q_weight
    # * q), so an image labelled anomalous has a region: its top-k pixels reach that cut
    q_weight = json.loads((trained_run / "checkpoint" / "state.json").read_text()).get("q_weight") or 0.0
    for path in paths:
        res = post(f"{base}/v1/predict", path.read_bytes(), regions="true").json()["results"][0]
        cut = min(1.0, max(0.0, model.threshold - q_weight * res["q"]))
        assert res["region_threshold"] == pytest.approx(cut)
        assert (res["regions_total"] > 0) or res["label"] == 0
    err = post(f"{base}/v1/predict", b"nope", name="x.png")
    ErrorResponse.model_validate(err.json())
    texts += [err.text, requests.get(f"{base}/readyz", timeout=30).text]
    for t in texts:  # no response reveals where the run lives
        assert str(trained_run) not in t and str(trained_run.parent) not in t


def test_concurrent_requests_are_batched_without_mixing_results(served, trained_run):
    from mapl_ray.inference import Predictor

    base, _ = served
    paths = [screw("good", i) for i in range(3)] + [screw("scratch_head", i) for i in range(3)]
    expected = {r["path"]: r["score"] for r in Predictor(trained_run, device="cpu").predict_paths(paths)[0]}
    with ThreadPoolExecutor(len(paths)) as pool:
        got = list(pool.map(lambda p: post(f"{base}/v1/predict", p.read_bytes(), name=str(p)), paths))
    for r in got:  # each answer belongs to its own image, whatever batch it was scored in
        assert r.status_code == 200, r.text
        res = r.json()["results"][0]
        assert res["score"] == pytest.approx(expected[res["name"]], abs=1e-5)


def test_json_batch_and_multipart_give_one_result_per_image_in_order(served):
    import requests

    base, _ = served
    paths = [screw("good", 0), screw("thread_top", 2), screw("good", 1)]  # 000.png, 002.png, 001.png
    single = {p.name: post(f"{base}/v1/predict", p.read_bytes()).json()["results"][0]["score"] for p in paths}
    batch = {"images": [{"name": p.name, "data": base64.b64encode(p.read_bytes()).decode()} for p in paths]}
    r = requests.post(f"{base}/v1/predict", json=batch, timeout=120)
    assert r.status_code == 200, r.text
    assert [x["name"] for x in r.json()["results"]] == [p.name for p in paths]
    r2 = requests.post(
        f"{base}/v1/predict", files=[("file", (p.name, p.read_bytes(), "image/png")) for p in paths], timeout=120
    )
    assert [x["name"] for x in r2.json()["results"]] == [p.name for p in paths]
    assert r2.status_code == 200, r2.text
    for res in r.json()["results"] + r2.json()["results"]:
        assert res["score"] == pytest.approx(single[res["name"]], abs=1e-5)


def test_exif_orientation_is_honoured(served, trained_run, tmp_path):
    from mapl_ray.inference import Predictor

    base, _ = served
    with Image.open(screw("thread_top", 0)) as src:
        up = src.convert("L").crop((0, 0, src.width, src.height * 3 // 4))  # not square: the turn shows in the size
    exif = Image.Exif()
    exif[0x0112] = 6  # "turn 90 degrees clockwise to display"
    turned = png(up.transpose(Image.Transpose.ROTATE_90), exif=exif.tobytes())
    a = post(f"{base}/v1/predict", png(up), heatmap="true").json()["results"][0]
    b = post(f"{base}/v1/predict", turned, heatmap="true").json()["results"][0]
    assert b["source"]["exif_orientation"] == 6 and b["image_size"] == a["image_size"] == [up.height, up.width]
    assert b["score"] == pytest.approx(a["score"], abs=1e-5)
    assert b["heatmap_png_base64"] == a["heatmap_png_base64"]  # the map on the image as a person sees it
    (tmp_path / "turned.png").write_bytes(turned)  # `mapl predict` reads files through the same decoder
    rec = Predictor(trained_run, device="cpu").predict_paths([tmp_path / "turned.png"])[0][0]
    assert rec["score"] == pytest.approx(a["score"], abs=1e-5)


# ------------------------------------------------------------------------------------ bad input
def _gif(frames: int) -> bytes:
    imgs = [Image.new("RGB", (64, 64), (60 * i, 100, 200 - 50 * i)) for i in range(frames)]
    buf = io.BytesIO()
    imgs[0].save(buf, format="GIF", save_all=True, append_images=imgs[1:])
    return buf.getvalue()


def _bad_inputs():
    good = screw().read_bytes()
    jpeg = io.BytesIO()
    Image.open(screw()).convert("RGB").save(jpeg, format="JPEG")
    jpeg = jpeg.getvalue()
    b64 = base64.b64encode(good).decode()
    return [  # (id, body, content type, query, status, kind, limit name)
        ("not_an_image", b"GIF89a? not really", "image/png", {}, 400, "not_an_image", None),
        ("truncated_png", good[: len(good) // 2], "image/png", {}, 400, "corrupt_image", None),
        ("truncated_jpeg", jpeg[: len(jpeg) // 2], "image/jpeg", {}, 400, "corrupt_image", None),
        ("zero_size", b"", "image/png", {}, 400, "empty_image", None),
        ("wrong_content_type", good, "text/plain", {}, 415, "unsupported_media_type", None),
        (
            "form_urlencoded_default_of_curl",
            good,
            "application/x-www-form-urlencoded",
            {},
            415,
            "unsupported_media_type",
            None,
        ),
        ("body_over_limit", b"\0" * 2_100_000, "image/png", {}, 413, "body_too_large", "max_body_bytes"),
        ("pixel_bomb", png(Image.new("L", (3000, 2000))), "image/png", {}, 413, "too_many_pixels", "max_pixels"),
        ("one_pixel", png(Image.new("RGB", (1, 1))), "image/png", {}, 422, "image_too_small", "min_side"),
        ("ten_thousand_by_one", png(Image.new("RGB", (10000, 1))), "image/png", {}, 422, "image_too_small", "min_side"),
        ("sliver", png(Image.new("RGB", (400, 40))), "image/png", {}, 422, "bad_aspect_ratio", "max_aspect"),
        (
            "batch_over_max",
            json.dumps({"images": [{"data": b64}] * 5}).encode(),
            "application/json",
            {},
            413,
            "batch_too_large",
            "max_batch_images",
        ),
        ("bad_base64", b'{"images": [{"data": "not base64!"}]}', "application/json", {}, 400, "bad_base64", None),
        ("bad_json", b'{"images": [', "application/json", {}, 400, "bad_json", None),
        ("json_wrong_shape", b'{"image": "x"}', "application/json", {}, 422, "invalid_request", None),
        (
            "one_bad_image_in_a_batch",
            json.dumps(
                {"images": [{"data": b64}, {"data": base64.b64encode(b"junk").decode(), "name": "junk.png"}]}
            ).encode(),
            "application/json",
            {},
            400,
            "not_an_image",
            None,
        ),
        (
            "multipart_without_file",
            b'--b\r\nContent-Disposition: form-data; name="x"\r\n\r\n1\r\n--b--\r\n',
            "multipart/form-data; boundary=b",
            {},
            400,
            "bad_multipart",
            None,
        ),
        ("bad_query_parameter", good, "image/png", {"region_threshold": "2"}, 422, "invalid_request", None),
        ("nan_query_parameter", good, "image/png", {"region_threshold": "nan"}, 422, "invalid_request", None),
    ]


@pytest.mark.parametrize("case", _bad_inputs(), ids=lambda c: c[0])
def test_bad_input_is_a_4xx_json_and_the_next_request_succeeds(served, case):
    base, _ = served
    _, body, ctype, query, status, kind, limit = case
    err = assert_error(post(f"{base}/v1/predict", body, ctype, **query), status, kind)
    if query.get("region_threshold") == "nan":  # said as what it is, not as "must be <= 1"
        assert "finite" in err["detail"], err
    if limit is not None:
        assert err["limit"]["name"] == limit and limit in err["detail"]
    if case[0] == "one_bad_image_in_a_batch":
        assert err["detail"].startswith("images[1] (junk.png):")
    assert_still_serving(base)


def test_declared_body_over_the_limit_is_refused_before_it_is_sent(served):
    base, _ = served
    host, port = base.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    conn.putrequest("POST", "/v1/predict")
    conn.putheader("Content-Type", "image/png")
    conn.putheader("Content-Length", str(2**30))  # 1 GiB announced, a few bytes sent
    conn.endheaders()
    conn.send(b"\x89PNG\r\n\x1a\n" + b"\0" * 1000)
    r = conn.getresponse()  # answered without waiting for the rest of the body
    body = json.loads(r.read())
    conn.close()
    assert r.status == 413 and body["limit"] == {"name": "max_body_bytes", "value": 2**30, "allowed": 2_000_000}
    assert_still_serving(base)


def test_chunked_body_over_the_limit_is_refused(served):
    import requests

    base, _ = served
    r = requests.post(
        f"{base}/v1/predict",
        data=(b"\0" * 65536 for _ in range(64)),  # 4 MB, chunked
        headers={"Content-Type": "image/png"},
        timeout=60,
    )
    assert_error(r, 413, "body_too_large")
    assert_still_serving(base)


def test_sixteen_bit_palette_and_animated_images(served):
    base, _ = served
    with Image.open(screw("scratch_head", 0)) as src:
        grey = np.asarray(src.convert("L"))
    ref = post(f"{base}/v1/predict", png(Image.fromarray(grey))).json()["results"][0]
    r16 = post(f"{base}/v1/predict", png(Image.fromarray(grey.astype(np.uint16) * 257))).json()["results"][0]
    assert r16["score"] == pytest.approx(ref["score"], abs=1e-6) and "16-bit" in r16["warnings"][0]
    rp = post(f"{base}/v1/predict", png(Image.fromarray(grey).convert("P"))).json()["results"][0]
    assert rp["source"]["mode"] == "P" and rp["score"] == pytest.approx(ref["score"], abs=1e-6)
    anim = post(f"{base}/v1/predict", _gif(3), "image/gif").json()["results"][0]
    assert anim["source"]["frames"] == 3 and "only the first frame" in anim["warnings"][0]
    first = post(f"{base}/v1/predict", _gif(1), "image/gif").json()["results"][0]
    assert anim["score"] == pytest.approx(first["score"], abs=1e-6)  # frame 1 is what was scored
    refused = assert_error(post(f"{base}/strict/v1/predict", _gif(3), "image/gif", token=TOKEN), 422, "animated_image")
    assert refused["limit"]["name"] == "animated"


def test_unknown_route_and_method_are_json(served):
    import requests

    base, _ = served
    assert_error(requests.get(f"{base}/predict", timeout=30), 404, "not_found")
    assert_error(requests.get(f"{base}/v1/predict", timeout=30), 405, "method_not_allowed")


# ----------------------------------------------------------------- token, queue, time limit, health
def test_token_required_on_every_route_but_healthz(served):
    import requests

    base, _ = served
    strict = f"{base}/strict"
    assert requests.get(f"{strict}/healthz", timeout=30).status_code == 200
    image = screw().read_bytes()
    for method, route in [
        ("GET", "/readyz"),
        ("GET", "/v1/model"),
        ("POST", "/v1/predict"),
        ("GET", "/docs"),
        ("GET", "/openapi.json"),
        ("GET", "/no/such/route"),
    ]:
        for auth in (None, "Bearer wrong", f"Basic {TOKEN}"):
            headers = {"Content-Type": "image/png"} | ({"Authorization": auth} if auth else {})
            r = requests.request(
                method, f"{strict}{route}", headers=headers, data=image if method == "POST" else None, timeout=30
            )
            assert_error(r, 401, "unauthorized")
            assert r.headers["WWW-Authenticate"] == "Bearer"
    ok = {"Authorization": f"Bearer {TOKEN}"}
    assert requests.get(f"{strict}/v1/model", headers=ok, timeout=60).status_code == 200
    assert requests.get(f"{strict}/openapi.json", headers=ok, timeout=60).status_code == 200
    assert post(f"{strict}/v1/predict", image, token=TOKEN).status_code == 200
    assert requests.get(f"{base}/v1/model", timeout=60).status_code == 200  # the app without a token is open


def test_full_queue_is_a_fast_503_with_retry_after(served):
    base, _ = served
    with Image.open(screw()) as src:
        heavy = png(src.convert("L").resize((1500, 1500)))  # slower to decode: the requests overlap
    with ThreadPoolExecutor(12) as pool:
        answers = list(pool.map(lambda _: post(f"{base}/strict/v1/predict", heavy, token=TOKEN), range(12)))
    codes = sorted(r.status_code for r in answers)
    assert set(codes) <= {200, 503} and codes.count(503) >= 1 and codes.count(200) >= 1, codes
    for r in answers:
        if r.status_code == 503:
            body = assert_error(r, 503, "queue_full")
            assert r.headers["Retry-After"] == "2" and body["limit"]["name"] == "max_queued_requests"
    assert post(f"{base}/strict/v1/predict", heavy, token=TOKEN).status_code == 200


def test_time_limit_is_a_504_not_a_hang(served):
    base, _ = served
    with Image.open(screw()) as src:
        big = png(src.convert("L").resize((3000, 3000)))  # 9 Mpx: decoding alone takes longer than 20 ms
    t0 = time.monotonic()
    body = assert_error(post(f"{base}/slow/v1/predict", big), 504, "timeout")
    assert body["limit"] == {"name": "request_timeout_s", "value": None, "allowed": 0.02}
    assert time.monotonic() - t0 < 30  # answered at the limit, not after the work
    assert_still_serving(base)


def test_health_and_readiness(served):
    import requests

    base, _ = served
    assert requests.get(f"{base}/healthz", timeout=30).json() == {"status": "ok"}
    ready = requests.get(f"{base}/readyz", timeout=30)
    assert ready.status_code == 200 and ready.json()["ready"] and ready.json()["model_replicas_running"] == 1


def test_openapi_declares_request_bodies_and_errors(served):
    import requests

    base, _ = served
    spec = requests.get(f"{base}/openapi.json", timeout=30).json()
    op = spec["paths"]["/v1/predict"]["post"]
    content = op["requestBody"]["content"]
    assert {"image/png", "image/jpeg", "image/*", "multipart/form-data", "application/json"} <= set(content)
    assert content["image/png"]["schema"] == {"type": "string", "format": "binary"}
    ref = content["application/json"]["schema"]["$ref"].rsplit("/", 1)[1]
    assert "images" in spec["components"]["schemas"][ref]["properties"]
    assert {"400", "401", "413", "415", "422", "503", "504"} <= set(op["responses"])
    assert op["responses"]["413"]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorResponse")
    assert spec["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"


def test_prometheus_metrics(served):
    import requests

    base, metrics_url = served
    post(f"{base}/v1/predict", screw().read_bytes())
    post(f"{base}/v1/predict", b"junk")
    deadline, text = time.monotonic() + 60, ""
    want = ("mapl_requests", "mapl_request_latency_ms", "mapl_errors", "mapl_batch_size")
    while time.monotonic() < deadline:  # Ray's agent exports on a period of a few seconds
        text = requests.get(metrics_url, timeout=10).text
        if all(w in text for w in want) and 'kind="not_an_image"' in text:
            break
        time.sleep(2)
    for w in want:
        assert w in text, f"{w} not exported"
    assert 'route="/v1/predict"' in text and 'kind="not_an_image"' in text


def test_replica_count_left_to_auto_on_a_cpu_cluster(served, layout):
    """The apps leave ``num_replicas`` to auto: on this CPU-only cluster (``ray.init(num_cpus=4)``) each layout
    runs one model replica, and :func:`cluster_shape` reads the cluster's GPUs and CPUs that resolve uses."""
    from ray import serve

    from mapl_ray.pipelines.serve import cluster_shape

    assert cluster_shape() == (0, 4)
    model = "Server" if layout == "single" else "Scorer"
    assert serve.status().applications["main"].deployments[model].replica_states == {"RUNNING": 1}


# ------------------------------------------------------------------------------- replica crash
def test_killed_model_replica_gives_json_and_serve_restarts_it(served, layout):
    """Runs last: the strict app's model replica is killed (SIGKILL) while it scores a request."""
    import ray
    import requests

    if layout == "single":
        pytest.skip("in the single layout the model replica is the HTTP front: its death takes the request")
    base, _ = served
    strict = f"{base}/strict"
    (name,) = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if "strict#Scorer#" in a["name"]]
    actor = ray.get_actor(name, namespace="serve")
    pid = ray.get(actor.__ray_call__.remote(lambda self: os.getpid()))
    with Image.open(screw()) as src:
        heavy = png(src.convert("L").resize((1900, 1900)))  # under max_pixels, slow to decode
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(post, f"{strict}/v1/predict", heavy, token=TOKEN)
        time.sleep(0.3)
        os.kill(pid, signal.SIGKILL)
        r = pending.result()
    assert r.headers["content-type"].startswith("application/json")  # never a plain-text 500
    if r.status_code != 200:  # retried on the restarted replica, or told to come back later
        assert_error(r, 503, "replica_unavailable")
        assert r.headers["Retry-After"]
    ok = {"Authorization": f"Bearer {TOKEN}"}
    deadline = time.monotonic() + 180
    while requests.get(f"{strict}/readyz", headers=ok, timeout=30).status_code != 200:
        assert time.monotonic() < deadline, "the model replica was not restarted"
        time.sleep(1)
    assert post(f"{strict}/v1/predict", screw().read_bytes(), token=TOKEN).status_code == 200


def test_build_app_rejects_a_folder_without_checkpoint(tmp_path):
    from mapl_ray.pipelines.serve import build_app
    from mapl_ray.runfolder import CheckpointError

    with pytest.raises(CheckpointError, match="not a trained run folder"):
        build_app(tmp_path)


def test_mapl_serve_refuses_bad_settings_before_starting_ray(trained_run, capsys):
    from mapl_ray.cli import main

    assert main(["serve", str(trained_run), "--set", "max_pixels=lots"]) == 2
    assert "max_pixels must be an integer" in capsys.readouterr().err
    assert main(["serve", str(trained_run), "--set", "max_pixel=5"]) == 2
    assert "unknown serve setting(s) max_pixel" in capsys.readouterr().err
    assert main(["serve", str(trained_run), "--token-file", "/nonexistent/token"]) == 2
    assert "token_file" in capsys.readouterr().err


def test_padded_batches_give_the_unpadded_answers(trained_run):
    """On a GPU each batch is padded to a captured CUDA-graph size; the same code on CPU must give
    each image its own answer, unchanged by the padding."""
    from mapl_ray.data.io import load_image
    from mapl_ray.pipelines.serve import Scorer
    from mapl_ray.serving.settings import ServeSettings

    s = ServeSettings(run_dir=str(trained_run), device="cpu").resolve(cluster_has_gpu=False, image_size=64)
    scorer = Scorer.func_or_class(s.to_dict())  # the replica's class, outside Serve
    paths = [screw("good", 0), screw("thread_top", 0), screw("scratch_head", 1)]
    items = [(load_image(p, 64), str(p), True) for p in paths]
    plain = scorer._forward(items)
    scorer.buckets = [1, 2, 4, 8]  # 3 images -> one pass of 4
    padded = scorer._forward(items)
    assert len(padded) == 3 and [r["path"] for r, _ in padded] == [str(p) for p in paths]
    for (r0, m0), (r1, m1) in zip(plain, padded):
        assert r1["score"] == pytest.approx(r0["score"], abs=1e-6) and np.allclose(m0, m1, atol=1e-6)
    # a map goes back only to the images that asked for it; the scores do not depend on it
    mixed = scorer._forward([(img, name, want) for (img, name, _), want in zip(items, (False, True, False))])
    assert [m is None for _, m in mixed] == [True, False, True] and np.allclose(mixed[1][1], plain[1][1], atol=1e-6)
    assert [r["score"] for r, _ in mixed] == pytest.approx([r["score"] for r, _ in plain], abs=1e-6)
    none = scorer._forward([(img, name, False) for img, name, _ in items])
    assert all(m is None for _, m in none)


def test_memory_banks_setting_scores_with_fewer_banks_under_its_own_version(trained_run):
    """``memory_banks=1`` serves the first bank of the run's two: the scores of ``Predictor(memory_banks=1)``,
    a ``model_version`` that says so, and more banks than the run holds refused before any replica starts."""
    from mapl_ray.data.io import load_image
    from mapl_ray.inference import Predictor
    from mapl_ray.pipelines.serve import Scorer, build_app
    from mapl_ray.serving.model_info import model_version
    from mapl_ray.serving.settings import ServeSettings

    s = ServeSettings(run_dir=str(trained_run), device="cpu", memory_banks=1).resolve(False, 64)
    scorer = Scorer.func_or_class(s.to_dict())
    assert scorer.version == model_version(trained_run) + "+banks1" and scorer.info()["memory_banks"] == 1
    paths = [screw("good", 0), screw("scratch_head", 1)]
    got = [r["score"] for r, _ in scorer._forward([(load_image(p, 64), str(p), False) for p in paths])]
    one, full = (Predictor(trained_run, device="cpu", memory_banks=n).predict_paths(paths)[0] for n in (1, None))
    assert got == pytest.approx([r["score"] for r in one], abs=1e-5)
    assert got != pytest.approx([r["score"] for r in full], abs=1e-5)  # the setting did change the model
    with pytest.raises(ValueError, match="memory_banks=3: the run holds 2"):
        build_app(trained_run, memory_banks=3)


def test_serve_config_file_holds_valid_settings(trained_run):
    """serve/config.yaml's application args are all ServeSettings fields with valid values."""
    import yaml

    from mapl_ray.pipelines.serve import app_builder

    cfg = yaml.safe_load((Path(__file__).resolve().parents[1] / "serve" / "config.yaml").read_text())
    assert cfg["http_options"]["host"] == "127.0.0.1"
    (app,) = cfg["applications"]
    assert app["import_path"] == "serve.app:app"
    app_builder({**app["args"], "run_dir": str(trained_run)})  # raises on an unknown key or a bad value
