"""Tests of magnet_jax.data: every loader on small files written here, plus the real idx files."""

import gzip
import hashlib
import importlib.util
import io
import os
import pickle
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

from magnet_jax import data
from magnet_jax.data import (
    FASHION_MNIST_COARSE,
    MNIST_PARITY,
    Dataset,
    coarsen,
    load_dataset,
    split_validation,
    stratified_split,
)

SHARED_DATASETS = Path(
    os.environ.get(
        "MAGNET_JAX_SHARED_DATASETS", Path(__file__).resolve().parents[2] / "shared" / "datasets"
    )
)

# ---------------------------------------------------------------------------------------
# helpers writing small files in the standard formats
# ---------------------------------------------------------------------------------------


def idx_bytes(array: np.ndarray) -> bytes:
    """An idx file of uint8 ``array`` (magic 0x0000 08 <ndim>, big-endian dims)."""
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def small_idx_arrays(seed=0, num_train=30, num_test=12):
    rng = np.random.default_rng(seed)
    return {
        "train-images-idx3-ubyte": rng.integers(0, 256, (num_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": (np.arange(num_train) % 10).astype(np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (num_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": (np.arange(num_test) % 10).astype(np.uint8),
    }


def write_idx_folder(folder: Path, arrays, compress=True, edit=None):
    """Writes the four idx files; ``edit(name, bytes) -> bytes`` may corrupt one."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, array in arrays.items():
        content = idx_bytes(array)
        if edit is not None:
            content = edit(name, content)
        if compress:
            (folder / f"{name}.gz").write_bytes(gzip.compress(content))
        else:
            (folder / name).write_bytes(content)
    return folder


CIFAR10_NAMES = [f"c10_{i}".encode() for i in range(10)]
CIFAR100_FINE = [f"fine_{i}".encode() for i in range(100)]
CIFAR100_COARSE = [f"coarse_{i}".encode() for i in range(20)]


def cifar_batch(rng, n, **labels):
    batch = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), b"batch_label": b"x"}
    batch.update({key.encode(): value for key, value in labels.items()})
    return batch


def cifar10_members(seed=0):
    """name -> pickled bytes of a tiny CIFAR-10 (2 images per training batch, 3 test)."""
    rng = np.random.default_rng(seed)
    members = {
        f"data_batch_{i}": cifar_batch(rng, 2, labels=[(2 * i) % 10, (2 * i + 1) % 10])
        for i in range(1, 6)
    }
    members["test_batch"] = cifar_batch(rng, 3, labels=[0, 5, 9])
    members["batches.meta"] = {b"label_names": CIFAR10_NAMES, b"num_cases_per_batch": 2}
    return {name: pickle.dumps(obj, protocol=2) for name, obj in members.items()}


def cifar100_members(seed=0):
    rng = np.random.default_rng(seed)
    fine_train, fine_test = [3, 99, 42, 7], [0, 55]
    members = {
        "train": cifar_batch(
            rng, 4, fine_labels=fine_train, coarse_labels=[f // 5 for f in fine_train]
        ),
        "test": cifar_batch(
            rng, 2, fine_labels=fine_test, coarse_labels=[f // 5 for f in fine_test]
        ),
        "meta": {b"fine_label_names": CIFAR100_FINE, b"coarse_label_names": CIFAR100_COARSE},
    }
    return {name: pickle.dumps(obj, protocol=2) for name, obj in members.items()}


def write_cifar_folder(folder: Path, members):
    folder.mkdir(parents=True)
    for name, content in members.items():
        (folder / name).write_bytes(content)


def write_cifar_archive(path: Path, folder_name: str, members):
    with tarfile.open(path, "w:gz") as archive:
        for name, content in members.items():
            info = tarfile.TarInfo(f"{folder_name}/{name}")
            info.size = len(content)
            archive.addfile(info, io.BytesIO(content))


# ---------------------------------------------------------------------------------------
# idx (MNIST / Fashion-MNIST) on small files
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("compress", [True, False])
def test_idx_loader_reads_gz_and_uncompressed(tmp_path, compress):
    arrays = small_idx_arrays()
    write_idx_folder(tmp_path / "fashion-mnist", arrays, compress=compress)
    ds = load_dataset("fashion_mnist", tmp_path, verify=False)
    assert ds.x_train.shape == (30, 28, 28, 1) and ds.x_test.shape == (12, 28, 28, 1)
    assert ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.int32
    np.testing.assert_allclose(
        ds.x_train[..., 0] * 255, arrays["train-images-idx3-ubyte"], atol=1e-3
    )
    np.testing.assert_array_equal(ds.y_test, arrays["t10k-labels-idx1-ubyte"])
    assert (
        ds.class_names[0] == "T-shirt/top"
        and ds.num_classes == 10
        and ds.input_shape == (28, 28, 1)
    )


@pytest.mark.parametrize("subdir", ["", "mnist", "MNIST/raw"])
def test_idx_loader_accepts_dataset_folder_or_parent(tmp_path, subdir):
    write_idx_folder(tmp_path / subdir if subdir else tmp_path, small_idx_arrays())
    ds = load_dataset("mnist", tmp_path, verify=False)
    assert ds.num_train == 30 and ds.class_names == tuple("0123456789")


@pytest.mark.parametrize("subdir", ["fashion-mnist", "fashion_mnist"])
def test_fashion_mnist_folder_aliases(tmp_path, subdir):
    write_idx_folder(tmp_path / subdir, small_idx_arrays())
    assert load_dataset("fashion-mnist", tmp_path, verify=False).name == "fashion_mnist"


def test_idx_dataset_subfolder_wins_over_files_in_root(tmp_path):
    write_idx_folder(tmp_path, small_idx_arrays(seed=1, num_train=20))
    write_idx_folder(tmp_path / "fashion-mnist", small_idx_arrays(seed=2, num_train=40))
    assert load_dataset("fashion_mnist", tmp_path, verify=False).num_train == 40
    assert load_dataset("mnist", tmp_path, verify=False).num_train == 20


def test_idx_default_dir_from_env(tmp_path, monkeypatch):
    write_idx_folder(tmp_path / "mnist", small_idx_arrays())
    monkeypatch.setenv("MAGNET_JAX_DATA", str(tmp_path))
    assert data.default_data_dir() == tmp_path
    assert load_dataset("mnist", verify=False).num_test == 12


def test_idx_wrong_magic(tmp_path):
    def swap_magic(name, content):
        return bytes([0, 0, 8, 1]) + content[4:] if name == "train-images-idx3-ubyte" else content

    write_idx_folder(tmp_path, small_idx_arrays(), edit=swap_magic)
    with pytest.raises(
        ValueError, match=r"train-images-idx3-ubyte\.gz: wrong idx magic number 2049.*expected 2051"
    ):
        load_dataset("mnist", tmp_path, verify=False)


@pytest.mark.parametrize("compress", [True, False])
def test_idx_truncated_content(tmp_path, compress):
    def cut(name, content):
        return content[:-100] if name == "t10k-images-idx3-ubyte" else content

    write_idx_folder(tmp_path, small_idx_arrays(), compress=compress, edit=cut)
    with pytest.raises(ValueError, match=r"t10k-images-idx3-ubyte.*truncated"):
        load_dataset("mnist", tmp_path, verify=False)


def test_idx_truncated_gzip_stream(tmp_path):
    write_idx_folder(tmp_path, small_idx_arrays())
    path = tmp_path / "train-labels-idx1-ubyte.gz"
    path.write_bytes(path.read_bytes()[:-12])
    with pytest.raises(ValueError, match=r"train-labels-idx1-ubyte\.gz: gzip stream is truncated"):
        load_dataset("mnist", tmp_path, verify=False)


def test_idx_checksum_mismatch_names_file_and_both_hashes(tmp_path):
    arrays = small_idx_arrays()
    write_idx_folder(tmp_path, arrays)
    actual = hashlib.sha256(idx_bytes(arrays["train-images-idx3-ubyte"])).hexdigest()
    expected = data._IDX_RAW_SHA256["fashion_mnist"]["train-images-idx3-ubyte"]
    with pytest.raises(ValueError, match="checksum mismatch") as info:
        load_dataset("fashion_mnist", tmp_path)
    message = str(info.value)
    assert "train-images-idx3-ubyte.gz" in message and actual in message and expected in message


def test_idx_image_and_label_counts_must_agree(tmp_path):
    arrays = small_idx_arrays()
    arrays["train-labels-idx1-ubyte"] = arrays["train-labels-idx1-ubyte"][:-1]
    write_idx_folder(tmp_path, arrays)
    with pytest.raises(ValueError, match="30 images but 29 labels"):
        load_dataset("mnist", tmp_path, verify=False)


def test_idx_missing_directory(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match=f"MNIST data directory {missing} does not exist"):
        load_dataset("mnist", missing)


def test_idx_missing_file_names_file_and_dirs(tmp_path):
    write_idx_folder(tmp_path, small_idx_arrays())
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(FileNotFoundError) as info:
        load_dataset("fashion_mnist", tmp_path, verify=False)
    message = str(info.value)
    assert "Fashion-MNIST file 't10k-labels-idx1-ubyte.gz' not found in" in message
    assert str(tmp_path) in message
    assert "looked for t10k-labels-idx1-ubyte.gz or t10k-labels-idx1-ubyte" in message


def test_idx_empty_folder_message_lists_places_searched(tmp_path):
    with pytest.raises(FileNotFoundError) as info:
        load_dataset("fashion_mnist", tmp_path)
    message = str(info.value)
    assert "'train-images-idx3-ubyte.gz' not found" in message
    assert str(tmp_path / "fashion-mnist") in message and str(tmp_path / "fashion_mnist") in message
    assert "--data-dir" in message


# ---------------------------------------------------------------------------------------
# real MNIST / Fashion-MNIST
# ---------------------------------------------------------------------------------------

REAL_LABEL_COUNTS = {
    "mnist": ([5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949],
              [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]),
    "fashion_mnist": ([6000] * 10, [1000] * 10),
}  # fmt: skip


@pytest.mark.parametrize("name,folder", [("mnist", "mnist"), ("fashion_mnist", "fashion-mnist")])
def test_real_idx_files(name, folder):
    if not (SHARED_DATASETS / folder / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip(f"no {folder} copy in {SHARED_DATASETS}")
    ds = load_dataset(name, SHARED_DATASETS)  # parent folder; checksums verified
    assert ds.x_train.shape == (60000, 28, 28, 1) and ds.x_test.shape == (10000, 28, 28, 1)
    assert ds.x_train.dtype == np.float32 and 0.0 == ds.x_train.min() and ds.x_train.max() == 1.0
    train_counts, test_counts = REAL_LABEL_COUNTS[name]
    np.testing.assert_array_equal(np.bincount(ds.y_train), train_counts)
    np.testing.assert_array_equal(np.bincount(ds.y_test), test_counts)


# ---------------------------------------------------------------------------------------
# CIFAR
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("form", ["folder", "archive"])
def test_cifar10(tmp_path, form):
    members = cifar10_members()
    if form == "folder":
        write_cifar_folder(tmp_path / "cifar-10-batches-py", members)
    else:
        write_cifar_archive(tmp_path / "cifar-10-python.tar.gz", "cifar-10-batches-py", members)
    ds = load_dataset("cifar10", tmp_path)
    assert ds.x_train.shape == (10, 32, 32, 3) and ds.x_test.shape == (3, 32, 32, 3)
    np.testing.assert_array_equal(ds.y_train, [2, 3, 4, 5, 6, 7, 8, 9, 0, 1])
    np.testing.assert_array_equal(ds.y_test, [0, 5, 9])
    assert ds.class_names == tuple(n.decode() for n in CIFAR10_NAMES)
    # channel planes R, G, B of the row become the last axis
    raw = pickle.loads(members["data_batch_1"], encoding="bytes")[b"data"][1]
    np.testing.assert_allclose(ds.x_train[1, 0, 1] * 255, raw[[1, 1024 + 1, 2048 + 1]], atol=1e-3)
    np.testing.assert_allclose(
        ds.x_train[1, 2, 0] * 255, raw[[64, 1024 + 64, 2048 + 64]], atol=1e-3
    )


def test_cifar10_dir_is_the_extracted_folder(tmp_path):
    write_cifar_folder(tmp_path / "x", cifar10_members())
    assert load_dataset("cifar10", tmp_path / "x").num_train == 10


@pytest.mark.parametrize("form", ["folder", "archive"])
def test_cifar100_fine_and_coarse(tmp_path, form):
    members = cifar100_members()
    if form == "folder":
        write_cifar_folder(tmp_path / "cifar-100-python", members)
    else:
        write_cifar_archive(tmp_path / "cifar-100-python.tar.gz", "cifar-100-python", members)
    fine = load_dataset("cifar100", tmp_path)
    np.testing.assert_array_equal(fine.y_train, [3, 99, 42, 7])
    assert fine.num_classes == 100 and fine.fine_train is None
    coarse = load_dataset("cifar100", tmp_path, label_mode="coarse")
    np.testing.assert_array_equal(coarse.y_train, [0, 19, 8, 1])
    np.testing.assert_array_equal(coarse.y_test, [0, 11])
    np.testing.assert_array_equal(coarse.fine_train, fine.y_train)
    np.testing.assert_array_equal(coarse.fine_test, fine.y_test)
    assert coarse.num_classes == 20 and coarse.fine_class_names == fine.class_names
    assert coarse.class_names[19] == "coarse_19"
    np.testing.assert_array_equal(coarse.x_train, fine.x_train)


def test_cifar_missing(tmp_path):
    with pytest.raises(FileNotFoundError) as info:
        load_dataset("cifar100", tmp_path)
    message = str(info.value)
    assert (
        "cifar-100-python.tar.gz" in message
        and "cifar-100-python/" in message
        and str(tmp_path) in message
    )


def test_cifar_folder_missing_member(tmp_path):
    members = cifar10_members()
    del members["test_batch"]
    write_cifar_folder(tmp_path / "cifar-10-batches-py", members)
    with pytest.raises(
        FileNotFoundError, match=r"CIFAR-10 file 'test_batch' not found in .*cifar-10-batches-py"
    ):
        load_dataset("cifar10", tmp_path)


def test_cifar_truncated_archive(tmp_path):
    path = tmp_path / "cifar-10-python.tar.gz"
    write_cifar_archive(path, "cifar-10-batches-py", cifar10_members())
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(ValueError, match="cifar-10-python.tar.gz: corrupt or truncated archive"):
        load_dataset("cifar10", tmp_path)


def test_cifar_pickle_with_code_is_refused(tmp_path):
    members = cifar10_members()
    members["test_batch"] = pickle.dumps({b"data": os.getcwd}, protocol=2)  # names a global
    write_cifar_folder(tmp_path / "cifar-10-batches-py", members)
    with pytest.raises(
        ValueError, match="test_batch: not a readable CIFAR python pickle.*refusing"
    ):
        load_dataset("cifar10", tmp_path)


def test_cifar_bad_data_shape(tmp_path):
    members = cifar10_members()
    members["test_batch"] = pickle.dumps(
        {b"data": np.zeros((3, 100), np.uint8), b"labels": [0, 1, 2]}
    )
    write_cifar_folder(tmp_path / "cifar-10-batches-py", members)
    with pytest.raises(ValueError, match=r"test_batch: b'data' must be uint8 \[n, 3072\]"):
        load_dataset("cifar10", tmp_path)


# ---------------------------------------------------------------------------------------
# npz features
# ---------------------------------------------------------------------------------------


def test_npz_with_test_split_and_noncontiguous_labels(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "feats.npz"
    np.savez(
        path,
        x=rng.normal(size=(6, 4)),
        y=[10, 30, 10, 7, 30, 7],
        x_test=rng.normal(size=(2, 4)),
        y_test=[99, 7],
    )
    ds = load_dataset(f"npz:{path}")
    assert ds.class_names == ("7", "10", "30", "99")
    np.testing.assert_array_equal(ds.y_train, [1, 2, 1, 0, 2, 0])
    np.testing.assert_array_equal(ds.y_test, [3, 0])
    assert ds.x_train.dtype == np.float32 and ds.input_shape == (4,)


def test_npz_without_test_split_is_stratified_and_fixed(tmp_path):
    y = np.repeat([5, -1, 8], [10, 20, 30])
    np.savez(tmp_path / "f.npz", x=np.arange(60, dtype=np.float64)[:, None] * np.ones(3), y=y)
    ds = load_dataset("npz:f.npz", tmp_path)  # relative to data_dir
    assert ds.class_names == ("-1", "5", "8")
    np.testing.assert_array_equal(np.bincount(ds.y_test), [4, 2, 6])
    np.testing.assert_array_equal(np.bincount(ds.y_train), [16, 8, 24])
    again = load_dataset("npz:f.npz", tmp_path)
    np.testing.assert_array_equal(ds.x_test, again.x_test)
    # nothing lost, nothing duplicated
    assert sorted(np.concatenate([ds.x_train[:, 0], ds.x_test[:, 0]]).tolist()) == list(range(60))


def test_npz_missing_file_and_keys(tmp_path):
    with pytest.raises(FileNotFoundError, match="features file 'nope.npz' not found"):
        load_dataset("npz:nope.npz", tmp_path)
    np.savez(tmp_path / "bad.npz", features=np.zeros((2, 2)))
    with pytest.raises(ValueError, match=r"bad.npz: missing array\(s\) \['x', 'y'\]"):
        load_dataset(f"npz:{tmp_path / 'bad.npz'}")


# ---------------------------------------------------------------------------------------
# digits, names, TFDS
# ---------------------------------------------------------------------------------------


def test_digits_split_fixed_and_stratified():
    ds = load_dataset("digits")
    assert ds.x_train.shape == (1347, 8, 8, 1) and ds.x_test.shape == (450, 8, 8, 1)
    assert ds.x_train.dtype == np.float32 and ds.x_train.min() == 0.0 and ds.x_train.max() == 1.0
    counts = np.bincount(np.concatenate([ds.y_train, ds.y_test]))
    np.testing.assert_array_equal(np.bincount(ds.y_test), np.round(counts * 0.25).astype(int))
    again = load_dataset("digits")
    np.testing.assert_array_equal(ds.x_test, again.x_test)
    np.testing.assert_array_equal(ds.y_train, again.y_train)
    # pin the split itself, so that it cannot drift between releases
    from sklearn.datasets import load_digits

    all_x = (load_digits().images[..., None] / 16).astype(np.float32)
    np.testing.assert_array_equal(ds.x_test[:10], all_x[[1, 5, 9, 12, 14, 15, 16, 17, 19, 23]])


def test_unknown_name_lists_known():
    with pytest.raises(
        ValueError,
        match=r"unknown dataset 'imagenet'; known: digits, mnist, fashion_mnist, cifar10",
    ):
        load_dataset("imagenet")


def test_coarse_label_mode_only_for_cifar100():
    with pytest.raises(ValueError, match="cifar100 only"):
        load_dataset("digits", label_mode="coarse")


def test_tfds_missing_gives_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)  # makes the import fail
    with pytest.raises(
        ImportError, match=r"tfds:mnist needs tensorflow-datasets: pip install 'magnet-jax\[tfds\]'"
    ):
        load_dataset("tfds:mnist")


@pytest.mark.slow
@pytest.mark.skipif(
    importlib.util.find_spec("tensorflow_datasets") is None,
    reason="tensorflow-datasets not installed",
)
def test_tfds_fashion_mnist_from_manual_dir(tmp_path):
    manual = SHARED_DATASETS / "fashion-mnist"
    if not (manual / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip(f"no fashion-mnist copy in {SHARED_DATASETS}")
    ds = load_dataset("tfds:fashion_mnist", tmp_path, manual_dir=manual)
    reference = load_dataset("fashion_mnist", SHARED_DATASETS)
    assert ds.x_train.shape == (60000, 28, 28, 1) and ds.x_train.dtype == np.float32
    assert ds.class_names == reference.class_names
    np.testing.assert_array_equal(np.bincount(ds.y_train), np.bincount(reference.y_train))

    def sorted_rows(x, y):  # TFDS shuffles the order while preparing
        rows = np.concatenate([x.reshape(len(x), -1), y[:, None].astype(np.float32)], axis=1)
        return rows[np.lexsort(rows.T[::-1])]

    np.testing.assert_array_equal(
        sorted_rows(ds.x_test, ds.y_test), sorted_rows(reference.x_test, reference.y_test)
    )


# ---------------------------------------------------------------------------------------
# coarsen, split_validation, Dataset checks
# ---------------------------------------------------------------------------------------


def tiny_dataset(num_classes=10, per_class=6):
    y = np.tile(np.arange(num_classes, dtype=np.int32), per_class)
    x = np.arange(len(y), dtype=np.float32)[:, None]
    names = tuple(f"c{i}" for i in range(num_classes))
    return Dataset("tiny", x, y, x[:num_classes] + 1000, y[:num_classes].copy(), names)


def test_coarsen_fashion_groups():
    ds = coarsen(tiny_dataset(), *FASHION_MNIST_COARSE)
    expected = np.array(
        [0, 2, 0, 0, 0, 1, 0, 1, 3, 1]
    )  # T-shirt, Trouser, Pullover, Dress, Coat, Sandal, ...
    np.testing.assert_array_equal(ds.y_test, expected)
    np.testing.assert_array_equal(ds.y_train, expected[ds.fine_train])
    assert (
        ds.class_names == ("tops", "footwear", "trouser", "bag") and ds.fine_class_names[0] == "c0"
    )
    assert ds.name == "tiny/coarse" and ds.num_fine_classes == 10
    parity = coarsen(tiny_dataset(), *MNIST_PARITY)
    np.testing.assert_array_equal(parity.y_train, parity.fine_train % 2)


def test_coarsen_rejects_non_partition():
    with pytest.raises(ValueError, match="class 1 is in group 0 and group 1"):
        coarsen(tiny_dataset(3), [[0, 1], [1, 2]], ["a", "b"])
    with pytest.raises(ValueError, match=r"classes \[2\]"):
        coarsen(tiny_dataset(3), [[0], [1]], ["a", "b"])


def test_split_validation_stratified_disjoint():
    base = coarsen(tiny_dataset(per_class=10), *MNIST_PARITY)
    ds = split_validation(base, fraction=0.2, seed=3)
    assert ds.num_train == 80 and ds.num_test == 20
    np.testing.assert_array_equal(np.bincount(ds.y_test), [10, 10])
    np.testing.assert_array_equal(ds.fine_test % 2, ds.y_test)  # fine labels move with their rows
    values = np.concatenate([ds.x_train[:, 0], ds.x_test[:, 0]])
    assert sorted(values.tolist()) == list(range(100))  # drawn from train only, each once
    np.testing.assert_array_equal(ds.fine_train % 2, ds.y_train)
    same = split_validation(base, fraction=0.2, seed=3)
    np.testing.assert_array_equal(same.x_test, ds.x_test)
    assert not np.array_equal(split_validation(base, fraction=0.2, seed=4).x_test, ds.x_test)


def test_stratified_split_small_classes():
    kept, held = stratified_split(np.array([0, 1, 1, 2, 2, 2]), 0.9, 0)
    assert sorted(np.concatenate([kept, held]).tolist()) == list(range(6))
    assert 0 in kept  # a class of one stays in the kept part
    assert set(np.array([0, 1, 1, 2, 2, 2])[kept].tolist()) == {0, 1, 2}  # each class keeps one


def test_dataset_rejects_bad_labels():
    x = np.zeros((3, 2), np.float32)
    with pytest.raises(
        ValueError, match=r"y_train has labels in \[0, 5\] but there are 2 class names"
    ):
        Dataset("bad", x, np.array([0, 1, 5], np.int32), x, np.zeros(3, np.int32), ("a", "b"))
    with pytest.raises(ValueError, match="must be an int32 array"):
        Dataset("bad", x, np.array([0, 1, 1]), x, np.zeros(3, np.int32), ("a", "b"))
