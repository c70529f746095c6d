"""Read detection and segmentation annotations in the formats people have.

COCO JSON, Pascal VOC XML and YOLO txt (boxes), PNG masks (segmentation).
Every reader parses data only: `json`, a DOCTYPE-free XML parse (entity
declarations are refused before parsing, so no entity expansion), plain
text, and Pillow for image headers and masks; nothing in a file runs.

Boxes come out as `yxyx` in pixels of the image (keras-hub's default
`bounding_box_format`), labels as 0-based class ids.

Bad input, with `on_error="skip"` (default): a box outside the image (by
more than one pixel), empty, or with an unknown class is skipped; an image
that is missing or unreadable, or a VOC / YOLO file that does not parse,
is skipped; each is counted in the returned `AnnotationReport` with a
message naming the file. `on_error="raise"` refuses instead: an
`AnnotationError` naming the file. A COCO JSON file that does not parse is
always refused (there is nothing to skip to).
"""

import dataclasses
import json
import os
import re
import xml.etree.ElementTree as ElementTree

import numpy as np

__all__ = [
    "AnnotationError",
    "AnnotationReport",
    "ImageAnnotation",
    "read_coco",
    "read_masks",
    "read_voc",
    "read_yolo",
]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif")
_TOLERANCE = 1.0  # pixels a box may overshoot the image (rounding in tools)


class AnnotationError(ValueError):
    """A bad annotation file or entry; the message names the file."""


@dataclasses.dataclass
class ImageAnnotation:
    """One image and its objects.

    Args:
        image: path of the image file.
        boxes: `(n, 4)` float32 `yxyx` pixel boxes.
        labels: `(n,)` int32 class ids.
        height: the image's height in pixels.
        width: the image's width in pixels.
    """

    image: str
    boxes: np.ndarray
    labels: np.ndarray
    height: int
    width: int


@dataclasses.dataclass
class AnnotationReport:
    """What a reader kept and skipped, with one message per skip."""

    images: int = 0
    boxes: int = 0
    skipped_images: int = 0
    skipped_boxes: int = 0
    messages: list = dataclasses.field(default_factory=list)

    def problem(self, message, on_error, what="box"):
        """Refuses (`on_error="raise"`) or counts one skipped item."""
        if on_error == "raise":
            raise AnnotationError(message)
        self.messages.append(message)
        if what == "box":
            self.skipped_boxes += 1
        else:
            self.skipped_images += 1

    def summary(self):
        """One line: kept and skipped counts."""
        return (f"{self.images} images, {self.boxes} boxes read; skipped "
                f"{self.skipped_images} images and {self.skipped_boxes} boxes")


def _check_on_error(on_error):
    if on_error not in ("skip", "raise"):
        raise ValueError("on_error must be 'skip' or 'raise'. Received: "
                         f"on_error={on_error!r}")


def image_size(path):
    """`(height, width)` from the image file's header (Pillow)."""
    from PIL import Image

    with Image.open(path) as image:
        width, height = image.size
    return height, width


def _check_box(box, height, width, where):
    """None if the `yxyx` box is inside the image, else why not."""
    y1, x1, y2, x2 = box
    if not np.all(np.isfinite(box)):
        return f"{where}: box {list(box)} is not finite"
    if y2 <= y1 or x2 <= x1:
        return f"{where}: box {list(box)} (yxyx) is empty"
    if (y1 < -_TOLERANCE or x1 < -_TOLERANCE or y2 > height + _TOLERANCE
            or x2 > width + _TOLERANCE):
        return (f"{where}: box {list(box)} (yxyx) lies outside the image "
                f"({height}x{width})")
    return None


def _add_image(result, report, path, boxes, labels, height, width):
    boxes = np.asarray(boxes, "float32").reshape(-1, 4)
    boxes[:, 0::2] = np.clip(boxes[:, 0::2], 0, height)
    boxes[:, 1::2] = np.clip(boxes[:, 1::2], 0, width)
    result.append(ImageAnnotation(path, boxes, np.asarray(labels, "int32"),
                                  int(height), int(width)))
    report.images += 1
    report.boxes += len(boxes)


def _load_json(path):
    try:
        with open(path, encoding="utf-8") as file:
            return json.load(file)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise AnnotationError(f"{path}: not a readable COCO JSON file "
                              f"({error})") from None


