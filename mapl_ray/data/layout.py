"""Dataset layout: MVTec-AD style category folders and unlabeled image folders.

Everything here works on file *names* only (``os.scandir``); no image is opened, so scanning a
category of a few thousand files takes milliseconds. Decoding lives in :mod:`mapl_ray.data.io`.

The MVTec AD layout (Bergmann et al., CVPR 2019) is::

    <root>/<category>/train/good/*.png
    <root>/<category>/test/good/*.png
    <root>/<category>/test/<defect_type>/<stem>.png
    <root>/<category>/ground_truth/<defect_type>/<stem>_mask.png   (or <stem>.png)
"""

from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = [
    "IMAGE_EXTENSIONS",
    "LABEL_ANOMALOUS",
    "LABEL_NORMAL",
    "LABEL_UNKNOWN",
    "CategoryIndex",
    "ImageReadError",
    "ImageRecord",
    "LayoutError",
    "is_image_file",
    "scan_category",
    "scan_folder",
]

#: Lower-case file extensions (with dot) of formats Pillow decodes; matched case-insensitively.
IMAGE_EXTENSIONS: frozenset[str] = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".gif"})

log = logging.getLogger("mapl_ray.data")

LABEL_NORMAL = 0
LABEL_ANOMALOUS = 1
LABEL_UNKNOWN = -1
_VALID_LABELS = (LABEL_NORMAL, LABEL_ANOMALOUS, LABEL_UNKNOWN)


class LayoutError(ValueError):
    """A dataset folder, file or field does not have the expected structure.

    Subclass of ``ValueError`` so callers that validate user input can catch both uniformly.
    """


class ImageReadError(LayoutError):
    """An image (or mask) file cannot be opened or decoded by Pillow.

    Attributes:
        path: the offending file, as given by the caller.
        reason: Pillow's (or the OS's) explanation, ``"<ExceptionType>: <message>"``.
        others: further unreadable files found in the same batch, ``(path, reason)`` pairs, so that a
            user fixes them all at once (the message names the first :data:`LISTED_OTHERS` and counts the rest).
    """

    LISTED_OTHERS = 5

    def __init__(self, path: str | os.PathLike[str], reason: str, others: tuple[tuple[str, str], ...] = ()) -> None:
        self.path = os.fspath(path)
        self.reason = reason
        self.others = tuple(others)
        text = f"cannot read image {self.path!r}: {reason}"
        if self.others:
            listed = "; ".join(f"{p!r} ({r})" for p, r in self.others[: self.LISTED_OTHERS])
            more = len(self.others) - self.LISTED_OTHERS
            text += f"; and {len(self.others)} more unreadable file(s): {listed}" + (
                f"; and {more} more" if more > 0 else ""
            )
        super().__init__(text)

    def __reduce__(self):
        # Default exception pickling calls cls(message); rebuild from (path, reason, others) instead so
        # the error survives transport between processes (Ray tasks, multiprocessing).
        return (type(self), (self.path, self.reason, self.others))


def is_image_file(name: str) -> bool:
    """True when ``name`` (a file name or path) has an extension in :data:`IMAGE_EXTENSIONS`.

    Hidden files (basename starting with ``.``, e.g. macOS ``._x.png`` resource forks) are
    rejected because they are never images of the data set even when the extension matches.
    """
    base = os.path.basename(name)
    if base.startswith("."):
        return False
    return os.path.splitext(base)[1].lower() in IMAGE_EXTENSIONS


