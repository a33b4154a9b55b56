"""The accuracy benchmark's grid file (YAML): which detectors, settings, categories, conditions and seeds.

A grid file (``bench/grids/accuracy_gpu.yaml`` is the full one)::

    seeds: [101, 102, 103]              # seeds of data.seed and train.seed; none of them chose a setting
    steps: 500                          # train.steps of every MAPL row
    categories:                         # DATASET/CATEGORY folders under the data root, in the report's order
      - mvtec_ad/screw
      - elpv/solar_cell
    image_level_only: [elpv/solar_cell] # no masks: data.require_masks = false, image AUROC only
    corruption: {noise_std: 12, contrast_min: 0.5, contrast_max: 0.8, seed: 0}   # the "bhad" condition
    peer: {coreset_ratio: 0.1}          # run_patchcore's keyword arguments
    set: {}                             # overrides of every row (e.g. smaller images on a CPU); a row's own win
    rows:                               # in the report's order; a trial per row x category x condition x seed
      mapl: {label: "MAPL (defaults)", conditions: {clean: all, bhad: [mvtec_ad/screw]}}
      memseg: {label: "MemSeg (pseudo-labels off)", set: {pseudo.enabled: false}}
      patchcore: {label: "PatchCore (anomalib)", detector: patchcore}
      mapl_5_labeled: {set: {data.labeled_anomalies: 5}, categories: [mvtec_ad/screw]}

A row's keys: ``detector`` (``mapl``, default, or ``patchcore``), ``label``, ``set`` (configuration
overrides ``section.field: value``), ``categories`` (default: all), ``conditions`` (a list of ``clean`` and /
or ``bhad``, each on the row's categories, or a mapping of condition to its categories or ``all``; default
``[clean]``), ``preset`` (the category preset, default true). Every row shares the data, textures, weights and
steps, so rows differ only where their ``set`` says.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import Config, ConfigError, read_yaml_mapping
from ..data.corruption import Corruption
from ..presets import category_preset

__all__ = ["CONDITIONS", "DETECTORS", "GridError", "GridSpec", "GridTrial", "Row", "expand", "load_grid"]

DETECTORS = ("mapl", "patchcore")
CONDITIONS = ("clean", "bhad")
_TOP = {"seeds", "steps", "categories", "image_level_only", "corruption", "peer", "set", "rows"}
_ROW = {"detector", "label", "set", "categories", "conditions", "preset"}


class GridError(ValueError):
    """A grid file is missing, not YAML, or names an unknown key, detector, condition, category or field."""


@dataclass
class Row:
    """One row of the report: a detector and its settings (see the module docstring)."""

    name: str
    detector: str = "mapl"
    label: str = ""
    set: dict[str, Any] = field(default_factory=dict)
    categories: list[str] = field(default_factory=list)
    conditions: dict[str, list[str]] = field(default_factory=dict)  # condition -> its categories
    preset: bool = True


@dataclass
class GridSpec:
    """A parsed grid file."""

    seeds: list[int]
    steps: int
    categories: list[str]
    rows: list[Row]
    image_level_only: list[str] = field(default_factory=list)
    corruption: Corruption = field(default_factory=Corruption)
    peer: dict[str, Any] = field(default_factory=dict)
    set: dict[str, Any] = field(default_factory=dict)
    source: str = ""


@dataclass
class GridTrial:
    """One trial: its unique name, its MAPL configuration (nested dict), and its labels."""

    name: str
    config: dict[str, Any]
    meta: dict[str, Any]


def _fail(source: str, what: str) -> GridError:
    return GridError(f"grid file {source}: {what}")


def _list(value: Any, source: str, key: str) -> list:
    if not isinstance(value, list):
        raise _fail(source, f"{key} must be a list, got {type(value).__name__}")
    return value


def load_grid(path: str | Path) -> GridSpec:
    """Read and check a grid file.

    Raises:
        GridError: the file is missing or not a YAML mapping, a key is unknown, a row names an unknown
            detector, condition or category, or its ``set`` names a configuration field that does not exist
            or holds a value of the wrong type (each message names the file and the key).
    """
    p = Path(path)
    src = str(p)
    try:
        data = read_yaml_mapping(p, "grid file", f"keys {sorted(_TOP)}")
    except ConfigError as e:
        raise GridError(str(e)) from e
    unknown = sorted(set(data) - _TOP)
    if unknown:
        raise _fail(src, f"unknown key(s) {unknown}; expected some of {sorted(_TOP)}")
    for key in ("seeds", "categories", "rows"):
        if not data.get(key):
            raise _fail(src, f"{key} is required and must not be empty")
    seeds = _list(data["seeds"], src, "seeds")
    if not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
        raise _fail(src, f"seeds must be integers, got {seeds}")
    categories = [str(c) for c in _list(data["categories"], src, "categories")]
    bad = [c for c in categories if c.count("/") != 1]
    if bad:
        raise _fail(src, f"categories must be DATASET/CATEGORY folders, got {bad}")
    image_level = [str(c) for c in _list(data.get("image_level_only") or [], src, "image_level_only")]
    bad = [c for c in image_level if c not in categories]
    if bad:
        raise _fail(src, f"image_level_only: {bad} are not in the grid's categories {categories}")
    steps = data.get("steps", Config().train.steps)
    if not isinstance(steps, int) or steps < 1:
        raise _fail(src, f"steps must be an integer >= 1, got {steps!r}")
    given = data.get("corruption") or {}
    if not isinstance(given, dict):
        raise _fail(src, f"corruption must be a mapping of its parameters, got {type(given).__name__}")
    known = [f.name for f in dataclasses.fields(Corruption)]
    unknown = sorted(set(given) - set(known), key=str)
    if unknown:
        raise _fail(src, f"corruption: unknown key(s) {unknown}; expected some of {known}")
    try:
        corruption = Corruption(**given)
    except (TypeError, ValueError) as e:
        raise _fail(src, f"corruption: {e}") from e
    if not isinstance(data["rows"], dict):
        raise _fail(src, "rows must be a mapping of row name to its settings")
    common = data.get("set") or {}
    if not isinstance(common, dict):
        raise _fail(src, f"set must be a mapping of section.field to value, got {type(common).__name__}")
    try:
        Config().override(common, text=False).validate()
    except ConfigError as e:
        raise _fail(src, f"set: {e}") from e
    rows = [_row(name, body or {}, categories, src) for name, body in data["rows"].items()]
    return GridSpec(
        seeds=seeds,
        steps=steps,
        categories=categories,
        rows=rows,
        image_level_only=image_level,
        corruption=corruption,
        peer=_peer(data.get("peer") or {}, src),
        set=dict(common),
        source=src,
    )


def _peer(body: Any, src: str) -> dict[str, Any]:
    """The ``peer`` mapping, its keys and value types checked against :func:`mapl_ray.peer.run_patchcore`'s
    keyword arguments (a typo failed every peer trial only once the grid ran)."""
    import inspect

    from ..peer import run_patchcore

    if not isinstance(body, dict):
        raise _fail(src, f"peer must be a mapping of run_patchcore's keyword arguments, got {type(body).__name__}")
    params = {k: v for k, v in inspect.signature(run_patchcore).parameters.items() if k != "config"}
    unknown = sorted(set(body) - set(params), key=str)
    if unknown:
        raise _fail(src, f"peer: unknown key(s) {unknown}; expected some of {sorted(params)}")
    for key, value in body.items():
        default = params[key].default
        kinds = (int, float) if isinstance(default, float) else (type(default),) if default is not None else (str,)
        if isinstance(value, bool) or not isinstance(value, kinds) or (isinstance(value, (int, float)) and value <= 0):
            expected = "a string" if default is None else "a number > 0"
            raise _fail(src, f"peer.{key}: expected {expected} (default {default!r}), got {value!r}")
    return dict(body)


def _row(name: str, body: dict, categories: list[str], src: str) -> Row:
    where = f"rows.{name}"
    if not isinstance(body, dict):
        raise _fail(src, f"{where} must be a mapping, got {type(body).__name__}")
    unknown = sorted(set(body) - _ROW)
    if unknown:
        raise _fail(src, f"{where}: unknown key(s) {unknown}; expected some of {sorted(_ROW)}")
    row_categories = [str(c) for c in _list(body.get("categories") or list(categories), src, f"{where}.categories")]
    conds = body.get("conditions") or ["clean"]
    if isinstance(conds, list):
        conds = {str(c): row_categories for c in conds}
    elif isinstance(conds, dict):
        conds = {
            str(c): row_categories if cats == "all" else [str(x) for x in _list(cats, src, f"{where}.conditions.{c}")]
            for c, cats in conds.items()
        }
    else:
        raise _fail(src, f"{where}.conditions must be a list or a mapping, got {type(conds).__name__}")
    row = Row(
        name=str(name),
        detector=str(body.get("detector", "mapl")),
        label=str(body.get("label", name)),
        set=dict(body.get("set") or {}),
        categories=row_categories,
        conditions=conds,
        preset=body.get("preset", True),
    )
    if not isinstance(row.preset, bool):  # bool("false") is True: a quoted or misspelt value must not pass
        raise _fail(src, f"{where}.preset must be true or false, got {row.preset!r}")
    if row.detector not in DETECTORS:
        raise _fail(src, f"{where}.detector is {row.detector!r}; expected one of {list(DETECTORS)}")
    bad = [c for c in row.conditions if c not in CONDITIONS]
    if bad:
        raise _fail(src, f"{where}.conditions {bad} unknown; expected some of {list(CONDITIONS)}")
    bad = sorted({c for cats in row.conditions.values() for c in cats if c not in categories})
    if bad:
        raise _fail(src, f"{where}: categories {bad} are not in the grid's categories {categories}")
    try:
        Config().override(row.set, text=False).validate()
    except ConfigError as e:
        raise _fail(src, f"{where}.set: {e}") from e
    return row


def trial_config(
    spec: GridSpec,
    row: Row,
    category: str,
    seed: int,
    data_root: str | Path,
    textures: str | None,
    weights: str | None = None,
    loader_workers: int = 0,
    steps: int | None = None,
) -> dict[str, Any]:
    """The configuration (nested dict) of one trial: the category's data under ``data_root`` (the BHAD copy's
    root for a corrupted trial), its preset unless the row says ``preset: false``, the textures, weights, steps
    and loader processes, the grid's ``set``, the row's ``set``, and ``seed`` as data and training seed."""
    dataset, name = category.split("/")
    over = {
        "data.root": str(Path(data_root) / dataset),
        "data.category": name,
        "data.require_masks": category not in spec.image_level_only,
        "simulation.texture_dir": textures,
        "train.steps": steps or spec.steps,
        "train.loader_workers": loader_workers,
        **(category_preset(name) if row.preset else {}),
        **({"model.weights": str(Path(weights).resolve())} if weights else {}),
        **spec.set,
        **row.set,
        "data.seed": seed,
        "train.seed": seed,
    }
    return Config().override(over).validate().to_dict()


def expand(
    spec: GridSpec,
    data_root: str | Path,
    textures: str | None,
    weights: str | None = None,
    bhad_root: str | Path | None = None,
    loader_workers: int = 0,
    steps: int | None = None,
    categories: list[str] | None = None,
) -> list[GridTrial]:
    """Every trial of the grid, in the file's row order, then condition, category and seed.

    Args:
        data_root: folder holding the DATASET/CATEGORY folders.
        bhad_root: folder of the corrupted copies (same layout); needed when a row has the ``bhad`` condition.
        steps: overrides the file's ``steps`` (short CPU runs).
        categories: only these of the grid's categories (None: all).

    Raises:
        GridError: a ``bhad`` trial without ``bhad_root``, or ``categories`` naming one the grid lacks.
    """
    wanted = categories or spec.categories
    bad = [c for c in wanted if c not in spec.categories]
    if bad:
        raise GridError(f"categories {bad} are not in grid file {spec.source} ({spec.categories})")
    trials = []
    for row in spec.rows:
        for condition, row_categories in row.conditions.items():
            for category in [c for c in row_categories if c in wanted]:
                if condition == "bhad" and bhad_root is None:
                    raise GridError(f"rows.{row.name} needs the corrupted data (bhad_root) for {category}")
                root = bhad_root if condition == "bhad" else data_root
                for seed in spec.seeds:
                    cfg = trial_config(spec, row, category, seed, root, textures, weights, loader_workers, steps)
                    meta = {
                        "row": row.name,
                        "detector": row.detector,
                        "category": category,
                        "condition": condition,
                        "seed": seed,
                    }
                    trials.append(GridTrial(f"{category.replace('/', '-')}-{row.name}-{condition}-{seed}", cfg, meta))
    return trials
