"""The cluster job entry points (jobs/*.py) and their shared helper (mapl_ray.pipelines.jobs): the same
--config everywhere, one-line errors, URIs copied in and out through pyarrow's filesystems."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
JOB_FILES = sorted((REPO / "jobs").glob("*.py"))


def _run_job_file(path: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, str(path), *args], capture_output=True, text=True, env=env, cwd=REPO)


def test_every_job_is_listed():
    assert {p.stem for p in JOB_FILES} >= {"train", "prepare", "score", "tune"}


@pytest.mark.parametrize("job", JOB_FILES, ids=lambda p: p.name)
def test_job_help_lists_config(job):
    out = _run_job_file(job, "--help")
    assert out.returncode == 0, out.stderr
    assert "--config" in out.stdout and "--scratch" in out.stdout
    assert out.stdout.startswith(f"usage: jobs/{job.name}")


@pytest.mark.parametrize("job", JOB_FILES, ids=lambda p: p.name)
@pytest.mark.parametrize(
    "content", ["train: {no_such_field: 1}\nno_such_option: 1\n", "a: [\n"], ids=["unknown", "yaml"]
)
def test_bad_config_file_exits_2_with_one_line(job, content, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(content)
    data_args = ["--data", str(tmp_path), "--category", "x"]
    positional = {"train": data_args, "tune": data_args, "prepare": [str(tmp_path)]}.get(
        job.stem, [str(tmp_path), str(tmp_path)]
    )
    out = _run_job_file(job, *positional, "--config", str(bad), "--out", str(tmp_path / "out"))
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"jobs/{job.name}: error:") and str(bad) in lines[0], lines
    assert not (tmp_path / "out").exists()


def test_uris_are_copied_in_and_outputs_copied_up(tmp_path):
    """file:// URIs take the pyarrow path an s3:// or gs:// URI takes: the data root is copied in for the
    category only, the options come from the --config YAML, the output is copied up when the job ends."""
    from mapl_ray.cli import command_parser
    from mapl_ray.pipelines.jobs import run_job

    run = tmp_path / "bucket" / "runs" / "r1"
    (run / "checkpoint").mkdir(parents=True)
    (run / "config.yaml").write_text("data: {image_size: 64}\n")
    src = tmp_path / "bucket" / "images"
    src.mkdir()
    (src / "a.png").write_bytes(b"png")
    (tmp_path / "opts.yaml").write_text("batch_size: 7\nmaps: true\n")
    seen = {}

    def fake_score(command, args, prog):
        seen.update(vars(args))
        Path(args.out, "part-0.parquet").parent.mkdir(parents=True, exist_ok=True)
        Path(args.out, "part-0.parquet").write_text("scores")
        return 0

    argv = [f"file://{run}", f"file://{src}", "--out", f"file://{tmp_path}/bucket/scores", "--config"]
    argv += [str(tmp_path / "opts.yaml"), "--scratch", str(tmp_path / "scratch"), "--batch-size", "9"]
    assert run_job("score", command_parser, fake_score, argv=argv) == 0
    assert seen["batch_size"] == 9 and seen["maps"] is True  # the flag beats the file
    assert Path(seen["run"], "config.yaml").is_file() and str(tmp_path / "scratch") in seen["run"]
    assert Path(seen["src"], "a.png").read_bytes() == b"png"
    assert (tmp_path / "bucket" / "scores" / "part-0.parquet").read_text() == "scores"


def test_data_root_uri_is_copied_for_its_category_only(tmp_path):
    from mapl_ray.pipelines.jobs import JobPathError, JobPaths

    root = tmp_path / "mvtec"
    for cat in ("screw", "bottle"):
        (root / cat / "train" / "good").mkdir(parents=True)
        (root / cat / "train" / "good" / "0.png").write_bytes(b"x")
    paths = JobPaths(str(tmp_path / "scratch"))
    local = Path(paths.stage_in(f"file://{root}", only="screw"))
    assert (local / "screw" / "train" / "good" / "0.png").is_file() and not (local / "bottle").exists()
    with pytest.raises(JobPathError, match="does not exist"):
        paths.stage_in(f"file://{root}", only="carpet")
    with pytest.raises(JobPathError, match="cannot open"):
        paths.stage_in("nosuchscheme://bucket/x")


@pytest.mark.parametrize(
    "content", [b"a: [\n", b"- 1\n- 2\n", b"\xff\xfe\x00binary", None], ids=["yaml", "list", "binary", "missing"]
)
def test_config_uri_gets_the_same_checks_and_messages_as_a_local_file(content, tmp_path):
    """jobs.read_yaml reads a URI's text through pyarrow and parses it with config.parse_yaml_mapping: the
    messages match those of config.read_yaml_mapping on the same file, and none is a raw traceback."""
    from mapl_ray.config import ConfigError, read_yaml_mapping
    from mapl_ray.pipelines.jobs import read_yaml

    path = tmp_path / "job.yaml"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ConfigError) as local:
        read_yaml_mapping(path)
    with pytest.raises(ConfigError) as uri:
        read_yaml(f"file://{path}")
    assert str(uri.value).replace(f"file://{path}", str(path)) == str(local.value)
    with pytest.raises(ConfigError) as plain:
        read_yaml(str(path))
    assert str(plain.value) == str(local.value)


def test_output_that_cannot_be_copied_up_is_kept_and_the_job_fails(tmp_path, capsys):
    """An output URI that cannot be written (here a path under a regular file) must not cost the job's
    output: the job exits 1, names the URI, and the local copy survives the scratch folder's cleanup."""
    from mapl_ray.cli import command_parser
    from mapl_ray.pipelines.jobs import run_job

    run = tmp_path / "run"
    (run / "checkpoint").mkdir(parents=True)
    (run / "config.yaml").write_text("data: {image_size: 64}\n")
    (tmp_path / "images").mkdir()
    (tmp_path / "blocker").write_text("a file, not a folder")

    def fake_score(command, args, prog):
        Path(args.out).mkdir(parents=True, exist_ok=True)
        Path(args.out, "part-0.parquet").write_text("scores")
        return 0

    target = f"file://{tmp_path}/blocker/scores"
    argv = [str(run), str(tmp_path / "images"), "--out", target]  # no --scratch: the job's own, removed at the end
    assert run_job("score", command_parser, fake_score, argv=argv) == 1
    err = capsys.readouterr().err
    assert f"could not copy the output to {target}" in err, err
    kept = Path(err.split("it is kept in ")[1].split()[0])
    assert (kept / "part-0.parquet").read_text() == "scores"


