"""Cost of decoding one upload as the HTTP front does (issue 18), in total and per part.

The serve front decodes every upload with :func:`mapl_ray.data.io.decode_upload` (the run's image size,
its pose normalisation ``data.align``, the serve settings' decode limits) in a worker thread. This bench
times that call and its parts, median (and min) ms over ``--rounds`` x ``--repeat`` calls cycling through
``--images`` bodies:

* ``decode_ms``: the whole ``decode_upload`` call;
* ``open_ms``: ``Image.open`` + ``load`` (the PNG decode) + the EXIF orientation (``_open_decoded``);
* ``convert_ms``: to the channels the code works at (RGB, or grey kept at one channel where it does);
* ``pose_estimate_ms`` / ``pose_apply_ms``: :class:`~mapl_ray.data.pose.PoseEstimator` and ``Pose.apply``;
* ``resize_ms``: to the run's image size (~0 when the upload already has it);
* ``to_array_ms``: the final ``uint8 [H, W, 3]`` array.

The bodies are the test split (the run's, or ``--data``'s ``--category``) as ``bench/gpu_payload.py``
ships it to the GPU machine (what ``bench/serve_load.py`` sent there): each image at the model's size,
grey where R = G = B, PNG (``optimize=True``), encoded in memory. No GPU is used.

``--compare-with DIR`` also times another copy of the package (e.g. ``git archive main mapl_ray | tar -x
-C DIR``) on the same bodies, in a subprocess with ``DIR`` first on ``PYTHONPATH`` (the two copies take turns,
round by round, so that other jobs on the machine slow both alike), and records whether both decode
every body to the same pixels and pose. Writes ``--out`` (default
``bench/results/decode_cost.json``) under ``machines[<this machine>]``, keeping other machines' entries.

    python bench/decode_cost.py --run RUN [--compare-with /tmp/main_src] [--images 32] [--repeat 400] [--rounds 3]
    python bench/decode_cost.py --data ROOT --category screw [--image-size 256] [--compare-with DIR]
"""

from __future__ import annotations

import argparse
import hashlib
import io
import itertools
import json
import os
import pickle
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


def settings_of(args) -> tuple[object, list[dict]]:
    """The config whose decode is timed (the run's, or the category preset's at ``--image-size``) and the
    test records (``path``, ``label``) the bodies come from."""
    from mapl_ray.config import Config

    if args.run:
        from mapl_ray.runfolder import load_run_config

        return load_run_config(args.run), json.loads((Path(args.run) / "split.json").read_text())["test"]
    from mapl_ray.data.layout import scan_category
    from mapl_ray.presets import category_preset

    over = {"data.root": args.data, "data.category": args.category, **category_preset(args.category)}
    cfg = Config().override({**over, "data.image_size": args.image_size}).validate()
    test = scan_category(args.data, args.category, require_masks=False).test
    return cfg, [{"path": r.path, "label": r.label} for r in test]


def payload_bodies(test: list[dict], n: int, size: int) -> list[bytes]:
    """Up to ``n`` test images, alternating good and defective, as ``gpu_payload.py`` stores them (at
    ``size``, grey where R = G = B, PNG ``optimize=True``), encoded in memory."""
    from PIL import Image

    from mapl_ray.data.io import load_image

    good = [r["path"] for r in test if r["label"] == 0]
    bad = [r["path"] for r in test if r["label"] != 0]
    paths = [p for pair in itertools.zip_longest(good, bad) for p in pair if p is not None][:n]
    if not paths:
        raise SystemExit("no test images")
    bodies = []
    for p in paths:
        img = load_image(p, size)
        grey = bool((img[..., 0] == img[..., 1]).all() and (img[..., 1] == img[..., 2]).all())
        buf = io.BytesIO()
        Image.fromarray(img[..., 0] if grey else img).save(buf, "PNG", optimize=True)
        bodies.append(buf.getvalue())
    return bodies


