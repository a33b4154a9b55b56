"""Ray Serve app: HTTP scoring of a trained run gives the same scores as the Predictor, and clear 400s."""

from __future__ import annotations

import base64
import io
import socket

import numpy as np
import pytest
from conftest import SCREW, needs_data
from PIL import Image

pytestmark = needs_data


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(trained_run):
    ray = pytest.importorskip("ray")
    from ray import serve

    from mapl_ray.pipelines.serve import build_app

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(trained_run, device="cpu", max_batch_size=4), name="mapl", route_prefix="/")
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()
    ray.shutdown()


def test_http_scores_match_the_predictor(served, trained_run):
    import requests

    from mapl_ray.inference import Predictor

    paths = [
        sorted((SCREW / "test" / "good").glob("*.png"))[3],
        sorted((SCREW / "test" / "thread_top").glob("*.png"))[3],
    ]
    expected, _, maps = Predictor(trained_run, device="cpu").predict_paths(paths)
    for path, exp, amap in zip(paths, expected, maps):
        r = requests.post(
            f"{served}/predict", params={"name": path.name, "heatmap": "true"}, data=path.read_bytes(), timeout=60
        )
        assert r.status_code == 200, r.text
        got = r.json()
        assert got["name"] == path.name
        assert got["score"] == pytest.approx(exp["score"], abs=1e-5) and got["label"] == exp["label"]
        heat = Image.open(io.BytesIO(base64.b64decode(got["heatmap_png_base64"])))
        with Image.open(path) as src:
            assert got["original_size"] == [src.height, src.width] and heat.size == src.size  # at the upload's size
        small = np.asarray(heat.resize(amap.shape[::-1], Image.Resampling.BILINEAR)) / 255.0
        assert np.abs(small - amap).mean() < 0.02  # the same map, resampled
    health = requests.get(f"{served}/health", timeout=30).json()
    assert (
        health["status"] == "ok"
        and health["category"] == "screw"
        and health["threshold"] == expected[0].get("threshold", health["threshold"])
    )


def test_concurrent_requests_are_batched_without_mixing_results(served, trained_run):
    from concurrent.futures import ThreadPoolExecutor

    import requests

    from mapl_ray.inference import Predictor

    paths = (
        sorted((SCREW / "test" / "good").glob("*.png"))[:3]
        + sorted((SCREW / "test" / "scratch_head").glob("*.png"))[:3]
    )
    expected = {r["path"]: r["score"] for r in Predictor(trained_run, device="cpu").predict_paths(paths)[0]}

    def post(path):
        r = requests.post(f"{served}/predict", params={"name": str(path)}, data=path.read_bytes(), timeout=120)
        assert r.status_code == 200, r.text
        return r.json()

    with ThreadPoolExecutor(len(paths)) as pool:
        got = list(pool.map(post, paths))
    for g in got:  # each answer belongs to its own image, whatever batch it was scored in
        assert g["score"] == pytest.approx(expected[g["name"]], abs=1e-5)


def test_http_bad_body_is_a_400_naming_the_upload(served):
    import requests

    r = requests.post(f"{served}/predict", params={"name": "scan_17.png"}, data=b"not an image", timeout=30)
    assert r.status_code == 400 and "scan_17.png" in r.json()["detail"]
    r = requests.post(f"{served}/predict", data=b"", timeout=30)
    assert r.status_code == 400 and "empty body" in r.json()["detail"]


def test_build_app_rejects_a_folder_without_checkpoint(tmp_path):
    from mapl_ray.pipelines.serve import build_app
    from mapl_ray.runfolder import CheckpointError

    with pytest.raises(CheckpointError, match="not a trained run folder"):
        build_app(tmp_path)