@dataclass(frozen=True)
class ImageRecord:
    """One image file and what is known about it (no pixels).

    Attributes:
        path: absolute path of the image file.
        label: 0 normal, 1 anomalous, -1 unknown (unlabeled pool).
        defect_type: ``"good"`` for normals, ``"unknown"`` for unlabeled images, else the
            MVTec defect folder name (e.g. ``"scratch_head"``).
        mask_path: absolute path of the pixel ground truth (``ground_truth/<type>/<stem>_mask.*``)
            or ``None`` (normals, unlabeled images, image-level-only data sets).

    Raises:
        ValueError: on a label outside {0, 1, -1}, an empty path or defect_type.
    """

    path: str
    label: int
    defect_type: str
    mask_path: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.path, str) or not self.path:
            raise ValueError(f"ImageRecord.path must be a non-empty str, got {self.path!r}")
        # bool is an int subclass; reject it so True is never silently read as "anomalous".
        if isinstance(self.label, bool) or self.label not in _VALID_LABELS:
            raise ValueError(f"ImageRecord.label for {self.path!r} must be one of {_VALID_LABELS}, got {self.label!r}")
        if not isinstance(self.defect_type, str) or not self.defect_type:
            raise ValueError(
                f"ImageRecord.defect_type for {self.path!r} must be a non-empty str, got {self.defect_type!r}"
            )
        if self.mask_path is not None and (not isinstance(self.mask_path, str) or not self.mask_path):
            raise ValueError(
                f"ImageRecord.mask_path for {self.path!r} must be None or a non-empty str, got {self.mask_path!r}"
            )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict with keys ``path``, ``label``, ``defect_type``, ``mask_path``."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ImageRecord:
        """Inverse of :meth:`to_dict`.

        Raises:
            ValueError: ``d`` is not a dict, misses ``path``/``label``/``defect_type``, has
                unknown keys, or holds invalid values (see class docstring).
        """
        if not isinstance(d, dict):
            raise ValueError(f"ImageRecord.from_dict expects a dict, got {type(d).__name__}")
        required = ("path", "label", "defect_type")
        missing = [k for k in required if k not in d]
        if missing:
            raise ValueError(f"ImageRecord dict {d!r} is missing field(s) {missing}")
        unknown = set(d) - {"path", "label", "defect_type", "mask_path"}
        if unknown:
            raise ValueError(f"ImageRecord dict {d!r} has unknown field(s) {sorted(unknown)}")
        return cls(
            path=d["path"],
            label=d["label"],
            defect_type=d["defect_type"],
            mask_path=d.get("mask_path"),
        )


@dataclass
class CategoryIndex:
    """File index of one MVTec-layout category, as returned by :func:`scan_category`.

    Attributes:
        root: absolute data-set root (the folder holding ``category``).
        category: category folder name, e.g. ``"screw"``.
        train_good: ``train/good`` images (label 0), sorted by path.
        test: all ``test/*`` images, sorted by path; ``good`` ones have label 0, the others
            label 1 with their ``mask_path``.
    """

    root: str
    category: str
    train_good: list[ImageRecord] = field(default_factory=list)
    test: list[ImageRecord] = field(default_factory=list)

    @property
    def defect_types(self) -> list[str]:
        """Sorted defect type names present in ``test`` (``"good"`` excluded)."""
        return sorted({r.defect_type for r in self.test if r.defect_type != "good"})

    @property
    def category_dir(self) -> str:
        """``root/category``."""
        return os.path.join(self.root, self.category)


def _list_images(folder: str) -> list[str]:
    """Sorted absolute paths of the (non-hidden) image files directly inside ``folder``."""
    with os.scandir(folder) as it:
        names = [e.name for e in it if e.is_file() and is_image_file(e.name)]
    return [os.path.join(folder, n) for n in sorted(names)]


def _list_subdirs(folder: str) -> list[str]:
    """Sorted names of the non-hidden sub-folders of ``folder``."""
    with os.scandir(folder) as it:
        return sorted(e.name for e in it if e.is_dir() and not e.name.startswith("."))


def _mask_lookup(gt_dir: str) -> tuple[dict[str, str], list[str]]:
    """Masks in ``gt_dir``: (image stem -> mask path, every image file in ``gt_dir``).

    A mask is ``<stem>_mask.<ext>`` (MVTec AD) or, failing that, ``<stem>.<ext>`` named like its image
    (the ground-truth folder holds masks only). Among several extensions for one stem ``.png`` wins,
    then the alphabetically first, so the choice is deterministic.
    """
    if not os.path.isdir(gt_dir):
        return {}, []
    files = _list_images(gt_dir)
    suffixed: dict[str, list[str]] = {}
    plain: dict[str, list[str]] = {}
    for path in files:
        stem = os.path.splitext(os.path.basename(path))[0]
        if stem.endswith("_mask"):
            suffixed.setdefault(stem[: -len("_mask")], []).append(path)
        else:
            plain.setdefault(stem, []).append(path)
    found = {**plain, **suffixed}  # <stem>_mask wins over <stem>
    return {
        stem: sorted(paths, key=lambda p: (os.path.splitext(p)[1].lower() != ".png", p))[0]
        for stem, paths in found.items()
    }, files


