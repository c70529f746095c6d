"""An offline detection and segmentation task from real images.

No detection set ships on these machines, so kft builds one: Fashion-MNIST
garments (the Debian package `dataset-fashion-mnist`), tinted with a
random colour, pasted at random scales and places onto crops of real
photographs, with every box and mask known exactly.

Backgrounds: the images of Debian's wallpaper packages in
`/usr/share/backgrounds` (`apt-get install lomiri-wallpapers-20.04`:
three photographs and one illustration) and Matplotlib's sample
photograph `grace_hopper.jpg` (installed with kft). Whole files are held
out for validation (`split="val"`), and validation garments come from
Fashion-MNIST's test split, so a validation scene shares neither its
background photo nor its garments with training.
"""

import glob
import os

import numpy as np

__all__ = [
    "BACKGROUND_DIRS",
    "FASHION_CLASSES",
    "background_photos",
    "fashion_scenes",
]

BACKGROUND_DIRS = ("/usr/share/backgrounds",)
FASHION_CLASSES = ("t-shirt", "trouser", "pullover", "dress", "coat",
                   "sandal", "shirt", "sneaker", "bag", "ankle boot")
_EXTENSIONS = ("*.jpg", "*.jpeg", "*.png")
_MAX_SIDE = 1024  # photos are downscaled once to this (wallpapers are 4-6k)


def _matplotlib_photo():
    try:
        import matplotlib
    except ImportError:  # pragma: no cover - matplotlib is a kft dependency
        return []
    path = os.path.join(os.path.dirname(matplotlib.__file__), "mpl-data",
                        "sample_data", "grace_hopper.jpg")
    return [path] if os.path.isfile(path) else []


def background_photos(split="train", directories=BACKGROUND_DIRS):
    """The background image files of a split.

    Every fourth file (sorted by name; at least one) is held out for
    `split="val"`; the rest are `"train"`.

    Args:
        split: `"train"`, `"val"` or `"all"`.
        directories: folders searched for `.jpg` / `.png` files.

    Returns:
        A sorted list of paths.

    Raises:
        FileNotFoundError: fewer than two images (one clear sentence).
    """
    files = sorted({os.path.realpath(p) for d in directories for e in _EXTENSIONS
                    for p in glob.glob(os.path.join(d, e))})
    files += _matplotlib_photo()
    if len(files) < 2:
        raise FileNotFoundError(
            f"Found {len(files)} background photo(s) in {list(directories)}; "
            "kft needs at least two (one held out). Install some with "
            "`apt-get install lomiri-wallpapers-20.04`, or pass directories=.")
    held_out = files[3::4] or files[-1:]
    if split == "all":
        return files
    if split == "val":
        return held_out
    if split == "train":
        return [f for f in files if f not in held_out]
    raise ValueError(f"split must be 'train', 'val' or 'all'. Received: "
                     f"split={split!r}")


def _load_photos(paths):
    from PIL import Image

    photos = []
    for path in paths:
        with Image.open(path) as image:
            image = image.convert("RGB")
            image.thumbnail((_MAX_SIDE, _MAX_SIDE))
            photos.append(np.asarray(image))
    return photos


def _crop(photo, size, rng):
    """A random square crop of a photo, resized to `size`."""
    from PIL import Image

    height, width = photo.shape[:2]
    side = int(rng.uniform(0.3, 1.0) * min(height, width))
    top = rng.integers(0, height - side + 1)
    left = rng.integers(0, width - side + 1)
    crop = Image.fromarray(photo[top:top + side, left:left + side])
    return np.asarray(crop.resize((size, size), Image.BILINEAR), "float32")


def _garment(image, side):
    """A garment's brightness (0..1) resized to `side` pixels."""
    from PIL import Image

    alpha = Image.fromarray(image).resize((side, side), Image.BILINEAR)
    return np.asarray(alpha, "float32") / 255.0


