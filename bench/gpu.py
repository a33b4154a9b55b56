"""GPU benchmark (issue 3): memory-bank step, training and inference throughput, full paper run.

One call on the GPU machine measures, side by side:
  * the memory-bank step (nearest memory sample + DI* for a batch of 64) against N = 30, 300, 3000
    memory samples: (a) a naive per-sample Python loop (MemSeg's reference style), (b) the batched
    torch path, (c) FAISS CPU, (d) FAISS GPU when FAISS has GPUs;
  * training images/s (forward + backward + AdamW step of the model; inputs already on the GPU) at
    batch 8, 32, 64 in fp32 and bf16, and the end-to-end step with CPU-side anomaly simulation;
  * a full paper-setting training run (500 steps, pseudo-labeler included) on a category in fp32
    and bf16 with the test image AUROC of each (anomaly simulation in loader processes);
  * inference images/s at batch 1, 32, 256 (fp32 and bf16, eager and CUDA graphs) through the
    run's ``Predictor``, and single-image latency;
  * the memory-bank ensemble (the category's preset, screw: 10 banks): a full run and inference
    images/s with 1, 5 and 10 banks;
  * peak GPU memory of each configuration.
Writes ``--out`` (default ``bench/results/gpu.json``).

    python bench/gpu.py --data ROOT --category screw --textures DIR [--weights FILE]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch

from mapl_ray.config import Config
from mapl_ray.model import build_model
from mapl_ray.model.losses import compute_losses
from mapl_ray.model.memory import MemoryBank, faiss_available


def cuda_time(fn, warmup: int = 3, iters: int = 10) -> float:
    """Median seconds of ``fn()`` with CUDA events (host clock + synchronize on CPU)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        if torch.cuda.is_available():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1000)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return float(np.median(times))


def peak_mb(fn) -> float:
    if not torch.cuda.is_available():
        return float("nan")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / 2**20


def naive_memory_step(feats: list[torch.Tensor], bank: list[torch.Tensor]) -> list[torch.Tensor]:
    """MemSeg-style reference: Python loops over batch and memory samples, then DI per level."""
    b, n = feats[0].shape[0], bank[0].shape[0]
    scores = torch.zeros(b, n, device=feats[0].device)
    for i in range(b):
        for j in range(n):
            scores[i, j] = sum(torch.mean((f[i] - m[j]) ** 2) for f, m in zip(feats, bank))
    idx = scores.argmin(1)
    return [torch.cat([f, (f - m[idx]) ** 2], 1) for f, m in zip(feats, bank)]


def bench_memory(device: torch.device, shapes, batch: int = 64) -> dict:
    out: dict = {"ms": {}, "batch": batch, "level_shapes": [list(s) for s in shapes]}
    has_faiss, n_gpu = faiss_available()
    g = torch.Generator(device=device).manual_seed(0)
    feats = [torch.randn(batch, *s, device=device, generator=g) for s in shapes]
    for n in (30, 300, 3000):
        bank = [torch.randn(n, *s, device=device, generator=g) for s in shapes]
        row = {}
        if n <= 300:  # the loop at N=3000 would take minutes
            row["naive_loop"] = 1000 * cuda_time(
                lambda: naive_memory_step(feats, bank), warmup=1, iters=2 if n > 30 else 3
            )
        for backend, ok in (("torch", True), ("faiss", has_faiss)):
            if not ok:
                continue
            mb = MemoryBank(backend).to(device)
            mb.set(bank)

            def step(mb=mb):
                di, idx = mb.difference(feats, exclude_self=False)
                return [torch.cat([f, d], 1) for f, d in zip(feats, di)]

            name = {
                "torch": "batched_torch",
                "faiss": "faiss_gpu" if (device.type == "cuda" and n_gpu) else "faiss_cpu",
            }[backend]
            row[name] = 1000 * cuda_time(step)
            if backend == "torch":
                ref = naive_memory_step(feats, bank) if n <= 30 else None
                if ref is not None:  # same answer as the loop
                    got = step()
                    row["batched_matches_naive"] = bool(all(torch.allclose(a, b, atol=1e-4) for a, b in zip(ref, got)))
        out["ms"][str(n)] = row
    out["speedup_vs_naive"] = {
        n: round(r["naive_loop"] / r["batched_torch"], 1) for n, r in out["ms"].items() if "naive_loop" in r
    }
    return out