def _defect_records(test_dir: str, gt_dir: str, dtype: str, require_masks: bool) -> list[ImageRecord]:
    """The images of ``test/<dtype>`` with their masks from ``ground_truth/<dtype>`` (see :func:`scan_category`).

    Raises:
        LayoutError: a defect image without a mask while ``require_masks``.
    """
    masks, gt_files = _mask_lookup(gt_dir)
    records = []
    for p in _list_images(os.path.join(test_dir, dtype)):
        stem = os.path.splitext(os.path.basename(p))[0]
        mask = masks.get(stem)
        if mask is None and require_masks:
            raise LayoutError(
                f"defect image {p!r} has no mask: expected {os.path.join(gt_dir, stem + '_mask.png')!r} "
                f"(or {stem}.png; any image extension); for image-label-only data pass --no-masks "
                f"(mapl train) or set data.require_masks: false"
            )
        records.append(ImageRecord(p, LABEL_ANOMALOUS, dtype, mask))
    unused = sorted(set(gt_files) - {r.mask_path for r in records})
    if unused:
        log.warning(
            "%d file(s) in %s match no image of test/%s and are ignored (a mask is named <stem>_mask.png or "
            "<stem>.png after its image <stem>.png), e.g. %s",
            len(unused),
            gt_dir,
            dtype,
            os.path.basename(unused[0]),
        )
    return records


def scan_category(
    root: str | os.PathLike[str], category: str, *, require_masks: bool = True, allow_empty_train: bool = False
) -> CategoryIndex:
    """Index an MVTec-AD-layout category folder without opening any image.

    Args:
        root: data-set root; the category lives in ``root/category``.
        category: category folder name.
        require_masks: when True (MVTec AD, MPDD, magnetic tile) every defect image
            ``test/<type>/<stem>.<ext>`` must have ``ground_truth/<type>/<stem>_mask.<ext>`` or, named
            like the image, ``ground_truth/<type>/<stem>.<ext>``. Set False for image-label-only sets
            (e.g. ELPV): defect images then get ``mask_path=None`` where no mask exists. Either way, a
            logged warning names files in ``ground_truth/<type>`` that match no image.
        allow_empty_train: accept a missing or empty ``train/good`` (training from an unlabeled pool).

    Returns:
        :class:`CategoryIndex` with absolute, sorted paths. Hidden files/folders and files
        without an image extension (:data:`IMAGE_EXTENSIONS`) are ignored.

    Raises:
        LayoutError: ``root/category`` missing; ``train/good`` missing or without images;
            ``test`` missing; a defect image without its mask (when ``require_masks``).
    """
    root_abs = os.path.abspath(os.fspath(root))
    cat_dir = os.path.join(root_abs, category)
    if not os.path.isdir(root_abs):
        what = "is a file, not a folder" if os.path.exists(root_abs) else "does not exist"
        raise LayoutError(
            f"data root {os.fspath(root)!r} {what} (resolved to {root_abs!r}; expected the folder "
            f"that holds <category>/train/good, e.g. .../mvtec_ad)"
        )
    if not os.path.isdir(cat_dir):
        # a mistyped category is the common case: name the ones that are there
        found = (
            sorted(d for d in os.listdir(root_abs) if os.path.isdir(os.path.join(root_abs, d, "train")))
            if os.path.isdir(root_abs)
            else []
        )
        hint = f"; categories under {root_abs!r}: {', '.join(found)}" if found else ""
        if not found and os.path.isdir(os.path.join(root_abs, "train")):  # --data given the category itself
            hint = f"; {root_abs!r} looks like a category folder: pass its parent as --data"
        raise LayoutError(
            f"category folder {cat_dir!r} does not exist (expected MVTec layout "
            f"<root>/<category>/train/good, test/<type>, ground_truth/<type>){hint}"
        )
    train_dir = os.path.join(cat_dir, "train", "good")
    if not os.path.isdir(train_dir) and not allow_empty_train:
        hint = ""
        if os.path.isdir(os.path.join(root_abs, "train", "good")):  # --data the category, --category a folder in it
            hint = (
                f"; {root_abs!r} looks like a category folder: pass its parent as --data and "
                f"{os.path.basename(root_abs)!r} as --category"
            )
        raise LayoutError(
            f"{train_dir!r} is missing: expected a folder of normal training images "
            f"(or pass --unlabeled DIR to train from unlabeled images){hint}"
        )
    train_paths = _list_images(train_dir) if os.path.isdir(train_dir) else []
    if not allow_empty_train:
        _require_images(train_paths, repr(train_dir))
    test_dir = os.path.join(cat_dir, "test")
    if not os.path.isdir(test_dir):
        raise LayoutError(f"{test_dir!r} is missing: expected test/good and test/<defect_type> folders")

    train_good = [ImageRecord(p, LABEL_NORMAL, "good") for p in train_paths]
    test: list[ImageRecord] = []
    for dtype in _list_subdirs(test_dir):
        if dtype == "good":
            test.extend(ImageRecord(p, LABEL_NORMAL, "good") for p in _list_images(os.path.join(test_dir, dtype)))
        else:
            gt_dir = os.path.join(cat_dir, "ground_truth", dtype)
            test.extend(_defect_records(test_dir, gt_dir, dtype, require_masks))
    test.sort(key=lambda r: r.path)
    return CategoryIndex(root=root_abs, category=category, train_good=train_good, test=test)


