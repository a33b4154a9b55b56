"""Semi-supervised train/test splits for MAPL experiments.

MAPL (arXiv 2405.06198) trains on a few labeled normals, an unlabeled pool (normal + a small
share of real anomalies, pseudo-labeled during training) and optionally k labeled anomalies
per defect type. :func:`make_split` builds such a split from an MVTec-layout
:class:`~mapl_ray.data.layout.CategoryIndex`, seeded and reproducible, and guarantees that no
image used for training (in any role) is also a test image.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .layout import (
    LABEL_ANOMALOUS,
    LABEL_NORMAL,
    LABEL_UNKNOWN,
    CategoryIndex,
    ImageRecord,
)

__all__ = ["Split", "make_split"]

_LISTS = ("labeled_normal", "unlabeled", "labeled_anomaly", "test", "validation")
_TRUE_KEYS = ("unlabeled_true_labels", "unlabeled_true_defect_types", "unlabeled_true_mask_paths")


def _key(path: str) -> str:
    """Comparison key for "same file": absolute, normalised, case-folded where the OS is."""
    return os.path.normcase(os.path.normpath(os.path.abspath(path)))


@dataclass
class Split:
    """One semi-supervised split.

    Attributes:
        labeled_normal: normal training images (label 0).
        unlabeled: unlabeled pool, every record stored with ``label=-1`` and
            ``defect_type="unknown"`` (no mask) so training code cannot see the truth.
        labeled_anomaly: labeled anomalous training images (label 1, mask kept).
        test: evaluation images (all ``test/good`` plus the anomalies not moved out).
        validation: the split's own validation images (benchmarking, ``validation_normals`` /
            ``validation_anomalies`` of :func:`make_split`): train/good images (label 0) and test
            anomalies (label 1, mask kept) that neither train nor test; empty when validation is held out of
            the labeled training data instead (:mod:`mapl_ray.data.train_data`).
        seed: the seed passed to :func:`make_split`.
        params: arguments of :func:`make_split` plus, for benchmarking only, the hidden truth of
            the pool, aligned with ``unlabeled``: ``unlabeled_true_labels`` (0/1, or -1 for
            user images), ``unlabeled_true_defect_types``, ``unlabeled_true_mask_paths``.
    """

    labeled_normal: list[ImageRecord]
    unlabeled: list[ImageRecord]
    labeled_anomaly: list[ImageRecord]
    test: list[ImageRecord]
    seed: int
    params: dict[str, Any] = field(default_factory=dict)
    validation: list[ImageRecord] = field(default_factory=list)

    # -- checks -------------------------------------------------------------------------------
    def validate(self) -> None:
        """Check the split's invariants.

        Raises:
            ValueError: a list holds a non-record; a label does not fit its list (labeled_normal
                0, labeled_anomaly 1, unlabeled -1); a path appears twice in the training sets
                or in both a training set and ``test``; a ``params["unlabeled_true_*"]`` list is
                not aligned with ``unlabeled``.
        """
        expected = {"labeled_normal": LABEL_NORMAL, "labeled_anomaly": LABEL_ANOMALOUS, "unlabeled": LABEL_UNKNOWN}
        for name in _LISTS:
            for i, r in enumerate(getattr(self, name)):
                if not isinstance(r, ImageRecord):
                    raise ValueError(f"Split.{name}[{i}] is a {type(r).__name__}, expected ImageRecord")
                if name == "validation" and r.label not in (LABEL_NORMAL, LABEL_ANOMALOUS):
                    raise ValueError(f"Split.validation[{i}] ({r.path!r}) has label {r.label}, expected 0 or 1")
                if name in expected and r.label != expected[name]:
                    raise ValueError(f"Split.{name}[{i}] ({r.path!r}) has label {r.label}, expected {expected[name]}")
        seen: dict[str, str] = {}
        for name in ("labeled_normal", "unlabeled", "labeled_anomaly", "validation"):
            for r in getattr(self, name):
                k = _key(r.path)
                if k in seen:
                    raise ValueError(f"{r.path!r} appears in both Split.{seen[k]} and Split.{name}")
                seen[k] = name
        clash = _first_clash(self.test, seen)
        if clash and clash[1]:
            raise ValueError(f"{clash[0].path!r} is in Split.{clash[1]} and in Split.test (train/test leak)")
        if clash:
            raise ValueError(f"{clash[0].path!r} appears twice in Split.test")
        for key in _TRUE_KEYS:
            if key in self.params and len(self.params[key]) != len(self.unlabeled):
                raise ValueError(
                    f"Split.params[{key!r}] has {len(self.params[key])} entries but "
                    f"Split.unlabeled has {len(self.unlabeled)}"
                )

    def summary(self) -> dict[str, int]:
        """Counts: ``labeled_normal``, ``unlabeled``, ``labeled_anomaly``, ``test``,
        ``test_good``, ``test_anomalous`` and, from the hidden truth, ``unlabeled_normal``,
        ``unlabeled_anomalous``, ``unlabeled_unknown`` (all pool images are "unknown" when
        ``params`` carries no truth)."""
        truth = self.params.get("unlabeled_true_labels")
        truth = list(truth) if truth is not None else [LABEL_UNKNOWN] * len(self.unlabeled)
        return {
            "labeled_normal": len(self.labeled_normal),
            "unlabeled": len(self.unlabeled),
            "labeled_anomaly": len(self.labeled_anomaly),
            "test": len(self.test),
            "validation": len(self.validation),
            "test_good": sum(r.label == LABEL_NORMAL for r in self.test),
            "test_anomalous": sum(r.label == LABEL_ANOMALOUS for r in self.test),
            "unlabeled_normal": truth.count(LABEL_NORMAL),
            "unlabeled_anomalous": truth.count(LABEL_ANOMALOUS),
            "unlabeled_unknown": truth.count(LABEL_UNKNOWN),
        }

    # -- persistence --------------------------------------------------------------------------
    def to_json(self, path: str | os.PathLike[str]) -> None:
        """Write the split as JSON (record dicts per list, ``seed``, ``params``, ``counts``).

        The file is written to a temporary name and renamed, so concurrent readers (e.g. Ray
        workers) never see a half-written file. Parent folders are created.
        """
        path = os.fspath(path)
        doc = {name: [r.to_dict() for r in getattr(self, name)] for name in _LISTS}
        doc.update(seed=self.seed, params=self.params, counts=self.summary())
        folder = os.path.dirname(os.path.abspath(path))
        os.makedirs(folder, exist_ok=True)
        # open(), not mkstemp: the file gets the umask's mode like the run's other files (mkstemp's is 0600)
        tmp = os.path.join(folder, f".split-{os.getpid()}-{threading.get_ident()}.json")
        try:
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump(doc, f, indent=1)
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise

    @classmethod
    def from_json(cls, path: str | os.PathLike[str]) -> Split:
        """Read a file written by :meth:`to_json` and validate it.

        Raises:
            FileNotFoundError: ``path`` does not exist.
            ValueError: invalid JSON, a missing field, a bad record, ``counts`` that do not
                match the lists, or a broken invariant (see :meth:`validate`); the message
                names the file.
        """
        path = os.fspath(path)
        with open(path, encoding="utf-8") as f:
            try:
                doc = json.load(f)
            except json.JSONDecodeError as exc:
                raise ValueError(f"split file {path!r} is not valid JSON: {exc}") from exc
        if not isinstance(doc, dict):
            raise ValueError(f"split file {path!r}: expected a JSON object at top level")
        if "validation" not in doc:  # written before a split held its own validation set
            doc["validation"] = []
            if isinstance(doc.get("counts"), dict):
                doc["counts"] = {**doc["counts"], "validation": 0}
        missing = [k for k in (*_LISTS, "seed", "params") if k not in doc]
        if missing:
            raise ValueError(f"split file {path!r} is missing field(s) {missing}")
        lists: dict[str, list[ImageRecord]] = {}
        for name in _LISTS:
            if not isinstance(doc[name], list):
                raise ValueError(f"split file {path!r}: field {name!r} must be a list")
            try:
                lists[name] = [ImageRecord.from_dict(d) for d in doc[name]]
            except ValueError as exc:
                raise ValueError(f"split file {path!r}, field {name!r}: {exc}") from exc
        if not isinstance(doc["params"], dict):
            raise ValueError(f"split file {path!r}: field 'params' must be an object")
        split = cls(**lists, seed=doc["seed"], params=doc["params"])
        try:
            split.validate()
        except ValueError as exc:
            raise ValueError(f"split file {path!r}: {exc}") from exc
        counts = doc.get("counts")
        if counts is not None and counts != split.summary():
            raise ValueError(f"split file {path!r}: stored counts {counts} do not match its lists {split.summary()}")
        return split


def _first_clash(records: Sequence[ImageRecord], placed: dict[str, str]) -> tuple[ImageRecord, str | None] | None:
    """The first record whose file is already in ``placed`` (``(record, where)``) or repeats an earlier
    record (``(record, None)``); None when the records are new and distinct."""
    keys: set[str] = set()
    for r in records:
        k = _key(r.path)
        if k in placed:
            return r, placed[k]
        if k in keys:
            return r, None
        keys.add(k)
    return None


def _check_fraction(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating)):
        raise ValueError(f"{name} must be a float in [0, 1), got {value!r}")
    v = float(value)
    if not 0.0 <= v < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {value!r}")
    return v


def _hide(r: ImageRecord) -> ImageRecord:
    return ImageRecord(path=r.path, label=LABEL_UNKNOWN, defect_type="unknown", mask_path=None)


def make_split(
    index: CategoryIndex,
    seed: int,
    unlabeled: Sequence[ImageRecord] | None = None,
    unlabeled_fraction: float = 0.0,
    contamination: float = 0.0,
    labeled_anomalies: int = 0,
    labeled_normals: int | None = None,
    pool_anomaly_share: float = 0.0,
    validation_normals: int = 0,
    validation_anomalies: int = 0,
) -> Split:
    """Build a reproducible semi-supervised split from a category index.

    Steps, in this order (each drawing from one ``numpy.random.default_rng(seed)``):

    0. With ``validation_normals`` / ``validation_anomalies``: that many random train/good images and
       test anomalies of each defect type become the split's ``validation`` set, drawn by their own
       generator from ``seed`` alone, so every split of a category with one seed (whatever its other
       arguments) validates on the same files; they take no part in the steps below.
    1. ``round(unlabeled_fraction * len(train_good))`` random train/good images (or all but
       ``labeled_normals`` of them, when given) move to the unlabeled pool; the rest are ``labeled_normal``.
    2. For every defect type, ``labeled_anomalies`` random test images of that type move to
       ``labeled_anomaly`` (label 1, mask kept).
    3. ``round(contamination * n_test_anomalies)`` (count taken before step 2) random remaining
       test anomalies move to the unlabeled pool (MAPL's contaminated unlabeled data); with
       ``pool_anomaly_share`` instead, as many as make that share of the pool (before user images).
    4. User ``unlabeled`` records are appended, and the pool is shuffled so its order does not
       reveal which images were normal. Pool records are stored hidden (label -1,
       ``"unknown"``); the truth goes to ``params["unlabeled_true_*"]`` for benchmarking.

    ``test`` keeps every ``test/good`` image and the anomalies not moved, sorted by path.

    Args:
        index: from :func:`~mapl_ray.data.layout.scan_category`.
        seed: int seed; the same arguments and seed give the same split.
        unlabeled: extra unlabeled images (e.g. :func:`~mapl_ray.data.layout.scan_folder`).
        unlabeled_fraction: share of train/good hidden in the pool, in [0, 1).
        contamination: share of test anomalies moved to the pool, in [0, 1).
        labeled_anomalies: k >= 0 labeled anomalies per defect type.
        labeled_normals: keep this many train/good images labeled (overrides ``unlabeled_fraction``).
        pool_anomaly_share: share of anomalies in the pool, in [0, 1) (overrides ``contamination``).
        validation_normals: train/good images set aside as validation normals (step 0), >= 0.
        validation_anomalies: test anomalies per defect type set aside for validation (step 0), >= 0.

    Returns:
        A validated :class:`Split`.

    Raises:
        ValueError: a fraction outside [0, 1); ``labeled_anomalies`` negative or not an int; a
            defect type with <= k test images (one must stay in test); contamination that would
            leave no anomaly in test or is > 0 without test anomalies; ``unlabeled_fraction``
            leaving no labeled normal; a user ``unlabeled`` image that is duplicated or is
            already a train/good or test image; a non-int ``seed``.
    """
    uf, cf, k, user = _check_split_args(seed, unlabeled_fraction, contamination, labeled_anomalies, unlabeled)
    train = list(index.train_good)
    anomalies = [r for r in index.test if r.label == LABEL_ANOMALOUS]
    validation, train, anomalies = _take_validation(
        index, train, anomalies, validation_normals, validation_anomalies, seed
    )
    rng = np.random.default_rng(int(seed))
    if labeled_normals is not None:
        if not 0 <= int(labeled_normals) <= len(train):
            raise ValueError(f"labeled_normals={labeled_normals}: the category has {len(train)} train/good images")
        uf = (len(train) - int(labeled_normals)) / len(train) if train else 0.0
    test_good = [r for r in index.test if r.label != LABEL_ANOMALOUS]
    labeled_normal, pool = _hide_train_good(train, uf, rng, allow_none=labeled_normals is not None or bool(user))
    labeled_anomaly, taken = _take_labeled_anomalies(index, anomalies, k, rng)
    share = _check_fraction("pool_anomaly_share", pool_anomaly_share)
    if share > 0 and anomalies:
        cf = round(share / (1 - share) * len(pool)) / len(anomalies)
    test_anomalies = _contaminate(index, anomalies, taken, cf, k, pool, rng)
    _check_user_unlabeled(user, list(index.train_good), index.test)
    pool.extend(user)
    order = rng.permutation(len(pool))
    pool = [pool[i] for i in order.tolist()]

    params: dict[str, Any] = {
        "root": index.root,
        "category": index.category,
        "unlabeled_fraction": uf,
        "contamination": cf,
        "labeled_normals": labeled_normals,
        "pool_anomaly_share": pool_anomaly_share,
        "labeled_anomalies": k,
        "validation_normals": int(validation_normals),
        "validation_anomalies": int(validation_anomalies),
        "n_user_unlabeled": len(user),
        "unlabeled_true_labels": [r.label for r in pool],
        "unlabeled_true_defect_types": [r.defect_type for r in pool],
        "unlabeled_true_mask_paths": [r.mask_path for r in pool],
    }
    split = Split(
        labeled_normal=labeled_normal,
        unlabeled=[_hide(r) for r in pool],
        labeled_anomaly=labeled_anomaly,
        test=sorted(test_good + test_anomalies, key=lambda r: r.path),
        seed=int(seed),
        params=params,
        validation=validation,
    )
    split.validate()
    return split


def _take_validation(
    index: CategoryIndex, train: list[ImageRecord], anomalies: list[ImageRecord], n_normals: int, k: int, seed: int
) -> tuple[list[ImageRecord], list[ImageRecord], list[ImageRecord]]:
    """Step 0 of :func:`make_split`: ``(validation records, train/good left, test anomalies left)``."""
    for name, v in (("validation_normals", n_normals), ("validation_anomalies", k)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0:
            raise ValueError(f"{name} must be an int >= 0, got {v!r}")
    if not n_normals and not k:
        return [], train, anomalies
    rng = np.random.default_rng([int(seed), 53])
    if n_normals >= len(train):
        raise ValueError(
            f"validation_normals={n_normals} but the category has {len(train)} train/good images; "
            "at least one must remain"
        )
    rows = set(rng.choice(len(train), size=n_normals, replace=False).tolist()) if n_normals else set()
    picked = [r for i, r in enumerate(train) if i in rows]
    taken: set[int] = set()
    for dtype in index.defect_types if k else ():
        idx = [i for i, r in enumerate(anomalies) if r.defect_type == dtype]
        if len(idx) <= k:
            raise ValueError(
                f"validation_anomalies={k} but defect type {dtype!r} has only {len(idx)} test image(s), and at "
                f"least one must stay in the test split: use at most {len(idx) - 1}"
            )
        taken.update(idx[j] for j in rng.choice(len(idx), size=k, replace=False).tolist())
    picked += [anomalies[i] for i in sorted(taken)]
    return (
        picked,
        [r for i, r in enumerate(train) if i not in rows],
        [r for i, r in enumerate(anomalies) if i not in taken],
    )


def _check_split_args(seed, unlabeled_fraction, contamination, labeled_anomalies, unlabeled):
    """Validated ``(unlabeled_fraction, contamination, labeled_anomalies, user records)`` of :func:`make_split`."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise ValueError(f"seed must be an int, got {seed!r}")
    uf = _check_fraction("unlabeled_fraction", unlabeled_fraction)
    cf = _check_fraction("contamination", contamination)
    if isinstance(labeled_anomalies, bool) or not isinstance(labeled_anomalies, (int, np.integer)):
        raise ValueError(f"labeled_anomalies must be an int >= 0, got {labeled_anomalies!r}")
    k = int(labeled_anomalies)
    if k < 0:
        raise ValueError(f"labeled_anomalies must be >= 0, got {k}")
    user = list(unlabeled) if unlabeled is not None else []
    for i, r in enumerate(user):
        if not isinstance(r, ImageRecord):
            raise ValueError(f"unlabeled[{i}] is a {type(r).__name__}, expected ImageRecord")
    return uf, cf, k, user


def _hide_train_good(train: list[ImageRecord], uf: float, rng: np.random.Generator, allow_none: bool = False):
    """Step 1: ``(labeled normals, pool)`` after moving ``round(uf * len(train))`` train/good images to the
    pool; all of them only when ``allow_none`` (training from the pool alone)."""
    n_move = int(round(uf * len(train)))
    if n_move >= len(train) and not (allow_none and n_move == len(train)):  # all moved, or none there
        raise ValueError(
            f"unlabeled_fraction={uf} moves {n_move} of {len(train)} train/good images to the pool, "
            f"leaving no labeled normal image"
        )
    moved_idx = set(rng.choice(len(train), size=n_move, replace=False).tolist()) if n_move else set()
    return ([r for i, r in enumerate(train) if i not in moved_idx], [r for i, r in enumerate(train) if i in moved_idx])


def _take_labeled_anomalies(index: CategoryIndex, anomalies: list[ImageRecord], k: int, rng: np.random.Generator):
    """Step 2: ``(labeled anomalies, their rows in anomalies)``, ``k`` per defect type."""
    labeled_anomaly: list[ImageRecord] = []
    taken: set[int] = set()
    if not k:
        return labeled_anomaly, taken
    for dtype in index.defect_types:
        idx = [i for i, r in enumerate(anomalies) if r.defect_type == dtype]
        if len(idx) <= k:
            raise ValueError(
                f"labeled_anomalies={k} but defect type {dtype!r} has only {len(idx)} test "
                f"image(s), and at least one must stay in the test split: use at most {len(idx) - 1}"
            )
        pick = rng.choice(len(idx), size=k, replace=False)
        chosen = sorted(idx[j] for j in pick.tolist())
        taken.update(chosen)
        labeled_anomaly.extend(anomalies[i] for i in chosen)
    return labeled_anomaly, taken


def _contaminate(
    index: CategoryIndex,
    anomalies: list[ImageRecord],
    taken: set[int],
    cf: float,
    k: int,
    pool: list[ImageRecord],
    rng: np.random.Generator,
) -> list[ImageRecord]:
    """Step 3: move ``round(cf * len(anomalies))`` remaining test anomalies into ``pool`` (in place);
    returns the test anomalies left."""
    remaining = [i for i in range(len(anomalies)) if i not in taken]
    n_contam = int(round(cf * len(anomalies)))
    if cf > 0 and not anomalies:
        raise ValueError(f"contamination={cf} but category {index.category!r} has no test anomalies")
    if n_contam and n_contam >= len(remaining):
        raise ValueError(
            f"contamination={cf} moves {n_contam} test anomalies to the pool but only "
            f"{len(remaining)} remain after labeled_anomalies={k}; at least one must stay in test"
        )
    contam_pos = set(rng.choice(len(remaining), size=n_contam, replace=False).tolist()) if n_contam else set()
    contam = {remaining[j] for j in contam_pos}
    pool.extend(anomalies[i] for i in sorted(contam))
    return [anomalies[i] for i in remaining if i not in contam]


def copies_among(unlabeled: Sequence[ImageRecord], others: dict[str, Sequence[ImageRecord]]) -> dict[str, list]:
    """The unlabeled images that are byte-for-byte copies of other images of a split (SHA-256 of the files):
    ``{role: [(unlabeled path, its copy's path), ...]}`` for each role of ``others`` (e.g. ``test``,
    ``train/good``) with a copy. A user's pool that holds a test image lets the test figures see an image the
    model trained on. Files that cannot be read are left to the decoder's error."""
    from concurrent.futures import ThreadPoolExecutor

    from .shards import content_hash

    def digest(path: str) -> str | None:
        try:
            with open(path, "rb") as f:
                return content_hash(f.read())
        except OSError:
            return None

    with ThreadPoolExecutor(8) as ex:
        pool = dict(zip(ex.map(digest, [r.path for r in unlabeled]), [r.path for r in unlabeled]))
        pool.pop(None, None)
        out: dict[str, list] = {}
        for role, records in others.items():
            hits = [(pool[h], r.path) for h, r in zip(ex.map(digest, [r.path for r in records]), records) if h in pool]
            if hits:
                out[role] = hits
    return out


def _check_user_unlabeled(user: list[ImageRecord], train: list[ImageRecord], test: list[ImageRecord]) -> None:
    """Step 4: a user's unlabeled image may be neither a category image nor listed twice."""
    placed = {_key(r.path): "train/good" for r in train}
    placed.update({_key(r.path): "test" for r in test})
    clash = _first_clash(user, placed)
    if clash and clash[1]:
        raise ValueError(f"unlabeled image {clash[0].path!r} is also a {clash[1]} image of the category")
    if clash:
        raise ValueError(f"unlabeled image {clash[0].path!r} is listed twice")
