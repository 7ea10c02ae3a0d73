"""Oxford-IIIT Pet as distributed (``images.tar.gz``, ``annotations.tar.gz``).

``annotations/trainval.txt`` and ``annotations/test.txt``: lines ``<image> <class id
1..37> <species> <breed id>``, ``#`` lines are comments; the image is
``images/<image>.jpg`` and the breed name is the image name without its number
(``Abyssinian_100`` -> ``Abyssinian``). The given split is trainval / test (in-class,
3,680 / 3,669).
"""

from __future__ import annotations

from pathlib import Path

from magnet_jax.data.images import Listing, Release, resolve_inside

NAME = "oxford_iiit_pet"


def read(root: Path) -> Listing:
    """The listing of the Oxford-IIIT Pet folder ``root`` (its two annotation lists)."""
    paths, labels, given_test, names = [], [], [], {}
    for file, test in (("trainval.txt", False), ("test.txt", True)):
        listing = root / "annotations" / file
        if not listing.is_file():
            raise FileNotFoundError(f"dataset {NAME!r}: annotation file {listing} is missing")
        for number, line in enumerate(listing.read_text().splitlines(), start=1):
            if not line.strip() or line.startswith("#"):
                continue
            parts = line.split()
            if len(parts) != 4 or not parts[1].isdigit():
                raise ValueError(f"dataset {NAME!r}: {listing} line {number} is not 4 fields")
            image, class_id = parts[0], int(parts[1])
            paths.append(
                resolve_inside(
                    root / "images", f"{image}.jpg", dataset=NAME, listed_in=str(listing)
                )
            )
            labels.append(class_id)
            given_test.append(test)
            names.setdefault(class_id, image.rsplit("_", 1)[0])
    return Listing(paths, labels, names, given_test)


RELEASE = Release(
    NAME,
    "Oxford-IIIT Pet",
    ("oxford-iiit-pet", "oxford_iiit_pet", "pets"),
    ("annotations/trainval.txt",),
    "Extract images.tar.gz and annotations.tar.gz "
    "(https://www.robots.ox.ac.uk/~vgg/data/pets/) into one folder.",
    read,
)
load = RELEASE.load
