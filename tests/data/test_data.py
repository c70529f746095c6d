import os

import numpy as np
import pytest
from conftest import make_images

import kft
from kft import data


def test_from_numpy_batches_splits_and_converts():
    x = np.random.default_rng(0).integers(0, 255, (40, 28, 28)).astype("uint8")
    y = np.arange(40) % 4
    bundle = data.from_numpy(x, y, batch_size=8, validation_split=0.3,
                             image_size=(32, 32), channels=3)
    images, labels = next(iter(bundle.train))
    assert images.shape == (8, 32, 32, 3) and images.dtype.name == "float32"
    assert bundle.input_shape == (32, 32, 3)
    assert bundle.num_classes == 4
    val_labels = np.concatenate([y for _, y in bundle.val])
    train_labels = np.concatenate([y for _, y in bundle.train])
    # Stratified: every class in both parts, nothing lost or duplicated.
    assert sorted(np.bincount(val_labels)) == [3, 3, 3, 3]
    assert len(train_labels) + len(val_labels) == 40


def test_same_seed_same_order():
    x, y = make_images(32)
    a = data.from_numpy(x, y, batch_size=8, seed=5)
    b = data.from_numpy(x, y, batch_size=8, seed=5)
    np.testing.assert_array_equal(
        np.concatenate([y for _, y in a.train]),
        np.concatenate([y for _, y in b.train]))


def test_per_class_subset():
    x, y = make_images(60, classes=3)
    bundle = data.from_numpy(x, y, per_class=5)
    labels = np.concatenate([y for _, y in bundle.train])
    assert sorted(np.bincount(labels)) == [5, 5, 5]


@pytest.mark.parametrize("y,match", [
    (np.array([0, 1, 5]), "found label 5"),
    (np.array([0, -1, 1]), "found label -1"),
    (np.array([2, 2, 2]), "single class"),
    (np.array([0.5, 1.0, 0.0]), "integer class indices"),
])
def test_bad_labels_fail_before_training(y, match):
    x = np.zeros((3, 32, 32, 3))
    with pytest.raises(ValueError, match=match):
        data.from_numpy(x, y, num_classes=3 if "5" in match else None)


def test_length_mismatch():
    with pytest.raises(ValueError, match="3 images, 2 labels"):
        data.from_numpy(np.zeros((3, 8, 8)), np.array([0, 1]))


def _write_folder(root, classes, per_class=3, size=40):
    from PIL import Image

    for c in classes:
        os.makedirs(root / c, exist_ok=True)
        for i in range(per_class):
            pixels = np.full((size, size, 3), 40 * (classes.index(c) + 1) + i,
                             "uint8")
            Image.fromarray(pixels).save(root / c / f"{i}.png")


def test_image_folder(tmp_path):
    _write_folder(tmp_path, ["cat", "dog", "emu"], per_class=4)
    bundle = data.from_image_folder(str(tmp_path), image_size=(32, 32),
                                    batch_size=4, validation_split=0.25)
    assert bundle.class_names == ["cat", "dog", "emu"]
    images, labels = next(iter(bundle.train))
    assert images.shape[1:] == (32, 32, 3)
    n = sum(len(y) for _, y in bundle.train) + sum(len(y) for _, y in bundle.val)
    assert n == 12


def test_image_folder_errors(tmp_path):
    with pytest.raises(ValueError, match="not found"):
        data.from_image_folder(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="no class sub-folders"):
        data.from_image_folder(str(tmp_path))
    _write_folder(tmp_path, ["only"])
    with pytest.raises(ValueError, match="single class"):
        data.from_image_folder(str(tmp_path))
    os.makedirs(tmp_path / "empty")
    with pytest.raises(ValueError, match=r"\['empty'\] hold no images"):
        data.from_image_folder(str(tmp_path))


def test_tfds_offline_is_a_clear_error(tmp_path, no_network):
    with pytest.raises(RuntimeError, match="not prepared.*data_dir"):
        data.from_tfds("mnist", data_dir=str(tmp_path))


def test_builtin_quickstart_data():
    (x, y), (x_val, y_val), names = data.load_builtin("fashion_mnist_holdout")
    assert names == ["Shirt", "Sneaker", "Bag", "Ankle boot"]
    assert x.shape == (800, 28, 28) and x_val.shape == (400, 28, 28)
    assert np.bincount(y).tolist() == [200] * 4
    with pytest.raises(ValueError, match="Known"):
        data.load_builtin("imagenet")


