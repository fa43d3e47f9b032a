"""Reading a MedMNIST-format ``.npz`` archive: its splits, image kind and labels, validated."""

from __future__ import annotations

import hashlib
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedrad.core.errors import ConfigError, DataError

SPLIT_ORDER = ("train", "val", "test")
"""The first split present in this order goes to the sites; the others become holdouts."""
KINDS = ("2d", "3d")
MAX_CHANNELS_FIRST = 4
"""A 4-D array whose second axis is at most this is not taken for a volume (see detect_kind)."""


@dataclass(frozen=True)
class ImageKind:
    """What the images of an archive are: 2D grey, 2D RGB or 3D volumes."""

    kind: str
    channels: int

    @property
    def label(self) -> str:
        """Short human-readable name: ``2d-grey``, ``2d-rgb`` or ``3d``."""
        if self.kind == "3d":
            return "3d"
        return "2d-rgb" if self.channels == 3 else "2d-grey"


GREY_2D, RGB_2D, VOLUME_3D = ImageKind("2d", 1), ImageKind("2d", 3), ImageKind("3d", 1)


@dataclass(frozen=True)
class Split:
    """One split of the archive: ``images`` uint8 ``(N, H, W[, 3])`` or ``(N, D, H, W)``."""

    name: str
    images: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return int(self.labels.shape[0])


@dataclass(frozen=True)
class Archive:
    """The validated splits of one archive, in :data:`SPLIT_ORDER`."""

    path: Path
    digest: str
    kind: ImageKind
    splits: tuple[Split, ...]

    @property
    def num_classes(self) -> int:
        """One more than the largest label of any split."""
        return 1 + max(int(s.labels.max()) for s in self.splits if len(s))


def detect_kind(shape: tuple[int, ...], kind: str | None) -> ImageKind:
    """Tell the image kind from an image array's shape, or check the ``kind`` override.

    Rules (MedMNIST keeps colour channels last): ``(N, H, W)`` and ``(N, H, W, 1)`` are 2D
    grey; ``(N, H, W, 3)`` is 2D RGB; other ``(N, D, H, W)`` are 3D volumes when
    ``D > 4``. A 4-D array with ``D <= 4`` that does not end in 3 looks like channels-first
    images and is refused unless ``kind="3d"`` says these are thin volumes. ``kind="3d"``
    also reads ``(N, D, H, 3)`` as volumes 3 voxels wide.
    """
    if kind is not None and kind not in KINDS:
        raise ConfigError(f"kind must be '2d', '3d' or None (detect), got '{kind}'.")
    ndim = len(shape)
    if ndim == 3 and kind != "3d":
        return GREY_2D
    if ndim == 4 and kind == "3d":
        return VOLUME_3D
    if ndim == 4 and shape[-1] in (1, 3):
        return GREY_2D if shape[-1] == 1 else RGB_2D
    if ndim == 4 and kind is None and shape[1] > MAX_CHANNELS_FIRST:
        return VOLUME_3D
    if ndim == 4 and kind is None:
        raise DataError(
            f"images of shape {shape} are ambiguous: a second axis of {shape[1]} looks like "
            "channels-first colour images, which MedMNIST does not use. Pass --kind 3d if "
            "these are volumes of that many slices, or move the channels last "
            "(np.moveaxis(images, 1, -1)) for 2D images."
        )
    wanted = {"2d": "(N, H, W) grey or (N, H, W, 3) RGB", "3d": "(N, D, H, W)"}.get(
        kind or "", "(N, H, W), (N, H, W, 3) or (N, D, H, W)"
    )
    raise DataError(
        f"images of shape {shape} do not fit kind {kind or 'detection'}: expected {wanted}."
    )


def _digest(path: Path) -> str:
    hasher = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            hasher.update(block)
    return hasher.hexdigest()


def _pixels(name: str, images: np.ndarray) -> np.ndarray:
    """Return ``images`` as uint8, accepting integer arrays that fit 0..255."""
    if images.dtype == np.uint8:
        return images
    if (
        np.issubdtype(images.dtype, np.integer)
        and images.size
        and (int(images.min()) >= 0 and int(images.max()) <= 255)
    ):
        return images.astype(np.uint8)
    raise DataError(
        f"{name} has dtype {images.dtype}: MedMNIST images are uint8 (0..255); convert them "
        "with np.clip(images, 0, 255).astype(np.uint8) after scaling."
    )


