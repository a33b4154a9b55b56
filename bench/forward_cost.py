"""What one inference forward pass costs on the GPU, by part and by variant, and how four serving
processes sharing one GPU compare with one (issues 18 and 13).

The weights do not change the cost, so no run is trained: the network is built from the configuration
(the category's preset: screw's 10 memory banks of 30 images, no TTA, the patch bank of
``model.knn_patches`` rows), its banks filled from random images and random patch rows. Every variant is
the :class:`~mapl_ray.inference.Predictor`'s own forward (``anomaly_map.anomaly_maps``, the patch map
fused at weight 0.5, the image score), bf16 autocast, channels-last, replayed as a CUDA graph
(:class:`~mapl_ray.model.graphs.GraphedForward`).

* ``parts``, each from the images (the encoder included): the encoder alone, the memory search of every bank
  (``MemoryBank.difference``), the decoder's map with 1 / 5 / 10 banks, the patch bank's map.
* ``variants``: the whole pass at each ``--batches`` size: ``base`` (the package as the Predictor runs it:
  MSFF's and the decoder's BatchNorms folded into their convolutions, ``MAPLModel.fold_batchnorm``);
  ``batchnorm_unfolded`` (as before 2026-12-07); ``knn_four_pass`` (the patch distances as they were
  computed before 2026-12-07: the distance matrix built in four passes, not as one ``addmm`` with the
  reference norms as its bias); ``banks_stacked`` (the bank ensemble as it was before 2026-12-07: DI* and
  the decoder's skip built by repeating the shared features k times, no shared convolutions);
  ``before_2026_12_07`` (the three old forms); each with the largest difference of its image scores, decoder
  maps and patch maps from ``base``'s.
* ``sharing``: ``P`` processes, each with its own model and CUDA graph at batch ``B``, run passes
  together for ``--share-seconds``: images/s of all of them, against one process (what a Ray Serve
  replica count per GPU does to the GPU).

    python bench/forward_cost.py [--category screw] [--image-size 256] [--batches 8,32] \\
        [--sharing 1x32,2x16,4x8,4x32] [--out bench/results/forward_cost.json]

Writes ``--out`` with the machine, the command and the settings. Without a CUDA device every pass runs
eagerly on the CPU (``--seconds`` per timing, at least ``--least`` passes) and ``sharing`` is skipped.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


def build(category: str, size: int, seed: int = 0, device: str = "cuda"):
    """The category's network on the GPU in eval mode, its memory banks and patch bank filled with random data."""
    from mapl_ray.config import Config
    from mapl_ray.model.network import build_model
    from mapl_ray.presets import category_preset

    cfg = Config().override(
        {**category_preset(category), "model.pretrained": False, "model.weights": None, "data.image_size": size}
    )
    cfg = cfg.validate()
    torch.manual_seed(seed)
    model = build_model(cfg).eval()
    dev = torch.device(device)
    model.to(dev)
    images = torch.rand(cfg.model.memory_samples, 3, size, size, device=dev)
    for b in range(cfg.model.memory_banks):
        model.refresh_memory(images.roll(b, 0), bank=b)
    with torch.no_grad():
        c = sum(model.encode(images[:1])[lvl].shape[1] for lvl in (2, 3))
    model.patch_bank.patches = torch.randn(cfg.model.knn_patches, c, device=dev)
    return cfg, model


def on_device(cfg, model, fold: bool = True):
    """``model`` as the Predictor runs it: BatchNorms folded (``MAPLModel.fold_batchnorm``; ``fold``), CUDA
    kernel choices made."""
    if fold:
        model.fold_batchnorm()
    if next(model.parameters()).is_cuda:
        model.use_cuda_kernels(cfg.train.channels_last, cfg.train.depthwise_kernels)
    return model


