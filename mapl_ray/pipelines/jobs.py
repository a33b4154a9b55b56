"""The shared helper of the cluster batch jobs (``jobs/*.py``, run by ``ray job submit``).

Every job runs a ``mapl`` command with that command's arguments plus:

- ``--config YAML``: the job's configuration. For ``train`` it is the experiment configuration (as
  ``mapl train --config``; flags override it). Commands with a ``--config`` of their own keep it (``prepare``:
  a config or a run folder). Any other job gets one here: a YAML mapping of its options by name
  (``batch_size: 512``, ``maps: true``...), flags override it. A bad file stops the job with exit status 2
  and one line naming it.
- paths that are a plain path or a URI. A plain path is used in place: on a cluster it must be on storage
  every node mounts at the same path (``/mnt/shared`` in ``cluster.yaml``). A URI (``s3://``, ``gs://``,
  ``hdfs://``, ``file://``: anything :meth:`pyarrow.fs.FileSystem.from_uri` opens) goes through pyarrow: an
  input is copied into ``--scratch`` first (of a data set root only the ``--category`` folder), an output is
  written there and copied to the URI when the job ends, also when it failed (a stopped run can then be
  resumed from its copy); an output that exists already is copied down first (``--resume``, a rerun of
  ``score``). For ``train`` the path fields of the ``--config`` file may be URIs too.
- ``--storage PATH|URI`` (``train``): Ray Train's ``RunConfig(storage_path=...)``, where the checkpoints the
  workers report are persisted (default ``RUN/ray_results``; see :mod:`mapl_ray.pipelines.ray_train`).

When it ends, the job prints where its outputs went. A new job (e.g. ``jobs/tune.py``) is a
:class:`JobSpec` (which arguments are inputs and outputs) and three lines calling :func:`run_job`.
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit, urlunsplit

from ..config import PATH_FIELDS, ConfigError, dump_yaml, parse_yaml_mapping, read_yaml_mapping


class JobPathError(ValueError):
    """A job's path or URI cannot be opened (unknown scheme, missing file, no access)."""


@dataclass(frozen=True)
class JobSpec:
    """What a job reads and writes, by argparse destination.

    Args:
        command: the ``mapl`` command it runs (``train``, ``prepare``, ``score``...).
        inputs: arguments naming files or folders the job reads (URIs are copied in).
        outputs: arguments naming folders the job writes (URIs are written locally, then copied up).
        config_paths: the ``--config`` YAML is an experiment configuration whose path fields
            (:data:`mapl_ray.config.PATH_FIELDS`) may be URIs.
        category_arg: the argument naming the category: a URI data root is copied for that category only.
    """

    command: str
    inputs: tuple[str, ...] = ()
    outputs: tuple[str, ...] = ()
    config_paths: bool = False
    category_arg: str | None = None


JOBS: dict[str, JobSpec] = {
    "train": JobSpec(
        "train",
        inputs=("config", "data", "textures", "unlabeled", "weights"),
        outputs=("out",),
        config_paths=True,
        category_arg="category",
    ),
    "prepare": JobSpec("prepare", inputs=("src", "config"), outputs=("out",)),
    "score": JobSpec("score", inputs=("run", "src"), outputs=("out",)),
    "tune": JobSpec(
        "tune",
        inputs=("config", "data", "textures", "unlabeled", "weights", "search_space"),
        outputs=("out",),
        config_paths=True,
        category_arg="category",
    ),
}


def is_uri(path: Any) -> bool:
    return isinstance(path, str) and "://" in path


# pyarrow's GCS client retries a failing call for 15 minutes by default, so an unreachable or unauthorised
# bucket looked like a hung job; a URI's own retry_limit_seconds wins
GCS_RETRY_LIMIT_S = 60


