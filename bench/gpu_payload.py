"""Prepare what a GPU-machine benchmark call carries (the device tool sends at most 64 MiB per call).

The GPU machine has no network, no ``../shared/data``, no Ray and no weights wheels. This writes, into
folders git ignores (add them to ``.git/info/exclude``):

* ``.data/<dataset>/<category>``: the categories with each image's shorter side at 256 and its aspect ratio
  kept (256x256 for square images), losslessly (PNG, grey where the image is grey; masks resized NEAREST,
  images BILINEAR, as ``mapl_ray.data.io`` does);
* ``.data/dtd256``: the texture set at 256x256 (JPEG quality 92: the full-size set does not fit);
* ``.data/w/tf_efficientnet_lite2.safetensors``: the ImageNet encoder weights (fp16) for ``--weights``;
* ``.whl_gpu``: Ray and its missing dependencies for Python 3.12, from the wheels that
  ``../shared/gpu/prepare-wheels.sh .whl`` downloads, with Ray's wheel recompressed with LZMA
  (46 -> 33 MiB) and the wheels Ray Train / Serve do not need here left out;
* ``.whl_faiss``: the faiss-cpu wheel found in the same folder (only for ``bench/gpu.py``'s FAISS CPU
  column; fetch it with ``pip download faiss-cpu --no-deps --only-binary=:all: --python-version 3.12
  --platform manylinux_2_28_x86_64 -d .whl``).

Then, for example (device tool, kind ``nvidia-h200-x2``):

    carry [.data/mvtec_ad, .data/dtd256, .data/w, .whl_faiss]:
      pip install --no-index --no-deps --target /tmp/site .whl_faiss/*.whl && export PYTHONPATH=/tmp/site:$PWD &&
      CUDA_VISIBLE_DEVICES=0 python3 bench/gpu.py --data .data/mvtec_ad --textures .data/dtd256
          --weights .data/w/tf_efficientnet_lite2.safetensors --out $OUT/gpu.json
    carry [.data/mvtec_ad, .data/dtd256, .data/w, .whl_gpu]:
      pip install --no-index --no-deps --target /tmp/site .whl_gpu/*.whl && export PYTHONPATH=/tmp/site:$PWD &&
      python3 bench/ddp.py --data .data/mvtec_ad --textures .data/dtd256
          --weights .data/w/tf_efficientnet_lite2.safetensors --out $OUT/gpu.json

    python bench/gpu_payload.py [--data-root ../shared/data] [--categories mvtec_ad/screw]

``--pack DIR`` then packs one call's whole payload into DIR (one folder to carry, e.g. ``.pack``):
``site.tar.xz`` (Ray and its missing dependencies from ``.whl_gpu``, plus the ``bench`` extra's peer,
anomalib, with the dependencies the GPU machine lacks, installed with ``pip --target --python-version 3.12
--only-binary=:all:``; ``bench/gpu_run.sh`` unpacks it into ``/tmp/site``), ``data.tar.xz`` (the
categories and ``dtd256``) and ``w.tar.xz`` (the weights); it prints each file's size and the total, which
must stay under the call's 64 MiB:

    python bench/gpu_payload.py --jpeg-quality 90 --pack .pack \
        --categories mvtec_ad/screw,magnetic_tile/magnetic_tile,mpdd/metal_plate,mvtec_ad/leather,elpv/solar_cell
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from PIL import Image

from mapl_ray.data.io import load_image, load_mask
from mapl_ray.data.layout import find_images

SIZE = 256
SKIP_WHEELS = ("virtualenv", "py_spy", "faiss")  # runtime_env pip, stack dumps; faiss travels separately
# anomalib (the accuracy benchmark's peer, pyproject's `bench` extra) and what importing its PatchCore needs
# that the GPU machine lacks (it has torch, timm, torchvision, scikit-learn, scipy, pandas, matplotlib,
# opencv). imagecodecs (45 MiB, an optional codec library of tifffile) and the CLI-only packages are left out.
PEER_PACKAGES = (
    "anomalib==2.7.0",
    "einops==0.8.2",
    "jsonargparse==4.46.0",
    "docstring-parser==0.18.0",
    "typeshed-client==2.15.0",
    "kornia==0.9.0",
    "kornia-rs==0.2.0",
    "lazy-loader==0.6",
    "lightning==2.6.6",
    "lightning-utilities==0.15.3",
    "torchmetrics==1.9.0",
    "omegaconf==2.4.0",
    "rich==15.0.0",
    "markdown-it-py==4.3.0",
    "mdurl==0.1.2",
    "pygments==2.21.0",
    "scikit-image==0.26.0",
    "tifffile==2026.3.3",
    "python-dotenv==1.2.4",
    "fsspec==2026.9.0",
)
# pure-Python packages published as source only: built into a wheel here first
SDIST_PACKAGES = ("FrEIA==0.2",)
# installed files the benchmark never imports, left out of the site tarball: scikit-image's sample images and
# the subpackages importing anomalib does not load (its PatchCore calls none of scikit-image), test suites
SITE_PRUNE = (
    "skimage/data",
    "skimage/feature",
    "skimage/restoration",
    "skimage/transform",
    "skimage/graph",
    "skimage/registration",
    "skimage/future",
    "skimage/metrics",
    "einops/tests",
    "fsspec/tests",
)
# --slim-ray: Ray libraries the grid benchmarks (Ray core tasks only) do not import
RAY_LIBRARIES = ("ray/data", "ray/serve", "ray/tune", "ray/train")
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64", "any")


def _drop(name: str) -> bool:
    """Files of Ray's wheel not needed for Train / Serve here (LLM and RL libraries, dashboard web client)."""
    return name.startswith(("ray/llm/", "ray/rllib/", "ray/dashboard/client/build/"))


