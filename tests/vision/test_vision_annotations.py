"""COCO / VOC / YOLO / PNG-mask readers: right boxes, bad input named."""

import json

import numpy as np
import pytest
from PIL import Image

from kft.vision.annotations import AnnotationError
from kft.vision.annotations import read_coco
from kft.vision.annotations import read_masks
from kft.vision.annotations import read_voc
from kft.vision.annotations import read_yolo


def _image(folder, name, size=(40, 60)):
    path = folder / name
    Image.fromarray(np.zeros((*size, 3), "uint8")).save(path)
    return path


def _coco(tmp_path, annotations, images=None):
    _image(tmp_path, "a.png")
    data = {
        "images": images or [{"id": 1, "file_name": "a.png", "height": 40,
                              "width": 60}],
        "annotations": annotations,
        "categories": [{"id": 7, "name": "cat"}, {"id": 3, "name": "dog"}],
    }
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(data))
    return path


def test_coco_boxes_become_yxyx_pixels_and_classes_follow_category_ids(tmp_path):
    path = _coco(tmp_path, [
        {"id": 1, "image_id": 1, "category_id": 7, "bbox": [10, 5, 20, 15]},
        {"id": 2, "image_id": 1, "category_id": 3, "bbox": [0, 0, 60, 40]}])
    annotations, names, report = read_coco(path)
    assert names == ["dog", "cat"]  # sorted by category id: 3, 7
    (item,) = annotations
    np.testing.assert_array_equal(item.boxes, [[5, 10, 20, 30], [0, 0, 40, 60]])
    np.testing.assert_array_equal(item.labels, [1, 0])
    assert (item.height, item.width) == (40, 60)
    assert report.images == 1 and report.boxes == 2 and not report.messages


@pytest.mark.parametrize("entry,match", [
    ({"category_id": 99, "bbox": [1, 1, 5, 5]}, "unknown category_id 99"),
    ({"category_id": 7, "bbox": [50, 30, 30, 20]}, "outside the image"),
    ({"category_id": 7, "bbox": [5, 5, 0, 4]}, "is empty"),
])
def test_a_bad_coco_box_is_skipped_and_counted_or_refused(tmp_path, entry, match):
    path = _coco(tmp_path, [
        {"id": 1, "image_id": 1, "category_id": 7, "bbox": [1, 1, 5, 5]},
        {"id": 2, "image_id": 1, **entry}])
    annotations, _, report = read_coco(path)
    assert len(annotations[0].labels) == 1
    assert report.skipped_boxes == 1
    assert str(path) in report.messages[0] and match in report.messages[0]
    with pytest.raises(AnnotationError, match=match) as error:
        read_coco(path, on_error="raise")
    assert str(path) in str(error.value)


def test_a_missing_coco_image_is_named(tmp_path):
    path = _coco(tmp_path, [], images=[
        {"id": 1, "file_name": "a.png", "height": 40, "width": 60},
        {"id": 2, "file_name": "gone.jpg", "height": 40, "width": 60}])
    annotations, _, report = read_coco(path)
    assert len(annotations) == 1 and report.skipped_images == 1
    assert "gone.jpg is missing" in report.messages[0]
    with pytest.raises(AnnotationError, match="gone.jpg is missing"):
        read_coco(path, on_error="raise")


@pytest.mark.parametrize("text", ["{not json", '{"images": []}'])
def test_malformed_coco_json_is_refused_naming_the_file(tmp_path, text):
    path = tmp_path / "broken.json"
    path.write_text(text)
    with pytest.raises(AnnotationError, match="broken.json"):
        read_coco(path)


VOC = """<annotation><filename>{image}</filename>
<size><width>60</width><height>40</height><depth>3</depth></size>
<object><name>{name}</name><bndbox><xmin>10</xmin><ymin>5</ymin>
<xmax>{xmax}</xmax><ymax>20</ymax></bndbox></object></annotation>"""


def _voc(tmp_path, **fields):
    values = {"image": "a.png", "name": "dog", "xmax": 30} | fields
    (tmp_path / "xml").mkdir(exist_ok=True)
    _image(tmp_path, "a.png")
    path = tmp_path / "xml" / "a.xml"
    path.write_text(VOC.format(**values))
    return path


