"""Prepare what a GPU-machine benchmark call carries (the device tool sends at most 64 MiB per call).

The GPU machine has no network, no ``../shared/data``, no Ray and no weights wheels. This writes, into
folders git ignores (add them to ``.git/info/exclude``):

* ``.data/<dataset>/<category>``: the categories at 256x256, losslessly (PNG, grey where the image is
  grey; masks resized NEAREST, images BILINEAR, as ``mapl_ray.data.io`` does);
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
"""

from __future__ import annotations

import argparse
import shutil
import zipfile
from pathlib import Path

from PIL import Image

from mapl_ray.data.io import load_image, load_mask
from mapl_ray.data.layout import find_images

SIZE = 256
SKIP_WHEELS = ("virtualenv", "py_spy", "faiss")  # runtime_env pip, stack dumps; faiss travels separately


def _drop(name: str) -> bool:
    """Files of Ray's wheel not needed for Train / Serve here (LLM library, dashboard web client)."""
    return name.startswith(("ray/llm/", "ray/dashboard/client/build/"))


def copy_category(src: Path, dst: Path, jpeg_quality: int | None = None) -> None:
    """The category at 256x256: images PNG (lossless) or JPEG at ``jpeg_quality`` (to fit more categories
    into one call), masks PNG."""
    for path in find_images(str(src)):
        rel = Path(path).relative_to(src)
        lossy = jpeg_quality and "ground_truth" not in rel.parts
        out = (dst / rel).with_suffix(".jpg" if lossy else ".png")
        out.parent.mkdir(parents=True, exist_ok=True)
        if "ground_truth" in rel.parts:
            Image.fromarray(load_mask(path, SIZE) * 255).save(out)
            continue
        img = load_image(path, SIZE)
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


def size_mib(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20


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
    args = p.parse_args()
    root, data = Path(args.data_root), here / ".data"
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


if __name__ == "__main__":
    main()
