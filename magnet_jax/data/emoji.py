"""The emoji64 set (``emoji64.npz``): 1,636 emoji classes drawn in up to 4 styles and 5 skin tones.

Every image also has a subcategory (95) and a category (8), a label hierarchy; its
``split`` array (0: class id < C/2, 1: the rest) is the set's own class-disjoint split.
Images ``[N, 64, 64, 3]`` in ``[0, 1]`` (resized with ``image_size``).

``label_level`` picks the labels: ``emoji`` (the classes), ``subcategory`` or
``category``; at a coarse level the emoji classes are kept as the fine labels, for the
hierarchy metrics. ``drop_duplicates`` leaves out the images flagged ``duplicate`` (the
same picture as an image of another class in the same style).
"""

from __future__ import annotations

import os
import zipfile
import zlib
from pathlib import Path

import numpy as np

from magnet_jax.data.core import Pool, candidate_dirs, default_data_dir, remap_labels

FILE_NAME = "emoji64.npz"
SUBDIRS = ("emoji", "emoji64")
LABEL_LEVELS = ("emoji", "subcategory", "category")
_LEVEL_ARRAYS = {
    "emoji": ("y", "class_names"),
    "subcategory": ("subcategory", "subcategory_names"),
    "category": ("category", "category_names"),
}
REQUIRED = ("x", "y", "subcategory", "category", "split", "duplicate", "class_names",
            "subcategory_names", "category_names")  # fmt: skip


def _find(data_dir) -> Path:
    root = Path(data_dir).expanduser() if data_dir is not None else default_data_dir()
    if root.is_file():
        return root
    looked = [d / FILE_NAME for d in candidate_dirs(root, SUBDIRS)]
    for path in looked:
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"emoji set not found (looked for {', '.join(map(str, looked))}); pass --data-dir "
        f"(data_dir=) pointing at the folder holding {FILE_NAME} or its parent"
    )


def _selected(names: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, tuple[str, ...]]:
    (remapped,), values = remap_labels(ids)
    return remapped, tuple(str(names[v]) for v in values)


def load(
    argument: str,
    data_dir: str | os.PathLike | None = None,
    *,
    label_level: str | None = None,
    drop_duplicates: bool = False,
    image_size: int | None = None,
) -> Pool:
    level = label_level or "emoji"
    if level not in LABEL_LEVELS:
        raise ValueError(f"unknown label_level {level!r}; choose one of {', '.join(LABEL_LEVELS)}")
    path = _find(data_dir)
    try:
        with np.load(path, allow_pickle=False) as archive:
            missing = [key for key in REQUIRED if key not in archive.files]
            if missing:
                raise ValueError(f"{path}: not the emoji64 set, no array(s) {missing}")
            arrays = {key: archive[key] for key in REQUIRED}
    except (OSError, zipfile.BadZipFile, zlib.error, EOFError) as error:
        raise ValueError(f"{path}: not a readable .npz file ({error})") from error
    keep = arrays["duplicate"] == 0 if drop_duplicates else np.ones(len(arrays["y"]), bool)
    labels_key, names_key = _LEVEL_ARRAYS[level]
    y, class_names = _selected(arrays[names_key], arrays[labels_key][keep])
    fine, fine_names = None, None
    if level != "emoji":
        fine, fine_names = _selected(arrays["class_names"], arrays["y"][keep])
    images = arrays["x"][keep]
    if image_size is not None and image_size != images.shape[1]:
        from PIL import Image

        images = np.stack(
            [
                np.asarray(Image.fromarray(image).resize((image_size, image_size), Image.BILINEAR))
                for image in images
            ]
        )
    x = images.astype(np.float32)
    x /= np.float32(255.0)
    class_train = arrays["split"][keep] == 0
    name = "emoji" if level == "emoji" else f"emoji/{level}"
    if drop_duplicates:
        name += "/no_duplicates"
    return Pool(
        name=name,
        x=x,
        y=y,
        class_names=class_names,
        given_test=~class_train,
        class_train=class_train,
        fine=fine,
        fine_class_names=fine_names,
    )
