"""Stanford Dogs as distributed (``images.tar``, ``lists.tar``): 20,580 images of 120 breeds.

``train_list.mat`` and ``test_list.mat`` (at the top of the folder, as ``lists.tar``
extracts them, or under ``lists/``): ``file_list`` (paths under ``Images/``, e.g.
``n02085620-Chihuahua/n02085620_5927.jpg``) and ``labels`` (1..120). The given split is
theirs (in-class, 100 training images per breed). A breed's name is its folder name
without the WordNet id.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from magnet_jax.data.images import Listing, Release, read_mat, resolve_inside

NAME = "stanford_dogs"


def read(root: Path) -> Listing:
    """The listing of the Stanford Dogs folder ``root`` (``train_list.mat`` and
    ``test_list.mat``, at its top or under ``lists/``)."""
    lists = root if (root / "train_list.mat").is_file() else root / "lists"
    paths, labels, given_test, names = [], [], [], {}
    for file, test in (("train_list.mat", False), ("test_list.mat", True)):
        content = read_mat(lists / file, dataset=NAME, keys=["file_list", "labels"])
        files = [str(f) for f in np.atleast_1d(content["file_list"])]
        ids = np.atleast_1d(content["labels"]).astype(np.int64).tolist()
        if len(files) != len(ids):
            raise ValueError(
                f"dataset {NAME!r}: {lists / file} has {len(files)} files but {len(ids)} labels"
            )
        for path, class_id in zip(files, ids):
            paths.append(resolve_inside(root / "Images", path, dataset=NAME, listed_in=file))
            labels.append(class_id)
            given_test.append(test)
            names.setdefault(class_id, path.split("/")[0].split("-", 1)[-1])
    return Listing(paths, labels, names, given_test)


RELEASE = Release(
    NAME,
    "Stanford Dogs",
    ("stanford_dogs", "StanfordDogs", "dogs"),
    ("train_list.mat", "lists/train_list.mat"),
    "Extract images.tar and lists.tar (http://vision.stanford.edu/aditya86/ImageNetDogs/) "
    "into one folder.",
    read,
)
load = RELEASE.load
