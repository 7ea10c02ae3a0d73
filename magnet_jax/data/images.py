"""Images decoded from files: a folder per class, a CSV list, and what the standard layouts share.

Every image is decoded with Pillow, converted to RGB and, with ``image_size``, resized so
that its shorter side is ``image_size`` and centre-cropped to ``image_size x image_size``
(the aspect ratio is kept; the crop drops the ends of the longer side). Without
``image_size`` all images must already have one size. The result is a
:class:`~magnet_jax.data.core.Pool` of float32 ``[N, S, S, 3]`` images in ``[0, 1]``.

Bad input stops before training with a message naming the file: a missing or unreadable
image (or, with ``skip_bad_images=True``, it is left out and a warning says how many were),
an empty class folder, a CSV without a ``path`` or ``label`` column or with an empty label,
a path that leads outside the dataset's folder.
"""

from __future__ import annotations

import concurrent.futures
import csv
import dataclasses
import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from magnet_jax.data.core import DEFAULT_RECALL_KS, Pool, candidate_dirs, remap_labels

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
# OML's CSV marks the held-out rows "validation"; "test" is accepted too.
CSV_SPLITS = {"train": False, "validation": True, "test": True}


def decode_image(path: Path, image_size: int | None) -> np.ndarray:
    """``[S, S, 3]`` uint8 RGB; raises OSError/ValueError (Pillow's) on a bad file."""
    from PIL import Image

    with Image.open(path) as image:
        image = image.convert("RGB")
        if image_size is not None:
            width, height = image.size
            scale = image_size / min(width, height)
            new_size = (
                max(image_size, round(width * scale)),
                max(image_size, round(height * scale)),
            )
            image = image.resize(new_size, Image.BILINEAR)
            left = (new_size[0] - image_size) // 2
            top = (new_size[1] - image_size) // 2
            image = image.crop((left, top, left + image_size, top + image_size))
        return np.asarray(image, np.uint8)