def _overlaps(box, boxes, limit=0.3):
    for other in boxes:
        y1, x1 = max(box[0], other[0]), max(box[1], other[1])
        y2, x2 = min(box[2], other[2]), min(box[3], other[3])
        inter = max(0, y2 - y1) * max(0, x2 - x1)
        area = min((box[2] - box[0]) * (box[3] - box[1]),
                   (other[2] - other[0]) * (other[3] - other[1]))
        if inter > limit * area:
            return True
    return False


def _paste(canvas, mask, alpha, label, rng, taken):
    """Pastes one tinted garment; returns its tight `yxyx` box or None."""
    size, side = canvas.shape[0], alpha.shape[0]
    for _ in range(10):
        top, left = rng.integers(0, size - side + 1, size=2)
        rows = np.nonzero(alpha.max(axis=1) > 1 / 16)[0]
        cols = np.nonzero(alpha.max(axis=0) > 1 / 16)[0]
        if not len(rows) or not len(cols):
            return None
        box = (top + rows[0], left + cols[0], top + rows[-1] + 1,
               left + cols[-1] + 1)
        if not _overlaps(box, taken):
            break
    else:
        return None
    colour = rng.uniform(0, 255, size=3)
    region = canvas[top:top + side, left:left + side]
    # Opaque wherever the garment is (its dark parts too), its brightness
    # shading the tint.
    opacity = np.minimum(1.0, 8.0 * alpha)[..., None]
    shade = colour * (0.35 + 0.65 * alpha[..., None])
    region[:] = opacity * shade + (1 - opacity) * region
    mask[top:top + side, left:left + side][alpha > 1 / 16] = label + 1
    return box


def _garments(split, garments):
    if garments is not None:
        return np.asarray(garments[0]), np.asarray(garments[1])
    from kft.data.builtin import load_fashion_mnist

    (x_train, y_train), (x_test, y_test) = load_fashion_mnist()
    return (x_train, y_train) if split == "train" else (x_test, y_test)


def fashion_scenes(count, *, split="train", image_size=128, objects=(1, 3),
                   scale=(0.25, 0.55), seed=0, garments=None, backgrounds=None):
    """Makes `count` scenes of garments on real photographs.

    Args:
        count: number of images.
        split: `"train"` (training photos, Fashion-MNIST train garments)
            or `"val"` (held-out photos, test garments).
        image_size: the square images' side in pixels.
        objects: `(fewest, most)` garments per image.
        scale: a garment's side as a fraction of the image side, drawn
            uniformly from this range.
        seed: the generator's seed (same seed, same scenes).
        garments: `(images, labels)` 28x28 uint8 arrays to use instead of
            Fashion-MNIST (tests).
        backgrounds: background image paths instead of
            `background_photos(split)`.

    Returns:
        A dict: `images` uint8 `(count, s, s, 3)`; `boxes` float32
        `(count, most, 4)` yxyx pixels and `labels` float32 `(count,
        most)`, both padded with -1; `masks` uint8 `(count, s, s)` (0 the
        background, class id + 1 a garment); `class_names`.
    """
    rng = np.random.default_rng(seed)
    x, y = _garments(split, garments)
    photos = _load_photos(backgrounds or background_photos(split))
    size, most = int(image_size), int(objects[1])
    images = np.zeros((count, size, size, 3), "uint8")
    masks = np.zeros((count, size, size), "uint8")
    boxes = -np.ones((count, most, 4), "float32")
    labels = -np.ones((count, most), "float32")
    for i in range(count):
        canvas = _crop(photos[rng.integers(len(photos))], size, rng)
        taken = []
        for _ in range(rng.integers(objects[0], most + 1)):
            pick = rng.integers(len(x))
            side = int(rng.uniform(*scale) * size)
            box = _paste(canvas, masks[i], _garment(x[pick], side), int(y[pick]),
                         rng, taken)
            if box is not None:
                boxes[i, len(taken)] = box
                labels[i, len(taken)] = y[pick]
                taken.append(box)
        images[i] = np.clip(canvas, 0, 255).astype("uint8")
    return {"images": images, "boxes": boxes, "labels": labels, "masks": masks,
            "class_names": list(FASHION_CLASSES)}
