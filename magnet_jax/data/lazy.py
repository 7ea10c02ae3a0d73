"""Image files that stay on disk until an example is read: the dataset side of streaming.

An :class:`ImageFiles` stands where a dataset holds ``x`` (``x_train``, ``x_test``, a
pool's ``x``) when a file source is loaded with ``lazy=True``: it has the shape and dtype
of the decoded ``[N, S, S, 3]`` float32 array, selecting rows (a slice, an index array, a
boolean mask) gives another :class:`ImageFiles` without reading anything, and reading one
row decodes that file exactly as the in-memory loader does
(:func:`magnet_jax.data.images.decode_images`), so a streamed example has the same pixels
as the in-memory one. ``np.asarray`` decodes every file (what a consumer that needs the
whole array gets, e.g. the retrieval pictures).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np


class ImageFiles:
    """``N`` image files read on demand as ``[S, S, 3]`` float32 images in ``[0, 1]``.

    Args:
      paths: the ``N`` files.
      image_size: ``S``: each image's shorter side is resized to ``S`` and the centre
        ``S x S`` kept (:func:`magnet_jax.data.images.decode_image`).
      dataset: the dataset's name, for messages.
    """

    def __init__(self, paths: Sequence[str | Path], image_size: int, *, dataset: str = ""):
        if image_size is None or int(image_size) < 1:
            raise ValueError(
                f"dataset {dataset!r}: streamed image files need --image-size N (image_size=N): "
                "every image is resized to N x N when it is read"
            )
        self.paths = np.asarray([str(p) for p in paths], dtype=object)
        self.image_size = int(image_size)
        self.dataset = dataset

    # -- the array-like surface that Dataset, Pool and the protocols use ---------------

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (len(self.paths), self.image_size, self.image_size, 3)

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(np.float32)

    @property
    def ndim(self) -> int:
        return 4

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, key):
        """An int reads that image ``[S, S, 3]``; a slice, index array or mask selects rows
        (an :class:`ImageFiles`, nothing read)."""
        if isinstance(key, int | np.integer):
            return self.read(int(key))
        return ImageFiles(self.paths[key], self.image_size, dataset=self.dataset)

    def __array__(self, dtype=None, copy=None):
        from magnet_jax.data.images import decode_images

        images, _ = decode_images(
            [Path(p) for p in self.paths], image_size=self.image_size, dataset=self.dataset
        )
        return images if dtype is None else images.astype(dtype)

    def __repr__(self) -> str:
        return f"ImageFiles({len(self)} files of {self.dataset!r}, {self.image_size}px)"

    # -- reading ------------------------------------------------------------------------

    def path(self, row: int) -> str:
        return self.paths[row]

    def read_uint8(self, row: int) -> np.ndarray:
        """``[S, S, 3]`` uint8: row ``row`` decoded, shorter side resized, centre crop.

        Raises:
          ValueError: naming the file, when it is missing or cannot be decoded.
        """
        from magnet_jax.data.images import decode_image

        path = Path(self.paths[row])
        try:
            return decode_image(path, self.image_size)
        except Exception as error:  # noqa: BLE001 -- Pillow raises many types for a bad file
            raise ValueError(
                f"dataset {self.dataset!r}: cannot read image {path} (row {row}; "
                f"{type(error).__name__}: {error}); replace or remove the file"
            ) from error

    def read(self, row: int) -> np.ndarray:
        """``[S, S, 3]`` float32 in ``[0, 1]``, the pixels the in-memory loader gives."""
        return self.read_uint8(row).astype(np.float32) / np.float32(255.0)

    def open(self, row: int):
        """The file of ``row`` as an RGB ``PIL.Image`` at its stored size (for host
        augmentations that crop from the full resolution)."""
        from PIL import Image

        path = Path(self.paths[row])
        try:
            with Image.open(path) as image:
                return image.convert("RGB")
        except Exception as error:  # noqa: BLE001 -- Pillow raises many types for a bad file
            raise ValueError(
                f"dataset {self.dataset!r}: cannot read image {path} (row {row}; "
                f"{type(error).__name__}: {error}); replace or remove the file"
            ) from error


def is_lazy(x) -> bool:
    """Whether ``x`` is an :class:`ImageFiles` (read on demand) rather than an array."""
    return isinstance(x, ImageFiles)
