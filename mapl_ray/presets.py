"""Category presets: per-category defaults as data, each value with the runs that decided it.

A preset fills the fields of a new run that neither the configuration file nor a flag sets (the
user's choices win); ``mapl train --no-category-preset`` skips it, and the run prints which preset it
used. ``judged_on`` says which data chose the values: ``"test"`` marks a choice made by comparing runs
on the test split (optimistic figures; the semi-supervision work re-chooses them on validation data).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["CATEGORY_PRESETS", "CategoryPreset", "category_preset"]


@dataclass(frozen=True)
class CategoryPreset:
    """Defaults for one category.

    Attributes:
        settings: ``{"section.field": value}`` overrides of :class:`~mapl_ray.config.Config`.
        provenance: ``{"section.field": "what decided it"}`` for every key of ``settings`` (results
            files under ``bench/results/`` and the runs in them).
        judged_on: ``"validation"`` or ``"test"``: the split whose scores chose the values.
    """

    settings: dict[str, Any]
    provenance: dict[str, str] = field(default_factory=dict)
    judged_on: str = "validation"

    def __post_init__(self) -> None:
        missing = sorted(set(self.settings) - set(self.provenance))
        if missing:
            raise ValueError(f"CategoryPreset: no provenance for {missing}")
        if self.judged_on not in ("validation", "test"):
            raise ValueError(f"CategoryPreset.judged_on must be 'validation' or 'test', got {self.judged_on!r}")


_CHOSEN = "bench/results/defaults.json (H200, 500 steps, seeds 1-2; ranked by mean validation image AUROC)"

#: Per-category presets by category folder name.
CATEGORY_PRESETS: dict[str, CategoryPreset] = {
    # screws lie at any angle: the images are pose-normalised, so the rotation augmentation, the
    # rotation TTA and the rotated memory copies that stood in for alignment are off
    "screw": CategoryPreset(
        settings={
            "data.align": "principal_axis",
            "train.augment": "none",
            "eval.tta": "none",
            "model.memory_rotations": 1,
            "model.memory_banks": 10,
        },
        provenance={
            key: f"{_CHOSEN}: variant 'preset' (validation 0.979 / 0.992) over 'topk10' (0.979 / 0.989), the "
            "general rotation defaults (0.945 / 0.960) and 'no_rotation' (0.955 / 0.936); first found in "
            "bench/results/design_sweep_screw.json sweep12-18"
            for key in ("data.align", "train.augment", "eval.tta", "model.memory_rotations", "model.memory_banks")
        },
        judged_on="validation",
    ),
    # magnetic tiles: validation preferred no rotations (0.981 / 1.000) to the rotation defaults (0.979 / 0.996)
    "magnetic_tile": CategoryPreset(
        settings={"train.augment": "none", "eval.tta": "none", "model.memory_rotations": 1},
        provenance={
            key: f"{_CHOSEN}: variant 'no_rotation' (validation 0.981 / 1.000) over the general defaults "
            "(0.979 / 0.996) and 'topk10' (0.980 / 0.995)"
            for key in ("train.augment", "eval.tta", "model.memory_rotations")
        },
        judged_on="validation",
    ),
}


def category_preset(category: str, explicit: set[str] = frozenset()) -> dict[str, Any]:
    """The :data:`CATEGORY_PRESETS` settings for ``category`` (``{}`` for one without a preset), less
    the fields in ``explicit`` (set by the user's file or flags, which win)."""
    preset = CATEGORY_PRESETS.get(category)
    return {k: v for k, v in preset.settings.items() if k not in explicit} if preset else {}
