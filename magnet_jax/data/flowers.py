"""Oxford 102 Flowers as distributed (``102flowers.tgz``, ``imagelabels.mat``, ``setid.mat``).

``imagelabels.mat``: ``labels`` [8189], class 1..102 of ``jpg/image_00001.jpg`` onwards;
``setid.mat``: 1-based image ids ``trnid``, ``valid``, ``tstid``. The given split trains
on ``trnid`` + ``valid`` (2,040 images) and tests on ``tstid`` (6,149). The files name no
classes, so the class names are the ids ``1`` .. ``102``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from magnet_jax.data.images import Listing, Release, read_mat

NAME = "oxford_flowers102"


def read(root: Path) -> Listing:
    """The listing of the Oxford 102 Flowers folder ``root`` (its two ``.mat`` files)."""
    labels = np.atleast_1d(
        read_mat(root / "imagelabels.mat", dataset=NAME, keys=["labels"])["labels"]
    )
    sets = read_mat(root / "setid.mat", dataset=NAME, keys=["trnid", "valid", "tstid"])
    labels = labels.astype(np.int64)
    test_ids = np.atleast_1d(sets["tstid"]).astype(np.int64)
    all_ids = np.concatenate([np.atleast_1d(sets[k]).astype(np.int64) for k in sets])
    if all_ids.min() < 1 or all_ids.max() > len(labels):
        raise ValueError(
            f"dataset {NAME!r}: setid.mat names image ids outside 1..{len(labels)} "
            "(the images of imagelabels.mat)"
        )
    ids = np.sort(all_ids)
    class_ids = labels[ids - 1].tolist()
    return Listing(
        paths=[root / "jpg" / f"image_{i:05d}.jpg" for i in ids],
        class_ids=class_ids,
        class_names={c: str(c) for c in class_ids},
        given_test=np.isin(ids, test_ids).tolist(),
    )


RELEASE = Release(
    NAME,
    "Oxford 102 Flowers",
    ("oxford_flowers102", "flowers102", "102flowers", "flowers"),
    ("imagelabels.mat",),
    "Download 102flowers.tgz (extract it), imagelabels.mat and setid.mat "
    "(https://www.robots.ox.ac.uk/~vgg/data/flowers/102/) into one folder.",
    read,
)
load = RELEASE.load
