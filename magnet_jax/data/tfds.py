"""Any TensorFlow Datasets builder (needs ``pip install 'magnet-jax[tfds]'``)."""

from __future__ import annotations

import os

import numpy as np

from magnet_jax.data.core import Dataset, remap_labels


def _import_tfds(builder_name: str):
    try:
        import tensorflow_datasets as tfds
    except ImportError as error:
        raise ImportError(
            f"tfds:{builder_name} needs tensorflow-datasets: pip install 'magnet-jax[tfds]'"
        ) from error
    return tfds


def _tfds_split_arrays(
    builder, split: str, image_size: tuple[int, int] | None
) -> tuple[np.ndarray, np.ndarray]:
    """One split as ``(x [N, ...] float32, y [N] int64)``; images scaled to [0, 1]."""
    import tensorflow as tf

    dataset = builder.as_dataset(split=split, as_supervised=True, shuffle_files=False)
    if image_size is not None:
        dataset = dataset.map(lambda image, label: (tf.image.resize(image, image_size), label))
    xs, ys = [], []
    for x, y in dataset.batch(1024).as_numpy_iterator():
        xs.append(x)
        ys.append(y)
    x, y = np.concatenate(xs), np.concatenate(ys).ravel()
    image_feature = builder.info.features[builder.info.supervised_keys[0]]
    is_image = type(image_feature).__name__ == "Image"
    if is_image:
        x = x.astype(np.float32) / np.float32(255.0)
        if x.ndim == 3:
            x = x[..., None]
    return np.asarray(x, np.float32), y


def _load_tfds(
    builder_name: str,
    data_dir: str | os.PathLike | None,
    manual_dir: str | os.PathLike | None,
    splits: tuple[str, str],
    image_size: tuple[int, int] | None,
) -> Dataset:
    tfds = _import_tfds(builder_name)
    builder = tfds.builder(builder_name, data_dir=None if data_dir is None else os.fspath(data_dir))
    download_config = tfds.download.DownloadConfig(
        manual_dir=None if manual_dir is None else os.fspath(manual_dir)
    )
    builder.download_and_prepare(download_config=download_config)
    if builder.info.supervised_keys is None:
        raise ValueError(f"tfds:{builder_name} has no supervised (input, label) keys")
    train_split, test_split = splits
    x_train, y_train = _tfds_split_arrays(builder, train_split, image_size)
    x_test, y_test = _tfds_split_arrays(builder, test_split, image_size)
    label_feature = builder.info.features[builder.info.supervised_keys[1]]
    names = getattr(label_feature, "names", None)
    if names:
        return Dataset(
            f"tfds:{builder_name}",
            x_train,
            y_train.astype(np.int32),
            x_test,
            y_test.astype(np.int32),
            tuple(names),
        )
    (y_train, y_test), values = remap_labels(y_train, y_test)
    return Dataset(
        f"tfds:{builder_name}",
        x_train,
        y_train,
        x_test,
        y_test,
        tuple(str(v) for v in values.tolist()),
    )


def load(
    builder_name: str,
    data_dir: str | os.PathLike | None = None,
    *,
    manual_dir: str | os.PathLike | None = None,
    splits: tuple[str, str] = ("train", "test"),
    image_size: tuple[int, int] | None = None,
) -> Dataset:
    """``tfds:<name>``: ``data_dir`` is TFDS's data dir (TFDS's default when None)."""
    return _load_tfds(builder_name, data_dir, manual_dir, splits, image_size)
