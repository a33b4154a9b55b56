"""Ray Data wiring: ``mapl prepare`` (images -> Parquet shards), anomaly simulation as a ``map_batches``
stage, ``mapl score`` (batch inference with an actor pool) and streamed training batches.

Only Ray wiring lives here: decoding, the shard schema, simulation draws and scoring are the method
layer's (:mod:`mapl_ray.data.shards`, :mod:`mapl_ray.data.streams`, :mod:`mapl_ray.inference`). Every
stage streams: the driver never holds the images, and nothing is ``ray.put`` whole.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..config import Config, ConfigError
from ..data.io import DecodeLimits, load_image, load_mask
from ..data.layout import ImageReadError, LayoutError
from ..data.pose import Aligner
from ..data.shards import (
    DUPLICATES_FILE,
    MANIFEST_FILE,
    REJECTED_FILE,
    ShardSpec,
    decode_batch,
    images_from_arrow,
    images_from_column,
    open_shard_set,
    parquet_files,
    parquet_source_record,
    read_rows,
    rejected_line,
    shard_paths,
    source_kind,
    source_records,
    source_rejected,
    write_shard,
)
from ..data.simulation import build_simulator
from ..data.split import Split
from ..data.streams import ROLE_ANOMALY, ROLE_UNLABELED, StreamPlan, assemble_steps, augment_samples, simulate_samples
from ..data.train_data import TrainData
from ..data.validation import ValidationSet
from .ray_env import init_ray

log = logging.getLogger("mapl_ray.data")

#: Rows per shard file written by ``mapl prepare`` (about 50 MB at 256 x 256).
ROWS_PER_SHARD = 256
#: Columns of a source Parquet that ``mapl prepare`` reads (those present).
PARQUET_SOURCE_COLUMNS = ("image", "path", "split", "defect_type", "label")
#: Columns ``mapl prepare`` adds to a source Parquet's rows while it reads them: the file, and the row's index in it
#: (from 0), which a rejected row's entry names (:func:`_read_row_group`).
SOURCE_FILE, SOURCE_ROW = "source_file", "source_row"


def quiet_data_context() -> None:
    """Ray Data without its own progress bars and start-up messages on the console (the commands draw one
    bar of images); its log file in the Ray session folder keeps everything."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)  # "progress bars disabled"
    for handler in logging.getLogger("ray.data").handlers:
        if isinstance(handler, logging.StreamHandler):  # the console, not the session log file
            handler.setLevel(logging.WARNING)


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(total: int | None, desc: str, show: bool):
    """The progress of ``total`` images (:class:`~mapl_ray.engine.progress.CountProgress`: a bar on a terminal,
    plain log lines in a redirected log), or nothing."""
    if not show:
        return _NoBar()
    from ..engine.progress import CountProgress

    return CountProgress(total, desc)


# -- mapl prepare ---------------------------------------------------------------------------------
def _decode_and_write(batch: pa.Table, out: str, spec: ShardSpec, align: Aligner | None, parquet: bool):
    """``map_batches`` stage of ``mapl prepare``: decode one batch of source rows, write it as one shard,
    return one status row per image (path, hash, shard, reason; no pixels). Images that ``mapl score`` and
    ``mapl serve`` would refuse (:meth:`DecodeLimits.for_model`: decompression bombs, slivers, a side under
    the minimum) are rejected here, on their header, before any pixel is decoded. ``parquet``: the rows are a
    source Parquet's (:func:`_read_row_group`); a rejected row's reason ends with its file and row index, and a
    row with no name at all (no path, no image path) is listed as ``row I of FILE``."""
    rows_in = batch.to_pylist()
    limits = DecodeLimits.for_model(min(spec.image_size))
    if not parquet:  # file sources: the record names the file to read
        rows, rejected = decode_batch(rows_in, spec.image_size, align, limits=limits)
    else:  # a source Parquet holds the encoded bytes (or a file path, Hugging Face's layout)
        rows, rejected = [], []
        for r in rows_in:
            where = f"row {r.pop(SOURCE_ROW)} of {r.pop(SOURCE_FILE)}"
            try:
                record, data = parquet_source_record(r, where)
            except ImageReadError as e:  # one bad row never stops the job: it is listed with its reason
                bad = [{"path": e.path, "reason": e.reason}]
            else:
                good, bad = decode_batch([record], spec.image_size, align, [data], limits)
                rows += good
            rejected += [b if b["path"] == where else {**b, "reason": f"{b['reason']} ({where})"} for b in bad]
    shard = write_shard(rows, out, spec).name if rows else None
    return pa.table(
        {
            "path": [r["path"] for r in rows] + [r["path"] for r in rejected],
            "hash": [r["hash"] for r in rows] + [None] * len(rejected),
            "shard": [shard] * len(rows) + [None] * len(rejected),
            "reason": [None] * len(rows) + [r["reason"] for r in rejected],
        },
        schema=pa.schema(
            [("path", pa.string()), ("hash", pa.string()), ("shard", pa.string()), ("reason", pa.string())]
        ),
    )


def _read_row_group(items: pa.Table, fields: list[tuple[str, pa.DataType]], rows: int) -> Iterator[pa.Table]:
    """``map_batches`` stage of ``mapl prepare`` on a source Parquet: the columns ``fields`` (name, type) of each
    item's row group (``file``, ``row_group``, ``first_row``: the index in the file of the group's first row),
    ``rows`` at a time (a large group is never read whole), a column the file lacks as nulls, with
    :data:`SOURCE_FILE` and :data:`SOURCE_ROW` added. Ray Data's Parquet reader keeps neither the file nor the
    row's index, which a bad row's entry must name, and takes its columns from the first file only."""
    for item in items.to_pylist():
        pf, row = pq.ParquetFile(item["file"]), item["first_row"]
        have = [name for name, _ in fields if name in pf.schema_arrow.names]
        for batch in pf.iter_batches(batch_size=rows, row_groups=[item["row_group"]], columns=have):
            n = batch.num_rows
            cols = {name: batch.column(name).cast(typ) if name in have else pa.nulls(n, typ) for name, typ in fields}
            cols[SOURCE_FILE] = pa.array([item["file"]] * n, pa.string())
            cols[SOURCE_ROW] = pa.array(range(row, row + n), pa.int64())
            yield pa.table(cols)
            row += n


def _type_kind(t: pa.DataType) -> str:
    """What a column's values are, so that int32 and int64, or string and large_string, read alike."""
    if pa.types.is_integer(t):
        return "integer"
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return "text"
    if pa.types.is_binary(t) or pa.types.is_large_binary(t):
        return "bytes"
    return str(t)


