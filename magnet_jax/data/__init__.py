"""Datasets as in-memory arrays, one module per source, one name -> loader registry.

Every loader gives a :class:`Dataset`: NumPy arrays that the sampler indexes at random,
labels remapped to contiguous ``int32`` ids in ``[0, C)`` and, where the dataset defines
them, class names. :func:`load_dataset` finds a name in
:data:`~magnet_jax.data.registry.SOURCES`:

* ``digits`` -- scikit-learn's bundled 8x8 digits (no files needed). A fixed stratified
  split (25% of every class to test, seed 0): 1,347 train / 450 test examples, images
  ``[N, 8, 8, 1]`` scaled ``/16`` to ``[0, 1]`` (:mod:`~magnet_jax.data.digits`).
* ``mnist``, ``fashion_mnist`` -- the standard idx files (:mod:`~magnet_jax.data.idx`).
* ``cifar10``, ``cifar100`` -- the python-pickle archives (:mod:`~magnet_jax.data.cifar`).
* ``mnist_parity``, ``fashion_mnist_coarse``, ``cifar100_coarse`` -- coarse labels for
  hierarchy experiments, the original labels kept as ``fine_*``.
* ``tfds:<name>`` -- any TensorFlow Datasets builder (:mod:`~magnet_jax.data.tfds`).
* ``npz:<path>`` -- precomputed features (:mod:`~magnet_jax.data.npz`).
* ``emoji`` -- the emoji64 set, label level selectable (:mod:`~magnet_jax.data.emoji`).
* ``folder:<dir>``, ``csv:<file>`` -- images of your own (:mod:`~magnet_jax.data.images`).
* ``cub200``, ``cars196``, ``sop``, ``stanford_dogs``, ``oxford_flowers102``,
  ``oxford_iiit_pet`` -- the released layouts, parsed from their own annotation files.

The protocol (``split=``): ``default`` (the in-class split a classification run uses),
``given`` (the dataset's own split) or ``classes`` (train on the first half of the
classes, test retrieval on the unseen rest); see :mod:`~magnet_jax.data.protocol`.

Where files are looked for: ``data_dir`` when given, else the environment variable
``MAGNET_JAX_DATA``, else ``~/.magnet_jax/datasets`` (see :func:`default_data_dir`). The
directory may be the dataset's own folder or its parent: for Fashion-MNIST the loader looks
in ``<dir>``, ``<dir>/fashion-mnist``, ``<dir>/fashion_mnist``, ``<dir>/FashionMNIST/raw``.
"""

from magnet_jax.data.core import (
    DATA_DIR_ENV_VAR,
    FASHION_MNIST_COARSE,
    MNIST_PARITY,
    ClassGrouping,
    Dataset,
    Pool,
    check_finite,
    coarsen,
    default_data_dir,
    split_validation,
    stratified_split,
)
from magnet_jax.data.digits import DIGITS_SPLIT_SEED, DIGITS_TEST_FRACTION, MNIST_CLASS_NAMES
from magnet_jax.data.idx import _IDX_RAW_SHA256, FASHION_MNIST_CLASS_NAMES, parse_idx
from magnet_jax.data.npz import NPZ_DEFAULT_TEST_FRACTION
from magnet_jax.data.protocol import SPLITS, split_pool
from magnet_jax.data.registry import (
    KNOWN_DATASETS,
    SOURCES,
    Source,
    dataset_help,
    find_source,
    load_dataset,
    takes_option,
)

__all__ = [
    "Dataset",
    "Pool",
    "ClassGrouping",
    "Source",
    "SOURCES",
    "SPLITS",
    "load_dataset",
    "find_source",
    "takes_option",
    "dataset_help",
    "split_pool",
    "check_finite",
    "coarsen",
    "split_validation",
    "stratified_split",
    "parse_idx",
    "default_data_dir",
    "KNOWN_DATASETS",
    "DATA_DIR_ENV_VAR",
    "FASHION_MNIST_CLASS_NAMES",
    "FASHION_MNIST_COARSE",
    "MNIST_PARITY",
    "MNIST_CLASS_NAMES",
    "DIGITS_TEST_FRACTION",
    "DIGITS_SPLIT_SEED",
    "NPZ_DEFAULT_TEST_FRACTION",
    "_IDX_RAW_SHA256",
]
