"""The layering rules of DESIGN.md, checked on the code itself: the method layer runs without Ray,
inference does not depend on the training engine, and library functions stay short enough to read."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "mapl_ray"
# the entry points and the Ray layer may import Ray; everything else is the method layer
RAY_LAYER = ("mapl_ray.pipelines", "mapl_ray.cli", "mapl_ray.main_job")
MAX_FUNCTION_LINES = 80


def library_modules() -> list[str]:
    names = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


def modules_loaded_after_import(modules: list[str]) -> set[str]:
    """Names in ``sys.modules`` after a fresh interpreter imports ``modules``."""
    code = (
        "import importlib, json, sys\n"
        f"for m in {modules!r}: importlib.import_module(m)\n"
        "print(json.dumps(sorted(sys.modules)))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=PACKAGE.parent
    ).stdout
    return set(json.loads(out.strip().splitlines()[-1]))


def test_method_layer_does_not_import_ray():
    below = [m for m in library_modules() if not m.startswith(RAY_LAYER)]
    assert "mapl_ray.engine.loop" in below and "mapl_ray.inference" in below
    loaded = modules_loaded_after_import(below)
    assert not any(m == "ray" or m.startswith("ray.") for m in loaded)


def test_inference_does_not_import_the_training_engine():
    loaded = modules_loaded_after_import(["mapl_ray.inference", "mapl_ray.eval.evaluate"])
    assert "mapl_ray.inference" in loaded
    assert not [m for m in loaded if m.startswith(("mapl_ray.engine", "mapl_ray.pseudo.labeler"))]


def test_inference_does_not_import_the_one_class_classifiers_libraries():
    """Every scoring actor and Serve replica starts by importing inference: scikit-learn and scipy.stats
    (the OCCs' and partial matching's) are a second of start-up they do not use."""
    loaded = modules_loaded_after_import(["mapl_ray.inference"])
    assert "mapl_ray.pseudo.patch_knn" in loaded  # the patch bank's, through the pseudo package
    assert not [m for m in loaded if m.split(".")[0] == "sklearn" or m.startswith("scipy.stats")]


def _code_lines(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    """Lines of a function without its docstring."""
    body = fn.body
    if (
        body
        and isinstance(body[0], ast.Expr)
        and isinstance(getattr(body[0], "value", None), ast.Constant)
        and isinstance(body[0].value.value, str)
    ):
        doc = body[0]
        return (fn.end_lineno - fn.lineno + 1) - (doc.end_lineno - doc.lineno + 1)
    return fn.end_lineno - fn.lineno + 1


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_library_functions_fit_on_a_screen(path):
    tree = ast.parse(path.read_text())
    long = [
        (node.name, _code_lines(node))
        for node in ast.walk(tree)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and _code_lines(node) > MAX_FUNCTION_LINES
    ]
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines (docstring excluded): {long}"