def with_gcs_retry_limit(uri: str, seconds: float = GCS_RETRY_LIMIT_S) -> str:
    """``uri`` with ``retry_limit_seconds=seconds`` in its query when it is a ``gs://`` / ``gcs://`` URI that
    sets none (pyarrow's ``GcsOptions`` URI option); any other URI unchanged."""
    parts = urlsplit(uri)
    if parts.scheme not in ("gs", "gcs") or "retry_limit_seconds" in parse_qs(parts.query):
        return uri
    query = "&".join(q for q in (parts.query, f"retry_limit_seconds={seconds:g}") if q)
    return urlunsplit(parts._replace(query=query))


def filesystem(uri: str):
    """``(pyarrow filesystem, path inside it)`` of a URI (:meth:`pyarrow.fs.FileSystem.from_uri`); a GCS
    URI gives up after :data:`GCS_RETRY_LIMIT_S` seconds of failing calls (:func:`with_gcs_retry_limit`).

    Raises:
        JobPathError: pyarrow cannot open it (unknown scheme, bad bucket, no credentials), naming the URI.
    """
    import pyarrow as pa
    import pyarrow.fs as pafs

    try:
        return pafs.FileSystem.from_uri(with_gcs_retry_limit(uri))
    except (pa.ArrowException, ValueError, OSError) as e:
        raise JobPathError(f"cannot open {uri}: {e}") from e


def _exists(fs, path: str, uri: str) -> bool:
    """Whether ``path`` exists on ``fs``.

    Raises:
        JobPathError: the storage of ``uri`` cannot be reached or read (network, credentials), naming it.
    """
    import pyarrow.fs as pafs

    try:
        return fs.get_file_info(path).type != pafs.FileType.NotFound
    except OSError as e:
        raise JobPathError(f"cannot reach {uri}: {e}") from e


def copy_tree(src_fs, src: str, dst_fs, dst: str) -> None:
    """Copy a file or a folder (recursively) between pyarrow filesystems (:func:`pyarrow.fs.copy_files`)."""
    import pyarrow.fs as pafs

    if src_fs.get_file_info(src).type == pafs.FileType.Directory:
        dst_fs.create_dir(dst, recursive=True)
        if not src_fs.get_file_info(pafs.FileSelector(src, recursive=True)):
            return  # copy_files of an empty folder
    else:
        dst_fs.create_dir(dst.rsplit("/", 1)[0] or "/", recursive=True)
    pafs.copy_files(src, dst, source_filesystem=src_fs, destination_filesystem=dst_fs)


