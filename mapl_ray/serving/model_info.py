"""What ``GET /v1/model`` and every prediction say about the served run (never a file-system path)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from ..runfolder import checkpoint_dir


def model_version(run_dir: str | Path) -> str:
    """``sha256:`` + the first 16 hex digits of SHA-256 over the checkpoint's ``model.safetensors`` and
    ``state.json`` (weights, normalisation, threshold): two servers answer alike iff their versions match.

    Raises:
        OSError: a checkpoint file cannot be read.
    """
    h = hashlib.sha256()
    for name in ("model.safetensors", "state.json"):
        with open(checkpoint_dir(run_dir) / name, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
    return "sha256:" + h.hexdigest()[:16]


def training_metrics(run_dir: str | Path) -> dict[str, Any]:
    """The test metrics ``mapl train`` wrote (``metrics.json``): ``overall`` and ``per_defect``, numbers
    only (the file's ``run`` section, which holds paths, is left out); ``{}`` when there is no file."""
    path = Path(run_dir) / "metrics.json"
    if not path.is_file():
        return {}
    data = json.loads(path.read_text())

    def numbers(d: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in d.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}

    out: dict[str, Any] = {"overall": numbers(data.get("overall", {}))}
    per = data.get("per_defect")
    if isinstance(per, dict):
        out["per_defect"] = {k: numbers(v) for k, v in per.items() if isinstance(v, dict)}
    return out
