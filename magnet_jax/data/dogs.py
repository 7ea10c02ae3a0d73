"""Stanford Dogs as distributed (``images.tar``, ``lists.tar``): 20,580 images of 120 breeds.

``train_list.mat`` and ``test_list.mat`` (at the top of the folder, as ``lists.tar``
extracts them, or under ``lists/``): ``file_list`` (paths under ``Images/``, e.g.
``n02085620-Chihuahua/n02085620_5927.jpg``) and ``labels`` (1..120). The given split is
theirs (in-class, 100 training images per breed). A breed's name is its folder name
without the WordNet id.
"""

from __future__ import annotations

import os

import numpy as np

from magnet_jax.data.core import Pool
from magnet_jax.data.images import pool_from_class_ids, read_mat, resolve_inside

SUBDIRS = ("stanford_dogs", "StanfordDogs", "dogs")


def _find_lists(data_dir) -> tuple:
    from pathlib import Path

    from magnet_jax.data.core import candidate_dirs, default_data_dir

    root = Path(data_dir).expanduser() if data_dir is not None else default_data_dir()
    looked = []
    for directory in candidate_dirs(root, SUBDIRS):
        for lists in (directory, directory / "lists"):
            looked.append(str(lists / "train_list.mat"))
            if (lists / "train_list.mat").is_file():
                return directory, lists
    raise FileNotFoundError(
        f"Stanford Dogs not found in {root} (looked for {', '.join(looked)}). Extract "
        "images.tar and lists.tar (http://vision.stanford.edu/aditya86/ImageNetDogs/) into "
        "one folder. Pass --data-dir (data_dir=) pointing at it or its parent."
    )


def load(
    argument: str,
    data_dir: str | os.PathLike | None = None,
    *,
    image_size: int | None = None,
    skip_bad_images: bool = False,
    lazy: bool = False,
) -> Pool:
    name = "stanford_dogs"
    root, lists = _find_lists(data_dir)
    paths, labels, given_test, names = [], [], [], {}
    for file, test in (("train_list.mat", False), ("test_list.mat", True)):
        content = read_mat(lists / file, dataset=name, keys=["file_list", "labels"])
        files = [str(f) for f in np.atleast_1d(content["file_list"])]
        ids = np.atleast_1d(content["labels"]).astype(np.int64).tolist()
        if len(files) != len(ids):
            raise ValueError(
                f"dataset {name!r}: {lists / file} has {len(files)} files but {len(ids)} labels"
            )
        for path, class_id in zip(files, ids):
            paths.append(resolve_inside(root / "Images", path, dataset=name, listed_in=file))
            labels.append(class_id)
            given_test.append(test)
            names.setdefault(class_id, path.split("/")[0].split("-", 1)[-1])
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
