import os

import keras
import numpy as np
import pytest

import kft
from kft.augment import ImageAugmentation


def _batches(ds):
    xs, ys = [], []
    for batch in ds:
        if isinstance(batch, tuple):
            xs.append(np.asarray(batch[0]))
            ys.append(np.asarray(batch[1]))
        else:
            xs.append(np.asarray(batch))
    return np.concatenate(xs), (np.concatenate(ys) if ys else None)


def _asymmetric(n=32, size=16):
    x = np.zeros((n, size, size, 3), "float32")
    x[:, :, : size // 4] = 200.0  # a bright band on the left
    x[:, : size // 4, :] += 50.0  # and on the top
    return x


def test_flips_only_flip_and_both_outcomes_occur():
    x = _asymmetric()
    out, _ = _batches(ImageAugmentation(horizontal_flip=True, seed=1).flow(
        x, batch_size=8, shuffle=False))
    mirrored = x[:, :, ::-1]
    same = [np.allclose(o, i, atol=1e-3) for o, i in zip(out, x)]
    flipped = [np.allclose(o, m, atol=1e-3) for o, m in zip(out, mirrored)]
    assert all(s or f for s, f in zip(same, flipped))
    assert any(same) and any(flipped)


def test_brightness_range_is_multiplicative():
    x = np.full((8, 16, 16, 3), 100.0, "float32")
    out, _ = _batches(ImageAugmentation(brightness_range=[0.5, 0.5]).flow(
        x, batch_size=8, shuffle=False))
    np.testing.assert_allclose(out.mean(), 50.0, rtol=1e-5)
    bright, _ = _batches(ImageAugmentation(brightness_range=[2.0, 2.0]).flow(
        x * 2, batch_size=8, shuffle=False))
    assert bright.max() == pytest.approx(255.0)  # clipped like PIL


def _marker(n, size, row, col):
    x = np.zeros((n, size, size, 3), "float32")
    x[:, row, col] = 255.0
    return x


def _marker_position(images):
    flat = images[..., 0].reshape(len(images), -1)
    idx = flat.argmax(axis=1)
    return np.stack(np.unravel_index(idx, images.shape[1:3]), axis=1)


def test_shifts_stay_inside_their_ranges():
    size = 40
    x = _marker(64, size, 20, 20)
    aug = ImageAugmentation(width_shift_range=0.1, height_shift_range=4,
                            fill_mode="constant", seed=3)
    out, _ = _batches(aug.flow(x, batch_size=16, shuffle=False))
    moves = _marker_position(out) - np.array([20, 20])
    assert np.abs(moves).max() <= 4 + 1  # 10% of 40 px, 4 px; +1 rounding
    assert (np.abs(moves) > 0).any()


def test_rotation_stays_inside_its_range():
    size = 41
    x = _marker(64, size, 20, 36)  # 16 px right of the centre
    out, _ = _batches(ImageAugmentation(rotation_range=30, fill_mode="constant",
                                        seed=4).flow(x, batch_size=16,
                                                     shuffle=False))
    rows, cols = _marker_position(out).T
    angles = np.degrees(np.arctan2(rows - 20, cols - 20))
    assert np.abs(angles).max() <= 30 + 5  # a pixel of slack at radius 16
    assert np.abs(angles).max() > 5


def test_labels_stay_paired_after_shuffling():
    y = np.arange(40) % 4
    x = np.repeat(y[:, None, None, None].astype("float32"), 8, axis=1)
    x = np.repeat(np.repeat(x, 8, axis=2), 3, axis=3) * 50
    out, labels = _batches(ImageAugmentation(horizontal_flip=True, seed=5).flow(
        x, y, batch_size=8, shuffle=True))
    np.testing.assert_allclose(out.mean(axis=(1, 2, 3)), labels * 50, atol=1e-3)
    assert sorted(labels.tolist()) == sorted(y.tolist())
    assert labels.tolist() != y.tolist()  # it did shuffle


def test_same_seed_same_stream():
    x = np.random.default_rng(0).uniform(0, 255, (16, 24, 24, 3)).astype("float32")
    kwargs = dict(rotation_range=20, zoom_range=0.2, horizontal_flip=True,
                  brightness_range=[0.8, 1.2], seed=7)
    a, _ = _batches(ImageAugmentation(**kwargs).flow(x, batch_size=8))
    b, _ = _batches(ImageAugmentation(**kwargs).flow(x, batch_size=8))
    np.testing.assert_allclose(a, b)
    # Batches are augmented in parallel from per-batch seeds: new draws
    # every epoch, the same epochs for the same seed, others for another.
    flow = ImageAugmentation(**kwargs).flow(x, batch_size=8, shuffle=False)
    first, _ = _batches(flow)
    second, _ = _batches(flow)
    again = ImageAugmentation(**kwargs).flow(x, batch_size=8, shuffle=False)
    np.testing.assert_allclose(_batches(again)[0], first)
    np.testing.assert_allclose(_batches(again)[0], second)
    assert not np.allclose(first, second)
    other, _ = _batches(ImageAugmentation(**{**kwargs, "seed": 8}).flow(
        x, batch_size=8, shuffle=False))
    assert not np.allclose(first, other)


def test_layer_is_active_only_in_training_and_serializes(tmp_path):
    aug = ImageAugmentation(rotation_range=40, horizontal_flip=True,
                            channel_shift_range=20, rescale=1 / 255.0)
    inputs = keras.Input((16, 16, 3))
    outputs = keras.layers.GlobalAveragePooling2D()(aug.layer()(inputs))
    model = keras.Model(inputs, outputs)
    x = _asymmetric(4)
    np.testing.assert_allclose(model(x, training=False),
                               x.mean(axis=(1, 2)) / 255.0, rtol=1e-5)
    layer = model.get_layer("image_augmentation")
    trained = np.asarray(layer(x, training=True))
    assert not np.allclose(trained, x / 255.0)
    path = str(tmp_path / "m.keras")
    model.save(path)
    reloaded = keras.saving.load_model(path)
    np.testing.assert_allclose(reloaded(x, training=False), model(x, training=False),
                               rtol=1e-6)


def test_featurewise_statistics_from_fit():
    rng = np.random.default_rng(0)
    x = rng.normal(100, 20, (64, 8, 8, 3)).astype("float32")
    aug = ImageAugmentation(featurewise_center=True,
                            featurewise_std_normalization=True)
    with pytest.raises(ValueError, match=r"\.fit\(x\)"):
        aug.layer()
    aug.fit(x)
    out = np.asarray(aug.layer()(x, training=False))
    np.testing.assert_allclose(out.mean(axis=(0, 1, 2)), 0.0, atol=1e-3)
    np.testing.assert_allclose(out.std(axis=(0, 1, 2)), 1.0, atol=1e-3)


@pytest.mark.parametrize("kwargs,match", [
    ({"fill_mode": "mirror"}, "fill_mode='mirror'"),
    ({"brightness_range": [1.2, 0.8]}, "brightness_range"),
    ({"rotation_range": -5}, "rotation_range"),
    ({"zoom_range": [0.5]}, "zoom_range"),
    ({"validation_split": 1.5}, "validation_split=1.5"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ImageAugmentation(**kwargs)


def _folder(root, classes=("zebra", "ant", "moose"), per_class=5):
    from PIL import Image

    for c_index, name in enumerate(classes):
        os.makedirs(root / name)
        for i in range(per_class):
            value = 10 * c_index + i  # identifies the file
            Image.fromarray(np.full((20, 20, 3), value, "uint8")).save(
                root / name / f"{i}.png")


def test_flow_from_directory_classes_modes_and_subsets(tmp_path):
    _folder(tmp_path)
    aug = ImageAugmentation(validation_split=0.4, seed=0)
    ds = aug.flow_from_directory(str(tmp_path), target_size=(16, 16),
                                 class_mode="sparse", shuffle=False)
    assert aug.class_indices == {"ant": 0, "moose": 1, "zebra": 2}
    x, y = _batches(ds)
    assert x.shape == (15, 16, 16, 3) and sorted(set(y.tolist())) == [0, 1, 2]
    _, onehot = _batches(aug.flow_from_directory(
        str(tmp_path), target_size=(16, 16), class_mode="categorical"))
    assert onehot.shape == (15, 3) and np.all(onehot.sum(axis=1) == 1)
    images, _ = _batches(aug.flow_from_directory(
        str(tmp_path), target_size=(16, 16), class_mode=None))
    assert images.shape == (15, 16, 16, 3)
    train, _ = _batches(aug.flow_from_directory(
        str(tmp_path), target_size=(16, 16), class_mode="sparse",
        subset="training"))
    val, _ = _batches(aug.flow_from_directory(
        str(tmp_path), target_size=(16, 16), class_mode="sparse",
        subset="validation"))
    ids_train = {int(round(v)) for v in train.mean(axis=(1, 2, 3))}
    ids_val = {int(round(v)) for v in val.mean(axis=(1, 2, 3))}
    assert len(ids_train) == 9 and len(ids_val) == 6
    assert not ids_train & ids_val
    with pytest.raises(ValueError, match="exactly 2 classes"):
        aug.flow_from_directory(str(tmp_path), class_mode="binary")
    with pytest.raises(ValueError, match="class_mode='onehot'"):
        aug.flow_from_directory(str(tmp_path), class_mode="onehot")


def test_augmented_stream_trains_a_kft_model():
    from conftest import make_images
    from conftest import tiny_classifier

    x, y = make_images(16, classes=2)
    train = ImageAugmentation(horizontal_flip=True, zoom_range=0.1).flow(
        x, y, batch_size=8)
    histories = kft.fine_tune(tiny_classifier(2), train, verbose=0,
                              stages=[{"epochs": 1}])
    assert histories[0].history["loss"]


def test_mixup_and_cutmix_mix_images_and_one_hot_labels():
    x = np.concatenate([np.zeros((8, 16, 16, 3)), np.full((8, 16, 16, 3), 200.0)])
    y = np.array([0] * 8 + [1] * 8)
    for kwargs in ({"mixup": 0.4}, {"cutmix": 1.0}):
        out, labels = _batches(ImageAugmentation(seed=0, **kwargs).flow(
            x.astype("float32"), y, batch_size=16, shuffle=True))
        assert labels.shape == (16, 2)
        np.testing.assert_allclose(labels.sum(axis=1), 1.0, atol=1e-5)
        mixed = (labels.max(axis=1) < 0.999)
        assert mixed.any()
        # An image's brightness follows its label's share of the bright class.
        share = out.mean(axis=(1, 2, 3)) / 200.0
        assert np.corrcoef(share, labels[:, 1])[0, 1] > 0.95
    with pytest.raises(ValueError, match="mixup=-1"):
        ImageAugmentation(mixup=-1)


def test_rand_augment_changes_images_and_keeps_range():
    x = np.random.default_rng(0).uniform(0, 255, (8, 24, 24, 3)).astype("float32")
    out, _ = _batches(ImageAugmentation(rand_augment={"num_ops": 2, "factor": 0.5},
                                        seed=0).flow(x, batch_size=8, shuffle=False))
    assert out.shape == x.shape and not np.allclose(out, x)
    assert out.min() >= -1e-3 and out.max() <= 255.0 + 1e-3
    with pytest.raises(ValueError, match="rand_augment"):
        ImageAugmentation(rand_augment="yes")


def test_shift_as_a_list_of_choices_moves_by_exactly_those_pixels():
    size = 40
    x = _marker(48, size, 20, 20)
    out, _ = _batches(ImageAugmentation(width_shift_range=[-5, 0, 5],
                                        fill_mode="constant", seed=2).flow(
        x, batch_size=16, shuffle=False))
    moves = (_marker_position(out) - np.array([20, 20]))[:, 1]
    assert set(np.abs(moves).tolist()) <= {0, 5} and set(moves.tolist()) >= {-5, 5}


def test_statistics_match_the_legacy_image_data_generator():
    legacy = pytest.importorskip(
        "tf_keras.preprocessing.image",
        reason="tf_keras (the legacy ImageDataGenerator) is not installed")
    rng = np.random.default_rng(0)
    n, size = 256, 40
    # Brightness: per-image factors drawn from the same range.
    flat = np.full((n, 8, 8, 3), 100.0, "float32")
    ours, _ = _batches(ImageAugmentation(brightness_range=[0.6, 1.4], seed=0)
                       .flow(flat, batch_size=64, shuffle=False))
    theirs = legacy.ImageDataGenerator(brightness_range=[0.6, 1.4]).flow(
        flat, batch_size=n, shuffle=False, seed=0)[0]
    a, b = ours.mean(axis=(1, 2, 3)) / 100, theirs.mean(axis=(1, 2, 3)) / 100
    assert abs(a.mean() - b.mean()) < 0.04 and abs(a.std() - b.std()) < 0.04
    # Shifts: the marker moves by the same distribution of distances.
    x = _marker(n, size, 20, 20)
    ours, _ = _batches(ImageAugmentation(width_shift_range=0.2,
                                         fill_mode="constant", seed=1)
                       .flow(x, batch_size=64, shuffle=False))
    theirs = legacy.ImageDataGenerator(width_shift_range=0.2,
                                       fill_mode="constant").flow(
        x, batch_size=n, shuffle=False, seed=1)[0]
    # tf_keras 2.21 moves images vertically for width_shift_range (its
    # axes are swapped); kft shifts horizontally, as documented. Compare
    # the distance moved, whatever the axis.
    ours_moves = np.abs(_marker_position(ours) - 20).max(axis=1)
    theirs_moves = np.abs(_marker_position(theirs) - 20).max(axis=1)
    assert np.all(np.abs(_marker_position(ours) - 20)[:, 0] == 0)
    assert abs(ours_moves.mean() - theirs_moves.mean()) < 0.8
    assert ours_moves.max() <= 9 and theirs_moves.max() <= 9
    del rng


def test_flow_from_directory_takes_validation_split_per_call(tmp_path):
    _folder(tmp_path, per_class=4)
    aug = ImageAugmentation()
    val, _ = _batches(aug.flow_from_directory(
        str(tmp_path), target_size=(8, 8), class_mode="sparse",
        subset="validation", validation_split=0.5))
    assert len(val) == 6
    with pytest.raises(ValueError, match="needs validation_split"):
        aug.flow_from_directory(str(tmp_path), subset="validation")
