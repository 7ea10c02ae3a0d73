"""Evaluation protocols: which examples train and which test.

* ``default`` -- the split a classification-style run has always used: the source's own
  split when its test classes all occur in training (MNIST, CIFAR, CUB's
  ``train_test_split.txt``, ...), else a stratified split of every class
  (``test_fraction`` of each class to test, see :func:`~magnet_jax.data.core.stratified_split`).
* ``given`` -- the source's own split, whatever it is (class-disjoint for Stanford Online
  Products and the emoji set).
* ``classes`` -- the metric-learning standard: train on the first half of the classes
  (by class id; the emoji set's own ``split`` array), test retrieval on the unseen second
  half.
"""

from __future__ import annotations

import numpy as np

from magnet_jax.data.core import Dataset, Pool, stratified_split

SPLITS = ("default", "given", "classes")


def pool_of(dataset: Dataset) -> Pool:
    """A dataset's train and test parts as one pool whose given split is the old one."""
    has_fine = dataset.fine_train is not None
    return Pool(
        name=dataset.name,
        x=np.concatenate([dataset.x_train, dataset.x_test]),
        y=np.concatenate([dataset.y_train, dataset.y_test]),
        class_names=dataset.class_names,
        given_test=np.arange(dataset.num_train + dataset.num_test) >= dataset.num_train,
        fine=np.concatenate([dataset.fine_train, dataset.fine_test]) if has_fine else None,
        fine_class_names=dataset.fine_class_names,
        recall_ks=dataset.recall_ks,
    )


def _given_is_in_class(pool: Pool) -> bool:
    return bool(np.isin(pool.y[pool.given_test], pool.y[~pool.given_test]).all())


def held_out_mask(pool: Pool, split: str, *, test_fraction: float, seed: int) -> np.ndarray:
    """``[N]`` bool, True for the examples that the protocol ``split`` sends to test."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    if split == "given" and pool.given_test is None:
        raise ValueError(
            f"dataset {pool.name!r} has no split of its own; use --split default (a "
            "stratified split of every class) or --split classes (unseen classes)"
        )
    if split == "given" or (
        split == "default" and pool.given_test is not None and _given_is_in_class(pool)
    ):
        return pool.given_test.copy()
    if split == "classes":
        if pool.class_train is not None:
            return ~pool.class_train
        num_classes = len(pool.class_names)
        if num_classes < 2:
            raise ValueError(f"dataset {pool.name!r}: --split classes needs >= 2 classes")
        return pool.y >= (num_classes + 1) // 2
    _, held_out = stratified_split(pool.y, test_fraction, seed)
    mask = np.zeros(len(pool.y), bool)
    mask[held_out] = True
    return mask


def split_pool(pool: Pool, split: str = "default", *, test_fraction: float = 0.2, seed: int = 0):
    """Splits a pool into a :class:`~magnet_jax.data.core.Dataset` by the protocol ``split``.

    Labels keep their ids (under ``classes`` the training labels are ``[0, C_train)`` and
    the test labels ``[C_train, C)``), so :attr:`Dataset.test_classes_seen` tells the
    protocols apart.

    Args:
      pool: every example with the source's own split.
      split: ``default``, ``given`` or ``classes`` (see the module docstring).
      test_fraction: ``default`` without an in-class split of the source's own: the share
        of every class held out.
      seed: seed of that stratified split.

    Returns:
      The dataset; its name gains ``/classes`` under the class-disjoint protocol.
    """
    test = held_out_mask(pool, split, test_fraction=test_fraction, seed=seed)
    if not test.any() or test.all():
        raise ValueError(
            f"dataset {pool.name!r}: --split {split} leaves "
            f"{'no test' if not test.any() else 'no training'} examples"
        )
    has_fine = pool.fine is not None
    return Dataset(
        name=pool.name if split != "classes" else f"{pool.name}/classes",
        x_train=pool.x[~test],
        y_train=pool.y[~test],
        x_test=pool.x[test],
        y_test=pool.y[test],
        class_names=pool.class_names,
        fine_train=pool.fine[~test] if has_fine else None,
        fine_test=pool.fine[test] if has_fine else None,
        fine_class_names=pool.fine_class_names,
        recall_ks=pool.recall_ks,
    )
