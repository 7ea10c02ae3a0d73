"""One name -> loader table for every dataset, and :func:`load_dataset` which reads it.

:data:`SOURCES` is the only list of dataset names: :data:`KNOWN_DATASETS`, the command's
help, the coarse-label variants and the check of which options a dataset takes are all
derived from it.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable

from magnet_jax.data import (
    cars,
    cifar,
    cub,
    digits,
    dogs,
    emoji,
    flowers,
    idx,
    images,
    npz,
    pets,
    sop,
    tfds,
)
from magnet_jax.data.core import (
    FASHION_MNIST_COARSE,
    MNIST_PARITY,
    ClassGrouping,
    Dataset,
    Pool,
    check_finite,
    coarsen,
)
from magnet_jax.data.protocol import SPLITS, pool_of, split_pool

# Options of load_dataset that a source must declare to be given them; giving one to a
# source that does not take it is an error. (verify, test_fraction and seed are accepted
# by every source: the first is ignored where there is nothing to verify, the others
# drive the stratified split of the `default` protocol.)
STRICT_OPTIONS = (
    "label_mode",
    "manual_dir",
    "splits",
    "image_size",
    "label_level",
    "drop_duplicates",
    "skip_bad_images",
    "lazy",
)
_IMAGE_FILE_OPTIONS = ("image_size", "skip_bad_images", "lazy")


@dataclasses.dataclass(frozen=True)
class Source:
    """A dataset the library can load.

    Attributes:
      name: the name (``mnist``), or the prefix of ``<name>:<argument>`` names (``npz``).
      load: ``load(argument, data_dir, **options) -> Dataset | Pool``; ``argument`` is the
        text after the prefix, or the name.
      summary: one line for the help.
      takes_argument: named ``<name>:<argument>``.
      options: the :data:`STRICT_OPTIONS` (and ``verify``, ``test_fraction``, ``seed``)
        that ``load`` takes as keywords.
      coarse_of: for a coarse-label variant, the source whose labels it groups.
      grouping: the groups of ``coarse_of``'s classes (None: ``load`` does it).
      aliases: other accepted names.
    """

    name: str
    load: Callable[..., Dataset | Pool]
    summary: str
    takes_argument: bool = False
    options: tuple[str, ...] = ()
    coarse_of: str | None = None
    grouping: ClassGrouping | None = None
    aliases: tuple[str, ...] = ()

    @property
    def display_name(self) -> str:
        return f"{self.name}:{_ARGUMENT_NAMES[self.name]}" if self.takes_argument else self.name


_ARGUMENT_NAMES = {"tfds": "<name>", "npz": "<path>", "folder": "<dir>", "csv": "<file>"}

SOURCES: tuple[Source, ...] = (
    Source("digits", digits.load, "scikit-learn's 8x8 digits, bundled, no files needed"),
    Source("mnist", idx.load, "idx files", options=("verify",)),
    Source("fashion_mnist", idx.load, "idx files", options=("verify",)),
    Source("cifar10", cifar.load, "python-pickle archive"),
    Source("cifar100", cifar.load, "python-pickle archive", options=("label_mode",)),
    Source("mnist_parity", idx.load, "MNIST even/odd", options=("verify",), coarse_of="mnist",
           grouping=MNIST_PARITY),
    Source("fashion_mnist_coarse", idx.load, "tops/footwear/trouser/bag", options=("verify",),
           coarse_of="fashion_mnist", grouping=FASHION_MNIST_COARSE),
    Source("cifar100_coarse", functools.partial(cifar.load, label_mode="coarse"),
           "20 superclasses", coarse_of="cifar100"),
    Source("tfds", tfds.load, "TensorFlow Datasets builder", takes_argument=True,
           options=("manual_dir", "splits", "image_size")),
    Source("npz", npz.load, "features x, y[, x_test, y_test]", takes_argument=True,
           options=("test_fraction", "seed")),
    Source("emoji", emoji.load, "emoji64.npz, class-disjoint split of its own",
           options=("label_level", "drop_duplicates", "image_size")),
    Source("folder", images.load_folder, "one subfolder of images per class",
           takes_argument=True, options=_IMAGE_FILE_OPTIONS),
    Source("csv", images.load_csv, "path,label[,split] (paths relative to the CSV)",
           takes_argument=True, options=_IMAGE_FILE_OPTIONS),
    Source("cub200", cub.load, "CUB-200-2011 release", options=_IMAGE_FILE_OPTIONS,
           aliases=("cub", "cub_200_2011")),
    Source("cars196", cars.load, "Stanford Cars release", options=_IMAGE_FILE_OPTIONS,
           aliases=("cars", "stanford_cars")),
    Source("sop", sop.load, "Stanford Online Products release", options=_IMAGE_FILE_OPTIONS,
           aliases=("stanford_online_products",)),
    Source("stanford_dogs", dogs.load, "Stanford Dogs release", options=_IMAGE_FILE_OPTIONS),
    Source("oxford_flowers102", flowers.load, "Oxford 102 Flowers release",
           options=_IMAGE_FILE_OPTIONS),
    Source("oxford_iiit_pet", pets.load, "Oxford-IIIT Pet release", options=_IMAGE_FILE_OPTIONS),
)  # fmt: skip

KNOWN_DATASETS = tuple(source.display_name for source in SOURCES)

_BY_NAME = {alias: source for source in SOURCES for alias in (source.name, *source.aliases)}


def find_source(name: str) -> tuple[Source, str]:
    """The source of a dataset name and the argument its loader gets.

    Raises:
      ValueError: an unknown name (the message lists the known ones).
    """
    prefix, colon, argument = name.partition(":")
    if colon:
        source = _BY_NAME.get(prefix.lower())
        if source is not None and source.takes_argument:
            return source, argument
    else:
        source = _BY_NAME.get(name.lower().replace("-", "_"))
        if source is not None and not source.takes_argument:
            key = source.coarse_of or source.name
            return source, key
    raise ValueError(f"unknown dataset {name!r}; known: {', '.join(KNOWN_DATASETS)}")


def takes_option(name: str, option: str) -> bool:
    """Whether dataset ``name`` takes the load option ``option`` (False for unknown names)."""
    try:
        source, _ = find_source(name)
    except ValueError:
        return False
    return option in source.options


def sources_taking(option: str) -> list[str]:
    """Display names of the sources that take ``option``."""
    return [source.display_name for source in SOURCES if option in source.options]


def dataset_help() -> str:
    """One line naming every dataset, for the command's ``--dataset`` help."""
    return "; ".join(f"{source.display_name} ({source.summary})" for source in SOURCES)


