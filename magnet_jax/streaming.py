"""Streaming input (``--input stream``): examples read by index on the host with Grain.

The in-memory input copies the whole training set onto every device and gathers the
sampled rows inside the jitted step. The streaming input keeps the training set on the
host (image files on disk, :class:`~magnet_jax.data.lazy.ImageFiles`, or an array in host
memory) and splits the step in two (:func:`magnet_jax.training.build_step_functions`):

1. the method's sampler, jitted, draws the next batch's indices from the method state;
2. the host reads, decodes and augments exactly those rows (:class:`Loader`, a Grain
   pipeline whose worker threads decode in parallel: Pillow releases the GIL), while the
   device runs the step before;
3. the jitted train step consumes the batch.

A refresh or an evaluation embeds a whole set in a streamed pass (:meth:`Loader.chunks`,
prefetched while the device embeds the chunk before).

Augmentation: image files are cropped on the host, from the image at its stored
resolution: a random resized crop + horizontal flip for training
(:func:`random_resized_crop_flip`), a resize + centre crop for evaluation
(:func:`center_crop`); each random draw is a function of the run's seed, the step and the
example's position in the batch, so a resumed run draws the same crops. An array in host
memory is augmented on the device as in memory.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Sequence

import numpy as np

from magnet_jax.augment import DEFAULT_CROP_FRACTION, DEFAULT_RATIO, DEFAULT_SCALE
from magnet_jax.data.lazy import ImageFiles, is_lazy

_HOST_CROP_STREAM = 0x686F7374  # mixed into the seed of a step's host-side crops


# --------------------------------------------------------------------------------------
# Host-side augmentation of image files (Pillow), the counterpart of magnet_jax.augment.
# --------------------------------------------------------------------------------------


def crop_box(
    rng: np.random.Generator,
    height: int,
    width: int,
    *,
    scale: tuple[float, float] = DEFAULT_SCALE,
    ratio: tuple[float, float] = DEFAULT_RATIO,
) -> tuple[float, float, float, float]:
    """One box ``(top, left, h, w)`` drawn as :func:`magnet_jax.augment.random_crop_boxes`
    draws its boxes: area a uniform share ``scale`` of the image, aspect ratio ``w / h``
    log-uniform in ``ratio``, clipped to the image, position uniform."""
    area = height * width * rng.uniform(scale[0], scale[1])
    aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
    box_w = min(max(math.sqrt(area * aspect), 1.0), width)
    box_h = min(max(math.sqrt(area / aspect), 1.0), height)
    top = rng.uniform() * (height - box_h)
    left = rng.uniform() * (width - box_w)
    return top, left, box_h, box_w


def random_resized_crop_flip(image, size: int, rng: np.random.Generator) -> np.ndarray:
    """Training view of a ``PIL.Image``: a random resized crop to ``size x size`` (Pillow's
    antialiased bilinear), mirrored left-right half the time.

    Returns:
      ``[size, size, 3]`` float32 in ``[0, 1]``.
    """
    from PIL import Image

    top, left, box_h, box_w = crop_box(rng, image.height, image.width)
    out = image.resize((size, size), Image.BILINEAR, box=(left, top, left + box_w, top + box_h))
    if rng.uniform() < 0.5:
        out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return np.asarray(out, np.float32) / np.float32(255.0)


def center_crop(image, size: int, *, crop_fraction: float = DEFAULT_CROP_FRACTION) -> np.ndarray:
    """Evaluation view of a ``PIL.Image``: the centre ``crop_fraction`` of its shorter side,
    square, resized to ``size x size`` (resize 256, centre crop 224 for ``size=224``).

    Returns:
      ``[size, size, 3]`` float32 in ``[0, 1]``.
    """
    from PIL import Image

    side = min(image.width, image.height) * crop_fraction
    left, top = (image.width - side) / 2, (image.height - side) / 2
    out = image.resize((size, size), Image.BILINEAR, box=(left, top, left + side, top + side))
    return np.asarray(out, np.float32) / np.float32(255.0)


# --------------------------------------------------------------------------------------
# The loader.
# --------------------------------------------------------------------------------------


def require_grain() -> None:
    """Raises ImportError with the install command when Grain is missing."""
    try:
        import grain  # noqa: F401
    except ImportError as error:
        raise ImportError(
            "--input stream reads the data with Grain, which is not installed: "
            'pip install "magnet-jax[stream]" (or pip install grain)'
        ) from error


@dataclasses.dataclass(frozen=True)
class Loader:
    """Reads rows of a training or test set on the host through a Grain pipeline.

    Attributes:
      x: ``[N, ...]``: an :class:`~magnet_jax.data.lazy.ImageFiles` (read from disk) or
        an array in host memory.
      workers: Grain's reading threads (0: read in the calling thread).
      host_crop: crop image files on the host (``--augment-crop``): training rows get a
        random resized crop + flip, evaluation rows a centre crop, both from the file at
        its stored size. False: rows as the in-memory input holds them.
      seed: the run's seed, for the host crops.
    """

    x: ImageFiles | np.ndarray
    workers: int = 0
    host_crop: bool = False
    seed: int = 0

    def __post_init__(self):
        if self.host_crop and not is_lazy(self.x):
            raise ValueError("host_crop needs image files (an ImageFiles), not an array")

    def __len__(self) -> int:
        return len(self.x)

    @property
    def example_shape(self) -> tuple[int, ...]:
        return tuple(self.x.shape[1:])

    def _read_options(self, prefetch: int):
        import grain

        return grain.ReadOptions(num_threads=self.workers, prefetch_buffer_size=prefetch)

    def train_example(self, step: int, slot: int, row: int) -> np.ndarray:
        """Row ``row`` as the ``slot``-th example of step ``step``'s batch."""
        if not self.host_crop:
            return self._plain(row)
        rng = np.random.default_rng((self.seed, _HOST_CROP_STREAM, step, slot))
        return random_resized_crop_flip(self.x.open(row), self.x.image_size, rng)

    def eval_example(self, row: int) -> np.ndarray:
        """Row ``row`` as embedded for a refresh or an evaluation."""
        if not self.host_crop:
            return self._plain(row)
        return center_crop(self.x.open(row), self.x.image_size)

    def _plain(self, row: int) -> np.ndarray:
        return self.x.read(row) if is_lazy(self.x) else np.asarray(self.x[row])

    def batch(self, indices: np.ndarray, step: int) -> tuple[np.ndarray, np.ndarray]:
        """The training batch of step ``step``, rows ``indices`` [B] read in parallel.

        A row drawn several times (a cluster smaller than D) is read once, unless the host
        crops, which gives every position its own crop.

        Returns:
          ``(rows [B, ...] float32, positions [B] int32, read [B] int32)``: the batch is
          ``rows[positions]``; ``read`` holds the training-set row of each of ``rows``
          (sorted, unless the host crops; padded with the largest int32 after the
          distinct ones, whose rows are zeros).

        Raises:
          ValueError: naming the file of a row that cannot be read.
        """
        import grain

        indices = np.asarray(indices)
        if self.host_crop:
            distinct, positions = indices, np.arange(len(indices))
        else:
            distinct, positions = np.unique(indices, return_inverse=True)
        pipeline = (
            grain.MapDataset.source(distinct)
            .map_with_index(lambda slot, row: self.train_example(step, slot, int(row)))
            .batch(len(distinct))
        )
        read = next(iter(pipeline.to_iter_dataset(self._read_options(len(distinct)))))
        rows = np.zeros((len(indices), *read.shape[1:]), np.float32)
        rows[: len(distinct)] = read
        padded = np.full(len(indices), np.iinfo(np.int32).max, np.int32)
        padded[: len(distinct)] = distinct
        return rows, positions.astype(np.int32), padded

    def chunks(self, starts: Sequence[int], chunk: int) -> Iterator[np.ndarray]:
        """Rows ``[start, start + chunk)`` for every start, in order, read ahead (the next
        chunk is decoded while the caller embeds this one).

        Yields:
          ``[chunk, ...]`` float32 per start.
        """
        yield from self.rows_in_chunks(
            np.concatenate([np.arange(start, start + chunk) for start in starts]), chunk
        )

    def rows_in_chunks(self, rows: np.ndarray, chunk: int) -> Iterator[np.ndarray]:
        """The rows ``rows`` [R] (R a multiple of ``chunk``) as embedded for a refresh, in
        chunks of ``chunk`` in order, read ahead like :meth:`chunks`.

        Yields:
          ``[chunk, ...]`` float32 per chunk.
        """
        import grain

        pipeline = (
            grain.MapDataset.source(np.asarray(rows))
            .map(lambda row: self.eval_example(int(row)))
            .batch(chunk)
        )
        yield from pipeline.to_iter_dataset(self._read_options(2 * chunk))
