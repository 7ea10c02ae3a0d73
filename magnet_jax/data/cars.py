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

import os
from pathlib import Path

import numpy as np

from magnet_jax.data.core import Pool, candidate_dirs, default_data_dir
from magnet_jax.data.images import pool_from_files, read_mat, resolve_inside

SUBDIRS = ("cars196", "stanford_cars", "cars", "CARS196")


def _records(content, dataset: str, path: Path, fields):
    annotations = np.atleast_1d(content["annotations"])
    names = annotations.dtype.names or ()
    missing = [f for f in fields if f not in names]
    if missing:
        raise ValueError(f"dataset {dataset!r}: {path} annotations lack {', '.join(missing)}")
    return {f: [annotations[f][i] for i in range(len(annotations))] for f in fields}


def load(
    argument: str,
    data_dir: str | os.PathLike | None = None,
    *,
    image_size: int | None = None,
    skip_bad_images: bool = False,
    lazy: bool = False,
) -> Pool:
    name = "cars196"
    base = Path(data_dir).expanduser() if data_dir is not None else default_data_dir()
    looked = []
    for root in candidate_dirs(base, SUBDIRS):
        looked += [str(root / "cars_annos.mat"), str(root / "devkit" / "cars_meta.mat")]
        if (root / "cars_annos.mat").is_file():
            path = root / "cars_annos.mat"
            content = read_mat(path, dataset=name, keys=["annotations", "class_names"])
            records = _records(content, name, path, ("relative_im_path", "class", "test"))
            files = [(root, str(p)) for p in records["relative_im_path"]]
            classes = [int(c) for c in records["class"]]
            given_test = [int(t) == 1 for t in records["test"]]
            break
        if (root / "devkit" / "cars_meta.mat").is_file():
            meta = root / "devkit" / "cars_meta.mat"
            content = read_mat(meta, dataset=name, keys=["class_names"])
            test_annos = root / "cars_test_annos_withlabels.mat"
            if not test_annos.is_file():
                test_annos = root / "devkit" / "cars_test_annos_withlabels.mat"
            files, classes, given_test = [], [], []
            for annos, folder, test in (
                (root / "devkit" / "cars_train_annos.mat", "cars_train", False),
                (test_annos, "cars_test", True),
            ):
                part = read_mat(annos, dataset=name, keys=["annotations"])
                records = _records(part, name, annos, ("fname", "class"))
                files += [(root / folder, str(f)) for f in records["fname"]]
                classes += [int(c) for c in records["class"]]
                given_test += [test] * len(records["fname"])
            break
    else:
        raise FileNotFoundError(
            f"Cars-196 not found in {base} (looked for {', '.join(looked)}). Extract the "
            "release (car_ims.tgz + cars_annos.mat, or the devkit with cars_train/, "
            "cars_test/ and cars_test_annos_withlabels.mat) into one folder. Pass --data-dir "
            "(data_dir=) pointing at it or its parent."
        )
    class_names = [str(n) for n in np.atleast_1d(content["class_names"])]
    bad = sorted({c for c in classes if not 1 <= c <= len(class_names)})
    if bad:
        raise ValueError(
            f"dataset {name!r}: classes {bad[:10]} outside 1..{len(class_names)} (class_names)"
        )
    return pool_from_files(
        name,
        [
            resolve_inside(folder, f, dataset=name, listed_in="the annotations")
            for folder, f in files
        ],
        [c - 1 for c in classes],
        class_names=class_names,
        given_test=given_test,
        image_size=image_size,
        skip_bad_images=skip_bad_images,
        lazy=lazy,
    )
