"""Oxford 102 Flowers as distributed (``102flowers.tgz``, ``imagelabels.mat``, ``setid.mat``).

``imagelabels.mat``: ``labels`` [8189], class 1..102 of ``jpg/image_00001.jpg`` onwards;
``setid.mat``: 1-based image ids ``trnid``, ``valid``, ``tstid``. The given split trains
on ``trnid`` + ``valid`` (2,040 images) and tests on ``tstid`` (6,149). The files name no
classes, so the class names are the ids ``1`` .. ``102``.
"""

from __future__ import annotations

import os

import numpy as np

from magnet_jax.data.core import Pool
from magnet_jax.data.images import find_root, pool_from_files, read_mat

SUBDIRS = ("oxford_flowers102", "flowers102", "102flowers", "flowers")


def load(
    argument: str,
    data_dir: str | os.PathLike | None = None,
    *,
    image_size: int | None = None,
    skip_bad_images: bool = False,
    lazy: bool = False,
) -> Pool:
    name = "oxford_flowers102"
    root = find_root(
        "Oxford 102 Flowers",
        data_dir,
        SUBDIRS,
        "imagelabels.mat",
        "Download 102flowers.tgz (extract it), imagelabels.mat and setid.mat "
        "(https://www.robots.ox.ac.uk/~vgg/data/flowers/102/) into one folder.",
    )
    labels = np.atleast_1d(
        read_mat(root / "imagelabels.mat", dataset=name, keys=["labels"])["labels"]
    )
    sets = read_mat(root / "setid.mat", dataset=name, keys=["trnid", "valid", "tstid"])
    labels = labels.astype(np.int64)
    test_ids = np.atleast_1d(sets["tstid"]).astype(np.int64)
    all_ids = np.concatenate([np.atleast_1d(sets[k]).astype(np.int64) for k in sets])
    if all_ids.min() < 1 or all_ids.max() > len(labels):
        raise ValueError(
            f"dataset {name!r}: setid.mat names image ids outside 1..{len(labels)} "
            "(the images of imagelabels.mat)"
        )
    ids = np.sort(all_ids)
    given_test = np.isin(ids, test_ids)
    return pool_from_files(
        name,
        [root / "jpg" / f"image_{i:05d}.jpg" for i in ids],
        labels[ids - 1],
        given_test=given_test,
        image_size=image_size,
        skip_bad_images=skip_bad_images,
        lazy=lazy,
    )
