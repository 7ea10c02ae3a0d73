"""scikit-learn's bundled 8x8 digits: the default dataset, needs no files."""

from __future__ import annotations

import numpy as np

from magnet_jax.data.core import Dataset, stratified_split

DIGITS_TEST_FRACTION = 0.25
DIGITS_SPLIT_SEED = 0
MNIST_CLASS_NAMES = tuple(str(digit) for digit in range(10))


def _load_digits() -> Dataset:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = (bunch.images[..., None] / 16.0).astype(np.float32)  # [1797, 8, 8, 1]
    y = bunch.target.astype(np.int32)
    train, test = stratified_split(y, DIGITS_TEST_FRACTION, DIGITS_SPLIT_SEED)
    return Dataset(
        name="digits",
        x_train=x[train],
        y_train=y[train],
        x_test=x[test],
        y_test=y[test],
        class_names=MNIST_CLASS_NAMES,
    )


def load(argument: str, data_dir=None) -> Dataset:
    """``digits``: needs no files (``data_dir`` is unused)."""
    return _load_digits()