def _parquet_source_fields(files: list[str], src: str) -> list[tuple[str, pa.DataType]]:
    """The :data:`PARQUET_SOURCE_COLUMNS` that any of a source Parquet's ``files`` holds, with their type (the
    first file's that has it; every file must hold ``image``).

    Raises:
        LayoutError: a file holds mapl shards, lacks ``image``, or gives a column a type another file's cannot
            become (naming both files).
    """
    fields: dict[str, tuple[pa.DataType, str]] = {}
    for f in files:
        schema = pq.read_schema(f)
        if (schema.metadata or {}).get(b"mapl_ray.shards"):
            raise LayoutError(f"{src!r} already holds mapl shards: `mapl score` and training read them as they are")
        if "image" not in schema.names:
            raise LayoutError(f"{f} has no 'image' column (expected encoded image bytes); columns: {schema.names}")
        for name in PARQUET_SOURCE_COLUMNS:
            if name not in schema.names:
                continue
            typ = schema.field(name).type
            first, where = fields.setdefault(name, (typ, f))
            if _type_kind(typ) != _type_kind(first):
                raise LayoutError(f"column {name!r} is {typ} in {f} but {first} in {where}: expected one type")
    return [(name, fields[name][0]) for name in PARQUET_SOURCE_COLUMNS if name in fields]


def _source_dataset(src: str, kind: str, rows: int = ROWS_PER_SHARD):
    """(Ray dataset of source rows, number of images, whether they are a source Parquet's rows). A source
    Parquet is read one row group a task, ``rows`` rows at a time, each file's columns its own
    (:func:`_read_row_group`)."""
    import ray.data

    if kind == "parquet":
        files = parquet_files(src)
        fields = _parquet_source_fields(files, src)
        groups, total = [], 0
        for f in files:
            meta, first = pq.ParquetFile(f).metadata, 0
            for g in range(meta.num_row_groups):
                groups.append({"file": f, "row_group": g, "first_row": first})
                first += meta.row_group(g).num_rows
            total += meta.num_rows
        ds = ray.data.from_items(groups, override_num_blocks=max(1, len(groups)))
        read = {"fields": fields, "rows": rows}
        return ds.map_batches(_read_row_group, batch_size=1, batch_format="pyarrow", fn_kwargs=read), total, True
    records = source_records(src, kind)
    unmasked = [r["path"] for r in records if r["label"] == 1 and not r["mask_path"]]
    if unmasked:  # kept (image-level data is allowed), but mapl train refuses them unless --no-masks
        log.warning(
            "%d defect images have no mask under ground_truth/ (kept with mask null; mapl train needs --no-masks "
            "to use them), e.g. %s",
            len(unmasked),
            unmasked[0],
        )
    return ray.data.from_items(records), len(records), False


def prepare_shards(
    src: str | os.PathLike[str],
    out: str | os.PathLike[str],
    image_size: int | tuple[int, int] = 256,
    align: Aligner | None = None,
    rows_per_shard: int = ROWS_PER_SHARD,
    concurrency: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """``mapl prepare``: decode and resize every image of ``src`` in parallel (Ray Data tasks) and write
    Parquet shards (:mod:`mapl_ray.data.shards`) with ``_rejected.jsonl``, ``_duplicates.jsonl`` and
    ``_manifest.json`` into ``out``.

    Args:
        src: an MVTec-layout category folder, a folder of images (recursive), a list file, or Parquet
            with encoded images (:func:`~mapl_ray.data.shards.source_kind`).
        out: new or empty folder.
        image_size: stored size, the run's ``data.image_size``.
        align: the run's pose estimator (``data.align``), or None.
        rows_per_shard: images per shard file.
        concurrency: decode tasks at once (default: Ray Data's choice, up to the cluster's CPUs).
        progress: draw a progress bar of images on stderr.

    Returns:
        The manifest: source, kind, spec, ``images`` written, ``rejected`` (unreadable or refused images, and
        the files of a folder without an image extension, the repeated lines of a list file),
        ``no_image_extension`` and ``listed_again`` (those alone),
        ``duplicates``, ``shards``.

    Raises:
        LayoutError: ``src`` missing or empty, ``out`` already holds shards, a source Parquet without images.
        RunFolderError: ``out`` cannot be created (:func:`~mapl_ray.runfolder.make_output_dir`).
    """
    import ray.data

    src, out_dir = os.fspath(src), Path(out)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.glob("*.parquet"))):
        raise LayoutError(
            f"--out {out_dir} already holds shards or is a file: choose a new folder (nothing was written)"
        )
    spec = ShardSpec.of(image_size, align)
    kind = source_kind(src)
    created = not out_dir.exists()
    from ..runfolder import make_output_dir

    make_output_dir(out_dir, "--out")  # before Ray starts: an --out that cannot be written is said at once
    try:
        init_ray()
        quiet_data_context()
        ds, total, parquet = _source_dataset(src, kind, rows_per_shard)
        not_images = source_rejected(src, kind)
    except BaseException:
        if created and not any(out_dir.iterdir()):  # nothing written: leave no empty folder behind
            out_dir.rmdir()
        raise
    status = ds.map_batches(
        _decode_and_write,
        batch_size=rows_per_shard,
        batch_format="pyarrow",
        fn_kwargs={"out": str(out_dir.resolve()), "spec": spec, "align": align, "parquet": parquet},
        compute=ray.data.TaskPoolStrategy(size=concurrency),  # `concurrency=` is deprecated since Ray 2.51
    )
    counts = _collect_status(status, out_dir, total, progress, not_images)
    manifest = {
        "source": os.path.abspath(src),
        "kind": kind,
        "image_size": list(spec.image_size),
        "align": spec.align_text(),
    }
    manifest.update(counts)
    (out_dir / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2))
    return manifest


def _collect_status(
    status, out_dir: Path, total: int, progress: bool, not_images: list[dict[str, str]]
) -> dict[str, Any]:
    """Stream the status rows: count images, write ``_rejected.jsonl`` and ``_duplicates.jsonl`` as they come.
    ``not_images`` (:func:`~mapl_ray.data.shards.source_rejected`: ``{"path", "reason", "kind"}`` of files never decoded)
    open ``_rejected.jsonl`` and count as rejected.

    Keeps one hash (and first path) per image to find duplicates: O(images) strings, no pixels."""
    first_by_hash: dict[str, str] = {}
    shards: set[str] = set()
    n_ok = n_dup = 0
    n_bad = len(not_images)
    bar = _progress(total, "prepare", progress)
    with (out_dir / REJECTED_FILE).open("w") as rej, (out_dir / DUPLICATES_FILE).open("w") as dup:
        rej.writelines(rejected_line(r["path"], r["reason"]) + "\n" for r in not_images)
        for batch in status.iter_batches(batch_size=None, batch_format="pyarrow"):
            for row in batch.to_pylist():
                if row["reason"] is not None:
                    n_bad += 1
                    rej.write(rejected_line(row["path"], row["reason"]) + "\n")
                    continue
                n_ok += 1
                shards.add(row["shard"])
                first = first_by_hash.setdefault(row["hash"], row["path"])
                if first != row["path"]:
                    n_dup += 1
                    dup.write(json.dumps({"path": row["path"], "same_as": first, "hash": row["hash"]}) + "\n")
            bar.update(batch.num_rows)
    bar.close()
    return {
        "images": n_ok,
        "rejected": n_bad,
        "no_image_extension": sum(r["kind"] == "no_image_extension" for r in not_images),
        "listed_again": sum(r["kind"] == "listed_again" for r in not_images),
        "duplicates": n_dup,
        "shards": len(shards),
    }


