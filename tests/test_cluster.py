"""Cluster batch jobs (issue 16): the launcher files against Ray's autoscaler schema, the jobs/ entry
points, and a real two-node local Ray cluster that runs ``ray job submit -- python jobs/train.py``."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import yaml
from conftest import needs_data

REPO = Path(__file__).resolve().parents[1]
LAUNCHER_FILES = ["cluster.yaml", "cluster-onprem.yaml"]


def _autoscaler_schema() -> dict:
    ray_autoscaler = pytest.importorskip("ray.autoscaler")
    return json.loads((Path(ray_autoscaler.__file__).parent / "ray-schema.json").read_text())


@pytest.mark.parametrize("name", LAUNCHER_FILES)
def test_launcher_file_matches_the_autoscaler_schema(name):
    """`ray up` cannot run here (no cloud account, no ssh hosts): the schema Ray ships, and Ray's own
    config preparation (defaults merged, node types filled in), are the check of the launcher files."""
    jsonschema = pytest.importorskip("jsonschema")
    from ray.autoscaler._private.util import prepare_config, validate_config

    schema = _autoscaler_schema()
    cfg = yaml.safe_load((REPO / name).read_text())
    jsonschema.validate(cfg, schema)
    prepared = prepare_config(copy.deepcopy(cfg))
    validate_config(prepared)
    assert cfg["idle_timeout_minutes"] > 0
    assert any("pip install" in c and "[gpu" in c for c in cfg["setup_commands"])  # the package, GPU extra
    assert any("/mnt/shared" in c for c in cfg["setup_commands"])  # shared storage on every node
    if cfg["provider"]["type"] == "local":
        assert cfg["provider"]["worker_ips"]
    else:
        types = cfg["available_node_types"]
        head = types[cfg["head_node_type"]]
        workers = [t for n, t in types.items() if n != cfg["head_node_type"]]
        assert "GPU" not in head["resources"]
        assert any(t["resources"].get("GPU", 0) >= 1 and t["max_workers"] > t.get("min_workers", 0) for t in workers)


def test_schema_check_rejects_a_broken_launcher_file():
    """The schema test can fail: a misspelt key and a fractional resource are refused."""
    jsonschema = pytest.importorskip("jsonschema")
    schema = _autoscaler_schema()
    cfg = yaml.safe_load((REPO / "cluster.yaml").read_text())
    misspelt = {**copy.deepcopy(cfg), "idle_timeout_minute": 5}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(misspelt, schema)
    fractional = copy.deepcopy(cfg)
    fractional["available_node_types"]["gpu_worker"]["resources"]["GPU"] = 0.5
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(fractional, schema)


# a real two-node Ray cluster on 127.0.0.1 -------------------------------------------------------------------


@pytest.fixture
def two_node_cluster():
    """Head (1 CPU: the job driver) + a worker node with the custom resource ``mapl_worker`` that the
    training workers ask for, so that training runs on the worker node. Every process stopped by PID."""
    pytest.importorskip("psutil")
    from mapl_ray.pipelines.local_cluster import LocalCluster

    cluster = LocalCluster(head_cpus=1, env={"PYTHONPATH": str(REPO)})
    try:
        cluster.start()
        cluster.add_node("worker", 2, {"mapl_worker": 1})
        yield cluster
    finally:
        cluster.stop()
        assert cluster.leftover_pids() == []


def _job_config(small_root, tmp_path, **overrides):
    from conftest import tiny_config

    cfg = tiny_config(
        small_root,
        **{"train.cpus_per_worker": 1, "train.worker_resources": "mapl_worker=1", "eval.heatmaps": 2, **overrides},
    )
    path = tmp_path / "job.yaml"
    cfg.save(path)
    return path


def _check_run(run: Path, steps: int) -> dict:
    from mapl_ray.runfolder import has_checkpoint, read_state

    assert has_checkpoint(run) and int(read_state(run)["step"]) == steps
    assert not (run / "ray_results").exists()  # Ray Train's copies are removed when the job ends
    metrics = json.loads((run / "metrics.json").read_text())
    assert 0.0 <= metrics["overall"]["image_auroc"] <= 1.0
    return json.loads((run / "train_summary.json").read_text())


@needs_data
def test_ray_job_submit_trains_on_the_worker_node(two_node_cluster, small_root, tmp_path):
    from mapl_ray.pipelines.local_cluster import submit_train_job

    run = tmp_path / "run"
    args = ["--config", str(_job_config(small_root, tmp_path)), "--out", str(run), "--max-failures", "1", "--quiet"]
    result = submit_train_job(two_node_cluster, args, run, cwd=str(REPO))
    assert result["status"] == "SUCCEEDED", result["logs"][-3000:]
    assert f"jobs/train.py: --out in {run}" in result["logs"]
    summary = _check_run(run, 6)
    assert summary["restarts"] == []
    assert summary["ray_node_id"] == two_node_cluster.node_id(two_node_cluster.nodes[1])  # not the head


@pytest.mark.slow
@needs_data
def test_lost_worker_node_resumes_from_the_last_checkpoint(two_node_cluster, small_root, tmp_path):
    """The worker node's raylet is killed during training; Ray Train restarts the worker on a replacement
    node from the last checkpoint, the job succeeds and its final checkpoint loads in `mapl predict`."""
    from mapl_ray.cli import main
    from mapl_ray.pipelines.local_cluster import submit_train_job

    run = tmp_path / "run"
    cfg = _job_config(small_root, tmp_path, **{"train.steps": 16, "train.checkpoint_every": 3})
    args = ["--config", str(cfg), "--out", str(run), "--max-failures", "2", "--quiet"]
    result = submit_train_job(
        two_node_cluster, args, run, str(REPO), kill="raylet", kill_at_step=7, replacement=(2, {"mapl_worker": 1})
    )
    assert result["status"] == "SUCCEEDED", result["logs"][-3000:]
    summary = _check_run(run, 16)
    [restart] = summary["restarts"]
    assert restart["step"] % 3 == 0 and 0 < restart["step"] <= 16
    log = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    before = max(r["step"] for r in log if r["segment"] == 0)  # the worker may log a step or two after the kill
    assert before >= result["killed_at_step"] and restart["steps_repeated"] == before - restart["step"]
    assert [r["step"] for r in log if r["segment"] == 1 and "event" not in r] == list(range(restart["step"] + 1, 17))
    assert main(["predict", str(run), str(small_root / "screw" / "test" / "good")]) == 0