def decode_images(
    paths: Sequence[Path],
    *,
    image_size: int | None,
    skip_bad_images: bool = False,
    dataset: str = "",
    num_workers: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Decodes image files in parallel threads (Pillow releases the GIL while decoding).

    Args:
      paths: ``N`` image files.
      image_size: side of the square output (shorter side resized, centre crop), or None
        to keep the stored size (then all images must share one).
      skip_bad_images: leave out a missing or unreadable file (with a warning giving the
        count and the first such path) instead of stopping.
      dataset: the dataset's name, for messages.
      num_workers: decoding threads (default: the number of CPUs).

    Returns:
      ``(images [n, S, S, 3] float32 in [0, 1], kept [N] bool)``; ``n = kept.sum()``.

    Raises:
      FileNotFoundError: a missing image (unless skipped).
      ValueError: an unreadable image (unless skipped), images of several sizes without
        ``image_size``, or no readable image at all.
    """

    def read(path: Path):
        if not path.is_file():
            return FileNotFoundError(f"dataset {dataset!r}: image {path} does not exist")
        try:
            return decode_image(path, image_size)
        except Exception as error:  # noqa: BLE001 -- Pillow raises many types for a bad file
            return ValueError(
                f"dataset {dataset!r}: cannot read image {path} ({type(error).__name__}: {error})"
            )

    workers = num_workers or min(32, os.cpu_count() or 1)
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        decoded = list(pool.map(read, paths))
    kept = np.array([not isinstance(item, Exception) for item in decoded], bool)
    bad = [item for item in decoded if isinstance(item, Exception)]
    if bad and not skip_bad_images:
        hint = " (pass --skip-bad-images to leave such files out)"
        raise type(bad[0])(f"{bad[0]}{hint}; {len(bad)} of {len(paths)} images are bad")
    if bad:
        warnings.warn(
            f"dataset {dataset!r}: skipped {len(bad)} of {len(paths)} images that are missing "
            f"or unreadable; the first: {bad[0]}",
            stacklevel=2,
        )
    images = [item for item in decoded if not isinstance(item, Exception)]
    if not images:
        raise ValueError(f"dataset {dataset!r}: no readable image among {len(paths)} files")
    shapes = {image.shape for image in images}
    if len(shapes) > 1:
        good_paths = [p for p, k in zip(paths, kept) if k]
        first, other = images[0].shape, next(i for i in images if i.shape != images[0].shape)
        other_path = good_paths[[i.shape for i in images].index(other.shape)]
        raise ValueError(
            f"dataset {dataset!r}: images differ in size ({good_paths[0]} is "
            f"{first[1]}x{first[0]}, {other_path} is {other.shape[1]}x{other.shape[0]}); "
            "pass --image-size N (image_size=N) to resize them to N x N"
        )
    stacked = np.stack(images).astype(np.float32)
    stacked /= np.float32(255.0)
    return stacked, kept


def _lazy_files(
    paths: Sequence[Path], *, image_size: int | None, skip_bad_images: bool, dataset: str
):
    """``(ImageFiles of the existing files, kept [N] bool)``; a missing file is an error
    naming it (or, with ``skip_bad_images``, left out with a warning)."""
    from magnet_jax.data.lazy import ImageFiles

    if image_size is None:
        raise ValueError(
            f"dataset {dataset!r}: --input stream reads every image when it is needed and "
            "resizes it then; pass --image-size N (image_size=N)"
        )
    kept = np.array([Path(p).is_file() for p in paths], bool)
    missing = [p for p, k in zip(paths, kept) if not k]
    if missing and not skip_bad_images:
        raise FileNotFoundError(
            f"dataset {dataset!r}: image {missing[0]} does not exist (pass --skip-bad-images "
            f"to leave such files out); {len(missing)} of {len(paths)} images are missing"
        )
    if missing:
        warnings.warn(
            f"dataset {dataset!r}: skipped {len(missing)} of {len(paths)} images that are "
            f"missing; the first: {missing[0]}",
            stacklevel=3,
        )
    if not kept.any():
        raise ValueError(f"dataset {dataset!r}: none of the {len(paths)} image files exists")
    return ImageFiles([p for p, k in zip(paths, kept) if k], image_size, dataset=dataset), kept


def resolve_inside(root: Path, relative: str, *, dataset: str, listed_in: str) -> Path:
    """``root / relative``, refusing a path that leads outside ``root`` (``..``, absolute)."""
    path = (root / relative).resolve()
    if not path.is_relative_to(root.resolve()):
        raise ValueError(
            f"dataset {dataset!r}: {listed_in} lists {relative!r}, which is outside the "
            f"dataset folder {root}; image paths must be relative and stay inside it"
        )
    return path


def pool_from_class_ids(
    name: str,
    paths: Sequence[Path],
    class_ids: Sequence,
    class_names: dict,
    **options,
) -> Pool:
    """:func:`pool_from_files` for a layout that numbers its classes itself: ``class_ids``
    [N] are the layout's ids (any sortable values) and ``class_names`` maps each to its
    name; classes are renumbered ``0..C-1`` in the order of their ids. ``options`` are
    :func:`pool_from_files`' keyword arguments."""
    ordered = sorted(class_names)
    index_of = {c: i for i, c in enumerate(ordered)}
    return pool_from_files(
        name,
        paths,
        [index_of[c] for c in class_ids],
        class_names=[class_names[c] for c in ordered],
        **options,
    )


def pool_from_files(
    name: str,
    paths: Sequence[Path],
    labels: Sequence,
    *,
    class_names: Sequence[str] | None = None,
    given_test: np.ndarray | None = None,
    image_size: int | None = None,
    skip_bad_images: bool = False,
    recall_ks: tuple[int, ...] = DEFAULT_RECALL_KS,
    lazy: bool = False,
) -> Pool:
    """Decodes ``paths`` and labels them; labels are remapped to ``[0, C)`` in sorted order.

    Args:
      name: the dataset's name.
      paths: ``N`` image files.
      labels: ``N`` labels: integer ids into ``class_names`` when it is given, else any
        sortable values, which then name the classes.
      class_names: names of the label ids, or None.
      given_test: ``[N]`` bool, the source's own split (True: test), or None.
      image_size, skip_bad_images: see :func:`decode_images`.
      recall_ks: the Recall@k to report.
      lazy: keep the files on disk (``x`` is a :class:`~magnet_jax.data.lazy.ImageFiles`
        read by the streaming input, ``--input stream``): only their existence is checked
        here (``skip_bad_images`` leaves out missing ones); a file that cannot be decoded
        stops the run when it is first read, naming it. Needs ``image_size``.
    """
    if lazy:
        x, kept = _lazy_files(
            paths, image_size=image_size, skip_bad_images=skip_bad_images, dataset=name
        )
    else:
        x, kept = decode_images(
            paths, image_size=image_size, skip_bad_images=skip_bad_images, dataset=name
        )
    labels = np.asarray(labels)[kept]
    (y,), values = remap_labels(labels)
    if class_names is not None:
        names = tuple(class_names[int(v)] for v in values)
    else:
        names = tuple(str(v) for v in values.tolist())
    return Pool(
        name=name,
        x=x,
        y=y,
        class_names=names,
        given_test=None if given_test is None else np.asarray(given_test, bool)[kept],
        recall_ks=recall_ks,
    )


def find_root(
    title: str,
    data_dir: str | os.PathLike | None,
    subdirs: Sequence[str],
    markers: Sequence[str],
    how: str,
) -> Path:
    """The folder of a dataset: ``data_dir`` or one of its ``subdirs`` holding one of the
    ``markers`` (paths relative to the folder), tried in that order."""
    from magnet_jax.data.core import default_data_dir

    root = Path(data_dir).expanduser() if data_dir is not None else default_data_dir()
    looked = []
    for directory in candidate_dirs(root, subdirs):
        for marker in markers:
            looked.append(str(directory / marker))
            if (directory / marker).exists():
                return directory
    raise FileNotFoundError(
        f"{title} not found in {root} (looked for {', '.join(looked)}). {how} Pass --data-dir "
        "(data_dir=) pointing at the extracted folder or its parent."
    )


@dataclasses.dataclass(frozen=True)
class Listing:
    """What a released layout's annotation files list.

    Attributes:
      paths: ``[N]`` image files.
      class_ids: ``[N]`` the layout's own class ids (any sortable values).
      class_names: the name of every class id; classes are numbered ``0..C-1`` in the
        order of their ids.
      given_test: ``[N]`` the release's own split (True: test).
    """

    paths: Sequence[Path]
    class_ids: Sequence
    class_names: dict
    given_test: Sequence[bool]


@dataclasses.dataclass(frozen=True)
class Release:
    """A dataset as its authors distribute it: where its folder is and how to read it.

    Attributes:
      name: the dataset's name (``cub200``), in the pool and in messages.
      title: what the not-found message calls it (``CUB-200-2011``).
      subdirs: the dataset's own folder names, tried under ``data_dir`` before it.
      markers: files (relative to the folder) of which one marks the folder.
      how: what to download and extract, for the not-found message.
      read: ``read(root) -> Listing``, the parser of the annotation files in ``root``.
      recall_ks: the Recall@k to report.
    """

    name: str
    title: str
    subdirs: tuple[str, ...]
    markers: tuple[str, ...]
    how: str
    read: Callable[[Path], Listing]
    recall_ks: tuple[int, ...] = DEFAULT_RECALL_KS

    def load(
        self,
        argument: str,
        data_dir: str | os.PathLike | None = None,
        *,
        image_size: int | None = None,
        skip_bad_images: bool = False,
        lazy: bool = False,
    ) -> Pool:
        """The registry's loader: finds the folder, reads its listing, decodes the images.

        ``argument`` is the dataset's name (a release takes no ``<name>:<argument>``);
        ``image_size``, ``skip_bad_images`` and ``lazy`` are :func:`pool_from_files`'.
        """
        del argument
        root = find_root(self.title, data_dir, self.subdirs, self.markers, self.how)
        listing = self.read(root)
        return pool_from_class_ids(
            self.name,
            listing.paths,
            listing.class_ids,
            listing.class_names,
            given_test=listing.given_test,
            image_size=image_size,
            skip_bad_images=skip_bad_images,
            recall_ks=self.recall_ks,
            lazy=lazy,
        )


def _resolve_argument(kind: str, text: str, data_dir: str | os.PathLike | None) -> Path:
    path = Path(text).expanduser()
    candidates = [path]
    if not path.is_absolute() and data_dir is not None:
        candidates.append(Path(data_dir).expanduser() / path)
    for candidate in candidates:
        if candidate.exists():
            return candidate
    raise FileNotFoundError(
        f"{kind} '{text}' not found (looked for {', '.join(str(c.resolve()) for c in candidates)})"
    )


def load_folder(
    argument: str,
    data_dir: str | os.PathLike | None = None,
    *,
    image_size: int | None = None,
    skip_bad_images: bool = False,
    lazy: bool = False,
) -> Pool:
    """``folder:<dir>``: one subfolder per class, named for it; no split of its own."""
    root = _resolve_argument("image folder", argument, data_dir)
    name = f"folder:{argument}"
    if not root.is_dir():
        raise ValueError(f"dataset {name!r}: {root} is not a folder")
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not class_dirs:
        raise ValueError(
            f"dataset {name!r}: {root} has no class subfolders; put each class's images in "
            "a subfolder named for the class"
        )
    paths, labels = [], []
    for label, class_dir in enumerate(class_dirs):
        files = sorted(
            p for p in class_dir.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
        )
        if not files:
            raise ValueError(
                f"dataset {name!r}: class folder {class_dir} holds no image files "
                f"({', '.join(IMAGE_EXTENSIONS)}); remove it or add images"
            )
        paths += files
        labels += [label] * len(files)
    return pool_from_files(
        name,
        paths,
        labels,
        class_names=[d.name for d in class_dirs],
        image_size=image_size,
        skip_bad_images=skip_bad_images,
        lazy=lazy,
    )


def _sortable_labels(texts: list[str]) -> np.ndarray:
    """Integers when every label is one (so 2 sorts before 10), else the strings."""
    try:
        return np.array([int(t) for t in texts], np.int64)
    except ValueError:
        return np.array(texts)


def load_csv(
    argument: str,
    data_dir: str | os.PathLike | None = None,
    *,
    image_size: int | None = None,
    skip_bad_images: bool = False,
    lazy: bool = False,
) -> Pool:
    """``csv:<file>``: columns ``path,label[,split]``, paths relative to the CSV's folder.

    open-metric-learning's convention: ``split`` is ``train`` or ``validation`` (``test``
    is read as ``validation``) and is the dataset's own split when present. Further
    columns are ignored.
    """
    csv_path = _resolve_argument("CSV file", argument, data_dir)
    name = f"csv:{argument}"
    try:
        with open(csv_path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
            columns = rows[0].keys() if rows else []
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise ValueError(f"dataset {name!r}: cannot read {csv_path} ({error})") from error
    if not rows:
        raise ValueError(f"dataset {name!r}: {csv_path} has no rows under a header")
    missing = [column for column in ("path", "label") if column not in columns]
    if missing:
        raise ValueError(
            f"dataset {name!r}: {csv_path} has no column {', '.join(missing)} (header: "
            f"{', '.join(columns)}); it needs path,label and optionally split"
        )
    root = csv_path.parent
    paths, labels, given_test = [], [], []
    for line, row in enumerate(rows, start=2):
        label = (row["label"] or "").strip()
        if not label:
            raise ValueError(f"dataset {name!r}: {csv_path} line {line} has no label")
        paths.append(
            resolve_inside(root, (row["path"] or "").strip(), dataset=name, listed_in=str(csv_path))
        )
        labels.append(label)
        if "split" in columns:
            split = (row["split"] or "").strip()
            if split not in CSV_SPLITS:
                raise ValueError(
                    f"dataset {name!r}: {csv_path} line {line} has split {split!r}; use "
                    f"{', '.join(CSV_SPLITS)}"
                )
            given_test.append(CSV_SPLITS[split])
    return pool_from_files(
        name,
        paths,
        _sortable_labels(labels),
        given_test=np.array(given_test, bool) if "split" in columns else None,
        image_size=image_size,
        skip_bad_images=skip_bad_images,
        lazy=lazy,
    )


def read_mat(path: Path, *, dataset: str, keys: Sequence[str]) -> dict:
    """The variables ``keys`` of a MATLAB ``.mat`` file (scipy.io, squeezed)."""
    if not path.is_file():
        raise FileNotFoundError(f"dataset {dataset!r}: annotation file {path} is missing")
    import scipy.io

    try:
        content = scipy.io.loadmat(path, squeeze_me=True)
    except Exception as error:  # noqa: BLE001 -- scipy raises several types for a bad file
        raise ValueError(
            f"dataset {dataset!r}: {path} is not a readable .mat file ({error})"
        ) from error
    missing = [key for key in keys if key not in content]
    if missing:
        found = sorted(k for k in content if not k.startswith("__"))
        raise ValueError(f"dataset {dataset!r}: {path} has no {', '.join(missing)} (has {found})")
    return {key: content[key] for key in keys}
