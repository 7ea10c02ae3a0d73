"""CUB-200-2011 as distributed (``CUB_200_2011.tgz``): 11,788 images of 200 bird species.

Files read, all ``<id> <value>`` lines: ``images.txt`` (image id, path under ``images/``),
``image_class_labels.txt`` (image id, class id 1..200), ``classes.txt`` (class id,
``001.Black_footed_Albatross``), ``train_test_split.txt`` (image id, 1 = train). The given
split is that file's (in-class, 5,994 / 5,794); the metric-learning standard is
``--split classes`` (species 1-100 train, 101-200 test).
"""

from __future__ import annotations

import os
from pathlib import Path

from magnet_jax.data.core import Pool
from magnet_jax.data.images import find_root, pool_from_files, resolve_inside

SUBDIRS = ("CUB_200_2011", "cub200", "CUB200", "cub")


def read_id_table(path: Path, *, dataset: str) -> dict[int, str]:
    """``<integer id> <value>`` lines (value may hold spaces) as ``{id: value}``."""
    if not path.is_file():
        raise FileNotFoundError(f"dataset {dataset!r}: annotation file {path} is missing")
    table = {}
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.strip().split(maxsplit=1)
        if len(parts) != 2 or not parts[0].isdigit():
            raise ValueError(f"dataset {dataset!r}: {path} line {number} is not '<id> <value>'")
        table[int(parts[0])] = parts[1].strip()
    return table


def load(
    argument: str,
    data_dir: str | os.PathLike | None = None,
    *,
    image_size: int | None = None,
    skip_bad_images: bool = False,
    lazy: bool = False,
) -> Pool:
    name = "cub200"
    root = find_root(
        "CUB-200-2011",
        data_dir,
        SUBDIRS,
        "images.txt",
        "Extract CUB_200_2011.tgz (https://www.vision.caltech.edu/datasets/cub_200_2011/).",
    )
    images = read_id_table(root / "images.txt", dataset=name)
    labels = read_id_table(root / "image_class_labels.txt", dataset=name)
    is_train = read_id_table(root / "train_test_split.txt", dataset=name)
    classes = read_id_table(root / "classes.txt", dataset=name)
    ids = sorted(images)
    for table, file in ((labels, "image_class_labels.txt"), (is_train, "train_test_split.txt")):
        missing = [i for i in ids if i not in table]
        if missing:
            raise ValueError(f"dataset {name!r}: {root / file} lacks image ids {missing[:10]}")
    class_ids = sorted(classes)
    names = [classes[c].split(".", 1)[-1] for c in class_ids]
    index_of = {c: i for i, c in enumerate(class_ids)}
    unknown = sorted({int(labels[i]) for i in ids} - set(class_ids))
    if unknown:
        raise ValueError(f"dataset {name!r}: classes {unknown[:10]} are not in classes.txt")
    return pool_from_files(
        name,
        [
            resolve_inside(root / "images", images[i], dataset=name, listed_in="images.txt")
            for i in ids
        ],
        [index_of[int(labels[i])] for i in ids],
        class_names=names,
        given_test=[is_train[i] == "0" for i in ids],
        image_size=image_size,
        skip_bad_images=skip_bad_images,
        lazy=lazy,
    )