def _coco_tables(data, path):
    if not isinstance(data, dict) or not all(
            isinstance(data.get(k), list) for k in ("images", "annotations",
                                                    "categories")):
        raise AnnotationError(f"{path}: a COCO file needs lists 'images', "
                              "'annotations' and 'categories'")
    categories = sorted(data["categories"], key=lambda c: c["id"])
    class_ids = {c["id"]: i for i, c in enumerate(categories)}
    names = [str(c.get("name", c["id"])) for c in categories]
    return class_ids, names


def read_coco(json_path, image_dir=None, *, on_error="skip"):
    """Reads a COCO detection file (`instances_*.json`).

    Args:
        json_path: the JSON file.
        image_dir: the folder of the images (`file_name` is relative to
            it); default: the JSON file's folder.
        on_error: `"skip"` (count bad boxes and images) or `"raise"`.

    Returns:
        `(annotations, class_names, report)`: a list of `ImageAnnotation`,
        the category names in id order (label i is the i-th), and an
        `AnnotationReport`.
    """
    _check_on_error(on_error)
    data = _load_json(json_path)
    class_ids, names = _coco_tables(data, json_path)
    image_dir = image_dir or os.path.dirname(json_path)
    objects = {}
    report = AnnotationReport()
    for entry in data["annotations"]:
        objects.setdefault(entry.get("image_id"), []).append(entry)
    result = []
    for image in data["images"]:
        path = os.path.join(image_dir, str(image.get("file_name", "")))
        if not os.path.isfile(path):
            report.problem(f"{json_path}: image {path} is missing", on_error,
                           "image")
            continue
        height, width = int(image["height"]), int(image["width"])
        boxes, labels = [], []
        for entry in objects.get(image.get("id"), []):
            where = f"{json_path} (annotation {entry.get('id')}, {path})"
            if entry.get("category_id") not in class_ids:
                report.problem(f"{where}: unknown category_id "
                               f"{entry.get('category_id')!r}", on_error)
                continue
            x, y, w, h = (float(v) for v in entry.get("bbox", (0, 0, 0, 0)))
            box = np.array([y, x, y + h, x + w], "float32")
            why = _check_box(box, height, width, where)
            if why:
                report.problem(why, on_error)
                continue
            boxes.append(box)
            labels.append(class_ids[entry["category_id"]])
        _add_image(result, report, path, boxes, labels, height, width)
    return result, names, report


def _parse_xml(path):
    """An XML tree, refusing DOCTYPE / ENTITY declarations (no expansion)."""
    with open(path, "rb") as file:
        text = file.read()
    if re.search(rb"<!(DOCTYPE|ENTITY)", text, re.IGNORECASE):
        raise ElementTree.ParseError("DOCTYPE and ENTITY declarations are "
                                     "not accepted")
    return ElementTree.fromstring(text)


def _voc_objects(root, class_names, where):
    """`(boxes, labels, problems, height, width)` of one VOC document."""
    size = root.find("size")
    height = int(float(size.findtext("height")))
    width = int(float(size.findtext("width")))
    boxes, labels, problems = [], [], []
    for obj in root.iter("object"):
        name = (obj.findtext("name") or "").strip()
        if name not in class_names:
            problems.append(f"{where}: unknown class {name!r} (known: "
                            f"{list(class_names)})")
            continue
        bndbox = obj.find("bndbox")
        x1, y1, x2, y2 = (float(bndbox.findtext(k))
                          for k in ("xmin", "ymin", "xmax", "ymax"))
        box = np.array([y1, x1, y2, x2], "float32")
        why = _check_box(box, height, width, where)
        if why:
            problems.append(why)
            continue
        boxes.append(box)
        labels.append(class_names.index(name))
    return boxes, labels, problems, height, width


def read_voc(annotation_dir, image_dir, class_names, *, on_error="skip"):
    """Reads Pascal VOC XML files (one per image).

    Args:
        annotation_dir: the folder of `.xml` files.
        image_dir: the folder of the images they name (`<filename>`).
        class_names: the class names in label order.
        on_error: `"skip"` or `"raise"`.

    Returns:
        `(annotations, report)`.
    """
    _check_on_error(on_error)
    class_names = list(class_names)
    result, report = [], AnnotationReport()
    for name in sorted(os.listdir(annotation_dir)):
        if not name.endswith(".xml"):
            continue
        where = os.path.join(annotation_dir, name)
        try:
            root = _parse_xml(where)
            path = os.path.join(image_dir, (root.findtext("filename") or "").strip())
            boxes, labels, problems, height, width = _voc_objects(
                root, class_names, where)
        except (ElementTree.ParseError, AttributeError, TypeError,
                ValueError) as error:
            report.problem(f"{where}: not a readable Pascal VOC file ({error})",
                           on_error, "image")
            continue
        if not os.path.isfile(path):
            report.problem(f"{where}: image {path} is missing", on_error, "image")
            continue
        for message in problems:
            report.problem(message, on_error)
        _add_image(result, report, path, boxes, labels, height, width)
    return result, report