def _require_images(paths: list[str], where: str) -> list[str]:
    """``paths``, or LayoutError saying that ``where`` holds no image file."""
    if not paths:
        raise LayoutError(f"{where} contains no image files (expected extensions {sorted(IMAGE_EXTENSIONS)})")
    return paths


def _visible_files(folder: str) -> list[str]:
    """Every file below ``folder``, recursively, sorted; hidden files and hidden folders skipped."""
    found: list[str] = []
    for dirpath, dirnames, filenames in os.walk(folder):
        # Prune hidden folders in place so os.walk does not descend into them (.git, .cache...).
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        found.extend(os.path.join(dirpath, f) for f in filenames if not f.startswith("."))
    return sorted(found)


def find_images(folder: str, warn: bool = False) -> list[str]:
    """Image files (:data:`IMAGE_EXTENSIONS`) below ``folder``, recursively, hidden entries skipped, sorted.
    ``warn``: log a warning naming how many other files were left out for their extension, and one of them."""
    files = _visible_files(folder)
    images = [p for p in files if is_image_file(p)]
    if warn and len(images) < len(files):
        other = next(p for p in files if not is_image_file(p))
        n = len(files) - len(images)
        log.warning(
            "%d %s under %s not read: no image extension (e.g. %s; %s)",
            n,
            "file" if n == 1 else "files",
            folder,
            os.path.relpath(other, folder),
            not_image_reason(other).split("; ", 1)[1],
        )
    return images


def find_non_images(folder: str) -> list[str]:
    """The files below ``folder`` that :func:`find_images` leaves out for their extension (hidden entries are
    skipped by both), recursively, sorted: what ``mapl prepare`` lists as rejected (:func:`not_image_reason`)."""
    return [p for p in _visible_files(folder) if not is_image_file(p)]


def not_image_reason(name: str) -> str:
    """Why ``name`` (a file name or path) is not taken as an image: its extension, and the ones that are."""
    ext = os.path.splitext(os.path.basename(name))[1]
    what = f"not an image extension ({ext})" if ext else "no file extension"
    return f"{what}; expected one of {' '.join(sorted(IMAGE_EXTENSIONS))}"


def scan_folder(path: str | os.PathLike[str], what: str = "unlabeled image folder") -> list[ImageRecord]:
    """Recursively list a user's unlabeled image folder.

    Args:
        path: folder to walk; hidden files and hidden sub-folders are skipped.
        what: how errors name the folder (``mapl score`` and ``mapl prepare`` read any image folder).

    Returns:
        Records with ``label=-1``, ``defect_type="unknown"``, ``mask_path=None``, sorted by
        absolute path.

    Raises:
        LayoutError: ``path`` does not exist, is not a folder, or holds no image file.
    """
    folder = os.path.abspath(os.fspath(path))
    if not os.path.isdir(folder):
        raise LayoutError(f"{what} {folder!r} does not exist or is not a folder")
    found = _require_images(find_images(folder, warn=True), f"{what} {folder!r}")
    return [ImageRecord(p, LABEL_UNKNOWN, "unknown") for p in found]