class JobPaths:
    """The local places of a job's URIs, under ``scratch`` (inputs in ``scratch/in``, outputs in
    ``scratch/out``, named by a hash of the URI so that a rerun finds them again)."""

    def __init__(self, scratch: str | None):
        self.own_scratch = scratch is None
        self.scratch = Path(scratch or tempfile.mkdtemp(prefix="mapl-job-")).expanduser().resolve()
        self.uploads: list[tuple[Path, str]] = []
        self.failed_uploads: dict[str, tuple[Path, str]] = {}

    def _local(self, kind: str, uri: str) -> Path:
        name = uri.rstrip("/").rsplit("/", 1)[-1] or "root"
        return self.scratch / kind / f"{hashlib.sha1(uri.encode()).hexdigest()[:10]}-{name}"

    def stage_in(self, uri: str, only: str | None = None) -> str:
        """A local copy of the file or folder ``uri`` (of ``uri/only`` when ``only``); its path.

        Raises:
            JobPathError: ``uri`` cannot be opened or does not exist.
        """
        import pyarrow.fs as pafs

        fs, path = filesystem(uri)
        src = f"{path.rstrip('/')}/{only}" if only else path
        if not _exists(fs, src, uri):
            raise JobPathError(f"{uri.rstrip('/')}{'/' + only if only else ''} does not exist")
        local = self._local("in", uri)
        if not (local / only if only else local).exists():
            try:
                copy_tree(fs, src, pafs.LocalFileSystem(), str(local / only if only else local))
            except OSError as e:
                shutil.rmtree(local, ignore_errors=True)  # a partial copy would pass for a complete one on a rerun
                raise JobPathError(f"cannot copy {uri} to {local}: {e}") from e
        return str(local)

    def stage_out(self, uri: str) -> str:
        """The local folder a job writes the output ``uri`` into (what exists there is copied down first);
        :meth:`upload` copies it to ``uri``."""
        import pyarrow.fs as pafs

        fs, path = filesystem(uri)
        local = self._local("out", uri)
        if _exists(fs, path, uri) and not local.exists():
            try:
                copy_tree(fs, path, pafs.LocalFileSystem(), str(local))
            except OSError as e:
                shutil.rmtree(local, ignore_errors=True)
                raise JobPathError(f"cannot copy {uri} to {local}: {e}") from e
        self.uploads.append((local, uri))
        return str(local)

    def upload(self) -> tuple[list[str], dict[str, tuple[Path, str]]]:
        """Copy every staged output that was written to its URI, each tried even when another fails.

        Returns:
            ``(URIs written, {URI: (its local folder, why the copy failed)})``; a failed output stays in
            its local folder (:meth:`cleanup` keeps the scratch folder then).
        """
        import pyarrow as pa
        import pyarrow.fs as pafs

        done, failed = [], {}
        for local, uri in self.uploads:
            if local.exists():
                try:
                    fs, path = filesystem(uri)
                    copy_tree(pafs.LocalFileSystem(), str(local), fs, path)
                except (JobPathError, OSError, pa.ArrowException) as e:
                    failed[uri] = (local, str(e))
                    continue
                done.append(uri)
        self.failed_uploads = failed
        return done, failed

    def cleanup(self) -> None:
        """Remove a scratch folder this job created (a given ``--scratch`` is kept for reruns), unless an
        output in it could not be copied to its URI."""
        if self.own_scratch and not self.failed_uploads:
            shutil.rmtree(self.scratch, ignore_errors=True)


def read_yaml(path: str, holds: str = "sections") -> dict[str, Any]:
    """A YAML mapping from a path (:func:`mapl_ray.config.read_yaml_mapping`) or a URI (its text read
    through pyarrow, parsed by :func:`mapl_ray.config.parse_yaml_mapping`: the same checks and messages).

    Raises:
        ConfigError: missing, unreadable, not YAML or not a mapping (naming the file).
    """
    if not is_uri(path):
        return read_yaml_mapping(Path(path), holds=holds)
    try:
        fs, p = filesystem(path)
        if not _exists(fs, p, path):
            raise ConfigError(f"config file {path} does not exist")
        with fs.open_input_stream(p) as fh:
            text = fh.read().decode()
    except (OSError, JobPathError, UnicodeDecodeError) as e:
        raise ConfigError(f"config file {path} cannot be read: {e}") from e
    return parse_yaml_mapping(text, f"config file {path}", holds)