# -- anomaly simulation as a stage ----------------------------------------------------------------
class SimulateBatch:
    """``map_batches`` callable (one per actor): simulated anomalies on a batch, each sample seeded by its key.

    Input columns: ``image`` uint8 ``(B, H, W, 3)``, ``sample_key`` int ``(B,)`` or ``(B, K)``; optional
    ``simulate`` bool ``(B,)`` (rows to simulate, default all) and ``mask`` uint8 ``(B, H, W)`` (kept
    where not simulated). Output: the same columns with ``image`` and ``mask`` replaced
    (:func:`mapl_ray.data.streams.simulate_samples`). The simulator (and its texture cache) is built
    once per actor.
    """

    def __init__(self, cfg: Config, seed: int):
        self.simulator, self.seed = build_simulator(cfg), int(seed)

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        images, masks = simulate_samples(
            self.simulator, batch["image"], batch["sample_key"], self.seed, batch.get("simulate"), batch.get("mask")
        )
        return {**batch, "image": images, "mask": masks}


def simulate(ds, cfg: Config, seed: int, concurrency: int | None = None, batch_size: int = 16):
    """``ds`` with anomalies simulated by a pool of ``concurrency`` CPU actors (:class:`SimulateBatch`;
    default: one per CPU of the cluster but one, which the tasks that read ``ds`` need: actors holding
    every CPU would starve them). The result of each sample depends only on ``(seed, its sample_key)``,
    never on the number of actors or the batch size."""
    import ray.data

    n = concurrency or max(1, int(ray.cluster_resources().get("CPU", 1)) - 1)
    return ds.map_batches(
        SimulateBatch,
        fn_constructor_kwargs={"cfg": cfg, "seed": seed},
        batch_size=batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=n),
        num_cpus=1,
    )


# -- mapl score -----------------------------------------------------------------------------------
# ``--out``'s files other than the scores start with "_": Parquet readers (pyarrow, pandas, Ray Data) skip
# them, so ``pandas.read_parquet(OUT)`` reads the scores alone
SCORE_RUN_FILE = "_score.json"
#: the claim file's name before that (an output folder written then is still continued)
_LEGACY_SCORE_RUN_FILE = "score.json"
SCORE_SUMMARY_FILE = "_summary.json"
SCORE_MAPS_DIR = "_maps"
#: Folder of ``--out`` where the scoring actors leave their timings while a job runs (removed after).
ACTOR_TIMINGS_DIR = ".actor_timings"
#: Images per output file when scoring a folder (a rerun skips the files already written).
ROWS_PER_SCORE_FILE = 1024


@dataclass
class _Unit:
    """One output file of ``mapl score``: a shard of the source, or a run of files of a folder."""

    name: str
    rows: int
    shard: str | None = None
    records: list[dict[str, Any]] | None = None

    def paths(self) -> list[str]:
        if self.shard is not None:
            return shard_paths(self.shard)
        return [r["path"] for r in self.records]


def _score_units(src: str, spec: ShardSpec, rows_per_file: int) -> tuple[list[_Unit], str]:
    """The output files a source maps to: one per shard, or one per ``rows_per_file`` files of a folder
    (named by their position and paths, so a changed folder is not mistaken for a scored one)."""
    kind = source_kind(src)
    if kind == "parquet":
        files, _ = open_shard_set(src, expect=spec)
        return [_Unit(Path(f).name, pq.ParquetFile(f).metadata.num_rows, shard=f) for f in files], kind
    records = [{"path": r["path"], "label": r["label"]} for r in source_records(src, kind)]
    units = []
    for i in range(0, len(records), rows_per_file):
        chunk = records[i : i + rows_per_file]
        digest = hashlib.sha1("\n".join(r["path"] for r in chunk).encode()).hexdigest()[:8]
        units.append(_Unit(f"part-{i // rows_per_file:05d}-{digest}.parquet", len(chunk), records=chunk))
    return units, kind


def _decode_in_order(batch: pa.Table, spec: ShardSpec, align: Aligner | None) -> pa.Table:
    """``map_batches`` stage of ``mapl score`` on a folder: shard rows in the batch's order, an unreadable
    image kept as a row with its ``error`` (so output files keep one row per source image). Images are
    decoded under ``mapl predict``'s and ``mapl serve``'s limits (:meth:`DecodeLimits.for_model`): what they
    refuse gets no score here either."""
    limits = DecodeLimits.for_model(min(spec.image_size))
    out = []
    for rec in batch.to_pylist():
        rows, rejected = decode_batch([rec], spec.image_size, align, limits=limits)
        row = rows[0] if rows else {"path": rec["path"], "label": rec["label"], "image": None, "pose": None}
        out.append(
            {k: row[k] for k in ("path", "label", "image", "pose")}
            | {"error": rejected[0]["reason"] if rejected else None}
        )
    schema = pa.schema(
        [
            ("path", pa.string()),
            ("label", pa.int8()),
            ("image", pa.binary()),
            ("pose", pa.string()),
            ("error", pa.string()),
        ]
    )
    return pa.Table.from_pylist(out, schema=schema)


class ScoreBatch:
    """``map_batches`` callable of ``mapl score``: loads the run's :class:`~mapl_ray.inference.Predictor`
    once per actor (on the actor's GPU when it has one), warms it up at the batch size (the CUDA graph is
    captured while the first blocks are still being read), and scores batches
    (:func:`mapl_ray.scoring.score_table`).

    With ``timings_dir``, each actor keeps ``<timings_dir>/actor-<pid>.json`` up to date: wall-clock times
    (``time.time()``) of its start, torch imported, model loaded, warmed up, first batch in and out, and the
    batches it scored (count, rows, sizes, seconds busy), which :func:`score_source` reads back.
    """

    def __init__(
        self, run: str, device: str, batch_size: int, maps_dir: str | None, threads: int, timings_dir: str | None = None
    ):
        t = {"start": time.time()}
        import torch

        t["torch_imported"] = time.time()
        from ..inference import Predictor

        torch.set_num_threads(max(1, threads))
        self.pred = Predictor(run, device=device, batch_size=batch_size, fixed_batch=True)
        t["model_loaded"] = time.time()
        self.pred.warm_up()
        t["warmed_up"] = time.time()
        self.maps_dir = maps_dir
        self.timings = {**t, "batches": 0, "rows": 0, "busy_s": 0.0, "sizes": {}}
        self.timings_file = Path(timings_dir) / f"actor-{os.getpid()}.json" if timings_dir else None
        self._save_timings()

    def _save_timings(self) -> None:
        """Best effort: an actor whose node cannot write there (no shared storage) stops keeping them."""
        if self.timings_file is None:
            return
        try:
            tmp = self.timings_file.with_suffix(".tmp")
            tmp.write_text(json.dumps(self.timings))
            os.replace(tmp, self.timings_file)
        except OSError:
            self.timings_file = None

    def __call__(self, batch: pa.Table) -> pa.Table:
        from ..scoring import score_table

        t_in = time.time()
        out = score_table(self.pred, batch, self.maps_dir)
        t = self.timings
        t_out = time.time()
        t.setdefault("first_in", t_in)
        t.setdefault("first_out", t_out)
        t.setdefault("first_rows", batch.num_rows)
        t["last_out"] = t_out
        t["batches"], t["rows"] = t["batches"] + 1, t["rows"] + batch.num_rows
        t["busy_s"] += t_out - t_in
        t["sizes"][str(batch.num_rows)] = t["sizes"].get(str(batch.num_rows), 0) + 1
        self._save_timings()
        return out