def time_parts(spec: dict, bodies: list[bytes], repeat: int) -> dict:
    """Call times (ms) of the decode and its parts with the imported ``mapl_ray``, and a digest of what
    every body decodes to (pixels and pose). ``spec``: ``image_size`` and ``pose`` (the estimator's
    ``[threshold, inverse]``, or None without pose normalisation)."""
    from PIL import Image

    import mapl_ray
    from mapl_ray.data import io as dio
    from mapl_ray.data.pose import PoseEstimator
    from mapl_ray.serving.settings import ServeSettings

    size = spec["image_size"]
    est = PoseEstimator(*spec["pose"]) if spec["pose"] else None
    limits = ServeSettings(run_dir="").resolve(False, size).decode_limits()
    # the code path of this copy of the package: grey kept at one channel where it has that step
    convert = getattr(dio, "_to_grey_or_rgb_image", dio._to_rgb_image)
    hw = (size, size)

    def stats(fn) -> list[float]:
        for i in range(min(len(bodies), repeat)):  # warm-up
            fn(i)
        times = []
        for i in range(repeat):
            t0 = time.perf_counter()
            fn(i)
            times.append(round(1000 * (time.perf_counter() - t0), 5))
        return times

    n = len(bodies)
    opened = [dio._open_decoded("x", io.BytesIO(b), limits)[0] for b in bodies]
    work = [convert(im) for im in opened]
    poses = [est(w) if est else None for w in work]
    turned = [p.apply(w, Image.Resampling.BILINEAR, reflect=True) if p else w for p, w in zip(poses, work)]
    resized = [dio._resize(t, hw, Image.Resampling.BILINEAR) for t in turned]
    times = {
        "decode_ms": stats(lambda i: dio.decode_upload(bodies[i % n], "x", size, est, limits)),
        "open_ms": stats(lambda i: dio._open_decoded("x", io.BytesIO(bodies[i % n]), limits)),
        "convert_ms": stats(lambda i: convert(opened[i % n])),
        "pose_estimate_ms": stats(lambda i: est(work[i % n])) if est else None,
        "pose_apply_ms": stats(
            lambda i: poses[i % n].apply(work[i % n], Image.Resampling.BILINEAR, reflect=True) if poses[i % n] else 0
        ),
        "resize_ms": stats(lambda i: dio._resize(turned[i % n], hw, Image.Resampling.BILINEAR)),
        "to_array_ms": stats(lambda i: to_array(resized[i % n])),
    }
    out = {"times": {k: v for k, v in times.items() if v is not None}, "working_modes": sorted({w.mode for w in work})}
    digest = hashlib.sha256()
    for b in bodies:
        d = dio.decode_upload(b, "x", size, est, limits)
        digest.update(d.image.tobytes())
        digest.update(repr(d.pose).encode())
    out["output_sha256"] = digest.hexdigest()
    out["package"] = str(Path(mapl_ray.__file__).parent)
    out["commit"] = git_commit(Path(mapl_ray.__file__).parent)
    return out


def summarise(runs: list[dict]) -> dict:
    """One copy's rounds (:func:`time_parts` results) -> median / min ms per part over all their calls."""
    out = {}
    for part in runs[0]["times"]:
        t = np.concatenate([r["times"][part] for r in runs])
        out[part] = {"median": round(float(np.median(t)), 4), "min": round(float(np.min(t)), 4)}
    digests = {r["output_sha256"] for r in runs}
    first = runs[0]
    return {**out, **{k: first[k] for k in ("working_modes", "package", "commit")}, "output_sha256": digests.pop()}


def to_array(img) -> np.ndarray:
    """The decode's last step: a writable ``uint8 [H, W, 3]`` array (a grey image's channel repeated)."""
    a = np.asarray(img)
    return np.stack([a] * 3, axis=-1) if a.ndim == 2 else a.copy()