def job_parser(spec: JobSpec, base: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """``base`` (the ``mapl`` command's parser, named after the job) with the job's own options:
    ``--scratch``, ``--config`` (when the command has none: a YAML of its options) and, for ``train``,
    ``--storage`` (already a ``mapl train`` flag)."""
    dests = {a.dest for a in base._actions}
    job = base.add_argument_group("cluster job (any path may also be an s3:// / gs:// / file:// URI)")
    job.add_argument(
        "--scratch",
        metavar="DIR",
        help="local folder for the copies of URI inputs and outputs (default: a temporary folder, removed at "
        "the end; on a multi-node cluster a folder on shared storage, kept for reruns)",
    )
    if "config" not in dests:
        job.add_argument(
            "--config", metavar="YAML", help="YAML mapping of this job's options by name; flags override it"
        )
    return base


def _options_from_config(parser: argparse.ArgumentParser, argv: list[str]) -> None:
    """Defaults from ``--config`` (a YAML of the job's options) for a command without a config of its own."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config")
    known, _ = pre.parse_known_args(argv)
    if not known.config:
        return
    options = read_yaml(known.config, holds="options by name")
    dests = {a.dest for a in parser._actions if a.option_strings} - {"help", "config"}
    unknown = sorted(set(options) - dests)
    if unknown:
        raise ConfigError(f"config file {known.config}: unknown option(s) {unknown}; expected some of {sorted(dests)}")
    parser.set_defaults(**options)


def _stage_config_paths(config: str, paths: JobPaths, category: str | None) -> str:
    """A copy of an experiment configuration whose URI path fields point at local copies (others as given)."""
    data = read_yaml(config)
    changed = False
    for field in PATH_FIELDS:
        section, name = field.split(".")
        value = (data.get(section) or {}).get(name)
        if is_uri(value):
            only = category or (data.get("data") or {}).get("category") if field == "data.root" else None
            data[section][name] = paths.stage_in(value, only=only)
            changed = True
    if not changed:
        return config
    local = paths.scratch / "config" / Path(config).name
    local.parent.mkdir(parents=True, exist_ok=True)
    local.write_text(dump_yaml(data))
    return str(local)


def _stage(spec: JobSpec, args: argparse.Namespace, paths: JobPaths) -> dict[str, str]:
    """Replace the URI arguments of ``args`` by local copies; returns {argument: where its output goes}."""
    category = getattr(args, spec.category_arg, None) if spec.category_arg else None
    for dest in spec.inputs:
        value = getattr(args, dest, None)
        if dest == "config" and spec.config_paths and value:
            value = paths.stage_in(value) if is_uri(value) else value
            setattr(args, dest, _stage_config_paths(value, paths, category))
        elif is_uri(value):
            setattr(args, dest, paths.stage_in(value, only=category if dest == "data" else None))
    where = {}
    for dest in spec.outputs:
        value = getattr(args, dest, None)
        if is_uri(value):
            setattr(args, dest, paths.stage_out(value))
        if value:
            where[dest] = value
    return where


def run_job(
    spec: JobSpec | str,
    command_parser: Callable[[str, str], argparse.ArgumentParser],
    run_command: Callable[[str, argparse.Namespace, str], int],
    argv: list[str] | None = None,
    prog: str | None = None,
) -> int:
    """Parse a job's arguments, copy its URI inputs in, run the ``mapl`` command, copy its URI outputs up
    and print where the outputs went. Returns the exit status (2: a user's mistake, one line on stderr).

    Args:
        spec: a :class:`JobSpec` or the name of one in :data:`JOBS`.
        command_parser, run_command: :func:`mapl_ray.cli.command_parser` and :func:`mapl_ray.cli.run_command`
            (passed in: the entry points sit above this layer).
        argv: the arguments (default ``sys.argv[1:]``); prog: the job's name (default ``jobs/COMMAND.py``).
    """
    spec = JOBS[spec] if isinstance(spec, str) else spec
    prog = prog or f"jobs/{spec.command}.py"
    argv = sys.argv[1:] if argv is None else argv
    parser = job_parser(spec, command_parser(spec.command, prog))
    paths = None
    try:
        if not any(a.dest == "config" for a in command_parser(spec.command, prog)._actions):
            _options_from_config(parser, argv)
        args = parser.parse_args(argv)
        paths = JobPaths(args.scratch)
        where = _stage(spec, args, paths)
    except (ConfigError, JobPathError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    try:
        status = run_command(spec.command, args, prog)
    finally:
        uploaded, failed = paths.upload()
        paths.cleanup()
        for target, (local, why) in failed.items():
            print(
                f"{prog}: error: could not copy the output to {target} ({why}); it is kept in {local}", file=sys.stderr
            )
    if failed and not status:
        status = 1
    for dest, target in where.items():
        if status and target not in uploaded:
            continue  # a job that failed before writing anything
        state = "copied to" if target in uploaded else "in"
        print(f"{prog}: --{dest.replace('_', '-')} {state} {target}", file=sys.stderr)
    if getattr(args, "storage", None):
        print(f"{prog}: Ray Train's checkpoints are under {args.storage}", file=sys.stderr)
    return status