def test_gcs_uris_give_up_after_a_bounded_retry():
    """pyarrow's GCS client retries for 15 minutes by default (a job with an unreachable bucket looked hung):
    gs:// URIs get retry_limit_seconds unless they set one, which pyarrow accepts as a URI option."""
    import pyarrow.fs as pafs

    from mapl_ray.pipelines.jobs import GCS_RETRY_LIMIT_S, with_gcs_retry_limit

    assert with_gcs_retry_limit("gs://bucket/runs/r1") == f"gs://bucket/runs/r1?retry_limit_seconds={GCS_RETRY_LIMIT_S}"
    assert with_gcs_retry_limit("gs://b/x?retry_limit_seconds=5") == "gs://b/x?retry_limit_seconds=5"
    assert (
        with_gcs_retry_limit("gs://b/x?project_id=p")
        == f"gs://b/x?project_id=p&retry_limit_seconds={GCS_RETRY_LIMIT_S}"
    )
    assert with_gcs_retry_limit("s3://b/x") == "s3://b/x" and with_gcs_retry_limit("file:///tmp/x") == "file:///tmp/x"
    if not hasattr(pafs, "GcsFileSystem"):
        pytest.skip("this pyarrow has no GCS filesystem")
    fs, path = pafs.FileSystem.from_uri(with_gcs_retry_limit("gs://bucket/runs/r1"))  # no network call
    assert isinstance(fs, pafs.GcsFileSystem) and path == "bucket/runs/r1"