def knn_four_pass(query: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """``patch_knn.nearest_distances`` as it was before 2026-12-07: the block x reference distance matrix built
    as ``||q||^2 + ||b||^2 - 2 q.b`` (``memory.squared_distances``), clamped, then its row minimum."""
    from mapl_ray.model.memory import squared_distances

    ref_sq = reference.pow(2).sum(1)
    out = []
    for i in range(0, query.shape[0], 2048):
        out.append(squared_distances(query[i : i + 2048], reference, ref_sq).amin(1).sqrt_())
    return torch.cat(out)


def heads_stacked(self, feats, banks, out_size):
    """``MAPLModel._heads`` as it was before 2026-12-07: DI* of every bank built as a concatenation with the
    features repeated k times, the decoder's skip ``f0`` repeated likewise (no shared convolutions)."""
    from mapl_ray.model.network import spatial_attention

    levels = feats[1:4]
    per_bank = [bank.difference(levels) for bank in banks]
    attention = [spatial_attention(list(di), bank.di_scale) for bank, (di, _) in zip(banks, per_bank)]
    k = len(banks)
    di = [torch.cat([p[0][lvl] for p in per_bank]) for lvl in range(len(levels))]
    att = [torch.cat([a[lvl] for a in attention]) for lvl in range(len(levels))]
    stacked = [f.repeat(k, *([1] * (f.dim() - 1))) for f in levels]
    low = feats[0].repeat(k, *([1] * (feats[0].dim() - 1)))
    di_star = [torch.cat([f, d.to(f.dtype)], dim=1) for f, d in zip(stacked, di)]
    fused = self.msff(di_star, [a.to(di_star[0].dtype) for a in att])
    logits = self.decoder(fused, low, out_size)
    return {"logits": logits, "q": self.head(fused), "nearest": per_bank[0][1], "di": per_bank[0][0]}


def stacked_copy(model):
    """A copy of ``model`` whose bank ensemble runs :func:`heads_stacked`."""
    import types

    model = copy.deepcopy(model)
    model._heads = types.MethodType(heads_stacked, model)
    return model


def forward_fn(cfg, model, knn_before: bool, parts: bool = False):
    from mapl_ray.model import patch_bank
    from mapl_ray.model.anomaly_map import anomaly_maps, fuse_maps, image_scores

    fusion = {"weight": 0.5, "map_scale": 1.0, "knn_scale": 1.0}

    def fn(x, cache):
        orig = patch_bank.nearest_distances
        if knn_before:
            patch_bank.nearest_distances = knn_four_pass
        try:
            out = anomaly_maps(model, x, [(0, False)], None, cfg.train.amp, cfg.train.channels_last, cache, knn=True)
        finally:
            patch_bank.nearest_distances = orig
        maps = fuse_maps(out["maps"], out["knn_maps"], fusion)
        scores = image_scores(maps, out["q"], cfg.eval.top_k)
        return {"scores": scores, "maps": out["maps"], "knn_maps": out["knn_maps"]} if parts else {"scores": scores}

    return fn


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_graphed(fn, x, seconds: float = 2.0, least: int = 5) -> float:
    """Median milliseconds of a replayed pass of ``fn`` on ``x`` (CUDA-graph captured first; eager on a CPU)."""
    from mapl_ray.model.graphs import GraphedForward

    g = GraphedForward(fn, x.device, True)
    g(x)
    sync(x.device)
    times = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end or len(times) < least:
        t = time.perf_counter()
        g(x)
        sync(x.device)
        times.append(time.perf_counter() - t)
    times.sort()
    return round(1000 * times[len(times) // 2], 3)


def part_fns(cfg, model):
    from mapl_ray.model.anomaly_map import anomaly_maps
    from mapl_ray.tensors import autocast_context

    def enc(x, cache):
        with autocast_context(x.device, cfg.train.amp, cache_enabled=cache):
            return {"f": model.encode(x)[3]}

    def enc_search(x, cache):
        with autocast_context(x.device, cfg.train.amp, cache_enabled=cache):
            levels = model.encode(x)[1:4]
            return {f"di{i}": bank.difference(levels)[0][0] for i, bank in enumerate(model.banks)}

    def banks(n):
        def fn(x, cache):
            return anomaly_maps(model, x, [(0, False)], n, cfg.train.amp, cfg.train.channels_last, cache)

        return fn

    def knn(x, cache):
        with autocast_context(x.device, cfg.train.amp, cache_enabled=cache):
            feats = model.encode(x)
            return {"k": model.patch_bank.distance_maps(feats, x.shape[2:])}

    n = len(model.banks)
    fns = {"encoder": enc, "encoder_memory_search_all_banks": enc_search, "patch_map": knn}
    for k in sorted({1, max(1, n // 2), n}):
        fns[f"decoder_map_{k}_banks"] = banks(k)
    return fns


def share_worker(rank: int, category: str, size: int, batch: int, seconds: float, barrier, results) -> None:
    from mapl_ray.model.graphs import GraphedForward

    cfg, model = build(category, size)
    model = on_device(cfg, model)
    g = GraphedForward(forward_fn(cfg, model, False), torch.device("cuda"), True)
    x = torch.rand(batch, 3, size, size, device="cuda").contiguous(memory_format=torch.channels_last)
    for _ in range(3):
        g(x)
    torch.cuda.synchronize()
    barrier.wait()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        g(x)["scores"].cpu()  # each pass waits for its result, as a serving replica does
        n += 1
    results[rank] = (n * batch, time.perf_counter() - t0)


def sharing(category: str, size: int, setups: list[tuple[int, int]], seconds: float, out: dict, save) -> None:
    """Each ``(processes, batch)`` setup into ``out`` (``save()`` after each: a call's time limit keeps what ran)."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    for procs, batch in setups:
        mgr = ctx.Manager()
        results, barrier = mgr.dict(), ctx.Barrier(procs)
        ps = [
            ctx.Process(target=share_worker, args=(r, category, size, batch, seconds, barrier, results))
            for r in range(procs)
        ]
        for p in ps:
            p.start()
        for p in ps:
            p.join()
        done = dict(results)
        images = sum(v[0] for v in done.values())
        wall = max((v[1] for v in done.values()), default=float("nan"))
        out[f"{procs}x{batch}"] = {
            "processes": procs,
            "batch": batch,
            "images_per_s": round(images / wall, 1) if done else None,
            "finished": len(done),
        }
        print(f"sharing {procs} processes x batch {batch}: {out[f'{procs}x{batch}']['images_per_s']} images/s")
        mgr.shutdown()
        save()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--category", default="screw")
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--batches", default="8,32")
    p.add_argument("--sharing", default="1x32,2x16,4x8,4x32", help="PROCESSESxBATCH list ('' skips)")
    p.add_argument("--share-seconds", type=float, default=6.0)
    p.add_argument("--seconds", type=float, default=2.0, help="timing of each part / variant and batch")
    p.add_argument("--least", type=int, default=5, help="passes timed at least")
    p.add_argument("--out", default=str(HERE / "results" / "forward_cost.json"))
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cudnn.benchmark = False
    size = args.image_size
    cfg, model = build(args.category, size, device=str(device))
    unfolded = on_device(cfg, copy.deepcopy(model), fold=False)
    model = on_device(cfg, model)
    res: dict = {
        "machine": {
            "gpu": torch.cuda.get_device_name(0) if device.type == "cuda" else None,
            "torch_threads": torch.get_num_threads(),
            "cores": os.cpu_count(),
            "python": platform.python_version(),
            "torch": torch.__version__,
        },
        "command": "python bench/forward_cost.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "settings": {
            "category": args.category,
            "image_size": size,
            "memory_banks": len(model.banks),
            "memory_samples": cfg.model.memory_samples,
            "knn_patches": cfg.model.knn_patches,
            "amp": cfg.train.amp,
            "channels_last": cfg.train.channels_last,
            "timing": "median of replays of one captured CUDA graph, synchronised after each",
        },
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:  # after each section: a call cut short by its time limit keeps what it measured
        Path(args.out).write_text(json.dumps(res, indent=1) + "\n")

    batches = [int(b) for b in args.batches.split(",") if b]
    x_of = {
        b: torch.rand(b, 3, size, size, device=device).contiguous(
            memory_format=torch.channels_last if device.type == "cuda" else torch.contiguous_format
        )
        for b in batches
    }
    res["parts_ms"] = {
        name: {str(b): time_graphed(fn, x_of[b], args.seconds, args.least) for b in batches}
        for name, fn in part_fns(cfg, model).items()
    }
    print(json.dumps(res["parts_ms"]))
    save()
    stacked = stacked_copy(model)
    variants = {
        "base": (model, False),
        "batchnorm_unfolded": (unfolded, False),
        "knn_four_pass": (model, True),
        "banks_stacked": (stacked, False),
        "before_2026_12_07": (stacked_copy(unfolded), True),
    }
    res["variants"] = {}
    for b in batches:
        ref = None
        for name, (m, fused) in variants.items():
            fn = forward_fn(cfg, m, fused)
            with torch.no_grad():
                out = forward_fn(cfg, m, fused, parts=True)(x_of[b], True)
            ref = out if ref is None else ref
            ms = time_graphed(fn, x_of[b], args.seconds, args.least)
            res["variants"].setdefault(name, {})[str(b)] = {
                "ms": ms,
                "images_per_s": round(1000 * b / ms, 1),
                **{f"max_{k}_diff_vs_base": float((out[k].float() - ref[k].float()).abs().max()) for k in out},
            }
        print(b, json.dumps({k: v[str(b)] for k, v in res["variants"].items()}))
        save()
    del model, unfolded, stacked, variants
    if device.type == "cuda":
        torch.cuda.empty_cache()
    setups = [tuple(int(v) for v in s.split("x")) for s in args.sharing.split(",") if s]
    if setups and device.type == "cuda":
        res["sharing"] = {}
        sharing(args.category, size, setups, args.share_seconds, res["sharing"], save)
    res["complete"] = True
    save()
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