def payload_hw(path: str) -> tuple[int, int]:
    """``(H, W)`` the payload stores ``path`` at: its shorter side 256, its aspect ratio kept (a square image
    256x256), so that what the run's decoder does to the file's shape (squash it, or turn it first with
    ``data.align=landscape``) happens on the GPU machine as it does here."""
    with Image.open(path) as im:
        w, h = im.size
    k = SIZE / min(w, h)
    return max(SIZE, round(h * k)), max(SIZE, round(w * k))


def copy_category(src: Path, dst: Path, jpeg_quality: int | None = None) -> None:
    """The category with each image's shorter side at 256 (:func:`payload_hw`): images PNG (lossless) or JPEG
    at ``jpeg_quality`` (to fit more categories into one call), masks PNG at their image's size."""
    for path in find_images(str(src)):
        rel = Path(path).relative_to(src)
        lossy = jpeg_quality and "ground_truth" not in rel.parts
        out = (dst / rel).with_suffix(".jpg" if lossy else ".png")
        out.parent.mkdir(parents=True, exist_ok=True)
        hw = payload_hw(path)
        if "ground_truth" in rel.parts:
            Image.fromarray(load_mask(path, hw) * 255).save(out)
            continue
        img = load_image(path, hw)
        grey = bool((img[..., 0] == img[..., 1]).all() and (img[..., 1] == img[..., 2]).all())
        pil = Image.fromarray(img[..., 0] if grey else img)
        pil.save(out, quality=jpeg_quality) if lossy else pil.save(out, optimize=True)


def copy_textures(src: Path, dst: Path, quality: int = 92) -> None:
    for path in find_images(str(src)):
        out = (dst / Path(path).relative_to(src)).with_suffix(".jpg")
        out.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(load_image(path, SIZE)).save(out, quality=quality)


def export_weights(out: Path, name: str = "tf_efficientnet_lite2") -> None:
    from safetensors.torch import save_file

    from mapl_ray.model.encoder import build_encoder

    body = build_encoder(name, None, True).body
    sd = {k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in body.state_dict().items()}
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(out))


def repack_wheels(src: Path, dst: Path) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    for whl in sorted(src.glob("*.whl")):
        if whl.name.startswith(SKIP_WHEELS):
            continue
        if not whl.name.startswith("ray-"):
            shutil.copy(whl, dst / whl.name)
            continue
        with zipfile.ZipFile(whl) as zi, zipfile.ZipFile(dst / whl.name, "w", zipfile.ZIP_LZMA) as zo:
            for info in zi.infolist():
                if _drop(info.filename):
                    continue
                data = zi.read(info)
                if info.filename.endswith(".dist-info/RECORD"):
                    data = "".join(
                        row + "\n" for row in data.decode().splitlines() if not _drop(row.split(",")[0])
                    ).encode()
                info.compress_type = zipfile.ZIP_LZMA
                zo.writestr(info, data)


def build_site(wheels: Path, dest: Path, peer: bool = True, slim_ray: bool = False) -> None:
    """Install the Ray wheels of ``wheels`` (``.whl_gpu``) and, with ``peer``, :data:`PEER_PACKAGES` and
    :data:`SDIST_PACKAGES` for Python 3.12 (binary wheels only, no dependency resolution: the GPU machine has
    the rest) into ``dest``, less :data:`SITE_PRUNE` (and :data:`RAY_LIBRARIES` with ``slim_ray``)."""
    plat = [a for p in PLATFORMS for a in ("--platform", p)]
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-compile", "--target", str(dest)]
    pip += ["--python-version", "3.12", "--implementation", "cp", "--only-binary=:all:", *plat]
    subprocess.run([*pip, "--no-index", *map(str, sorted(wheels.glob("*.whl")))], check=True)
    if peer:
        with tempfile.TemporaryDirectory() as built:
            build = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", built, *SDIST_PACKAGES]
            subprocess.run(build, check=True)
            subprocess.run([*pip, "--upgrade", *PEER_PACKAGES, *map(str, Path(built).glob("*.whl"))], check=True)
    for rel in SITE_PRUNE + (RAY_LIBRARIES if slim_ray else ()):
        shutil.rmtree(dest / rel, ignore_errors=True)
    for cache in dest.rglob("__pycache__"):
        shutil.rmtree(cache, ignore_errors=True)