def _check_output(out: Path, run: Path, src: str, names: list[str], version: str | None = None) -> dict[str, str]:
    """Refuse an ``out`` that is a file, is a folder of other files (a run folder...), holds another run's scores,
    holds scores of an earlier model of this run (``version``: the run's
    :func:`~mapl_ray.serving.model_info.model_version` now; a resumed or retrained run has a new one, and its files
    already there would keep the old scores and threshold), or holds score files that ``names`` (this
    source's output files) does not include: a changed folder or another ``--rows-per-file`` splits the
    images into other files, so a rerun would score them again beside the old files and ``out`` would hold
    every such image twice. Creates nothing (a job that fails before scoring leaves no folder behind);
    returns the claim :func:`_claim_output` records."""
    want = {"run": str(run.resolve()), "source": os.path.abspath(src)}
    path = out / SCORE_RUN_FILE
    if not path.is_file() and (out / _LEGACY_SCORE_RUN_FILE).is_file():
        path = out / _LEGACY_SCORE_RUN_FILE
    if out.exists() and not out.is_dir():
        raise LayoutError(f"--out {out} is a file: give a folder for the score files")
    where = out.resolve()
    for folder, what in ((run.resolve(), "the run folder"), (Path(src).resolve(), "the source folder")):
        # score files in a run clutter it; in a shards source, the next read would take them for shards
        if (folder == where or folder in where.parents) and Path(folder).is_dir():
            raise LayoutError(
                f"--out {out} is inside {what} {folder}: give the score files a folder of their own "
                "(nothing was written)"
            )
    if out.is_dir() and not path.is_file():
        from ..runfolder import CONFIG_FILE, checkpoint_dir

        # not a score folder: score files among a run's (or anything's) files would be mixed up with them
        other = sorted(f.name for f in out.iterdir() if not f.name.startswith("."))
        if other:
            run_like = (out / CONFIG_FILE).is_file() and checkpoint_dir(out).is_dir()
            what = "a run folder" if run_like else "not empty"
            raise LayoutError(
                f"--out {out} is {what} ({other[0]}, ...) and holds no mapl score output: give the score files a new "
                "or empty folder (nothing was written)"
            )
    if path.is_file():
        had = json.loads(path.read_text())
        if {k: had.get(k) for k in want} != want:
            raise LayoutError(
                f"--out {out} holds scores of run {had.get('run')} on {had.get('source')}: choose another folder "
                "(a rerun with the same run and source continues it)"
            )
        if version and had.get("model_version") not in (None, version):
            raise LayoutError(
                f"--out {out} holds scores of an earlier model of run {run} ({had['model_version']}; its checkpoint "
                f"is {version} now: trained or resumed since): give the new scores another folder, or delete {out} "
                "to score every image again (nothing was written)"
            )
        expected = set(names)
        stale = sorted(f.name for f in out.glob("*.parquet") if f.name not in expected)
        if stale:
            raise LayoutError(
                f"--out {out} holds {len(stale)} score file(s) this source would not write ({stale[0]}, ...): the "
                "folder's images or --rows-per-file changed since they were written; rerun with the same "
                "--rows-per-file, or choose another folder (a new one scores every image once)"
            )
    return {**want, "model_version": version} if version else want


def _claim_output(out: Path, claim: dict[str, str]) -> None:
    """Record which run, source and model version ``out`` holds scores of (``claim`` from :func:`_check_output`).

    Raises:
        RunFolderError: ``out`` cannot be created (:func:`~mapl_ray.runfolder.make_output_dir`).
    """
    from ..runfolder import make_output_dir

    make_output_dir(out, "--out")
    (out / SCORE_RUN_FILE).write_text(json.dumps(claim, indent=2))


#: ``mapl score`` actors sharing one GPU by default: 4 scored 3,025 images/s on the H200 against 1,982 with 2 and
#: 1,695 with 1 (bench/results/ray_data.json, gpu.score.by_actors_per_gpu).
SCORE_ACTORS_PER_GPU = 4


def _score_device(device: str | None) -> bool | None:
    """What ``mapl score --device`` asks of the actors: True (a CUDA device), False (``cpu``), None (``auto``:
    a GPU where the cluster has one). The driver checks only the name: the actors' machines, not this
    one, must have the GPU.

    Raises:
        ConfigError: not a device name torch knows, or a device type other than cpu and cuda.
    """
    from ..tensors import parse_device

    dev = parse_device(device)
    if dev is None:
        return None
    if dev.type not in ("cpu", "cuda"):
        raise ConfigError(f"--device {device}: mapl score runs on cpu or cuda devices")
    return dev.type == "cuda"


