"""Stanford Online Products as distributed (``Stanford_Online_Products.zip``).

``Ebay_train.txt`` and ``Ebay_test.txt``: a header ``image_id class_id super_class_id
path`` and one line per image, paths relative to the dataset folder
(``bicycle_final/111085122871_0.JPG``). 120,053 images of 22,634 products in 12 super
classes; the given split is class-disjoint (11,318 / 11,316 products), so Recall@10 and
@100 are reported too. Class names are ``<super class folder>/<class id>``.
"""

from __future__ import annotations

from pathlib import Path

from magnet_jax.data.images import Listing, Release, resolve_inside

NAME = "sop"
HEADER = ["image_id", "class_id", "super_class_id", "path"]


def read(root: Path) -> Listing:
    """The listing of the Stanford Online Products folder ``root`` (``Ebay_*.txt``)."""
    paths, labels, given_test, names = [], [], [], {}
    for file, test in (("Ebay_train.txt", False), ("Ebay_test.txt", True)):
        listing = root / file
        if not listing.is_file():
            raise FileNotFoundError(f"dataset {NAME!r}: annotation file {listing} is missing")
        lines = listing.read_text().splitlines()
        if not lines or lines[0].split() != HEADER:
            raise ValueError(
                f"dataset {NAME!r}: {listing} does not start with '{' '.join(HEADER)}'"
            )
        for number, line in enumerate(lines[1:], start=2):
            parts = line.split()
            if not parts:
                continue
            if len(parts) != 4 or not parts[1].isdigit():
                raise ValueError(f"dataset {NAME!r}: {listing} line {number} is not 4 fields")
            class_id = int(parts[1])
            paths.append(resolve_inside(root, parts[3], dataset=NAME, listed_in=str(listing)))
            labels.append(class_id)
            given_test.append(test)
            names.setdefault(
                class_id, f"{parts[3].split('/')[0].removesuffix('_final')}/{class_id}"
            )
    return Listing(paths, labels, names, given_test)


RELEASE = Release(
    NAME,
    "Stanford Online Products",
    ("Stanford_Online_Products", "sop", "SOP", "stanford_online_products"),
    ("Ebay_train.txt",),
    "Extract Stanford_Online_Products.zip (https://cvgl.stanford.edu/projects/lifted_struct/).",
    read,
    recall_ks=(1, 2, 4, 8, 10, 100),
)
load = RELEASE.load