def tar_xz(out: Path, base: Path, names: list[str]) -> None:
    """``tar cf - -C base names | xz -9 > out``."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "wb") as f:
        tar = subprocess.Popen(["tar", "cf", "-", "-C", str(base), *names], stdout=subprocess.PIPE)
        subprocess.run(["xz", "-9", "-T0"], stdin=tar.stdout, stdout=f, check=True)
        if tar.wait():
            raise RuntimeError(f"tar of {names} under {base} failed")


def pack(here: Path, out: Path, categories: list[str], peer: bool = True, slim_ray: bool = False) -> None:
    """Write ``out/site.tar.xz``, ``out/data.tar.xz`` and ``out/w.tar.xz`` (module docstring)."""
    data = here / ".data"
    with tempfile.TemporaryDirectory() as tmp:
        site = Path(tmp) / "site"
        build_site(here / ".whl_gpu", site, peer, slim_ray)
        tar_xz(out / "site.tar.xz", site, sorted(p.name for p in site.iterdir()))
    tar_xz(out / "data.tar.xz", data, sorted({c.split("/")[0] for c in categories} | {"dtd256"}))
    tar_xz(out / "w.tar.xz", data, ["w"])
    for f in sorted(out.glob("*.tar.xz")):
        print(f"{f.relative_to(here) if f.is_relative_to(here) else f}: {f.stat().st_size / 2**20:.1f} MiB")
    print(f"total {size_mib(out):.1f} MiB (one call carries at most 64 MiB)")


def size_mib(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20


def copy_all(args: argparse.Namespace, root: Path, data: Path, here: Path) -> None:
    """The categories, textures and weights into ``data``; the repacked wheels into ``.whl_gpu`` / ``.whl_faiss``."""
    for item in args.categories.split(","):
        shutil.rmtree(data / item, ignore_errors=True)
        copy_category(root / item, data / item, args.jpeg_quality)
    shutil.rmtree(data / "dtd256", ignore_errors=True)
    copy_textures(root / "dtd_subset" / "images", data / "dtd256", 85 if args.jpeg_quality else 92)
    export_weights(data / "w" / "tf_efficientnet_lite2.safetensors")
    wheels = Path(args.wheels)
    if wheels.is_dir():
        repack_wheels(wheels, here / ".whl_gpu")
        faiss = here / ".whl_faiss"
        faiss.mkdir(exist_ok=True)
        for whl in wheels.glob("faiss_cpu-*.whl"):
            shutil.copy(whl, faiss / whl.name)
    else:
        print(f"{wheels} not found: run ../shared/gpu/prepare-wheels.sh {wheels} first for the Ray wheels")


def main() -> None:
    here = Path(__file__).resolve().parent.parent
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-root", default=str(here.parent / "shared" / "data"))
    p.add_argument("--categories", default="mvtec_ad/screw", help="comma list of DATASET/CATEGORY")
    p.add_argument("--wheels", default=str(here / ".whl"), help="output folder of ../shared/gpu/prepare-wheels.sh")
    p.add_argument(
        "--jpeg-quality",
        type=int,
        help="store images as JPEG of this quality (masks stay PNG) to fit "
        "several categories with Ray's wheels into one call's 64 MiB; textures then at quality 85",
    )
    p.add_argument("--pack", metavar="DIR", help="then pack site / data / weights tarballs into DIR (e.g. .pack)")
    p.add_argument("--no-peer", action="store_true", help="with --pack: leave anomalib out of the site tarball")
    p.add_argument(
        "--slim-ray",
        action="store_true",
        help="with --pack: leave Ray Data / Serve / Tune / Train out of the site tarball (grid benchmarks only)",
    )
    p.add_argument("--pack-only", action="store_true", help="pack the .data and .whl_gpu already there")
    args = p.parse_args()
    root, data = Path(args.data_root), here / ".data"
    if not args.pack_only:
        copy_all(args, root, data, here)
    for folder in sorted(
        {
            *(data / i.split("/")[0] for i in args.categories.split(",")),
            data / "dtd256",
            data / "w",
            here / ".whl_gpu",
            here / ".whl_faiss",
        }
    ):
        if folder.exists():
            print(f"{folder.relative_to(here)}: {size_mib(folder):.1f} MiB")
    if args.pack:
        pack(here, Path(args.pack).resolve(), args.categories.split(","), not args.no_peer, args.slim_ray)


if __name__ == "__main__":
    main()
