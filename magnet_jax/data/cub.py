"""CUB-200-2011 as distributed (``CUB_200_2011.tgz``): 11,788 images of 200 bird species.

Files read, all ``<id> <value>`` lines: ``images.txt`` (image id, path under ``images/``),
``image_class_labels.txt`` (image id, class id 1..200), ``classes.txt`` (class id,
``001.Black_footed_Albatross``), ``train_test_split.txt`` (image id, 1 = train). The given
split is that file's (in-class, 5,994 / 5,794); the metric-learning standard is
``--split classes`` (species 1-100 train, 101-200 test).
"""

from __future__ import annotations

from pathlib import Path

from magnet_jax.data.images import Listing, Release, resolve_inside

NAME = "cub200"


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


def read(root: Path) -> Listing:
    """The listing of the CUB-200-2011 folder ``root`` (its four annotation files)."""
    images = read_id_table(root / "images.txt", dataset=NAME)
    labels = read_id_table(root / "image_class_labels.txt", dataset=NAME)
    is_train = read_id_table(root / "train_test_split.txt", dataset=NAME)
    classes = read_id_table(root / "classes.txt", dataset=NAME)
    ids = sorted(images)
    for table, file in ((labels, "image_class_labels.txt"), (is_train, "train_test_split.txt")):
        missing = [i for i in ids if i not in table]
        if missing:
            raise ValueError(f"dataset {NAME!r}: {root / file} lacks image ids {missing[:10]}")
    unknown = sorted({int(labels[i]) for i in ids} - set(classes))
    if unknown:
        raise ValueError(f"dataset {NAME!r}: classes {unknown[:10]} are not in classes.txt")
    return Listing(
        paths=[
            resolve_inside(root / "images", images[i], dataset=NAME, listed_in="images.txt")
            for i in ids
        ],
        class_ids=[int(labels[i]) for i in ids],
        class_names={c: value.split(".", 1)[-1] for c, value in classes.items()},
        given_test=[is_train[i] == "0" for i in ids],
    )


RELEASE = Release(
    NAME,
    "CUB-200-2011",
    ("CUB_200_2011", "cub200", "CUB200", "cub"),
    ("images.txt",),
    "Extract CUB_200_2011.tgz (https://www.vision.caltech.edu/datasets/cub_200_2011/).",
    read,
)
load = RELEASE.load
