"""Benchmark of the checkpoints of a training run (issue 13): where one save's time goes, and what the
in-loop checkpoints cost the training loop (``train_summary``'s ``phases_s.checkpoints``).

Trains ``--steps`` steps on a real category with its preset (screw: 10 memory banks of 30 images, most of
``model.safetensors``), ``train.checkpoint_every`` = ``--checkpoint-every``, without Ray and without the
evaluation, then times the parts of one save of the trained model: the host copy of the state dict, the
``model.safetensors`` write, the optimizer state and ``optimizer.pt``, ``state.json`` and the swap. Merges one
record per ``--label`` and device into ``--out``. With the checkpoint writer, it also times what one in-loop
checkpoint costs the training thread, synchronous save against snapshot + hand-over, interleaved (the
loop's phases of two runs differ as much as the machine's load does). ``--label`` names the code measured: run it with
``PYTHONPATH`` pointing at another checkout to measure that one (``before``), e.g.

    PYTHONPATH=$PWD python bench/checkpoint.py --label after --steps 12 --checkpoint-every 3
    PYTHONPATH=/path/to/older/checkout python bench/checkpoint.py --label before --steps 12 --checkpoint-every 3
    python bench/checkpoint.py --device cuda --steps 500 --checkpoint-every 100 --weights W  # the paper setting

On a GPU the CUDA-graph step and bf16 follow the configuration's defaults.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from mapl_ray.config import Config
from mapl_ray.data.train_data import load_train_data
from mapl_ray.engine.loop import train_model
from mapl_ray.eval.accuracy_report import machine
from mapl_ray.main_job import prepare_run
from mapl_ray.presets import category_preset


def save_parts(model: torch.nn.Module, run: Path, repeats: int = 3) -> dict[str, float]:
    """Median seconds of the parts of one save of ``model`` (with an AdamW state of its trainable weights)."""
    from safetensors.torch import save_file

    from mapl_ray.runfolder import _scalars_to_floats, _swap_in

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    for p in params:
        p.grad = torch.zeros_like(p)
    opt.step()
    parts: dict[str, list[float]] = {}

    def timed(name, fn):
        t = time.perf_counter()
        out = fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        parts.setdefault(name, []).append(time.perf_counter() - t)
        return out

    for step in range(repeats):
        tmp = run / "checkpoint.tmp"
        tmp.mkdir(parents=True)
        sd = timed(
            "state_dict_to_host", lambda: {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        )
        timed("model_safetensors_write", lambda: save_file(sd, str(tmp / "model.safetensors")))
        osd = timed("optimizer_state_dict", opt.state_dict)
        osd["param_groups"] = [_scalars_to_floats(g) for g in osd["param_groups"]]
        timed("optimizer_pt_write", lambda: torch.save({"optimizer": osd}, tmp / "optimizer.pt"))
        timed("state_json_write", lambda: (tmp / "state.json").write_text(json.dumps({"step": step})))
        timed("swap_in", lambda: _swap_in(tmp, run / "checkpoint"))
    mib = {
        "model_safetensors_mib": (run / "checkpoint" / "model.safetensors").stat().st_size / 2**20,
        "memory_bank_mib": sum(v.numel() * v.element_size() for k, v in sd.items() if "memory" in k) / 2**20,
        "optimizer_pt_mib": (run / "checkpoint" / "optimizer.pt").stat().st_size / 2**20,
    }
    return {**{k: float(np.median(v)) for k, v in parts.items()}, **{k: round(v, 2) for k, v in mib.items()}}


def training_thread_costs(cfg: Config, data, run: Path, device: str, repeats: int = 5) -> dict[str, float] | None:
    """Median seconds the training thread spends on one in-loop checkpoint of a fresh :class:`Trainer` (banks
    filled, no steps): a synchronous save (``write_checkpoint`` of ``Trainer.snapshot``) against a snapshot handed to the writer thread
    (``Trainer.snapshot`` + ``CheckpointWriter.submit``; the write itself is waited for outside the timing),
    interleaved in one process so that both see the same load. None for code without the writer."""
    from mapl_ray.engine.loop import Trainer
    from mapl_ray.runfolder import write_checkpoint

    if not hasattr(Trainer, "snapshot"):
        return None
    trainer = Trainer(cfg, data, run, device)
    trainer.refresh_banks(trainer.model)
    sync, beside = [], []
    for step in range(1, repeats + 1):
        t = time.perf_counter()
        write_checkpoint(trainer.run_dir, trainer.snapshot(step))
        sync.append(time.perf_counter() - t)
        t = time.perf_counter()
        trainer.writer.submit(step, trainer.snapshot(step))
        beside.append(time.perf_counter() - t)
        trainer.writer.drain()
    trainer.writer.close()
    return {"synchronous_save": float(np.median(sync)), "snapshot_and_submit": float(np.median(beside))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "mvtec_ad"))
    ap.add_argument("--category", default="screw")
    ap.add_argument("--textures", default=None, help="DTD images (default: DATA/../dtd_subset/images)")
    ap.add_argument("--weights", default=None, help="encoder weights file (default: random init)")
    ap.add_argument("--image-size", type=int, default=None, help="default: the configuration's (256)")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--checkpoint-every", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--label", default="after", help="names the code measured (see the module docstring)")
    ap.add_argument("--out", default="bench/results/checkpoint.json")
    args = ap.parse_args()
    torch.set_num_threads(min(torch.get_num_threads(), 2)) if args.device == "cpu" else None
    textures = args.textures or str(Path(args.data).parent / "dtd_subset" / "images")
    overrides = {
        **category_preset(args.category),
        "data.root": args.data,
        "data.category": args.category,
        "simulation.texture_dir": textures,
        "train.steps": args.steps,
        "train.checkpoint_every": args.checkpoint_every,
        "train.use_gpu": args.device != "cpu",
        **({"data.image_size": args.image_size} if args.image_size else {}),
        **({"model.weights": str(Path(args.weights).resolve())} if args.weights else {"model.pretrained": False}),
    }
    cfg = Config().override(overrides)
    run = Path(tempfile.mkdtemp(prefix="bench-ckpt-"))
    try:
        data, _, _ = load_train_data(cfg, prepare_run(cfg, run / "run"))
        t = time.perf_counter()
        model, summary = train_model(cfg, data, run / "run", device=args.device, progress=False)
        wall = time.perf_counter() - t
        in_loop = len(range(args.checkpoint_every, args.steps, args.checkpoint_every))
        phases = summary["phases_s"]
        record = {
            "label": args.label,
            "device": args.device,
            "machine": machine(),
            "command": " ".join([sys.executable, *sys.argv]),
            "settings": overrides,
            "in_loop_checkpoints": in_loop,
            "phases_s": phases,
            "checkpoint_s_per_in_loop_save": phases["checkpoints"] / max(in_loop, 1),
            "train_wall_s": summary["train_wall_s"],
            "loop_wall_s": summary["loop_wall_s"],
            "train_model_s": wall,
            "save_parts_s": save_parts(model, run / "parts"),
            "training_thread_s": training_thread_costs(cfg, data, run / "ab", args.device),
        }
    finally:
        shutil.rmtree(run, ignore_errors=True)
    out = Path(args.out)
    records = json.loads(out.read_text()) if out.is_file() else []
    records = [r for r in records if (r["label"], r["device"]) != (args.label, args.device)] + [record]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(records, indent=2))
    keys = ("label", "phases_s", "checkpoint_s_per_in_loop_save", "training_thread_s", "save_parts_s")
    print(json.dumps({k: record[k] for k in keys}))


if __name__ == "__main__":
    main()
