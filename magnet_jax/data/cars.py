"""Cars-196 (Stanford Cars) as distributed, in either of its two releases.

* ``cars_annos.mat`` (with ``car_ims/``): ``annotations`` records with
  ``relative_im_path`` (``car_ims/000001.jpg``), ``class`` (1..196) and ``test`` (1 =
  test), and ``class_names``.
* the devkit: ``devkit/cars_meta.mat`` (``class_names``), ``devkit/cars_train_annos.mat``
  (``annotations`` with ``fname`` and ``class``, images in ``cars_train/``) and
  ``cars_test_annos_withlabels.mat`` (at the top or in ``devkit/``; images in
  ``cars_test/``).

16,185 images of 196 models; the given split is the release's (in-class, 8,144 / 8,041);
the metric-learning standard is ``--split classes`` (models 1-98 train, 99-196 test).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from magnet_jax.data.images import Listing, Release, read_mat, resolve_inside

NAME = "cars196"


def _records(content, dataset: str, path: Path, fields):
    annotations = np.atleast_1d(content["annotations"])
    names = annotations.dtype.names or ()
    missing = [f for f in fields if f not in names]
    if missing:
        raise ValueError(f"dataset {dataset!r}: {path} annotations lack {', '.join(missing)}")
    return {f: [annotations[f][i] for i in range(len(annotations))] for f in fields}


def read(root: Path) -> Listing:
    """The listing of the Cars-196 folder ``root``, in either release."""
    if (root / "cars_annos.mat").is_file():
        path = root / "cars_annos.mat"
        content = read_mat(path, dataset=NAME, keys=["annotations", "class_names"])
        records = _records(content, NAME, path, ("relative_im_path", "class", "test"))
        files = [(root, str(p)) for p in records["relative_im_path"]]
        classes = [int(c) for c in records["class"]]
        given_test = [int(t) == 1 for t in records["test"]]
    else:
        meta = root / "devkit" / "cars_meta.mat"
        content = read_mat(meta, dataset=NAME, keys=["class_names"])
        test_annos = root / "cars_test_annos_withlabels.mat"
        if not test_annos.is_file():
            test_annos = root / "devkit" / "cars_test_annos_withlabels.mat"
        files, classes, given_test = [], [], []
        for annos, folder, test in (
            (root / "devkit" / "cars_train_annos.mat", "cars_train", False),
            (test_annos, "cars_test", True),
        ):
            part = read_mat(annos, dataset=NAME, keys=["annotations"])
            records = _records(part, NAME, annos, ("fname", "class"))
            files += [(root / folder, str(f)) for f in records["fname"]]
            classes += [int(c) for c in records["class"]]
            given_test += [test] * len(records["fname"])
    class_names = [str(n) for n in np.atleast_1d(content["class_names"])]
    bad = sorted({c for c in classes if not 1 <= c <= len(class_names)})
    if bad:
        raise ValueError(
            f"dataset {NAME!r}: classes {bad[:10]} outside 1..{len(class_names)} (class_names)"
        )
    return Listing(
        paths=[
            resolve_inside(folder, f, dataset=NAME, listed_in="the annotations")
            for folder, f in files
        ],
        class_ids=classes,
        class_names={number: text for number, text in enumerate(class_names, start=1)},
        given_test=given_test,
    )


RELEASE = Release(
    NAME,
    "Cars-196",
    ("cars196", "stanford_cars", "cars", "CARS196"),
    ("cars_annos.mat", "devkit/cars_meta.mat"),
    "Extract the release (car_ims.tgz + cars_annos.mat, or the devkit with cars_train/, "
    "cars_test/ and cars_test_annos_withlabels.mat) into one folder.",
    read,
)
load = RELEASE.load