def git_commit(where: Path) -> str | None:
    try:
        sha = subprocess.run(
            ["git", "-C", str(where), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(where), "status", "--porcelain", "."], capture_output=True, text=True)
        return sha + ("+uncommitted" if dirty.stdout.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return None


def machine_key() -> tuple[str, dict]:
    info = {"python": platform.python_version(), "cores": os.cpu_count(), "platform": platform.platform()}
    try:
        import PIL

        info["pillow"] = PIL.__version__
    except ImportError:
        pass
    info["numpy"] = np.__version__
    gpu = os.environ.get("MAPL_BENCH_MACHINE")  # e.g. "NVIDIA H200 host": this bench itself uses no GPU
    return f"{gpu or 'CPU'} ({os.cpu_count()} cores, {platform.machine()})", info


def compare(args, bodies_file: str) -> dict:
    """:func:`time_parts` of the copy of ``mapl_ray`` in ``args.compare_with``, in a subprocess."""
    path = os.pathsep.join([str(Path(args.compare_with).resolve()), os.environ.get("PYTHONPATH", ""), str(HERE.parent)])
    cmd = [sys.executable, __file__, "--repeat", str(args.repeat), "--_bodies", bodies_file]
    done = subprocess.run(cmd, env={**os.environ, "PYTHONPATH": path}, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"--compare-with {args.compare_with} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", help="trained run folder (its config: image size, data.align; its test split)")
    p.add_argument("--data", help="without --run: data-set root (MVTec layout), with --category")
    p.add_argument("--category", default="screw", help="without --run: the category (its preset's data.align)")
    p.add_argument("--image-size", type=int, default=256, help="without --run: the model's input size")
    p.add_argument("--images", type=int, default=32, help="distinct test images (round robin)")
    p.add_argument("--repeat", type=int, default=400, help="timed calls per part and round")
    p.add_argument("--rounds", type=int, default=3, help="rounds, the copies taking turns (default 3)")
    p.add_argument("--compare-with", help="folder holding another copy of mapl_ray (the code before a change)")
    p.add_argument("--label", default="this", help="name of this copy's results (default 'this')")
    p.add_argument("--compare-label", default="before", help="name of --compare-with's results")
    p.add_argument("--note", help="free text stored with the results")
    p.add_argument("--out", default=str(HERE / "results" / "decode_cost.json"))
    p.add_argument("--_bodies", help=argparse.SUPPRESS)  # internal: time these bodies, print JSON
    args = p.parse_args(argv)

    if args._bodies:
        job = pickle.loads(Path(args._bodies).read_bytes())
        print(json.dumps(time_parts(job["spec"], job["bodies"], args.repeat)))
        return 0
    if not args.run and not args.data:
        p.error("give --run RUN, or --data ROOT [--category NAME] [--image-size N]")

    from mapl_ray.data.pose import build_pose_estimator

    cfg, test = settings_of(args)
    size = cfg.data.image_size
    est = build_pose_estimator(cfg)
    spec = {"image_size": size, "pose": [est.threshold, est.inverse] if est else None}
    bodies = payload_bodies(test, args.images, size)
    rounds: dict[str, list[dict]] = {args.label: []}
    with tempfile.NamedTemporaryFile(suffix=".pkl") as f:
        f.write(pickle.dumps({"spec": spec, "bodies": bodies}))
        f.flush()
        for _ in range(args.rounds):  # the copies take turns, so that load from other jobs hits both alike
            if args.compare_with:
                rounds.setdefault(args.compare_label, []).append(compare(args, f.name))
            rounds[args.label].append(time_parts(spec, bodies, args.repeat))
    results = {label: summarise(rs) for label, rs in rounds.items()}

    key, info = machine_key()
    entry = {
        "machine": info,
        "command": "python " + shlex.join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        "settings": {
            "run": args.run,
            "data": None if args.run else args.data,
            "category": cfg.data.category,
            "image_size": size,
            "align": cfg.data.align,
            "pose_estimator": spec["pose"],
            "images": len(bodies),
            "body_bytes_median": int(np.median([len(b) for b in bodies])),
            "repetitions": args.repeat,
            "rounds": args.rounds,
            "bodies": "test images as bench/gpu_payload.py stores them (at image_size, grey where R=G=B, "
            "PNG optimize=True), in memory",
            "load_average_1min_at_end": round(os.getloadavg()[0], 2),
        },
        "results": results,
    }
    if args.compare_with:
        a, b = (results[k]["output_sha256"] for k in (args.compare_label, args.label))
        entry["identical_output"] = a == b
        entry["decode_speedup"] = round(
            results[args.compare_label]["decode_ms"]["median"] / results[args.label]["decode_ms"]["median"], 2
        )
    if args.note:
        entry["note"] = args.note
    out = Path(args.out)
    doc = json.loads(out.read_text()) if out.exists() else {"machines": {}}
    doc.setdefault("machines", {})[key] = entry
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2) + "\n")
    print(json.dumps({k: v for k, v in entry.items() if k != "machine"}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
