"""The image sources, the released layouts and the protocols, on miniature copies written here.

Each layout is rebuilt with its real file names and annotation formats (a few tiny images);
every image is one flat colour that encodes its position, so that labels, order and split
can be checked pixel by pixel.
"""

import warnings

import numpy as np
import pytest
import scipy.io
from PIL import Image

from magnet_jax import data
from magnet_jax.data import KNOWN_DATASETS, SOURCES, Dataset, load_dataset


def colour(i: int) -> tuple[int, int, int]:
    """A distinct flat colour for image ``i`` (well apart, so JPEG keeps them apart)."""
    return (40 * (i % 6) + 20, 40 * ((i // 6) % 6) + 20, 40 * ((i // 36) % 6) + 20)


def write_image(path, i, size=(6, 5)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour(i)).save(path)


def image_ids(x: np.ndarray) -> list[int]:
    """Inverts :func:`colour` on decoded images ``[n, H, W, 3]`` in [0, 1]."""
    rgb = np.rint((x.mean(axis=(1, 2)) * 255 - 20) / 40).astype(int)
    return (rgb[:, 0] + 6 * rgb[:, 1] + 36 * rgb[:, 2]).tolist()


def check(ds: Dataset, train_ids, test_ids, y_train, y_test, class_names):
    assert image_ids(ds.x_train) == list(train_ids)
    assert image_ids(ds.x_test) == list(test_ids)
    np.testing.assert_array_equal(ds.y_train, y_train)
    np.testing.assert_array_equal(ds.y_test, y_test)
    assert ds.class_names == tuple(class_names)
    assert ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.int32


# ---------------------------------------------------------------------------------------
# registry
# ---------------------------------------------------------------------------------------


def test_registry_is_the_one_list_of_names():
    assert KNOWN_DATASETS == tuple(s.display_name for s in SOURCES)
    assert KNOWN_DATASETS[:4] == ("digits", "mnist", "fashion_mnist", "cifar10")
    for name in ("emoji", "folder:<dir>", "csv:<file>", "cub200", "cars196", "sop"):
        assert name in KNOWN_DATASETS and name.split(":")[0] in data.dataset_help()
    coarse = {s.name: s.coarse_of for s in SOURCES if s.coarse_of}
    assert coarse == {
        "mnist_parity": "mnist",
        "fashion_mnist_coarse": "fashion_mnist",
        "cifar100_coarse": "cifar100",
    }
    assert data.takes_option("cub200", "image_size") and not data.takes_option(
        "mnist", "image_size"
    )
    assert data.find_source("Stanford-Online-Products")[0].name == "sop"


def test_option_a_source_does_not_take_is_refused():
    with pytest.raises(ValueError, match=r"label_level='category' applies to emoji only.*digits"):
        load_dataset("digits", label_level="category")
    with pytest.raises(ValueError, match=r"image_size=32 applies to .*folder:<dir>.*'mnist'"):
        load_dataset("mnist", image_size=32)
    with pytest.raises(ValueError, match="unknown split 'halves'"):
        load_dataset("digits", split="halves")


# ---------------------------------------------------------------------------------------
# protocols on a source without images
# ---------------------------------------------------------------------------------------


def test_split_classes_no_test_class_in_training():
    ds = load_dataset("digits", split="classes")
    assert set(ds.y_train.tolist()) == {0, 1, 2, 3, 4}
    assert set(ds.y_test.tolist()) == {5, 6, 7, 8, 9}
    assert not ds.test_classes_seen and ds.name == "digits/classes"
    default = load_dataset("digits")
    assert default.test_classes_seen
    assert ds.num_train + ds.num_test == default.num_train + default.num_test
    given = load_dataset("digits", split="given")
    np.testing.assert_array_equal(given.x_test, default.x_test)


def test_split_given_without_a_split_of_its_own(tmp_path):
    for k in range(2):
        for i in range(3):
            write_image(tmp_path / "imgs" / f"c{k}" / f"{i}.png", 3 * k + i)
    with pytest.raises(ValueError, match="has no split of its own; use --split default"):
        load_dataset(f"folder:{tmp_path / 'imgs'}", split="given")


# ---------------------------------------------------------------------------------------
# folder and CSV
# ---------------------------------------------------------------------------------------


def write_folder(root, counts=(3, 2, 4)):
    ids = {}
    i = 0
    for k, count in enumerate(counts):
        for j in range(count):
            write_image(root / f"class_{k}" / f"img{j}.png", i)
            ids.setdefault(k, []).append(i)
            i += 1
    return ids


def test_folder_classes_and_in_class_split(tmp_path):
    write_folder(tmp_path / "imgs")
    ds = load_dataset(f"folder:{tmp_path / 'imgs'}", test_fraction=0.34, seed=0)
    assert ds.class_names == ("class_0", "class_1", "class_2")
    assert ds.num_train + ds.num_test == 9 and ds.test_classes_seen
    assert ds.input_shape == (5, 6, 3)
    all_ids = sorted(image_ids(ds.x_train) + image_ids(ds.x_test))
    assert all_ids == list(range(9))
    # every image's label is the folder it came from
    for x, y in ((ds.x_train, ds.y_train), (ds.x_test, ds.y_test)):
        expected = [0 if i < 3 else 1 if i < 5 else 2 for i in image_ids(x)]
        np.testing.assert_array_equal(y, expected)
    relative = load_dataset("folder:imgs", tmp_path, test_fraction=0.34)  # against data_dir
    np.testing.assert_array_equal(relative.x_train, ds.x_train)


def test_folder_resizes_keeping_aspect(tmp_path):
    write_image(tmp_path / "imgs" / "a" / "0.png", 0, size=(12, 6))
    write_image(tmp_path / "imgs" / "a" / "1.png", 1, size=(6, 9))
    write_image(tmp_path / "imgs" / "b" / "0.png", 2, size=(8, 8))
    write_image(tmp_path / "imgs" / "b" / "1.png", 3, size=(8, 8))
    with pytest.raises(ValueError, match=r"images differ in size .*pass --image-size"):
        load_dataset(f"folder:{tmp_path / 'imgs'}")
    ds = load_dataset(f"folder:{tmp_path / 'imgs'}", image_size=4, split="classes")
    assert ds.input_shape == (4, 4, 3)
    assert image_ids(ds.x_train) == [0, 1] and image_ids(ds.x_test) == [2, 3]


def test_folder_bad_input(tmp_path):
    write_folder(tmp_path / "imgs")
    (tmp_path / "imgs" / "class_3").mkdir()
    with pytest.raises(ValueError, match=r"class folder .*class_3 holds no image files"):
        load_dataset(f"folder:{tmp_path / 'imgs'}")
    (tmp_path / "imgs" / "class_3").rmdir()
    broken = tmp_path / "imgs" / "class_1" / "broken.png"
    broken.write_bytes(b"not a png")
    with pytest.raises(ValueError, match=r"cannot read image .*broken.png.*--skip-bad-images"):
        load_dataset(f"folder:{tmp_path / 'imgs'}")
    with pytest.warns(UserWarning, match=r"skipped 1 of 10 images .*broken.png"):
        ds = load_dataset(f"folder:{tmp_path / 'imgs'}", skip_bad_images=True)
    assert ds.num_train + ds.num_test == 9
    with pytest.raises(FileNotFoundError, match="image folder 'nowhere' not found"):
        load_dataset("folder:nowhere", tmp_path)


def write_csv(tmp_path, rows, header="path,label,split"):
    lines = [header] + [",".join(map(str, row)) for row in rows]
    path = tmp_path / "ds" / "list.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


def test_csv_labels_split_and_paths(tmp_path):
    rows = []
    for i, (label, split) in enumerate(
        [(10, "train"), (2, "train"), (10, "validation"), (2, "validation"), (7, "train"),
         (7, "validation")]
    ):  # fmt: skip
        write_image(tmp_path / "ds" / "images" / f"{i}.jpg", i)
        rows.append((f"images/{i}.jpg", label, split))
    path = write_csv(tmp_path, rows)
    ds = load_dataset(f"csv:{path}", split="given")
    # labels sort as numbers: 2 < 7 < 10
    check(ds, [0, 1, 4], [2, 3, 5], [2, 0, 1], [2, 0, 1], ["2", "7", "10"])
    default = load_dataset(f"csv:{path}")  # the given split is in-class: kept
    np.testing.assert_array_equal(default.y_test, ds.y_test)


@pytest.mark.parametrize(
    "header, rows, error",
    [
        ("path,split", [("a.png", "train")], r"has no column label \(header: path, split\)"),
        ("path,label", [("a.png", "")], r"line 2 has no label"),
        ("path,label", [("../outside.png", "x")], r"lists '../outside.png', which is outside"),
        ("path,label,split", [("a.png", "x", "dev")], r"line 2 has split 'dev'"),
        ("path,label", [("missing.png", "x")], r"image .*missing.png does not exist"),
    ],
)
def test_csv_bad_input(tmp_path, header, rows, error):
    write_image(tmp_path / "ds" / "a.png", 0)
    write_image(tmp_path / "outside.png", 1)
    path = write_csv(tmp_path, rows, header=header)
    with pytest.raises((ValueError, FileNotFoundError), match=error):
        load_dataset(f"csv:{path}")


# ---------------------------------------------------------------------------------------
# the released layouts
# ---------------------------------------------------------------------------------------


def test_cub200_layout(tmp_path):
    root = tmp_path / "CUB_200_2011"
    classes = ["001.Black_footed_Albatross", "002.Laysan_Albatross", "003.Sooty_Albatross"]
    images, labels, split = [], [], []
    for i in range(9):
        class_id = i % 3 + 1
        rel = f"{classes[class_id - 1]}/{classes[class_id - 1][4:]}_00{i}_{i}.jpg"
        write_image(root / "images" / rel, i)
        images.append(f"{i + 1} {rel}")
        labels.append(f"{i + 1} {class_id}")
        split.append(f"{i + 1} {int(i < 6)}")  # 1 = training image
    (root / "images.txt").write_text("\n".join(images) + "\n")
    (root / "image_class_labels.txt").write_text("\n".join(labels) + "\n")
    (root / "train_test_split.txt").write_text("\n".join(split) + "\n")
    (root / "classes.txt").write_text("\n".join(f"{k + 1} {c}" for k, c in enumerate(classes)))
    names = ["Black_footed_Albatross", "Laysan_Albatross", "Sooty_Albatross"]
    given = load_dataset("cub200", tmp_path)  # the parent folder
    check(given, range(6), [6, 7, 8], [0, 1, 2, 0, 1, 2], [0, 1, 2], names)
    assert given.test_classes_seen
    by_class = load_dataset("cub200", root, split="classes")
    check(by_class, [0, 1, 3, 4, 6, 7], [2, 5, 8], [0, 1, 0, 1, 0, 1], [2, 2, 2], names)
    assert not by_class.test_classes_seen


def _struct(records: dict) -> np.ndarray:
    """A MATLAB struct array (1 x N) with the given fields, as scipy.io writes it."""
    n = len(next(iter(records.values())))
    array = np.empty((1, n), dtype=[(name, object) for name in records])
    for name, values in records.items():
        for i, value in enumerate(values):
            array[0, i][name] = value
    return array


def _cell(strings) -> np.ndarray:
    cell = np.empty((len(strings), 1), dtype=object)
    for i, s in enumerate(strings):
        cell[i, 0] = s
    return cell


def test_cars196_annos_mat(tmp_path):
    root = tmp_path / "cars196"
    paths = [f"car_ims/{i + 1:06d}.jpg" for i in range(8)]
    for i, rel in enumerate(paths):
        write_image(root / rel, i)
    classes = [1, 2, 3, 4, 1, 2, 3, 4]
    tests = [0, 0, 0, 0, 1, 1, 1, 1]
    annotations = _struct(
        {
            "relative_im_path": paths,
            "bbox_x1": [np.array([[1]])] * 8,
            "class": [np.array([[c]], np.uint8) for c in classes],
            "test": [np.array([[t]], np.uint8) for t in tests],
        }
    )
    names = ["AM General Hummer SUV 2000", "Acura RL Sedan 2012", "Acura TL Sedan 2012",
             "Acura TL Type-S 2008"]  # fmt: skip
    scipy.io.savemat(
        root / "cars_annos.mat", {"annotations": annotations, "class_names": _cell(names)}
    )
    ds = load_dataset("cars196", tmp_path)
    check(ds, range(4), range(4, 8), [0, 1, 2, 3], [0, 1, 2, 3], names)
    by_class = load_dataset("cars", tmp_path, split="classes")
    check(by_class, [0, 1, 4, 5], [2, 3, 6, 7], [0, 1, 0, 1], [2, 3, 2, 3], names)


def test_cars196_devkit(tmp_path):
    root = tmp_path / "stanford_cars"
    names = ["A", "B", "C"]
    (root / "devkit").mkdir(parents=True)
    scipy.io.savemat(root / "devkit" / "cars_meta.mat", {"class_names": _cell(names)})
    train = {
        "fname": ["00001.jpg", "00002.jpg", "00003.jpg"],
        "class": [np.array([[c]]) for c in (3, 1, 2)],
    }
    test = {"fname": ["00001.jpg", "00002.jpg"], "class": [np.array([[c]]) for c in (2, 3)]}
    for i, f in enumerate(train["fname"]):
        write_image(root / "cars_train" / f, i)
    for i, f in enumerate(test["fname"]):
        write_image(root / "cars_test" / f, 3 + i)
    scipy.io.savemat(root / "devkit" / "cars_train_annos.mat", {"annotations": _struct(train)})
    scipy.io.savemat(root / "cars_test_annos_withlabels.mat", {"annotations": _struct(test)})
    ds = load_dataset("cars196", tmp_path)
    check(ds, [0, 1, 2], [3, 4], [2, 0, 1], [1, 2], names)


def test_sop_layout(tmp_path):
    root = tmp_path / "Stanford_Online_Products"
    header = "image_id class_id super_class_id path"
    train, test, i = [header], [header], 0
    for class_id, folder in ((1, "bicycle_final"), (2, "bicycle_final"), (3, "cabinet_final"),
                             (4, "chair_final")):  # fmt: skip
        for j in range(2):
            rel = f"{folder}/{100 + class_id}_{j}.JPG"
            (root / folder).mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (6, 5), colour(i)).save(root / rel, format="JPEG")
            (train if class_id <= 2 else test).append(f"{i + 1} {class_id} 1 {rel}")
            i += 1
    (root / "Ebay_train.txt").write_text("\n".join(train) + "\n")
    (root / "Ebay_test.txt").write_text("\n".join(test) + "\n")
    names = ["bicycle/1", "bicycle/2", "cabinet/3", "chair/4"]
    given = load_dataset("sop", tmp_path, split="given")
    check(given, range(4), range(4, 8), [0, 0, 1, 1], [2, 2, 3, 3], names)
    assert not given.test_classes_seen and given.recall_ks == (1, 2, 4, 8, 10, 100)
    default = load_dataset("sop", tmp_path)  # the given split is class-disjoint: stratified
    assert default.test_classes_seen and default.num_test == 4
    assert np.bincount(default.y_test).tolist() == [1, 1, 1, 1]


@pytest.mark.parametrize("under_lists", [False, True])
def test_stanford_dogs_layout(tmp_path, under_lists):
    root = tmp_path / "stanford_dogs"
    folders = ["n02085620-Chihuahua", "n02085782-Japanese_spaniel"]
    files = [f"{folders[k]}/{folders[k][:9]}_{j}.jpg" for j in range(3) for k in range(2)]
    for i, f in enumerate(files):
        write_image(root / "Images" / f, i)
    labels = [k + 1 for j in range(3) for k in range(2)]
    lists = root / "lists" if under_lists else root
    lists.mkdir(parents=True, exist_ok=True)
    for name, part in (("train_list.mat", slice(0, 4)), ("test_list.mat", slice(4, 6))):
        scipy.io.savemat(
            lists / name,
            {
                "file_list": _cell(files[part]),
                "annotation_list": _cell([f[:-4] for f in files[part]]),
                "labels": np.array(labels[part], np.float64)[:, None],
            },
        )
    ds = load_dataset("stanford_dogs", tmp_path)
    check(ds, range(4), [4, 5], [0, 1, 0, 1], [0, 1], ["Chihuahua", "Japanese_spaniel"])


def test_oxford_flowers102_layout(tmp_path):
    root = tmp_path / "oxford_flowers102"
    labels = np.array([[3, 1, 2, 3, 1, 2, 77]], np.uint8)  # 77: an image in no set
    for i in range(7):
        write_image(root / "jpg" / f"image_{i + 1:05d}.jpg", i)
    scipy.io.savemat(root / "imagelabels.mat", {"labels": labels})
    scipy.io.savemat(
        root / "setid.mat",
        {"trnid": np.array([[2, 1]]), "valid": np.array([[3]]), "tstid": np.array([[6, 4, 5]])},
    )
    ds = load_dataset("oxford_flowers102", tmp_path)
    check(ds, [0, 1, 2], [3, 4, 5], [2, 0, 1], [2, 0, 1], ["1", "2", "3"])


def test_oxford_iiit_pet_layout(tmp_path):
    root = tmp_path / "oxford-iiit-pet"
    rows = [("Abyssinian_1", 1, 1, 1), ("american_bulldog_10", 2, 2, 1), ("Abyssinian_2", 1, 1, 1),
            ("american_bulldog_11", 2, 2, 1), ("Abyssinian_3", 1, 1, 1)]  # fmt: skip
    for i, row in enumerate(rows):
        write_image(root / "images" / f"{row[0]}.jpg", i)
    (root / "annotations").mkdir()
    lines = [" ".join(map(str, r)) for r in rows]
    (root / "annotations" / "trainval.txt").write_text("\n".join(lines[:3]) + "\n")
    (root / "annotations" / "test.txt").write_text("\n".join(lines[3:]) + "\n")
    ds = load_dataset("oxford_iiit_pet", tmp_path)
    check(ds, [0, 1, 2], [3, 4], [0, 1, 0], [1, 0], ["Abyssinian", "american_bulldog"])


def test_layout_missing_gives_what_to_extract(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"CUB-200-2011 not found .*CUB_200_2011.tgz"):
        load_dataset("cub200", tmp_path)
    with pytest.raises(FileNotFoundError, match=r"Cars-196 not found .*cars_annos.mat"):
        load_dataset("cars196", tmp_path)


def test_layout_missing_image_names_it_or_is_skipped(tmp_path):
    test_oxford_iiit_pet_layout(tmp_path)
    (tmp_path / "oxford-iiit-pet" / "images" / "Abyssinian_2.jpg").unlink()
    with pytest.raises(FileNotFoundError, match=r"image .*Abyssinian_2.jpg does not exist"):
        load_dataset("oxford_iiit_pet", tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = load_dataset("oxford_iiit_pet", tmp_path, skip_bad_images=True)
    assert ds.num_train == 2 and "skipped 1 of 5 images" in str(caught[0].message)


# ---------------------------------------------------------------------------------------
# emoji
# ---------------------------------------------------------------------------------------


def write_emoji(path):
    """A tiny emoji64.npz: 6 classes (3 train, 3 test), 3 subcategories, 2 categories."""
    path.parent.mkdir(parents=True, exist_ok=True)
    y = np.array([0, 0, 1, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5], np.int32)
    sub_of_class = {0: 0, 1: 1, 2: 1, 3: 1, 4: 2, 5: 2}
    subcategory = np.array([sub_of_class[c] for c in y], np.int32)
    category = (subcategory >= 2).astype(np.int32)
    x = np.stack([np.full((4, 4, 3), 10 * i, np.uint8) for i in range(len(y))])
    np.savez(
        path,
        x=x,
        y=y,
        style=np.zeros(len(y), np.int8),
        tone=np.zeros(len(y), np.int8),
        subcategory=subcategory,
        category=category,
        split=(y >= 3).astype(np.int8),
        duplicate=np.isin(np.arange(len(y)), [1, 12]).astype(np.int8),
        class_names=np.array(["grin", "smile", "wink", "car", "bus", "train"]),
        class_unified=np.array(["1F600", "1F604", "1F609", "1F697", "1F68C", "1F686"]),
        subcategory_names=np.array(["face-smiling", "face-affection", "transport-ground"]),
        category_names=np.array(["Smileys & Emotion", "Travel & Places"]),
        style_names=np.array(["google", "twitter", "openmoji-color", "openmoji-black"]),
    )
    return y, subcategory, category


def test_emoji_levels_split_and_duplicates(tmp_path):
    y, subcategory, category = write_emoji(tmp_path / "emoji" / "emoji64.npz")
    given = load_dataset("emoji", tmp_path, split="given")
    np.testing.assert_array_equal(given.y_train, y[y < 3])
    np.testing.assert_array_equal(given.y_test, y[y >= 3])
    assert given.class_names == ("grin", "smile", "wink", "car", "bus", "train")
    assert not given.test_classes_seen and given.fine_train is None
    np.testing.assert_allclose(given.x_test[:, 0, 0, 0] * 255, 10 * np.flatnonzero(y >= 3))
    classes = load_dataset("emoji", tmp_path, split="classes")  # the set's own split array
    np.testing.assert_array_equal(classes.x_test, given.x_test)

    sub = load_dataset("emoji", tmp_path, label_level="subcategory", split="classes")
    np.testing.assert_array_equal(sub.y_train, subcategory[y < 3])
    np.testing.assert_array_equal(sub.fine_test, y[y >= 3])  # emoji kept as fine labels
    assert sub.fine_class_names[3] == "car" and sub.class_names[2] == "transport-ground"
    cat = load_dataset("emoji", tmp_path, label_level="category")
    assert cat.class_names == ("Smileys & Emotion", "Travel & Places") and cat.test_classes_seen
    assert sorted(np.concatenate([cat.fine_train, cat.fine_test]).tolist()) == sorted(y.tolist())

    dropped = load_dataset("emoji", tmp_path, split="given", drop_duplicates=True)
    assert dropped.num_train + dropped.num_test == len(y) - 2
    assert dropped.name == "emoji/no_duplicates"
    np.testing.assert_allclose(
        dropped.x_train[:, 0, 0, 0] * 255, 10 * np.array([0, 2, 3, 4, 5, 6]), atol=1e-4
    )
    bigger = load_dataset("emoji", tmp_path, image_size=8, split="given")
    assert bigger.input_shape == (8, 8, 3)
    with pytest.raises(ValueError, match="unknown label_level 'genus'"):
        load_dataset("emoji", tmp_path, label_level="genus")


@pytest.mark.slow
def test_real_emoji_set():
    from pathlib import Path

    folder = Path("/work/shared/datasets/emoji")
    folder = Path(__import__("os").environ.get("MAGNET_JAX_EMOJI", folder))
    if not (folder / "emoji64.npz").is_file():
        pytest.skip("no emoji64.npz")
    ds = load_dataset("emoji", folder, split="classes")
    assert ds.num_classes == 1636 and ds.input_shape == (64, 64, 3)
    assert (ds.num_train, ds.num_test) == (8112, 3271)
    assert len(np.unique(ds.y_train)) == 818 and not ds.test_classes_seen


# ---------------------------------------------------------------------------------------
# npz checks (labels, file type) and non-finite inputs
# ---------------------------------------------------------------------------------------


def test_npz_float_labels_refused(tmp_path):
    np.savez(tmp_path / "half.npz", x=np.zeros((4, 2)), y=[0.5, 1.5, 0.5, 1.5])
    with pytest.raises(ValueError, match=r"y has dtype float64; labels must be integer class ids"):
        load_dataset(f"npz:{tmp_path / 'half.npz'}")
    np.savez(tmp_path / "whole.npz", x=np.zeros((4, 2)), y=[0.0, 1.0, 0.0, 1.0])
    with pytest.raises(ValueError, match=r"whole numbers: save y.astype"):
        load_dataset(f"npz:{tmp_path / 'whole.npz'}")


def test_npz_not_an_npz(tmp_path):
    (tmp_path / "notes.npz").write_text("x,y\n1,2\n")
    with pytest.raises(ValueError, match=r"notes.npz: not an .npz archive; write one with"):
        load_dataset(f"npz:{tmp_path / 'notes.npz'}")
    np.save(tmp_path / "one.npy", np.zeros(3))
    (tmp_path / "one.npy").rename(tmp_path / "one.npz")
    with pytest.raises(ValueError, match=r"not an .npz archive \(it is a single .npy array\)"):
        load_dataset(f"npz:{tmp_path / 'one.npz'}")


def test_non_finite_rows_are_named(tmp_path):
    x_test = np.zeros((5, 3))
    x_test[1, 2] = np.nan
    x_test[4, 0] = np.inf
    np.savez(tmp_path / "f.npz", x=np.zeros((4, 3)), y=[0, 1, 0, 1], x_test=x_test,
             y_test=[0, 1, 0, 1, 0])  # fmt: skip
    with pytest.raises(ValueError, match=r"x_test has NaN or inf in 2 of 5 rows \(rows 1, 4\)"):
        load_dataset(f"npz:{tmp_path / 'f.npz'}")


def test_bad_csv_stops_the_command_before_the_work_directory_is_touched(tmp_path, capsys):
    from magnet_jax import cli

    write_image(tmp_path / "ds" / "a.png", 0)
    path = write_csv(tmp_path, [("a.png", "train")], header="path,split")
    workdir = tmp_path / "run"
    workdir.mkdir()
    (workdir / "keep.txt").write_text("earlier work")
    code = cli.main(
        ["train", "--dataset", f"csv:{path}", "--workdir", str(workdir), "--no-progress"]
    )
    assert code == 2
    assert "has no column label (header: path, split)" in capsys.readouterr().err
    assert sorted(p.name for p in workdir.iterdir()) == ["keep.txt"]
