"""Plots and a Markdown / JSON report for one evaluation run.

Figures are drawn on ``matplotlib.figure.Figure`` objects with the Agg canvas,
never through ``pyplot``: no global backend is switched and nothing leaks
between calls or threads (Ray workers, pytest).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from sklearn.metrics import roc_curve

from .metrics import _image_inputs, _to_numpy, image_auroc

__all__ = [
    "decision_text",
    "heatmap_range",
    "map_threshold",
    "save_heatmap_overlay",
    "save_roc_plot",
    "save_score_histogram",
    "write_report",
]

#: ``info`` keys left out of report.md's run table (training internals and data details; metrics.json
#: keeps them; the table shows the training time, the number of training normals and the validation data).
DETAIL_KEYS = ("training", "data")

_METRIC_COLUMNS = [
    ("image_auroc", "Image AUROC"),
    ("pixel_auroc", "Pixel AUROC"),
    ("aupro", "AUPRO"),
    ("f1_max", "F1-max"),
]


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)  # attaches the Agg canvas to the figure
    fig.savefig(path, format="png", dpi=100)
    return path


def save_roc_plot(labels: np.ndarray, scores: np.ndarray, path: str | Path, title: str = "ROC") -> Path:
    """Save the image-level ROC curve as a PNG, AUROC in the legend.

    Args:
        labels: (N,) {0, 1}, 1 = anomalous. Both classes must be present.
        scores: (N,) float image scores.
        path: output PNG file (parent folders are created).
        title: figure title.

    Returns:
        ``Path`` of the written file.

    Raises:
        ValueError: as :func:`mapl_ray.eval.metrics.image_auroc`.

    Source: ``sklearn.metrics.roc_curve``; matplotlib Agg.
    """
    y, s = _image_inputs(labels, scores)
    fpr, tpr, _ = roc_curve(y, s)
    auc = image_auroc(y, s)
    fig = Figure(figsize=(4.5, 4.5))
    ax = fig.add_subplot(1, 1, 1)
    ax.plot(fpr, tpr, lw=2, label=f"AUROC = {100 * auc:.1f}%")
    ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=1, label="chance")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.set_xlabel("False positive rate")
    ax.set_ylabel("True positive rate")
    ax.set_title(title)
    ax.legend(loc="lower right")
    fig.tight_layout()
    return _save(fig, path)


def save_heatmap_overlay(
    image: np.ndarray,
    anomaly_map: np.ndarray,
    path: str | Path,
    mask: np.ndarray | None = None,
    title: str = "",
    vmin: float | None = None,
    vmax: float | None = None,
    threshold: float | None = None,
) -> Path:
    """Save image | image + jet heatmap (alpha 0.5) side by side, with the GT contour.

    Args:
        image: (H, W, 3) uint8 RGB (an (H, W) grey image is also accepted).
        anomaly_map: (H, W) float, same H and W as the image (resize before
            calling; this function does not resample).
        path: output PNG file (parent folders are created).
        mask: optional (H, W) {0, 1} (or {0, 255}, for display only) ground
            truth; its contour is drawn in lime on both panels.
        title: figure title (e.g. "crack/000  score=3.21").
        vmin, vmax: colour range of the heatmap; default: the map's min / max
            (:func:`heatmap_range` gives a range that keeps the threshold in view).
        threshold: decision threshold in map units, marked on the colour bar
            (omitted when None or outside the colour range).

    Returns:
        ``Path`` of the written file.

    Raises:
        ValueError: wrong image / map / mask shapes, non-uint8 image, or
            non-finite map values.

    Source: matplotlib ``imshow`` (jet colormap) and ``contour``.
    """
    img = _to_numpy(image, "image")
    amap = _to_numpy(anomaly_map, "anomaly_map").astype(np.float64)
    if img.dtype != np.uint8:
        raise ValueError(f"image: expected dtype uint8, got {img.dtype}")
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=2)
    if img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"image: expected shape (H, W, 3), got {img.shape}")
    if amap.shape != img.shape[:2]:
        raise ValueError(f"anomaly_map: expected shape {img.shape[:2]} (image H, W), got {amap.shape}")
    if not np.isfinite(amap).all():
        raise ValueError("anomaly_map: expected finite values, found NaN or inf")
    m = None
    if mask is not None:
        m = _to_numpy(mask, "mask")
        if m.shape != img.shape[:2]:
            raise ValueError(f"mask: expected shape {img.shape[:2]}, got {m.shape}")
        m = (m > 0).astype(np.float64)

    fig = Figure(figsize=(8, 4.3))
    ax_img, ax_ov = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    ax_img.imshow(img)
    ax_img.set_title("image")
    ax_ov.imshow(img)
    hm = ax_ov.imshow(amap, cmap="jet", alpha=0.5, vmin=vmin, vmax=vmax)
    ax_ov.set_title("anomaly map")
    bar = fig.colorbar(hm, ax=ax_ov, fraction=0.046, pad=0.04)
    lo, hi = hm.get_clim()
    if threshold is not None and lo <= threshold <= hi:
        bar.ax.axhline(threshold, color="white", lw=2)
        bar.ax.axhline(threshold, color="black", lw=1, ls="--")
        bar.ax.text(
            -0.15, threshold, "thr", transform=bar.ax.get_yaxis_transform(), ha="right", va="center", fontsize=7
        )
    if m is not None and m.any() and not m.all():  # contour needs both levels present
        # full outline on the image; a thin dashed one over the heat so it does not cover a detection
        ax_img.contour(m, levels=[0.5], colors="lime", linewidths=1.2)
        ax_ov.contour(m, levels=[0.5], colors="lime", linewidths=0.7, linestyles="dashed")
    for ax in (ax_img, ax_ov):
        ax.set_axis_off()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, path)


def heatmap_range(anomaly_map: np.ndarray, threshold: float | None = None) -> tuple[float, float]:
    """Colour range of one image's heatmap: from the map's minimum to the larger of its maximum and
    the decision threshold.

    Each image gets its own scale, so a moderate detection is not washed out by a strong one elsewhere
    in the report (what one shared scale did), while a map that stays below the threshold is not
    stretched to look hot: the top of its scale is the threshold.

    Args:
        anomaly_map: (H, W) float.
        threshold: decision threshold in map units (see :func:`map_threshold`), or None: the map's own range.

    Returns:
        ``(vmin, vmax)`` with ``vmax > vmin``.
    """
    amap = _to_numpy(anomaly_map, "anomaly_map")
    lo = float(amap.min())
    hi = float(amap.max()) if threshold is None else max(float(amap.max()), float(threshold))
    return lo, hi if hi > lo else lo + 1e-6


def map_threshold(threshold: float | None, q_weight: float) -> float | None:
    """The decision threshold in anomaly-map units, or None when it has none: the image score is the
    mean of the map's top-k pixels only while ``eval.q_weight`` is 0 (else it adds the image head's q)."""
    return None if threshold is None or q_weight else float(threshold)


def decision_text(score: float, threshold: float | None) -> str:
    """``"score 0.41 >= threshold 0.3: defect"`` / ``"... < ...: good"`` (the run's decision), or the
    score alone when the run has no threshold."""
    if threshold is None:
        return f"score {score:.4g} (no decision threshold)"
    flagged = score >= threshold
    return f"score {score:.4g} {'>=' if flagged else '<'} threshold {threshold:.4g}: {'defect' if flagged else 'good'}"


def save_score_histogram(
    labels: np.ndarray,
    scores: np.ndarray,
    path: str | Path,
    threshold: float | None = None,
    title: str = "Image scores",
) -> Path:
    """Save a histogram of normal vs anomalous image scores, with the threshold line.

    Args:
        labels: (N,) {0, 1}; one class alone is allowed (only that histogram is drawn).
        scores: (N,) float image scores.
        path: output PNG file (parent folders are created).
        threshold: decision threshold in score units, drawn as a vertical line
            (omitted when None).
        title: figure title.

    Returns:
        ``Path`` of the written file.

    Raises:
        ValueError: shape mismatch, non-binary labels, non-finite scores.

    Source: matplotlib ``hist``.
    """
    y, s = _image_inputs(labels, scores, need_both_classes=False)
    bins = np.histogram_bin_edges(s, bins=min(40, max(5, s.size // 3)))
    fig = Figure(figsize=(6, 4))
    ax = fig.add_subplot(1, 1, 1)
    if (~y).any():
        ax.hist(s[~y], bins=bins, alpha=0.6, color="tab:green", label=f"good (n={int((~y).sum())})")
    if y.any():
        ax.hist(s[y], bins=bins, alpha=0.6, color="tab:red", label=f"anomalous (n={int(y.sum())})")
    if threshold is not None:
        ax.axvline(float(threshold), color="k", ls="--", label=f"threshold = {float(threshold):.4g}")
    ax.set_xlabel("anomaly score")
    ax.set_ylabel("images")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    return _save(fig, path)


# --------------------------------------------------------------------------- #
# report
# --------------------------------------------------------------------------- #
def _jsonable(x: Any) -> Any:
    """Convert numpy / Path / tuple values to plain JSON types; NaN/inf -> None."""
    if isinstance(x, Mapping):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple, set)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return _jsonable(x.tolist())
    if isinstance(x, np.generic):
        return _jsonable(x.item())
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, (str, int, bool)) or x is None:
        return x
    if isinstance(x, Path):
        return str(x)
    return str(x)


def _pct(v: Any) -> str:
    return "–" if v is None else f"{100 * float(v):.1f}"


def _md_cell(v: Any) -> str:
    if isinstance(v, float):
        text = f"{v:.4g}"
    elif isinstance(v, (list, tuple)):
        text = ", ".join(str(e) for e in v)
    else:
        text = str(v)
    return text.replace("|", "\\|").replace("\n", " ")


def _safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "x"


def write_report(
    run_dir: str | Path,
    metrics: dict,
    info: dict,
    *,
    labels: np.ndarray | None = None,
    scores: np.ndarray | None = None,
    threshold: float | None = None,
    sample: Sequence[dict] | None = None,
    map_threshold: float | None = None,
) -> Path:
    """Write ``metrics.json``, plots, heatmaps and ``report.md`` into a run folder.

    Files written (folders created as needed):

    * ``run_dir/metrics.json``: ``metrics`` plus ``info`` under the key
      ``"run"``; strict JSON (numpy values converted, NaN/inf -> null).
    * ``run_dir/plots/roc.png`` (when ``labels`` and ``scores`` are given and
      both classes are present) and ``run_dir/plots/score_histogram.png``
      (when ``labels`` and ``scores`` are given), the latter with ``threshold``.
    * ``run_dir/heatmaps/<defect>_<stem>.png`` for each ``sample`` entry.
    * ``run_dir/report.md``: metrics table (overall and per defect type; image
      AUROC, pixel AUROC, AUPRO, F1-max in percent with 1 decimal, "–" when
      not computed), the decisions at the threshold (``metrics["decisions"]``
      from :func:`~mapl_ray.eval.metrics.decision_counts`: accuracy, false
      positives and negatives per type), the notes of ``metrics``, the ``info``
      key/values as a table (a nested dict in one cell) except :data:`DETAIL_KEYS`
      (kept in ``metrics.json`` only), and links to every
      ``scores.csv`` (when present), ``plots/*.png`` and ``heatmaps/*.png`` present in ``run_dir`` (also those
      written earlier by other code).

    Args:
        run_dir: output folder.
        metrics: dict from :func:`mapl_ray.eval.metrics.compute_metrics`
            (``overall`` / ``per_defect`` / ``notes``).
        info: free-form run description, e.g. category, config highlights,
            split counts, training time, validation data used, skipped images.
        labels: (N,) {0, 1} image labels of the test set, for the plots.
        scores: (N,) float image scores, for the plots.
        threshold: decision threshold (score units) drawn on the histogram and
            listed in the report.
        sample: images to render, each a dict with ``image`` ((H, W, 3) uint8),
            ``map`` ((H, W) float), optional ``mask`` ((H, W) or None),
            ``path`` (source file; its stem names the output), optional
            ``defect_type`` (default: the name of the source file's parent
            folder, the MVTec layout ``test/<type>/000.png``), ``score`` and
            ``label`` (shown in the title with the decision at ``threshold``).
            Each heatmap has its own colour range (:func:`heatmap_range`).
        map_threshold: ``threshold`` in anomaly-map units (:func:`map_threshold`):
            the least top of each heatmap's colour range, marked on its colour bar.

    Returns:
        ``Path`` of ``report.md``.

    Raises:
        ValueError: ``metrics`` is not a dict with ``overall``; ``labels`` /
            ``scores`` given alone or inconsistent; a sample entry lacking
            ``image``, ``map`` or ``path`` or with bad shapes.

    Source: project-specific report layout; plots via matplotlib Agg.
    """
    run_dir = Path(run_dir)
    if not isinstance(metrics, Mapping) or "overall" not in metrics:
        raise ValueError("metrics: expected the dict returned by compute_metrics (with 'overall')")
    if not isinstance(info, Mapping):
        raise ValueError(f"info: expected a dict, got {type(info).__name__}")
    if (labels is None) != (scores is None):
        raise ValueError("labels and scores: expected both or neither")
    run_dir.mkdir(parents=True, exist_ok=True)
    plots_dir, heat_dir = run_dir / "plots", run_dir / "heatmaps"

    payload = _jsonable(dict(metrics))
    payload["run"] = _jsonable(dict(info))
    if threshold is not None:
        payload["run"].setdefault("threshold", float(threshold))
    (run_dir / "metrics.json").write_text(json.dumps(payload, indent=2, allow_nan=False) + "\n")

    if labels is not None:
        y, s = _image_inputs(labels, scores, need_both_classes=False)
        if y.any() and not y.all():
            save_roc_plot(y, s, plots_dir / "roc.png", title=f"ROC {info.get('category', '')}".strip())
        save_score_histogram(y, s, plots_dir / "score_histogram.png", threshold=threshold)

    if sample:
        _write_heatmaps(heat_dir, sample, threshold, map_threshold)

    md = _render_markdown(payload, threshold)
    if (run_dir / "scores.csv").is_file():
        md += "\nPer-image scores, labels and decisions: [scores.csv](scores.csv).\n"
    md += _links_section("Plots", run_dir, plots_dir)
    md += _links_section("Heatmaps", run_dir, heat_dir, embed=True)
    path = run_dir / "report.md"
    path.write_text(md)
    return path


def _write_heatmaps(heat_dir: Path, sample: Sequence[dict], threshold: float | None, map_thr: float | None) -> None:
    """``heat_dir/<defect>_<stem>.png`` for each sample entry (see :func:`write_report`)."""
    used: set[str] = set()
    for i, entry in enumerate(sample):
        for key in ("image", "map", "path"):
            if key not in entry or entry[key] is None:
                raise ValueError(f"sample[{i}]: missing required key {key!r}")
        amap = _to_numpy(entry["map"], f"sample[{i}].map")
        src = Path(str(entry["path"]))
        defect = entry.get("defect_type") or src.parent.name or "image"
        name = _safe_name(f"{defect}_{src.stem}")
        if name in used:  # same stem in two folders: keep both
            name = f"{name}_{i}"
        used.add(name)
        parts = [f"{defect}/{src.stem}"]
        if entry.get("label") is not None:  # ground truth, then the run's decision at its threshold
            parts.append("truth: " + ("defect" if int(entry["label"]) else "good"))
        if entry.get("score") is not None:
            parts.append(decision_text(float(entry["score"]), threshold))
        vmin, vmax = heatmap_range(amap, map_thr)
        save_heatmap_overlay(
            entry["image"],
            amap,
            heat_dir / f"{name}.png",
            mask=entry.get("mask"),
            title="  ".join(parts),
            vmin=vmin,
            vmax=vmax,
            threshold=map_thr,
        )


def _render_markdown(payload: dict, threshold: float | None) -> str:
    info = payload.get("run", {})
    title = "MAPL evaluation report"
    if info.get("category"):
        title += f" — {info['category']}"
    lines = [f"# {title}", "", "## Metrics (%)", ""]
    header = ["subset", "good", "anomalous"] + [c[1] for c in _METRIC_COLUMNS]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "---|" * len(header))

    def row(name: str, m: Mapping) -> str:
        cells = [name, str(m.get("n_good", "")), str(m.get("n_anomalous", ""))]
        cells += [_pct(m.get(key)) for key, _ in _METRIC_COLUMNS]
        return "| " + " | ".join(_md_cell(c) for c in cells) + " |"

    lines.append(row("**overall**", payload["overall"]))
    for dtype, m in sorted(payload.get("per_defect", {}).items()):
        lines.append(row(dtype, m))
    f1t = payload["overall"].get("f1_threshold")
    lines.append("")
    lines.append(
        "Per-defect rows: all good images plus that defect type. "
        "F1-max uses the best threshold on the test set itself (oracle)"
        + (f": {f1t:.4g}." if isinstance(f1t, (int, float)) else ".")
    )
    if threshold is not None:
        lines.append(f"Decision threshold (chosen without test labels): {float(threshold):.4g}.")
    source = next((info[k] for k in ("threshold", "validation") if isinstance(info.get(k), str)), None)
    lines += _decisions_section(payload.get("decisions"), source)
    notes = payload.get("notes") or []
    if notes:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in notes]
    shown = _run_rows(info)
    if shown:
        lines += ["", "## Run", "", "| key | value |", "|---|---|"]
        lines += [f"| {_md_cell(k)} | {_md_cell(v)} |" for k, v in shown]
    if any(k in info for k in DETAIL_KEYS):
        lines += ["", "Training timings and losses and the images used: `metrics.json` (`run.training`, `run.data`),"]
        lines += ["`train_summary.json`, `train_log.jsonl` and `data_info.json`."]
    lines.append("")
    return "\n".join(lines)


def _run_rows(info: Mapping) -> list[tuple[str, Any]]:
    """The ``## Run`` table of report.md: ``info`` less :data:`DETAIL_KEYS` and the threshold's value (shown
    above; its source stays), a nested dict in one cell (its non-zero entries), plus the training time,
    the training normals and the validation data (``run.data.validation``: the report says which)."""
    rows: list[tuple[str, Any]] = []
    for k, v in info.items():
        if k in DETAIL_KEYS or (k == "threshold" and not isinstance(v, str)):  # the number is shown above
            continue
        if isinstance(v, Mapping):
            v = ", ".join(f"{kk} {_md_cell(vv)}" for kk, vv in v.items() if vv not in (0, None, "", [], {}))
        rows.append((k, v))
    training, data = info.get("training") or {}, info.get("data") or {}
    if isinstance(training.get("train_wall_s"), (int, float)):
        text = f"{training['train_wall_s']:.0f} s ({training.get('steps_run', '?')} steps)"
        total, steps = training.get("train_wall_s_total"), training.get("steps_run_total")
        if isinstance(total, (int, float)) and steps not in (None, training.get("steps_run")):
            # a resumed run: the whole run first (an interrupted segment counts up to its last log line)
            text = f"{total:.0f} s over {steps} steps, of which the last segment {text}"
        rows.append(("training time", text))
    if "train_normals" in data:
        rows.append(("training normals", data["train_normals"]))
    if isinstance(data.get("validation"), str):
        rows.append(("validation data", data["validation"]))
    return rows


def _decisions_section(decisions: Mapping | None, source: str | None) -> list[str]:
    """Markdown lines for :func:`~mapl_ray.eval.metrics.decision_counts`' result ([] without one);
    ``source`` says how the threshold was chosen."""
    if not decisions:
        return []
    n, fp, fn = decisions["images"], decisions["false_positives"], decisions["false_negatives"]
    lines = ["", "## Decisions at the threshold", ""]
    lines.append(
        f"An image is flagged as a defect when its score is >= {decisions['threshold']:.4g}"
        + (f" ({source})" if source else "")
        + f". Accuracy {_pct(decisions['accuracy'])}% ({decisions['correct']} of {n}): "
        f"{fp} false positive(s) (good images flagged), {fn} false negative(s) (defects missed)."
    )
    lines += ["", "| subset | images | flagged as defect | errors |", "|---|---|---|---|"]
    for t, c in decisions["by_type"].items():
        errors = f"{c['flagged']} false positive(s)" if t == "good" else f"{c['images'] - c['flagged']} missed"
        lines.append(f"| {_md_cell(t)} | {c['images']} | {c['flagged']} | {errors} |")
    lines += ["", "Each image's decision is in scores.csv (column `anomalous`)."]
    return lines


def _links_section(heading: str, run_dir: Path, folder: Path, embed: bool = False) -> str:
    files = sorted(folder.glob("*.png")) if folder.is_dir() else []
    if not files:
        return ""
    out = ["", f"## {heading}", ""]
    for f in files:
        rel = f.relative_to(run_dir).as_posix()
        out.append(f"![{f.stem}]({rel})" if embed else f"- [{f.name}]({rel})")
    if not embed:
        out.append("")
        out += [f"![{f.stem}]({f.relative_to(run_dir).as_posix()})" for f in files]
    out.append("")
    return "\n".join(out)