def _yolo_rows(text, num_classes, height, width, where):
    boxes, labels, problems = [], [], []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        fields = line.split()
        try:
            label = int(fields[0])
            cx, cy, w, h = (float(v) for v in fields[1:5])
        except (ValueError, IndexError):
            raise ValueError(f"line {number} is not 'class cx cy w h'") from None
        if not 0 <= label < num_classes:
            problems.append(f"{where} line {number}: unknown class id {label} "
                            f"(num_classes={num_classes})")
            continue
        box = np.array([(cy - h / 2) * height, (cx - w / 2) * width,
                        (cy + h / 2) * height, (cx + w / 2) * width], "float32")
        why = _check_box(box, height, width, f"{where} line {number}")
        if why:
            problems.append(why)
            continue
        boxes.append(box)
        labels.append(label)
    return boxes, labels, problems


def read_yolo(image_dir, label_dir, num_classes, *, on_error="skip"):
    """Reads YOLO txt labels (`class cx cy w h`, relative to the image).

    Args:
        image_dir: the folder of images.
        label_dir: the folder of `.txt` files named after the images; an
            image without one has no objects.
        num_classes: the number of classes (ids 0..num_classes-1).
        on_error: `"skip"` or `"raise"`.

    Returns:
        `(annotations, report)`.
    """
    _check_on_error(on_error)
    result, report = [], AnnotationReport()
    for name in sorted(os.listdir(image_dir)):
        if not name.lower().endswith(IMAGE_EXTENSIONS):
            continue
        path = os.path.join(image_dir, name)
        where = os.path.join(label_dir, os.path.splitext(name)[0] + ".txt")
        try:
            height, width = image_size(path)
            text = ""
            if os.path.isfile(where):
                with open(where, encoding="utf-8") as file:
                    text = file.read()
            boxes, labels, problems = _yolo_rows(text, num_classes, height,
                                                 width, where)
        except (OSError, UnicodeDecodeError, ValueError) as error:
            report.problem(f"{where}: not readable ({error})", on_error, "image")
            continue
        for message in problems:
            report.problem(message, on_error)
        _add_image(result, report, path, boxes, labels, height, width)
    return result, report


def read_masks(image_dir, mask_dir, num_classes, *, on_error="skip",
               ignore_value=255):
    """Pairs images with PNG class masks of the same stem.

    A mask holds one class id per pixel (0 the background); `ignore_value`
    (VOC's 255 border) is allowed and mapped to 0 by the dataset.

    Args:
        image_dir: the folder of images.
        mask_dir: the folder of `<stem>.png` masks.
        num_classes: number of classes, background included.
        on_error: `"skip"` (count images without a readable, matching
            mask) or `"raise"`.
        ignore_value: a mask value allowed besides the class ids.

    Returns:
        `(pairs, report)`: `[(image_path, mask_path), ...]`.
    """
    from PIL import Image

    _check_on_error(on_error)
    pairs, report = [], AnnotationReport()
    for name in sorted(os.listdir(image_dir)):
        if not name.lower().endswith(IMAGE_EXTENSIONS):
            continue
        path = os.path.join(image_dir, name)
        mask = os.path.join(mask_dir, os.path.splitext(name)[0] + ".png")
        try:
            with Image.open(mask) as image:
                values = np.unique(np.asarray(image))
                mask_size = image.size
            if image_size(path)[::-1] != mask_size:
                raise ValueError(f"size {mask_size} differs from the image's")
            bad = [int(v) for v in values if v >= num_classes and v != ignore_value]
            if bad:
                raise ValueError(f"class ids {bad} >= num_classes={num_classes}")
        except (OSError, ValueError) as error:
            report.problem(f"{mask}: not a usable mask for {path} ({error})",
                           on_error, "image")
            continue
        pairs.append((path, mask))
        report.images += 1
    return pairs, report