def _labels(name: str, labels: np.ndarray, n_images: int) -> np.ndarray:
    """Return single-label integer classes of shape ``(N,)``."""
    if labels.ndim == 2 and labels.shape[1] > 1:
        raise DataError(
            f"{name} has shape {labels.shape}: multi-label ({labels.shape[1]} labels per image, "
            "as in ChestMNIST) is not supported; fedrad trains one class per image. Save an "
            f"archive with one column, e.g. {name}=labels[:, [k]]."
        )
    if labels.ndim not in (1, 2):
        raise DataError(f"{name} has shape {labels.shape}: expected (N,) or (N, 1) classes.")
    flat = labels.reshape(-1)
    if not (np.issubdtype(flat.dtype, np.integer) or flat.dtype == np.bool_):
        raise DataError(f"{name} has dtype {flat.dtype}: labels must be integer classes 0, 1, ...")
    if flat.shape[0] != n_images:
        raise DataError(
            f"{name} holds {flat.shape[0]} labels but its images hold {n_images}: every image "
            "needs exactly one label; re-export the archive."
        )
    if flat.size and int(flat.min()) < 0:
        raise DataError(f"{name} holds negative label {int(flat.min())}: classes start at 0.")
    return flat.astype(np.int64)


def load_archive(path: Path, *, kind: str | None = None) -> Archive:
    """Load and validate every split of a MedMNIST-format archive.

    Raises
    ------
    DataError
        When the file is missing or not an ``.npz``, lacks a ``<split>_images`` /
        ``<split>_labels`` pair, or holds arrays of the wrong shape, type or count.
    """
    if not path.is_file():
        raise DataError(
            f"{path} not found: give the path of a MedMNIST-format .npz archive "
            "(e.g. pneumoniamnist.npz)."
        )
    try:
        npz = np.load(path, allow_pickle=False)
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as exc:
        raise DataError(
            f"{path} is not a readable .npz archive ({exc.__class__.__name__}): "
            "give a file written by numpy.savez, as MedMNIST ships."
        ) from None
    if not isinstance(npz, np.lib.npyio.NpzFile):
        raise DataError(
            f"{path} holds a single array, not an .npz archive with train_images and train_labels."
        )
    with npz:
        keys = set(npz.files)
        splits = []
        for name in SPLIT_ORDER:
            pair = {f"{name}_images", f"{name}_labels"}
            if len(pair & keys) == 1:
                missing = (pair - keys).pop()
                raise DataError(
                    f"{path} has {(pair & keys).pop()} but no {missing}: each split "
                    "needs both <split>_images and <split>_labels."
                )
            if pair <= keys:
                splits.append(_read_split(npz, path, name))
    if not splits:
        raise DataError(
            f"{path} holds no MedMNIST split: expected train_images/train_labels (and optional "
            f"val_* and test_*), found keys {', '.join(sorted(keys)) or 'none'}."
        )
    image_kind = _common_kind(path, splits, kind)
    if image_kind == GREY_2D and splits[0].images.ndim == 4:  # (N, H, W, 1)
        splits = [Split(s.name, s.images[..., 0], s.labels) for s in splits]
    return Archive(path, _digest(path), image_kind, tuple(splits))


def _read_split(npz: np.lib.npyio.NpzFile, path: Path, name: str) -> Split:
    try:
        images = np.asarray(npz[f"{name}_images"])
        labels = np.asarray(npz[f"{name}_labels"])
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
        raise DataError(
            f"{path}: split '{name}' cannot be read ({exc}); re-export the archive "
            "with numpy.savez (no object arrays)."
        ) from None
    images = _pixels(f"{name}_images", images)
    return Split(name, images, _labels(f"{name}_labels", labels, images.shape[0]))


def _common_kind(path: Path, splits: list[Split], kind: str | None) -> ImageKind:
    """Check that every split holds images of one kind and shape; return that kind."""
    shapes = {s.images.shape[1:] for s in splits}
    if len(shapes) > 1:
        raise DataError(
            f"{path}: splits hold images of different shapes "
            f"({', '.join(map(str, sorted(shapes)))}); one archive, one image size."
        )
    image_kind = detect_kind(splits[0].images.shape, kind)
    if min(splits[0].images.shape[1:3]) < 1:
        raise DataError(f"{path}: images of shape {splits[0].images.shape} are empty.")
    return image_kind