def test_voc_boxes_read_in_pixels(tmp_path):
    _voc(tmp_path)
    annotations, report = read_voc(tmp_path / "xml", tmp_path, ["cat", "dog"])
    np.testing.assert_array_equal(annotations[0].boxes, [[5, 10, 20, 30]])
    np.testing.assert_array_equal(annotations[0].labels, [1])
    assert report.summary().startswith("1 images, 1 boxes")


@pytest.mark.parametrize("fields,match", [
    ({"name": "horse"}, "unknown class 'horse'"),
    ({"xmax": 90}, "outside the image"),
    ({"image": "gone.png"}, "gone.png is missing"),
])
def test_bad_voc_entries_name_the_xml_file(tmp_path, fields, match):
    path = _voc(tmp_path, **fields)
    _, report = read_voc(tmp_path / "xml", tmp_path, ["cat", "dog"])
    assert match in report.messages[0] and str(path) in report.messages[0]
    with pytest.raises(AnnotationError, match=match):
        read_voc(tmp_path / "xml", tmp_path, ["cat", "dog"], on_error="raise")


@pytest.mark.parametrize("text", [
    "<annotation><size>",
    '<!DOCTYPE a [<!ENTITY x "y">]><annotation>&x;</annotation>',
])
def test_malformed_or_entity_xml_is_skipped_and_named(tmp_path, text):
    _image(tmp_path, "a.png")
    (tmp_path / "xml").mkdir()
    (tmp_path / "xml" / "bad.xml").write_text(text)
    annotations, report = read_voc(tmp_path / "xml", tmp_path, ["dog"])
    assert not annotations and report.skipped_images == 1
    assert "bad.xml: not a readable Pascal VOC file" in report.messages[0]
    with pytest.raises(AnnotationError, match="bad.xml"):
        read_voc(tmp_path / "xml", tmp_path, ["dog"], on_error="raise")


def test_yolo_relative_centres_become_pixel_boxes(tmp_path):
    (tmp_path / "labels").mkdir()
    _image(tmp_path, "a.png")
    _image(tmp_path, "b.png")  # no label file: no objects
    (tmp_path / "labels" / "a.txt").write_text("1 0.5 0.5 0.5 0.25\n\n")
    annotations, report = read_yolo(tmp_path, tmp_path / "labels", 2)
    np.testing.assert_allclose(annotations[0].boxes, [[15, 15, 25, 45]])
    assert len(annotations[1].labels) == 0
    assert report.images == 2


@pytest.mark.parametrize("line,match", [
    ("5 0.5 0.5 0.1 0.1", "unknown class id 5"),
    ("0 0.9 0.5 0.5 0.1", "outside the image"),
    ("0 half 0.5 0.1 0.1", "not readable"),
])
def test_bad_yolo_lines_name_the_file_and_line(tmp_path, line, match):
    (tmp_path / "labels").mkdir()
    _image(tmp_path, "a.png")
    (tmp_path / "labels" / "a.txt").write_text(line)
    _, report = read_yolo(tmp_path, tmp_path / "labels", 2)
    assert match in report.messages[0] and "a.txt" in report.messages[0]
    with pytest.raises(AnnotationError, match=match):
        read_yolo(tmp_path, tmp_path / "labels", 2, on_error="raise")


def test_masks_pair_by_stem_and_bad_ones_are_named(tmp_path):
    (tmp_path / "masks").mkdir()
    for name in ("a", "b", "c"):
        _image(tmp_path, f"{name}.jpg")
    good = np.zeros((40, 60), "uint8")
    good[5:10] = 2
    good[0] = 255  # VOC's ignore border
    Image.fromarray(good).save(tmp_path / "masks" / "a.png")
    Image.fromarray(good + 5).save(tmp_path / "masks" / "b.png")  # ids too big
    pairs, report = read_masks(tmp_path, tmp_path / "masks", 3)
    assert [p.rsplit("/", 1)[-1] for p, _ in pairs] == ["a.jpg"]
    assert report.skipped_images == 2
    assert any("b.png" in m and "class ids" in m for m in report.messages)
    assert any("c.png" in m for m in report.messages)  # missing mask