def test_fashion_mnist_idx_reader(tmp_path):
    import gzip

    images = np.arange(2 * 28 * 28, dtype="uint8").reshape(2, 28, 28)
    labels = np.array([3, 7], "uint8")
    for prefix in ("train", "t10k"):
        with gzip.open(tmp_path / f"{prefix}-images-idx3-ubyte.gz", "wb") as f:
            f.write(b"\x00\x00\x08\x03" + (2).to_bytes(4, "big")
                    + (28).to_bytes(4, "big") * 2 + images.tobytes())
        with gzip.open(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", "wb") as f:
            f.write(b"\x00\x00\x08\x01" + (2).to_bytes(4, "big") + labels.tobytes())
    (x, y), (xt, yt) = data.load_fashion_mnist(str(tmp_path))
    np.testing.assert_array_equal(x, images)
    np.testing.assert_array_equal(yt, labels)


def test_bundle_unpacks_like_a_pair():
    x, y = make_images(12)
    bundle = kft.data.from_numpy(x, y, validation_split=0.25)
    train, val = bundle
    assert train is bundle.train and val is bundle.val
    assert sum(len(b) for _, b in train) + sum(len(b) for _, b in val) == 12


def test_scan_image_folder_skips_hidden_files_and_folders(tmp_path):
    _write_folder(tmp_path, ["dog", "cat"], per_class=2)
    os.makedirs(tmp_path / ".ipynb_checkpoints")
    (tmp_path / ".ipynb_checkpoints" / "0.png").write_bytes(b"not read")
    (tmp_path / "cat" / "._0.png").write_bytes(b"macOS metadata")
    (tmp_path / "cat" / "notes.txt").write_text("not an image")
    (tmp_path / "cat" / "UPPER.PNG").write_bytes(b"listed, not decoded")
    os.makedirs(tmp_path / "cat" / "nested.png")  # a folder, not an image
    names, paths, labels = data.scan_image_folder(tmp_path)
    assert names == ["cat", "dog"]
    assert [os.path.relpath(p, tmp_path) for p in paths] == [
        os.path.join("cat", "0.png"), os.path.join("cat", "1.png"),
        os.path.join("cat", "UPPER.PNG"),
        os.path.join("dog", "0.png"), os.path.join("dog", "1.png")]
    assert labels == [0, 0, 0, 1, 1]
    # Chosen classes keep their order as labels.
    names, _, labels = data.scan_image_folder(tmp_path, classes=["dog", "cat"])
    assert names == ["dog", "cat"] and labels == [0, 0, 1, 1, 1]
    with pytest.raises(ValueError, match=r"no class folder\(s\) \['emu'\]"):
        data.scan_image_folder(tmp_path, classes=["cat", "emu"])


def test_image_folder_and_flow_from_directory_read_the_same_files(tmp_path):
    from kft.augment import ImageAugmentation

    _write_folder(tmp_path, ["cat", "dog"], per_class=3)
    os.makedirs(tmp_path / ".hidden")
    _write_folder(tmp_path / ".hidden", ["x"], per_class=1)
    from PIL import Image

    Image.fromarray(np.zeros((40, 40, 3), "uint8")).save(tmp_path / "cat" / ".9.png")
    bundle = data.from_image_folder(str(tmp_path), image_size=(8, 8),
                                    validation_split=0.0)
    assert bundle.class_names == ["cat", "dog"] and not bundle.skipped_files
    assert sum(len(y) for _, y in bundle.train) == 6
    augmentation = ImageAugmentation()
    augmentation.flow_from_directory(str(tmp_path), target_size=(8, 8),
                                     class_mode="sparse")
    assert augmentation.class_indices == {"cat": 0, "dog": 1}
    assert augmentation.samples == 6


def _npz(path, **arrays):
    np.savez(path, **arrays)
    return str(path)


def test_load_npz(tmp_path):
    x, y = make_images(6, classes=2)
    path = _npz(tmp_path / "full.npz", x_train=x, y_train=y, x_val=x[:2],
                y_val=y[:2], class_names=np.array(["cat", "dog"]))
    x_out, y_out, x_val, y_val, names = data.load_npz(path)
    np.testing.assert_array_equal(x_out, x)
    np.testing.assert_array_equal(y_val, y[:2])
    assert x_val.shape == (2, 32, 32, 3) and names == ["cat", "dog"]
    assert all(isinstance(n, str) for n in names)
    path = _npz(tmp_path / "train_only.npz", x_train=x, y_train=y)
    assert data.load_npz(path)[2:] == (None, None, None)


@pytest.mark.parametrize("arrays,match", [
    ({"x_train": 1}, r"lacks array\(s\) \['y_train'\]"),
    ({"images": 1}, r"lacks array\(s\) \['x_train', 'y_train'\]"),
    ({"x_train": 1, "y_train": 1, "x_val": 1}, r"lacks array\(s\) \['y_val'\]"),
    ({"x_train": 1, "y_train": 1,
      "class_names": np.array([{"a": 1}], dtype=object)}, "Python objects"),
])
def test_load_npz_names_what_is_missing_or_refused(tmp_path, arrays, match):
    path = _npz(tmp_path / "data.npz", **arrays)
    with pytest.raises(ValueError, match=match):
        data.load_npz(path)


def test_load_npz_missing_or_wrong_file(tmp_path):
    with pytest.raises(ValueError, match="No such .npz file"):
        data.load_npz(tmp_path / "missing.npz")
    (tmp_path / "text.npz").write_text("not numpy")
    with pytest.raises(ValueError, match="not a readable .npz"):
        data.load_npz(tmp_path / "text.npz")
    np.save(tmp_path / "one.npy", np.zeros(3))
    with pytest.raises(ValueError, match="single array"):
        data.load_npz(tmp_path / "one.npy")
