"""Oxford-IIIT Pet as distributed (``images.tar.gz``, ``annotations.tar.gz``).

``annotations/trainval.txt`` and ``annotations/test.txt``: lines ``<image> <class id
1..37> <species> <breed id>``, ``#`` lines are comments; the image is
``images/<image>.jpg`` and the breed name is the image name without its number
(``Abyssinian_100`` -> ``Abyssinian``). The given split is trainval / test (in-class,
3,680 / 3,669).
"""

from __future__ import annotations

import os

from magnet_jax.data.core import Pool
from magnet_jax.data.images import find_root, pool_from_class_ids, resolve_inside

SUBDIRS = ("oxford-iiit-pet", "oxford_iiit_pet", "pets")


def load(
    argument: str,
    data_dir: str | os.PathLike | None = None,
    *,
    image_size: int | None = None,
    skip_bad_images: bool = False,
    lazy: bool = False,
) -> Pool:
    name = "oxford_iiit_pet"
    root = find_root(
        "Oxford-IIIT Pet",
        data_dir,
        SUBDIRS,
        "annotations/trainval.txt",
        "Extract images.tar.gz and annotations.tar.gz "
        "(https://www.robots.ox.ac.uk/~vgg/data/pets/) into one folder.",
    )
    paths, labels, given_test, names = [], [], [], {}
    for file, test in (("trainval.txt", False), ("test.txt", True)):
        listing = root / "annotations" / file
        if not listing.is_file():
            raise FileNotFoundError(f"dataset {name!r}: annotation file {listing} is missing")
        for number, line in enumerate(listing.read_text().splitlines(), start=1):
            if not line.strip() or line.startswith("#"):
                continue
            parts = line.split()
            if len(parts) != 4 or not parts[1].isdigit():
                raise ValueError(f"dataset {name!r}: {listing} line {number} is not 4 fields")
            image, class_id = parts[0], int(parts[1])
            paths.append(
                resolve_inside(
                    root / "images", f"{image}.jpg", dataset=name, listed_in=str(listing)
                )
            )
            labels.append(class_id)
            given_test.append(test)
            names.setdefault(class_id, image.rsplit("_", 1)[0])
    return pool_from_class_ids(
        name,
        paths,
        labels,
        names,
        given_test=given_test,
        image_size=image_size,
        skip_bad_images=skip_bad_images,
        lazy=lazy,
    )