def load_dataset(
    name: str,
    data_dir: str | os.PathLike | None = None,
    *,
    verify: bool = True,
    label_mode: str = "fine",
    test_fraction: float = npz.NPZ_DEFAULT_TEST_FRACTION,
    seed: int = 0,
    manual_dir: str | os.PathLike | None = None,
    splits: tuple[str, str] = ("train", "test"),
    image_size: int | tuple[int, int] | None = None,
    split: str = "default",
    label_level: str | None = None,
    drop_duplicates: bool = False,
    skip_bad_images: bool = False,
    lazy: bool = False,
) -> Dataset:
    """Loads a dataset by name into memory, split by the protocol ``split``.

    Args:
      name: a name of :data:`KNOWN_DATASETS` (``-`` may stand for ``_``): ``digits``,
        ``mnist``, ``fashion_mnist``, ``cifar10``, ``cifar100``; the coarse-label variants
        for hierarchy experiments ``mnist_parity`` (even/odd), ``fashion_mnist_coarse``
        (tops, footwear, trouser, bag), ``cifar100_coarse`` (20 superclasses), whose
        original labels are kept as ``fine_*``; ``tfds:<builder>``; ``npz:<path>``;
        ``emoji``; ``folder:<dir>``; ``csv:<file>``; the released layouts ``cub200``,
        ``cars196``, ``sop``, ``stanford_dogs``, ``oxford_flowers102``, ``oxford_iiit_pet``.
      data_dir: where the files are (the dataset's folder or its parent); defaults to
        :func:`~magnet_jax.data.core.default_data_dir`. For ``tfds:`` it is TFDS's data dir.
        For ``npz:``, ``folder:``, ``csv:`` a relative path is tried against the working
        directory, then against ``data_dir``. Unused by ``digits``.
      verify: check the SHA-256 of the canonical MNIST / Fashion-MNIST files.
      label_mode: CIFAR-100 only: ``"fine"`` or ``"coarse"`` (fine labels kept in ``fine_*``).
      test_fraction: the share of every class held out when the protocol needs a
        stratified split (``npz:`` without ``x_test``; ``default`` on a dataset whose own
        split is class-disjoint or missing).
      seed: seed of that stratified split.
      manual_dir: ``tfds:`` only: local raw files (``DownloadConfig(manual_dir=...)``).
      splits: ``tfds:`` only: the TFDS split names used as train and test.
      image_size: ``tfds:``, ``emoji`` and the image-file sources: resize every image to
        this size (an int, or a square ``(height, width)``).
      split: ``default``, ``given`` or ``classes`` (:mod:`magnet_jax.data.protocol`).
      label_level: ``emoji`` only: ``emoji``, ``subcategory`` or ``category``.
      drop_duplicates: ``emoji`` only: leave out the images flagged ``duplicate``.
      skip_bad_images: image-file sources: leave out missing or unreadable images (a
        warning says how many) instead of stopping.
      lazy: image-file sources: keep the images on disk, ``x_train`` and ``x_test`` being
        :class:`~magnet_jax.data.lazy.ImageFiles` that the streaming input reads
        (``--input stream``); needs ``image_size``.

    Returns:
      The :class:`~magnet_jax.data.core.Dataset`, its inputs checked to be finite.

    Raises:
      ValueError: unknown name or option, an option the dataset does not take, corrupt
        data, non-finite inputs.
      FileNotFoundError: the files are not where they were looked for.
      ImportError: ``tfds:`` without tensorflow-datasets installed.
    """
    if label_mode not in ("fine", "coarse"):
        raise ValueError(f"label_mode must be 'fine' or 'coarse', got {label_mode!r}")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    source, argument = find_source(name)
    given = {
        "verify": verify,
        "label_mode": label_mode,
        "test_fraction": test_fraction,
        "seed": seed,
        "manual_dir": manual_dir,
        "splits": tuple(splits),
        "image_size": image_size,
        "label_level": label_level,
        "drop_duplicates": drop_duplicates,
        "skip_bad_images": skip_bad_images,
        "lazy": lazy,
    }
    defaults = {
        "label_mode": "fine",
        "manual_dir": None,
        "splits": ("train", "test"),
        "image_size": None,
        "label_level": None,
        "drop_duplicates": False,
        "skip_bad_images": False,
        "lazy": False,
    }
    for option in STRICT_OPTIONS:
        if given[option] != defaults[option] and option not in source.options:
            takers = sources_taking(option)
            raise ValueError(
                f"{option}={given[option]!r} applies to {', '.join(takers)} only, not to {name!r}"
            )
    if image_size is not None and source.name != "tfds":
        given["image_size"] = _square_size(image_size)
    loaded = source.load(argument, data_dir, **{k: given[k] for k in source.options})
    if isinstance(loaded, Pool):
        dataset = split_pool(loaded, split, test_fraction=test_fraction, seed=seed)
    elif split != "default":
        dataset = split_pool(pool_of(loaded), split, test_fraction=test_fraction, seed=seed)
    else:
        dataset = loaded
    if source.grouping is not None:
        key = name.lower().replace("-", "_")
        suffix = "/classes" if split == "classes" else ""
        dataset = coarsen(dataset, *source.grouping, name=key + suffix)
    check_finite(dataset)
    return dataset


def _square_size(image_size: int | tuple[int, int]) -> int:
    if isinstance(image_size, tuple):
        if len(image_size) != 2 or image_size[0] != image_size[1]:
            raise ValueError(f"image_size must be square here, got {image_size}")
        image_size = image_size[0]
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise ValueError(f"image_size must be a positive integer, got {image_size!r}")
    return image_size
