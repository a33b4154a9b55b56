"""The accuracy benchmark's report: per category, condition and row, mean and spread over seeds; figures.

:func:`summarise` groups the trial records of ``bench/results/accuracy.json``; :func:`write_results` writes
``docs/RESULTS.md`` with those tables, the wall times, the failed trials and what was not run, and the figures
under ``docs/img/accuracy/`` (:func:`save_category_bars`; :func:`save_heatmap_strip` joins a run's heatmaps;
:func:`save_corruption_sample` shows the BHAD-style corruption). Figures use matplotlib's Agg canvas on
``Figure`` objects, never ``pyplot`` (as :mod:`mapl_ray.eval.report`).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

__all__ = [
    "METRICS",
    "machine",
    "save_category_bars",
    "save_corruption_sample",
    "save_heatmap_strip",
    "stats",
    "summarise",
    "write_results",
]

#: figures summarised per cell: (record key, table title, decimals shown)
METRICS = (
    ("image_auroc", "image AUROC", 3),
    ("pixel_auroc", "pixel AUROC", 3),
    ("aupro", "AUPRO", 3),
    ("wall_s", "trial wall time (s)", 0),
)


def stats(values: Sequence[Any]) -> dict[str, float | int] | None:
    """Mean, sample standard deviation (ddof 1; 0 for one value), min, max and count of the values that are
    not None; None when none is."""
    v = np.array([x for x in values if x is not None], dtype=float)
    if not len(v):
        return None
    return {
        "mean": float(v.mean()),
        "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0,
        "min": float(v.min()),
        "max": float(v.max()),
        "n": int(len(v)),
    }


def machine() -> dict[str, Any]:
    """The machine a result was measured on: host, CPU count, Python, torch and the GPU's name."""
    import platform

    info: dict[str, Any] = {"host": platform.node(), "cpus": os.cpu_count(), "python": platform.python_version()}
    try:
        import torch

        info["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
        info["torch"] = torch.__version__
    except ImportError:
        pass
    return info


def summarise(records: Sequence[dict[str, Any]]) -> dict[str, dict[str, dict[str, dict[str, Any]]]]:
    """``{category: {condition: {row: {metric: stats, "runs": n, "failed": n}}}}`` over the records
    (each with ``category``, ``condition``, ``row`` and the :data:`METRICS` keys; records with ``error``
    count as failed and enter no mean)."""
    out: dict = {}
    for r in records:
        cell = out.setdefault(r["category"], {}).setdefault(r["condition"], {}).setdefault(r["row"], [])
        cell.append(r)
    for conds in out.values():
        for rows in conds.values():
            for row, rs in rows.items():
                ok = [r for r in rs if "error" not in r]
                rows[row] = {k: stats([r.get(k) for r in ok]) for k, _, _ in METRICS} | {
                    "runs": len(ok),
                    "failed": len(rs) - len(ok),
                }
    return out


def _cell(s: dict | None, digits: int = 3) -> str:
    if not s:
        return "–"
    if s["n"] == 1:
        return f"{s['mean']:.{digits}f} (1 seed)"
    return f"{s['mean']:.{digits}f} ± {s['std']:.{digits}f}"


def _save(fig: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(path, format="png", dpi=100)
    return path


def save_category_bars(
    category: str, cells: dict[str, dict[str, dict]], labels: dict[str, str], path: str | Path
) -> Path:
    """Bar chart of one category: image AUROC mean per row (error bar: standard deviation over seeds), one
    group per condition. ``cells`` is :func:`summarise`'s ``{condition: {row: ...}}`` of the category."""
    fig = Figure(figsize=(7.5, 3.6))
    ax = fig.add_subplot(1, 1, 1)
    conds = list(cells)
    rows = [r for r in labels if any(r in cells[c] for c in conds)]
    width = 0.8 / max(1, len(rows))
    colours = {r: f"C{i}" for i, r in enumerate(rows)}
    lo = 1.0
    for j, cond in enumerate(conds):
        for i, row in enumerate(rows):
            s = (cells[cond].get(row) or {}).get("image_auroc")
            if not s:
                continue
            lo = min(lo, s["mean"] - s["std"])
            ax.bar(
                j + (i - (len(rows) - 1) / 2) * width,
                s["mean"],
                width,
                yerr=s["std"],
                color=colours[row],
                label=labels[row] if j == 0 or row not in cells[conds[0]] else None,
                capsize=3,
            )
    ax.set_xticks(range(len(conds)), conds)
    ax.set_ylim(max(0.0, math.floor((lo - 0.05) * 20) / 20), 1.0)
    ax.set_ylabel("image AUROC (mean ± std over seeds)")
    ax.set_title(category)
    handles, names = ax.get_legend_handles_labels()
    seen = dict(zip(names, handles))
    ax.legend(seen.values(), seen.keys(), fontsize=7, loc="lower left")
    fig.tight_layout()
    return _save(fig, Path(path))


def save_heatmap_strip(heatmaps: Sequence[str | Path], path: str | Path, height: int = 260) -> Path | None:
    """Join a run's heatmap overlays (``heatmaps/*.png`` of :func:`mapl_ray.eval.report.write_report`) side by
    side, each scaled to ``height`` pixels; None without any."""
    from PIL import Image

    images = []
    for h in heatmaps:
        with Image.open(h) as im:
            im = im.convert("RGB")
            images.append(im.resize((max(1, round(im.width * height / im.height)), height)))
    if not images:
        return None
    strip = Image.new("RGB", (sum(i.width for i in images), height), "white")
    x = 0
    for im in images:
        strip.paste(im, (x, 0))
        x += im.width
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    strip.save(path, optimize=True)
    return path


def save_corruption_sample(pairs: Sequence[tuple[str, np.ndarray, np.ndarray]], path: str | Path) -> Path:
    """Figure of ``(title, clean image, corrupted image)`` pairs (uint8 ``(H, W, 3)``), clean above corrupted."""
    fig = Figure(figsize=(2.6 * len(pairs), 5.4))
    for i, (title, clean, bad) in enumerate(pairs):
        for k, (img, what) in enumerate(((clean, "clean"), (bad, "BHAD-style"))):
            ax = fig.add_subplot(2, len(pairs), k * len(pairs) + i + 1)
            ax.imshow(img)
            ax.set_title(f"{title}: {what}", fontsize=7)
            ax.axis("off")
    fig.tight_layout()
    return _save(fig, Path(path))


def _table(
    summary: dict, categories: list[str], rows: dict[str, str], condition: str, metric: str, digits: int = 3
) -> list[str]:
    cats = [c for c in categories if condition in summary.get(c, {})]
    lines = ["| row | " + " | ".join(cats) + " |", "|---|" + "---|" * len(cats)]
    for row, label in rows.items():
        cells = [(summary[c][condition].get(row) or {}).get(metric) for c in cats]
        if any(cells):
            lines.append(f"| {label} | " + " | ".join(_cell(s, digits) for s in cells) + " |")
    return lines


def write_results(
    result: dict[str, Any], md_path: str | Path, img_dir: str | Path, not_run: Sequence[str] = ()
) -> Path:
    """Write the Markdown report of an accuracy result (``bench/results/accuracy.json``'s content) and the
    per-category bar charts into ``img_dir``; heatmap strips and the corruption sample already in ``img_dir``
    are linked. Returns ``md_path``.

    ``result`` keys: ``runs`` (trial records), ``categories``, ``rows`` (``{row: label}``), ``seeds``,
    ``steps``, ``corruption``, ``command``, ``machine``, ``wall_s``; ``not_run``: lines naming what the grid
    leaves out and why.
    """
    md_path, img_dir = Path(md_path), Path(img_dir)
    runs = result.get("runs", [])
    summary = summarise(runs)
    rows: dict[str, str] = result.get("rows") or {r["row"]: r["row"] for r in runs}
    categories = [c for c in result.get("categories") or sorted(summary) if c in summary]
    rel = Path(os.path.relpath(img_dir.resolve(), md_path.parent.resolve()))  # links relative to the report
    conditions = [c for c in ("clean", "bhad") if any(c in summary[k] for k in categories)]
    out = [
        "# Detection quality against a peer, same run",
        "",
        f"Generated by `mapl benchmark` (`bench/accuracy.py`) from `bench/results/{result.get('json', 'accuracy.json')}`;"
        " do not edit by hand.",
        "",
        f"- command: `{result.get('command', '')}`",
        f"- machine: {result.get('machine', {})}",
        f"- seeds {result.get('seeds')} (data.seed = train.seed; none of them chose any setting), "
        f"{result.get('steps')} training steps per MAPL trial; figures are mean ± sample standard deviation "
        "over the seeds, on each category's test split (minus labeled anomalies where a row takes some)",
        f"- grid wall time {result.get('wall_s', 0):.0f} s; {sum('error' not in r for r in runs)} trials finished, "
        f"{sum('error' in r for r in runs)} failed or cancelled",
        "",
    ]
    for cond in conditions:
        title = "clean data" if cond == "clean" else "BHAD-style corruption on train and test images"
        for metric, name, digits in METRICS:
            lines = _table(summary, categories, rows, cond, metric, digits)
            if len(lines) > 2:
                out += [f"## {name}, {title}", "", *lines, ""]
    corr = result.get("corruption")
    if corr and "bhad" in conditions:
        out += [
            "## The BHAD-style corruption",
            "",
            f"`mapl_ray/data/corruption.py`, parameters {corr}: per image, contrast scaled about the image mean "
            f"by c ~ U[{corr.get('contrast_min')}, {corr.get('contrast_max')}], then Gaussian noise of standard "
            f"deviation {corr.get('noise_std')} grey levels added, rounded and clipped; seeded per file "
            "(seed, crc32 of the file's path in the category); train and test images alike, at the 256 x 256 the "
            "detectors read (masks resized alike, not changed).",
            "",
        ]
        if (img_dir / "bhad_sample.png").is_file():
            out += [f"![BHAD-style corruption sample]({(rel / 'bhad_sample.png').as_posix()})", ""]
    out += ["## Figures", ""]
    for cat in categories:
        name = cat.replace("/", "_")
        save_category_bars(cat, summary[cat], rows, img_dir / f"bars_{name}.png")
        out.append(f"![{cat}]({(rel / f'bars_{name}.png').as_posix()})")
        if (img_dir / f"heatmaps_{name}.png").is_file():
            out.append(f"![{cat} heatmaps, MAPL]({(rel / f'heatmaps_{name}.png').as_posix()})")
        out.append("")
    failed = [r for r in runs if "error" in r]
    if failed:
        out += ["## Failed or cancelled trials", ""]
        out += [f"- {r.get('name')}: {r['error']}" for r in failed]
        out.append("")
    if not_run:
        out += ["## Not run", "", *[f"- {line}" for line in not_run], ""]
    md_path.parent.mkdir(parents=True, exist_ok=True)
    md_path.write_text("\n".join(out))
    return md_path