def bench_train(cfg: Config, device: torch.device) -> dict:
    res = {}
    for amp in ("off", "bf16"):
        for batch in (8, 32, 64):
            c = cfg.override({"train.amp": amp})
            model = build_model(c).to(device).to(memory_format=torch.channels_last)
            model.refresh_memory(torch.rand(30, 3, 256, 256, device=device))
            model.train()
            opt = torch.optim.AdamW(
                [p for p in model.parameters() if p.requires_grad], lr=1e-3, fused=device.type == "cuda"
            )
            x = torch.rand(batch, 3, 256, 256, device=device).contiguous(memory_format=torch.channels_last)
            masks = (torch.rand(batch, 1, 256, 256, device=device) > 0.97).float()
            masks[: batch // 2] = 0
            kind = torch.tensor([0] * (batch // 2) + [1] * (batch - batch // 2), device=device)
            label = torch.where(kind == 0, 0, 1)
            pseudo = torch.full_like(label, -1)

            def step(model=model, opt=opt, x=x, c=c, amp=amp):  # bound now: the loop deletes them after timing
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp == "bf16"):
                    out = model(x)
                loss = compute_losses(out, masks, kind, label, pseudo, c, has_pool=False)["loss"]
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()

            t = cuda_time(step, warmup=5, iters=20)
            res[f"{'fp32' if amp == 'off' else 'bf16'}_b{batch}"] = {
                "images_per_s": round(batch / t, 1),
                "step_ms": round(1000 * t, 2),
                "peak_gpu_mem_mb": round(peak_mb(step), 1),
            }
            del model, opt
            torch.cuda.empty_cache() if device.type == "cuda" else None
    return res


def bench_infer(run_dir: Path, device: torch.device) -> dict:
    """Inference through :class:`mapl_ray.inference.Predictor` (the path of ``mapl evaluate`` / ``predict``
    / serve) on a trained run: eager vs CUDA graphs, fp32 vs bf16, batch 1 / 32 / 256; image on the GPU."""
    from mapl_ray.inference import Predictor

    res = {}
    # the raw model (tta none) in every mode, then the default scoring (8-view test-time augmentation)
    modes = [(amp, graphs, "none") for amp in ("off", "bf16") for graphs in (False, True)]
    modes += [("bf16", False, "rot90"), ("bf16", True, "rot90")]
    for amp, graphs, tta in modes:
        pred = Predictor(run_dir, device=device, cuda_graphs=graphs, amp=amp, tta=tta)
        for batch in (1, 32, 256):
            x = torch.rand(batch, 3, 256, 256, device=device)
            name = f"{'fp32' if amp == 'off' else 'bf16'}_{'graph' if graphs else 'eager'}_b{batch}" + (
                "_tta8" if tta == "rot90" else ""
            )

            def step(pred=pred, x=x):
                return pred.predict_tensor(x)["scores"]

            try:
                t = cuda_time(step, warmup=5, iters=20)
                res[name] = {
                    "images_per_s": round(batch / t, 1),
                    "ms_per_batch": round(1000 * t, 3),
                    "peak_gpu_mem_mb": round(peak_mb(step), 1),
                    "cuda_graphs": pred.cuda_graphs,
                }
            except Exception as e:  # noqa: BLE001 - recorded in the results, the other configurations still run
                res[name] = {"error": f"{type(e).__name__}: {e}"}
            print(name, res[name], flush=True)
        del pred
        torch.cuda.empty_cache() if device.type == "cuda" else None
    return res


def bench_infer_banks(run_dir: Path, device: torch.device) -> dict:
    """Inference cost of the memory-bank ensemble: the run's ``Predictor`` (bf16, CUDA graphs, its own
    test-time augmentation) with its first 1, 5 and all banks, batch 1 / 32 / 256."""
    from mapl_ray.inference import Predictor

    res = {}
    n = len(Predictor(run_dir, device="cpu").model.banks)
    for k in sorted({1, min(5, n), n}):
        pred = Predictor(run_dir, device=device, amp="bf16", memory_banks=k)
        for batch in (1, 32, 256):
            x = torch.rand(batch, 3, 256, 256, device=device)

            def step(pred=pred, x=x):
                return pred.predict_tensor(x)["scores"]

            t = cuda_time(step, warmup=5, iters=20)
            res[f"banks{k}_b{batch}"] = {
                "images_per_s": round(batch / t, 1),
                "ms_per_batch": round(1000 * t, 3),
                "peak_gpu_mem_mb": round(peak_mb(step), 1),
                "cuda_graphs": pred.cuda_graphs,
            }
            print(f"banks{k}_b{batch}", res[f"banks{k}_b{batch}"], flush=True)
        del pred
        torch.cuda.empty_cache() if device.type == "cuda" else None
    return res


def full_run(cfg: Config, device: str, out_dir: Path, amp: str, seed: int = 0, tag: str = "") -> dict:
    from mapl_ray.data.train_data import load_train_data
    from mapl_ray.engine.loop import train_model
    from mapl_ray.eval.evaluate import calibrate, evaluate_run
    from mapl_ray.main_job import absolute_paths, prepare_run

    c = absolute_paths(cfg.override({"train.amp": amp, "train.seed": seed}))
    run = out_dir / (f"full_{amp}" + (f"_s{seed}" if seed else "") + tag)
    split = prepare_run(c, run)
    data, val, _ = load_train_data(c, split)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    _, summary = train_model(c, data, run, device=device, progress=False)
    if device == "cuda":
        torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else float("nan")
    calibrate(run, val, device=device)
    t1 = time.perf_counter()
    m = evaluate_run(run, device=device)["overall"]
    return {
        "train_wall_s": round(wall, 2),
        "loop_wall_s": round(summary["loop_wall_s"], 2),
        "images_per_s": round(summary["images_per_s"], 1),
        "step_s_median": summary["step_s_median"],
        "loader_workers": summary["loader_workers"],
        "loader_wait_s": round(summary["loader_wait_s"], 2),
        "first_batch_s": round(summary["first_batch_s"], 2),
        "pseudo_fit_s": round(summary["pseudo_fit_s"], 2),
        "cuda_graph_step": summary["cuda_graph_step"],
        "graph_captures": summary["graph_captures"],
        "eager_steps": summary["eager_steps"],
        "evaluate_s": round(time.perf_counter() - t1, 2),
        "image_auroc": m["image_auroc"],
        "pixel_auroc": m["pixel_auroc"],
        "aupro": m["aupro"],
        "seed": seed,
        "train_augment": c.train.augment,
        "eval_tta": c.eval.tta,
        "memory_backend": summary["memory_backend"],
        "peak_gpu_mem_mb": round(peak, 1),
        "run_dir": str(run),
    }


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--data", required=True)
    p.add_argument("--category", default="screw")
    p.add_argument("--textures")
    p.add_argument("--weights")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "gpu.json"))
    p.add_argument("--runs", default="/tmp/mapl_gpu_runs")
    p.add_argument("--skip", default="", help="comma list of parts to skip: memory,train,infer,full,banks")
    p.add_argument("--seeds", default="0", help="training seeds of the full bf16 / fp32 runs (comma list)")
    p.add_argument(
        "--eager",
        action="store_true",
        help="also run the first seed's full bf16 run with train.cuda_graphs=false (side by side)",
    )
    p.add_argument("--set", default="", help="comma list of config overrides key=value for every run")
    args = p.parse_args()
    skip = set(args.skip.split(","))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cudnn.benchmark = True
    over = {"data.root": args.data, "data.category": args.category, "simulation.texture_dir": args.textures}
    if args.weights:
        over["model.weights"] = args.weights
    over.update(dict(kv.split("=", 1) for kv in args.set.split(",") if kv))
    cfg = Config().override({k: v for k, v in over.items() if v})
    out = Path(args.out)
    # merge: a call that skips parts keeps the earlier results of those parts
    result = json.loads(out.read_text()) if out.is_file() else {}
    result.update(
        {
            "machine": {
                "gpu": torch.cuda.get_device_name(0) if device.type == "cuda" else "none",
                "torch": torch.__version__,
                "python": platform.python_version(),
                "host": platform.node(),
            },
            "settings": "256x256, encoder tf_efficientnet_lite2 (frozen), channels_last; CUDA events, median of 20",
            "command": "python bench/gpu.py " + " ".join(f"--{k} {v}" for k, v in vars(args).items() if v),
        }
    )

    def save():
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2))

    if "memory" not in skip:
        model = build_model(cfg)
        shapes = [tuple(f.shape[1:]) for f in model.encoder(torch.rand(1, 3, 256, 256))[1:4]]
        mem = bench_memory(device, shapes)
        result["memory_step_ms"] = mem["ms"]
        result["memory_speedup_vs_naive"] = mem["speedup_vs_naive"]
        save()
        print("memory", json.dumps(mem["ms"]), flush=True)
    if "train" not in skip:
        result["train"] = bench_train(cfg, device)
        result["train_images_per_s"] = {k: v["images_per_s"] for k, v in result["train"].items()}
        save()
        print("train", json.dumps(result["train_images_per_s"]), flush=True)
    runs = Path(args.runs)
    if "full" not in skip and args.data:
        # train_wall_s: the whole train_model call (model build, memory bank, 500 steps, pseudo-labeler
        # refits, final checkpoint); loop_wall_s: the 500 steps alone
        seeds = [int(x) for x in args.seeds.split(",")]
        full_run(
            cfg.override({"train.steps": 20}), device.type, runs / "warmup", "bf16"
        )  # CUDA / cuDNN first use, untimed
        by_seed = {(amp, sd): full_run(cfg, device.type, runs, amp, sd) for sd in seeds for amp in ("bf16", "off")}
        result["full_run"] = {amp: by_seed[(amp, seeds[0])] for amp in ("bf16", "off")}
        result["full_run_s"] = result["full_run"]["bf16"]["train_wall_s"]
        result["auroc_bf16"] = result["full_run"]["bf16"]["image_auroc"]
        result["auroc_fp32"] = result["full_run"]["off"]["image_auroc"]
        # one pair of runs differs by the seed-to-seed spread; the same seeds in both dtypes show the dtype's own effect
        diffs = [by_seed[("bf16", sd)]["image_auroc"] - by_seed[("off", sd)]["image_auroc"] for sd in seeds]
        result["full_run_seeds"] = {
            "seeds": seeds,
            "auroc_bf16": [by_seed[("bf16", sd)]["image_auroc"] for sd in seeds],
            "auroc_fp32": [by_seed[("off", sd)]["image_auroc"] for sd in seeds],
            "train_wall_s_bf16": [by_seed[("bf16", sd)]["train_wall_s"] for sd in seeds],
            "paired_diff_bf16_minus_fp32": diffs,
            "mean_diff": sum(diffs) / len(diffs),
            "mean_abs_diff": sum(abs(d) for d in diffs) / len(diffs),
            "mean_bf16": float(np.mean([by_seed[("bf16", sd)]["image_auroc"] for sd in seeds])),
            "mean_fp32": float(np.mean([by_seed[("off", sd)]["image_auroc"] for sd in seeds])),
        }
        if args.eager:
            result["full_run_eager"] = full_run(
                cfg.override({"train.cuda_graphs": False}), device.type, runs, "bf16", seeds[0], tag="_eager"
            )
        save()
        print("full", json.dumps(result["full_run"]), flush=True)
    if "infer" not in skip and args.data:
        if not (runs / "full_bf16" / "checkpoint").is_dir():
            full_run(cfg, device.type, runs, "bf16")
        result["infer"] = bench_infer(runs / "full_bf16", device)
        result["infer_images_per_s"] = {k: v["images_per_s"] for k, v in result["infer"].items() if "images_per_s" in v}
        save()
        print("infer", json.dumps(result["infer_images_per_s"]), flush=True)
    if "banks" not in skip and args.data:
        # the screw preset (pose normalisation, one view, 10 memory banks): training and inference cost
        from mapl_ray.presets import category_preset

        c = cfg.override(category_preset(args.category) or {"model.memory_banks": 10})
        result["memory_bank_ensemble"] = {
            "preset": category_preset(args.category),
            "command": result["command"],
            "full_run": full_run(c, device.type, runs, "bf16", tag="_banks"),
            "infer": bench_infer_banks(runs / "full_bf16_banks", device),
        }
        save()
    result["peak_gpu_mem_mb"] = {
        **{f"train_{k}": v["peak_gpu_mem_mb"] for k, v in result.get("train", {}).items()},
        **{f"infer_{k}": v["peak_gpu_mem_mb"] for k, v in result.get("infer", {}).items() if "peak_gpu_mem_mb" in v},
        **{f"full_run_{k}": v["peak_gpu_mem_mb"] for k, v in result.get("full_run", {}).items()},
    }
    result.setdefault("ddp_scaling_2gpu", None)  # bench/ddp.py (Ray Train, two GPUs) fills it in
    save()


if __name__ == "__main__":
    main()