def _actor_resources(
    actors: int | None, gpus_per_actor: float | None, want_gpu: bool | None = None, device: str | None = "auto"
) -> tuple[int, float, int]:
    """(actors, GPUs per actor, CPUs per actor): :data:`SCORE_ACTORS_PER_GPU` actors per GPU where the
    cluster has GPUs (each actor's CPU work, Arrow to array and the score rows, overlaps another's forward
    pass); on CPUs one actor with all CPUs but one (left to the tasks that read and decode). ``want_gpu``
    (:func:`_score_device`): False keeps the actors off the GPUs; True needs one in the cluster.

    Raises:
        ConfigError: ``want_gpu`` where the Ray cluster has no GPU.
    """
    import ray

    res = ray.cluster_resources()
    cpus, gpus = int(res.get("CPU", 1)), float(res.get("GPU", 0))
    if want_gpu and not gpus:
        raise ConfigError(
            f"--device {device}: the Ray cluster has no GPU (use --device cpu or auto; on a cluster, "
            "check that its GPU workers have joined: ray status)"
        )
    if want_gpu is False:
        gpus_per_actor = 0.0
    if gpus_per_actor is None:
        gpus_per_actor = 1.0 / SCORE_ACTORS_PER_GPU if gpus >= 1 else 0.0
    if actors is None:
        actors = max(1, int(gpus // gpus_per_actor)) if gpus_per_actor else 1
    cpus_per_actor = 1 if gpus_per_actor else max(1, (cpus - 1) // actors)
    return actors, gpus_per_actor, cpus_per_actor


def _score_input(pending: list[_Unit], kind: str, spec: ShardSpec, align: Aligner | None, batch_size: int):
    """The rows ``mapl score`` feeds its actors: the shards read (or the folder's files decoded, unreadable
    ones kept with their ``error``), in blocks of exactly ``batch_size`` rows but the last
    (``repartition(target_num_rows_per_block=..., strict=True)``, a streaming stage). Whole blocks make
    each actor task one batch, whose rows reach the writer as soon as it is scored (a task's outputs
    leave together when it ends) and every batch but the last one shape (no partial batch at each shard's
    end, each a CUDA graph of its own or padding). No ``preserve_order``: :func:`_write_units` routes rows
    by path, so any actor's batch is written as it comes."""
    import ray.data

    # read blocks of about one batch of images: every actor gets work early (Ray Data's 128 MiB default
    # would make a few shards one block)
    ray.data.DataContext.get_current().target_max_block_size = max(
        2**20, batch_size * 3 * spec.image_size[0] * spec.image_size[1]
    )
    if kind == "parquet":
        columns = ["path", "label", "image", "pose", "orig_height", "orig_width"]  # sizes: score_table's limits
        ds = ray.data.read_parquet([u.shard for u in pending]).select_columns(columns)
    else:
        items = [r for u in pending for r in u.records]
        ds = ray.data.from_items(items).map_batches(
            _decode_in_order, batch_format="pyarrow", batch_size=64, fn_kwargs={"spec": spec, "align": align}
        )
    return ds.repartition(target_num_rows_per_block=batch_size, strict=True)


def score_source(
    run: str | os.PathLike[str],
    src: str | os.PathLike[str],
    out: str | os.PathLike[str],
    batch_size: int = 256,
    actors: int | None = None,
    gpus_per_actor: float | None = None,
    maps: bool = False,
    device: str = "auto",
    rows_per_file: int = ROWS_PER_SCORE_FILE,
    progress: bool = True,
) -> dict[str, Any]:
    """``mapl score``: batch inference of a trained run on shards (``mapl prepare``) or on a folder / list
    file (decoded on the way, the same rows), with a Ray Data actor pool.

    Writes ``out/<name>.parquet`` (:data:`mapl_ray.scoring.SCORE_SCHEMA`, one per source shard or per
    ``rows_per_file`` files), optionally ``out/_maps/*.png``, and ``out/_summary.json``. Each output file is
    written whole (temporary name, then renamed) once all its rows are scored; a rerun skips the files
    that exist, so a stopped job continues where it was.

    Args:
        batch_size: images per ``map_batches`` batch and per forward pass.
        actors, gpus_per_actor: the actor pool (default: four actors per GPU; one on a CPU-only cluster).
        maps: also write each anomaly map as an 8-bit PNG.

    Returns:
        summary: ``images`` scored, ``unreadable`` (rows with no score: unreadable, or refused by the decode
        limits), ``files_written``, ``files_skipped``, the output folder;
        ``total_s`` (the whole call), ``wall_s`` / ``first_batch_s`` / ``steady_images_per_s`` (from the start
        of Ray Data's execution, :func:`_write_units`) and ``stages_s``, where the time went: ``setup_s``
        (listing, output claim), ``ray_init_s``, ``plan_s`` (building the dataset), ``paths_s``,
        ``wait_s`` / ``write_s`` (the driver waiting for rows / writing them) and the actors' start-up and
        work (:func:`_actor_stages`).

    Raises:
        CheckpointError: ``run`` is not a trained run folder or its weights are unreadable.
        ConfigError: ``device`` not a device name, or a CUDA device where the Ray cluster has no GPU.
        LayoutError: ``src`` missing, shards decoded at another size or pose normalisation than the run's or
            with a row without a path (naming the file and the row),
            ``out`` a file or holding another run's scores or files this source would not write (another
            ``rows_per_file``, a changed folder).
    """
    import ray.data

    from ..data.pose import build_pose_estimator
    from ..runfolder import check_model_weights, load_run_config
    from ..serving.model_info import model_version

    t_call = time.time()
    run, src, out = Path(run), os.fspath(src), Path(out)
    cfg = load_run_config(run)
    check_model_weights(run)  # here, not in each actor: a bad checkpoint is one line, not actor restarts
    want_gpu = _score_device(device)
    align = build_pose_estimator(cfg)
    spec = ShardSpec.of(cfg.data.image_size, align)
    units, kind = _score_units(src, spec, rows_per_file)
    claim = _check_output(out, run, src, [u.name for u in units], model_version(run))
    pending = [u for u in units if not (out / u.name).is_file()]
    counts: dict[str, Any] = {"images": 0, "unreadable": 0}
    stages: dict[str, Any] = {"setup_s": time.time() - t_call}
    if pending:
        t = time.time()
        init_ray()
        quiet_data_context()
        stages["ray_init_s"] = time.time() - t
        n_actors, gpus, cpus = _actor_resources(actors, gpus_per_actor, want_gpu, device)
    _claim_output(out, claim)
    if pending:
        t = time.time()
        ds = _score_input(pending, kind, spec, align, batch_size)
        stages["plan_s"] = time.time() - t
        maps_dir = out / SCORE_MAPS_DIR if maps else None
        if maps_dir:
            maps_dir.mkdir(exist_ok=True)
        timings_dir = out / ACTOR_TIMINGS_DIR
        shutil.rmtree(timings_dir, ignore_errors=True)
        timings_dir.mkdir()
        scored = ds.map_batches(
            ScoreBatch,
            fn_constructor_kwargs={
                "run": str(run.resolve()),
                "device": device,
                "batch_size": batch_size,
                "maps_dir": str(maps_dir.resolve()) if maps_dir else None,
                "threads": cpus,
                "timings_dir": str(timings_dir.resolve()),
            },
            batch_size=batch_size,
            batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(size=n_actors),
            num_gpus=gpus,
            num_cpus=cpus,
        )
        counts = _write_units(scored, pending, out, progress)
        t_iter, t_end = counts.pop("iter_start"), counts.pop("iter_end")
        stages.update({k: counts.pop(k) for k in ("paths_s", "wait_s", "write_s")})
        stages.update(_actor_stages(timings_dir, t_iter, t_end))
    summary = {"run": str(run), "source": src, "out": str(out), **counts}
    summary.update(files_written=len(pending), files_skipped=len(units) - len(pending))
    summary["total_s"] = time.time() - t_call
    summary["stages_s"] = _rounded(stages)
    (out / SCORE_SUMMARY_FILE).write_text(json.dumps(summary, indent=2))
    return summary


def _rounded(value: Any) -> Any:
    """Floats rounded to 3 decimals, in dicts and lists too."""
    if isinstance(value, float):
        return round(value, 3)
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_rounded(v) for v in value]
    return value


def _actor_stages(folder: Path, t_iter: float, t_end: float) -> dict[str, Any]:
    """Where the scoring actors' time went, from their timing files (:class:`ScoreBatch`; the folder is
    removed). Moments (``*_at_s``) are seconds after the iteration began, as [earliest, latest] over the
    actors; durations are the longest actor's; ``actor_busy_fraction`` = time in ``score_table`` over the
    time from each actor's first batch to the end. Empty when no actor left a file (e.g. on other nodes)."""
    found = []
    for f in folder.glob("actor-*.json"):
        try:
            found.append(json.loads(f.read_text()))
        except (OSError, ValueError):  # an actor was writing it when the job ended
            continue
    shutil.rmtree(folder, ignore_errors=True)
    if not found:
        return {}

    def at(key: str) -> list[float] | None:
        vals = [r[key] - t_iter for r in found if key in r]
        return [min(vals), max(vals)] if vals else None

    def longest(a: str, b: str) -> float:
        return max(r[b] - r[a] for r in found)

    sizes: dict[str, int] = {}
    for r in found:
        for k, v in r["sizes"].items():
            sizes[k] = sizes.get(k, 0) + v
    active = sum(max(t_end - r["first_in"], 1e-9) for r in found if "first_in" in r)
    done = [r for r in found if "last_out" in r]
    after = sum(r["rows"] - r["first_rows"] for r in done)
    span = max((r["last_out"] for r in done), default=0.0) - min((r["first_out"] for r in done), default=0.0)
    return {
        "actors": len(found),
        "actor_start_at_s": at("start"),
        "torch_import_s": longest("start", "torch_imported"),
        "model_load_s": longest("torch_imported", "model_loaded"),
        "warm_up_s": longest("model_loaded", "warmed_up"),
        "actor_ready_at_s": at("warmed_up"),
        "first_batch_in_at_s": at("first_in"),
        "first_batch_out_at_s": at("first_out"),
        "batches_per_actor": sorted(r["batches"] for r in found),
        "batch_sizes": dict(sorted(sizes.items(), key=lambda kv: -kv[1])),
        "actor_busy_fraction": sum(r["busy_s"] for r in found) / active if active else None,
        # rows the actors scored after their first batch, over the time from the first batch out to the last
        "actor_images_per_s": after / span if after > 0 and span > 0 else None,
    }


#: batches after the first that the driver must receive before it reports a steady rate (:func:`_write_units`)
STEADY_MIN_BATCHES = 4


def _write_units(scored, pending: list[_Unit], out: Path, progress: bool) -> dict[str, Any]:
    """Route the stream of score rows to the output files by path, each file written (rows in its source
    order) as soon as all its rows arrived. Routing by path, not by count: with many actors Ray Data
    delivered rows out of order on the H200 although ``preserve_order`` was set.

    Also times it: ``wall_s`` (from the start of the iteration), ``first_batch_s`` (start-up: read, actors,
    model load), ``steady_images_per_s`` (the rows after the first batch over the time after it; None
    below :data:`STEADY_MIN_BATCHES` batches after the first: rows reach the driver in bursts, and two
    batches 0.05 s apart once gave 4,038 images/s for actors that scored 60), ``paths_s`` (reading the
    source files' paths, after the first batch: the pipeline runs on meanwhile), ``wait_s`` (waiting for
    score rows), ``write_s`` (routing and writing), ``iter_start`` / ``iter_end`` (``time.time()`` of the
    iteration's ends).

    Raises:
        RuntimeError: a row's path belongs to no pending file, or a path is in two files (not routable).
        LayoutError: a source shard has a row without a path (:func:`~mapl_ray.data.shards.shard_paths`).
    """
    bar = _progress(sum(u.rows for u in pending), "score", progress)
    unit_paths: list[list[str]] = []
    owner: dict[str, int] = {}
    paths_s = 0.0
    parts: dict[int, list[pa.Table]] = {}
    got = np.zeros(len(pending), np.int64)
    images = unreadable = first_rows = n_batches = 0
    wait_s = 0.0
    iter_start, t0, t_first = time.time(), time.perf_counter(), None
    batches = iter(scored.iter_batches(batch_size=None, batch_format="pyarrow"))
    while True:
        t_wait = time.perf_counter()
        batch = next(batches, None)
        wait_s += time.perf_counter() - t_wait
        if batch is None:
            break
        if t_first is None:
            t_first, first_rows = time.perf_counter(), batch.num_rows
            # the source files' paths, read once the first batch is out: Ray Data runs on meanwhile
            unit_paths = [u.paths() for u in pending]
            for i, paths in enumerate(unit_paths):
                for p in paths:
                    if owner.setdefault(p, i) != i:
                        raise RuntimeError(f"{p} is in two source files ({pending[owner[p]].name}, {pending[i].name})")
            paths_s = time.perf_counter() - t_first
        try:
            idx = np.array([owner[p] for p in batch.column("path").to_pylist()], np.int64)
        except KeyError as e:
            raise RuntimeError(f"score row for {e.args[0]}, a path of no pending source file") from e
        for i in np.unique(idx):
            mine = idx == i
            parts.setdefault(int(i), []).append(batch.filter(pa.array(mine)))
            got[i] += int(mine.sum())
            if got[i] < pending[i].rows:
                continue
            table = pa.concat_tables(parts.pop(int(i))).combine_chunks()
            pos = {p: j for j, p in enumerate(unit_paths[i])}
            rows = table.take(pa.array(np.argsort([pos[p] for p in table.column("path").to_pylist()], kind="stable")))
            tmp = out / f".{pending[i].name}.tmp"
            pq.write_table(rows, tmp)
            os.replace(tmp, out / pending[i].name)
            readable = rows.column("error").null_count
            images, unreadable = images + readable, unreadable + rows.num_rows - readable
        bar.update(batch.num_rows)
        n_batches += 1
    bar.close()
    wall = time.perf_counter() - t0
    first = (t_first or t0) - t0
    after = images + unreadable - first_rows
    timed = n_batches - 1 >= STEADY_MIN_BATCHES and wall > first and after > 0
    steady = after / (wall - first) if timed else None
    return {
        "images": images,
        "unreadable": unreadable,
        "wall_s": wall,
        "first_batch_s": first,
        "steady_images_per_s": steady,
        "paths_s": paths_s,
        "wait_s": wait_s,
        "write_s": wall - wait_s,
        "iter_start": iter_start,
        "iter_end": time.time(),
    }


# -- training input -------------------------------------------------------------------------------
def batches_dataset_name(rank: int) -> str:
    """Name of rank ``rank``'s dataset among the Ray Train datasets (one per rank, not split)."""
    return f"batches_rank{rank}"


@dataclass
class StreamSources:
    """Where the images of each role (:data:`mapl_ray.data.streams.ROLE_NORMAL` ...) are read from.

    ``paths[role]``: the images in the order the plan's ``index`` counts them (labeled normals as in
    ``TrainData.normals``); ``mask_paths``: the labeled anomalies' masks. With ``shards``, ``locations[role]``
    is int64 ``(n, 2)``: (file in ``shards``, row) of each image, and the pixels come from there.
    """

    paths: tuple[list[str], list[str], list[str]]
    mask_paths: list[str | None]
    shards: list[str] | None = None
    locations: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None

    @property
    def sizes(self) -> tuple[int, int, int]:
        return tuple(len(p) for p in self.paths)

    def with_shards(self, folders: list[str | os.PathLike[str]], spec: ShardSpec) -> StreamSources:
        """The same images read from shard sets (``mapl prepare`` outputs decoded with ``spec``).

        Raises:
            LayoutError: a shard set was decoded otherwise, has a row without a path (:func:`shard_paths`), or
                holds none of an image of the split.
        """
        try:
            files = [f for folder in folders for f in open_shard_set(folder, expect=spec)[0]]
            names = [shard_paths(f) for f in files]
        except LayoutError as e:  # the folders come from one setting: name it as the user wrote it
            raise LayoutError(f"--shards (data.shards): {e}") from e
        where: dict[str, tuple[int, int]] = {}
        for fi, paths in enumerate(names):
            for row, p in enumerate(paths):
                where.setdefault(p, (fi, row))
        missing = [p for role in self.paths for p in role if p not in where]
        if missing:
            raise LayoutError(
                f"{len(missing)} training images are in no shard of {[os.fspath(f) for f in folders]}, e.g. "
                f"{missing[0]!r}: prepare the category (and the unlabeled folder) with `mapl prepare`"
            )
        locations = tuple(np.array([where[p] for p in role], np.int64).reshape(-1, 2) for role in self.paths)
        return dataclasses.replace(self, shards=files, locations=locations)


class StreamRows(SimulateBatch):
    """``map_batches`` callable of the training stream: for rows of a :class:`~mapl_ray.data.streams.StreamPlan`,
    fetch each image (a row group of a shard, or the file decoded like ``load_train_data`` does), flip /
    rotate / jitter it, and simulate anomalies on the rows marked ``simulate`` (:class:`SimulateBatch`);
    every sample with its own generator. Adds ``image`` uint8 ``(B, H, W, 3)`` and ``mask`` uint8 ``(B, H, W)``."""

    def __init__(self, cfg: Config, sources: StreamSources, align: Aligner | None):
        super().__init__(cfg, cfg.train.seed)
        self.cfg, self.sources, self.align = cfg, sources, align
        self.hw = (cfg.data.image_size, cfg.data.image_size)
        self._files: dict[str, pq.ParquetFile] = {}
        self._bad_pool: set[int] = set()  # unreadable pool images met so far (data.skip_bad_images)

    def _from_shards(self, role: np.ndarray, index: np.ndarray, images: np.ndarray, masks: np.ndarray) -> None:
        loc = np.stack([self.sources.locations[r][i] for r, i in zip(role, index)])
        for fi in np.unique(loc[:, 0]):
            sel = np.flatnonzero(loc[:, 0] == fi)
            file = self.sources.shards[int(fi)]
            pf = self._files.setdefault(file, pq.ParquetFile(file))
            table = read_rows(file, loc[sel, 1], ["image", "mask"], pf)
            images[sel] = images_from_arrow(table.column("image"), self.hw)
            for j, m in zip(sel, table.column("mask").to_pylist()):
                if m is not None:
                    masks[j] = images_from_column([m], self.hw, channels=0)[0]

    def _from_files(self, role: np.ndarray, index: np.ndarray, images: np.ndarray, masks: np.ndarray) -> None:
        for j, (r, i) in enumerate(zip(role, index)):
            if r == ROLE_UNLABELED and self.cfg.data.skip_bad_images:
                images[j], pose = self._readable_pool_image(int(i))
            else:
                images[j], pose = load_image(self.sources.paths[r][i], self.hw, align=self.align, return_pose=True)
            mask_path = self.sources.mask_paths[i] if r == ROLE_ANOMALY else None
            if mask_path:
                masks[j] = load_mask(mask_path, self.hw, pose=pose)

    def _readable_pool_image(self, i: int):
        """With ``data.skip_bad_images``: pool image ``i`` or, when it does not decode, the first after it
        (cyclically) that does (a folder's pool is only read as it streams; the labeled sets were checked when
        decoded). The same for every worker and batch size. Raises ImageReadError when none does."""
        pool = self.sources.paths[ROLE_UNLABELED]
        for k in range(len(pool)):
            n = (i + k) % len(pool)
            if n in self._bad_pool:
                continue
            try:
                return load_image(pool[n], self.hw, align=self.align, return_pose=True)
            except ImageReadError:
                self._bad_pool.add(n)
                log.warning("skipping unreadable pool image %s (data.skip_bad_images): the next one streams", pool[n])
        raise ImageReadError(pool[i], f"no image of the unlabeled pool ({len(pool)} files) could be read")

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(batch["role"])
        images, masks = np.zeros((n, *self.hw, 3), np.uint8), np.zeros((n, *self.hw), np.uint8)
        fetch = self._from_shards if self.sources.shards else self._from_files
        fetch(batch["role"], batch["index"], images, masks)
        t = self.cfg.train
        images, masks = augment_samples(
            images, masks, batch["kind"], batch["sample_key"], t.seed, t.augment, t.color_jitter
        )
        keep = ("step", "kind", "slot", "label", "simulate", "sample_key")
        return super().__call__({**{k: batch[k] for k in keep}, "image": images, "mask": masks})


def _plan_rows(batch: dict[str, np.ndarray], plan: StreamPlan, start: int) -> dict[str, np.ndarray]:
    """``map_batches`` stage: step numbers (``ray.data.range`` ids from ``start``) -> the plan's rows."""
    return plan.rows(batch["id"] + start)


def training_dataset(
    cfg: Config,
    sources: StreamSources,
    plan: StreamPlan,
    start: int,
    end: int,
    concurrency: int = 1,
    batch_size: int = 8,
):
    """The rows of steps ``start .. end`` of one worker's plan, fetched, augmented and simulated by
    ``concurrency`` CPU actors (:class:`StreamRows`); ordered by step when ``preserve_order`` is set
    (the Ray Train data config of :class:`TrainStream` sets it). Lazy: nothing runs until iterated."""
    import ray.data

    from ..data.pose import build_pose_estimator

    steps = max(0, end - start)
    # step numbers as in-memory blocks of 4 steps: no read tasks, which the actors could starve of CPUs
    ds = ray.data.from_items([{"id": i} for i in range(steps)], override_num_blocks=max(1, -(-steps // 4)))
    ds = ds.map_batches(_plan_rows, batch_format="numpy", batch_size=4, fn_kwargs={"plan": plan, "start": start})
    return ds.map_batches(
        StreamRows,
        fn_constructor_kwargs={"cfg": cfg, "sources": sources, "align": build_pose_estimator(cfg)},
        batch_size=batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=concurrency),
        num_cpus=1,
    )


def worker_batches(plan: StreamPlan, rank: int, prefetch: int = 4) -> Iterator[dict[str, Any]]:
    """In a Ray Train worker: this rank's training batches from its dataset shard
    (``ray.train.get_dataset_shard``), one dict per step (:func:`mapl_ray.data.streams.assemble_steps`)."""
    import ray.train

    shard = ray.train.get_dataset_shard(batches_dataset_name(rank))
    plan = dataclasses.replace(plan, rank=rank)
    return assemble_steps(plan, shard.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=prefetch))


@dataclass
class TrainStream:
    """Training input of a Ray Train job as Ray Data pipelines: one dataset per rank (steps ``start ..
    end``), handed whole to its worker (``DataConfig(datasets_to_split=[])``) in step order.

    Pass it to :func:`mapl_ray.pipelines.ray_train.train_with_ray` (``stream=``); build it with
    :func:`train_stream`."""

    cfg: Config
    sources: StreamSources
    start: int
    end: int
    refit_steps: frozenset[int]
    concurrency: int

    def plan(self, rank: int, world: int) -> StreamPlan:
        return StreamPlan.from_config(self.cfg, self.sources.sizes, rank, world, self.refit_steps)

    def datasets(self, world: int) -> dict[str, Any]:
        return {
            batches_dataset_name(r): training_dataset(
                self.cfg, self.sources, self.plan(r, world), self.start, self.end, self.concurrency
            )
            for r in range(world)
        }

    def data_config(self):
        import warnings

        from ray.train import DataConfig

        with warnings.catch_warnings():  # Ray's own default options set a field Ray deprecates (Ray 2.5x)
            warnings.filterwarnings("ignore", message=".*exclude_resources.*")
            options = DataConfig.default_ingest_options()
        options.preserve_order = True  # assemble_steps cuts the rows into steps by order
        return DataConfig(datasets_to_split=[], execution_options=options)


def load_streamed_train_data(
    cfg: Config, split: Split
) -> tuple[TrainData, ValidationSet, dict[str, Any], StreamSources]:
    """:func:`~mapl_ray.data.train_data.load_train_data` without decoding the unlabeled pool, which streams.

    The labeled sets are decoded here as before (the memory bank, the pseudo-labeler's normals and the
    validation set need them); ``TrainData.unlabeled`` is a :class:`~mapl_ray.data.streams.StreamedPool`.
    A streamed pool feeds L_Yu and the OCC fits (a fresh sample of it at each refit); its images do not
    join the normal stream or the memory bank (the in-memory path of ``mapl train`` does that).

    Returns:
        (data, validation set, data info, the sources of every role in ``data``'s order).

    Raises:
        the errors of ``load_train_data``; LayoutError: no labeled normal image (a streamed run needs
        ``train/good``); RuntimeError: a labeled image skipped for its mask alone (``data.skip_bad_images``)
        leaves the decoded sets and the split out of step.
    """
    from ..data.streams import StreamedPool
    from ..data.train_data import load_train_data

    if not split.labeled_normal:
        raise LayoutError(
            "streamed training needs labeled normal images (train/good of the category); "
            "with unlabeled images alone, train in memory (mapl train --unlabeled ...)"
        )
    data, validation, info = load_train_data(cfg, dataclasses.replace(split, unlabeled=[]))
    dropped = {p for p, _ in info["skipped_images"]} | set(info["validation_normals"]) | set(validation.paths)
    normals = [r.path for r in split.labeled_normal if r.path not in dropped]
    anomalies = [r for r in split.labeled_anomaly if r.path not in dropped]
    if len(normals) != len(data.normals) or len(anomalies) != (0 if data.anomalies is None else len(data.anomalies)):
        raise RuntimeError(f"decoded labeled sets do not match the split; skipped files: {info['skipped_images']}")
    if split.unlabeled:
        data.unlabeled = StreamedPool(len(split.unlabeled))
    info.update(unlabeled=len(split.unlabeled), unlabeled_streamed=True)
    paths = (normals, [r.path for r in split.unlabeled], [r.path for r in anomalies])
    return data, validation, info, StreamSources(paths, [r.mask_path for r in anomalies])


def train_stream(
    cfg: Config,
    sources: StreamSources,
    run_dir: str | os.PathLike[str],
    resume: bool = False,
    shards: list[str | os.PathLike[str]] | None = None,
    concurrency: int = 1,
) -> TrainStream:
    """The :class:`TrainStream` of a run: steps from the checkpoint's (``resume``) to ``train.steps``, pools
    on the pseudo-labeler's refit steps (and on the first step of a resumed run that saved no pseudo-labeler
    past its warm-up, where :meth:`PseudoLabeler.due` refits), images from ``shards`` when given.

    Raises:
        LayoutError: shards decoded at another size or pose normalisation, or missing images of the split.
    """
    from ..data.pose import build_pose_estimator
    from ..pseudo.labeler import is_refit_step
    from ..runfolder import load_pseudo, read_state

    start = int(read_state(run_dir)["step"]) if resume else 0
    p = cfg.pseudo
    refit = {s for s in range(start, cfg.train.steps) if is_refit_step(p, s)}
    if resume and p.enabled and start >= p.warmup_steps and load_pseudo(run_dir) is None:  # PseudoLabeler.due
        refit.add(start)
    if shards:
        sources = sources.with_shards(shards, ShardSpec.of(cfg.data.image_size, build_pose_estimator(cfg)))
    return TrainStream(cfg, sources, start, cfg.train.steps, frozenset(refit), concurrency)


def train_streamed(
    cfg: Config,
    split: Split,
    run_dir: str | os.PathLike[str],
    shards: list[str | os.PathLike[str]] | None = None,
    resume: bool = False,
    progress: bool = True,
    verbose: bool = False,
) -> tuple[dict[str, Any], ValidationSet, dict[str, Any]]:
    """Train with the unlabeled pool (and every batch) streamed through Ray Data into Ray Train workers.

    ``verbose``: Ray's INFO lines and the workers' output on the console (:func:`init_ray`'s ``quiet`` off), as
    :func:`~mapl_ray.pipelines.ray_train.train_with_ray`.

    CPUs: each training worker gets ``train.cpus_per_worker`` (default 1 beside a GPU, else half of the
    CPUs split between the workers); the rest run the data actors (at least one).

    Returns:
        (training summary as :func:`~mapl_ray.pipelines.ray_train.train_with_ray`, validation set, data info).
    """
    import ray

    from ..pseudo.labeler import report_pool
    from .ray_train import train_with_ray

    init_ray(quiet=not verbose)
    quiet_data_context()
    data, validation, info, sources = load_streamed_train_data(cfg, split)
    report_pool(cfg, data)
    total, n = int(ray.cluster_resources().get("CPU", 1)), cfg.train.num_workers
    per_worker = cfg.train.cpus_per_worker or (1 if cfg.train.use_gpu else max(1, total // (2 * n)))
    cfg = cfg.override({"train.cpus_per_worker": per_worker})
    stream = train_stream(cfg, sources, run_dir, resume, shards, concurrency=max(1, total - n * per_worker))
    summary = train_with_ray(
        cfg, data, validation, run_dir, resume=resume, progress=progress, verbose=verbose, stream=stream
    )
    return summary, validation, info
