"""Data sets: the synthetic VOC writer, pascal_voc, coco (JSON path), the factory, imdb helpers."""
from __future__ import annotations

import filecmp
import json
import math
import os
import pickle
import xml.etree.ElementTree as ET

import cv2
import numpy as np
import pytest

from caffe_compat.errors import DataError
from caffe_compat.frcnn.config import temporary_cfg
from caffe_compat.frcnn.datasets import synthetic_voc
from caffe_compat.frcnn.datasets.factory import get_imdb, list_imdbs
from caffe_compat.frcnn.datasets.imdb import (imdb, load_proposals, load_roidb, save_proposals, save_roidb,
                                              unique_boxes, filter_small_boxes)
from caffe_compat.frcnn.datasets.pascal_voc import VOC_CLASSES, pascal_voc

SIZE = (64, 96)


@pytest.fixture(scope="module")
def voc_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("synvoc")
    info = synthetic_voc.write_dataset(str(out), 8, seed=0, image_size=SIZE, difficult_prob=0.3)
    assert info["num_difficult"] > 0    # the tests below need difficult objects
    return out


@pytest.fixture
def data_dir(voc_dir, tmp_path):
    # DATA_DIR/cache (gt roidb caches) lives inside the module's synthetic data set
    with temporary_cfg({"DATA_DIR": str(voc_dir)}):
        yield voc_dir


def _xml_objects(root, index):
    tree = ET.parse(os.path.join(root, "Annotations", index + ".xml"))
    out = []
    for o in tree.findall("object"):
        bb = o.find("bndbox")
        out.append((o.find("name").text, int(o.find("difficult").text),
                    [int(bb.find(t).text) for t in ("xmin", "ymin", "xmax", "ymax")]))
    size = tree.find("size")
    return out, int(size.find("width").text), int(size.find("height").text)


# --------------------------------------------------------------------------- synthetic writer
def test_synthetic_files_and_boxes(voc_dir):
    root = os.path.join(voc_dir, "VOCdevkit2007", "VOC2007")
    sets = {s: open(os.path.join(root, "ImageSets", "Main", s + ".txt")).read().split()
            for s in ("trainval", "test", "train", "val")}
    assert len(sets["trainval"]) == 6 and len(sets["test"]) == 2
    assert sorted(sets["trainval"] + sets["test"]) == [f"{k:06d}" for k in range(1, 9)]
    assert sorted(sets["train"] + sets["val"]) == sorted(sets["trainval"])
    n_diff = 0
    for index in sets["trainval"] + sets["test"]:
        im = cv2.imread(os.path.join(root, "JPEGImages", index + ".jpg"))
        assert im is not None and im.ndim == 3
        objs, w, h = _xml_objects(root, index)
        assert (w, h) == (im.shape[1], im.shape[0])
        assert SIZE[0] <= w <= SIZE[1] and SIZE[0] <= h <= SIZE[1]
        assert 1 <= len(objs) <= 4
        for name, diff, (x1, y1, x2, y2) in objs:
            assert name in VOC_CLASSES[1:]
            assert 1 <= x1 <= x2 <= w and 1 <= y1 <= y2 <= h     # 1-based, inside the image
            n_diff += diff
    assert n_diff > 0


def test_synthetic_is_deterministic(tmp_path):
    a = synthetic_voc.write_dataset(str(tmp_path / "a"), 3, seed=5, image_size=SIZE)
    b = synthetic_voc.write_dataset(str(tmp_path / "b"), 3, seed=5, image_size=SIZE)
    c = synthetic_voc.write_dataset(str(tmp_path / "c"), 3, seed=6, image_size=SIZE)
    assert a["num_objects"] == b["num_objects"]
    sub = os.path.join("VOCdevkit2007", "VOC2007")
    for rel in ("JPEGImages/000001.jpg", "JPEGImages/000003.jpg", "Annotations/000002.xml",
                "ImageSets/Main/trainval.txt"):
        assert filecmp.cmp(tmp_path / "a" / sub / rel, tmp_path / "b" / sub / rel, shallow=False)
    assert not filecmp.cmp(tmp_path / "a" / sub / "JPEGImages/000001.jpg",
                           tmp_path / "c" / sub / "JPEGImages/000001.jpg", shallow=False)
    # image k does not depend on how many images were asked for
    img3, objs3 = synthetic_voc.render_image(5, 2, SIZE)
    img3b, objs3b = synthetic_voc.render_image(5, 2, SIZE)
    assert np.array_equal(img3, img3b) and objs3 == objs3b


@pytest.mark.parametrize("seed", range(4))
def test_synthetic_boxes_are_tight(seed):
    # one object per image: the pixels of the class colour span exactly the written box
    for number in range(5):
        img, objs = synthetic_voc.render_image(seed, number, SIZE, difficult_prob=0.0, max_objects=1)
        (o,) = objs
        _, colour = synthetic_voc.class_style(o["class"] - 1)
        near = (np.abs(img.astype(int) - np.array(colour)).max(axis=2) <= 16)
        ys, xs = np.nonzero(near)
        assert [xs.min() + 1, ys.min() + 1, xs.max() + 1, ys.max() + 1] == o["bbox"]
        assert o["name"] == synthetic_voc.CLASS_NAMES[o["class"] - 1]


def test_synthetic_classes_subset_and_styles(tmp_path):
    info = synthetic_voc.write_dataset(str(tmp_path), 6, image_size=SIZE, num_classes=2)
    assert info["classes"] == ["aeroplane", "bicycle"]
    root = tmp_path / "VOCdevkit2007" / "VOC2007"
    names = {n for k in range(1, 7) for n, _, _ in _xml_objects(str(root), f"{k:06d}")[0]}
    assert names <= {"aeroplane", "bicycle"}
    styles = [synthetic_voc.class_style(c) for c in range(20)]
    assert len(set(styles)) == 20 and len({s for s, _ in styles}) == 10
    with pytest.raises(DataError):
        synthetic_voc.write_dataset(str(tmp_path), 2, num_classes=21)
    with pytest.raises(DataError):
        synthetic_voc.write_dataset(str(tmp_path), 0)


def test_synthetic_cli(tmp_path):
    from click.testing import CliRunner

    import caffe_compat.cli.synthetic_voc  # noqa: F401  (attaches the command)
    from caffe_compat.cli.main import main

    r = CliRunner().invoke(main, ["synthetic-voc", str(tmp_path), "--images", "4", "--classes", "3",
                                  "--min-size", "64", "--max-size", "80", "--seed", "1"])
    assert r.exit_code == 0, r.output
    assert "4 images (3 trainval, 1 test)" in r.output
    assert (tmp_path / "VOCdevkit2007" / "VOC2007" / "JPEGImages" / "000004.jpg").exists()
    r = CliRunner().invoke(main, ["synthetic-voc", str(tmp_path), "--min-size", "90", "--max-size", "80"])
    assert r.exit_code == 2 and "min-size" in r.output


# --------------------------------------------------------------------------- pascal_voc
def test_pascal_voc_gt_roidb_matches_xml(data_dir):
    d = pascal_voc("trainval", "2007")
    root = os.path.join(data_dir, "VOCdevkit2007", "VOC2007")
    assert d.name == "voc_2007_trainval" and d.num_classes == 21 and d.classes == VOC_CLASSES
    assert d.num_images == 6
    assert os.path.exists(d.image_path_at(0))
    roidb = d.roidb
    for index, e in zip(d.image_index, roidb):
        objs, _, _ = _xml_objects(root, index)
        keep = [o for o in objs if o[1] == 0]                 # difficult left out by default
        assert e["boxes"].dtype == np.uint16
        np.testing.assert_array_equal(e["boxes"], np.array([b for _, _, b in keep]).reshape(-1, 4) - 1)
        np.testing.assert_array_equal(e["gt_classes"], [VOC_CLASSES.index(n) for n, _, _ in keep])
        assert e["gt_overlaps"].shape == (len(keep), 21)
        np.testing.assert_array_equal(e["gt_overlaps"].argmax(1), e["gt_classes"])
        np.testing.assert_array_equal(e["gt_overlaps"].sum(1), 1)
        w = e["boxes"][:, 2].astype(float) - e["boxes"][:, 0] + 1
        h = e["boxes"][:, 3].astype(float) - e["boxes"][:, 1] + 1
        np.testing.assert_array_equal(e["seg_areas"], w * h)
        assert not e["flipped"] and not e["difficult"].any()


def test_pascal_voc_use_diff_keeps_difficult(data_dir):
    d = pascal_voc("trainval", "2007")
    d.config["use_diff"] = True
    root = os.path.join(data_dir, "VOCdevkit2007", "VOC2007")
    roidb = d.gt_roidb()
    total = 0
    for index, e in zip(d.image_index, roidb):
        objs, _, _ = _xml_objects(root, index)
        assert len(e["boxes"]) == len(objs)
        np.testing.assert_array_equal(e["difficult"], [bool(o[1]) for o in objs])
        total += e["difficult"].sum()
    d2 = pascal_voc("test", "2007")
    d2.config["use_diff"] = True
    total += sum(e["difficult"].sum() for e in d2.gt_roidb())
    assert total > 0


def test_flipped_boxes_exact(data_dir):
    d = pascal_voc("trainval", "2007")
    orig = [e["boxes"].astype(np.int64).copy() for e in d.roidb]
    widths = [cv2.imread(d.image_path_at(i)).shape[1] for i in range(d.num_images)]
    d.append_flipped_images()
    assert d.num_images == 12 and len(d.roidb) == 12
    assert d.image_index[6:] == d.image_index[:6]
    for i in range(6):
        f = d.roidb[6 + i]
        assert f["flipped"] and f["boxes"].dtype == np.uint16
        W = widths[i]
        np.testing.assert_array_equal(f["boxes"][:, 0], W - orig[i][:, 2] - 1)
        np.testing.assert_array_equal(f["boxes"][:, 2], W - orig[i][:, 0] - 1)
        np.testing.assert_array_equal(f["boxes"][:, [1, 3]], orig[i][:, [1, 3]])
        np.testing.assert_array_equal(f["gt_classes"], d.roidb[i]["gt_classes"])


def test_gt_roidb_cache_is_npz_and_invalidated(data_dir, monkeypatch):
    d = pascal_voc("trainval", "2007")
    first = d.gt_roidb()
    cache = os.path.join(str(data_dir), "cache", "voc_2007_trainval_gt_roidb.npz")
    assert os.path.exists(cache)
    np.load(cache, allow_pickle=False).close()          # readable without pickle

    def boom(self, index):
        raise AssertionError("cache not used")

    monkeypatch.setattr(pascal_voc, "_load_pascal_annotation", boom)
    again = pascal_voc("trainval", "2007").gt_roidb()
    for a, b in zip(first, again):
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])
        assert b["boxes"].dtype == np.uint16 and isinstance(b["flipped"], bool)
    # an edited annotation must be re-read
    xml = os.path.join(str(data_dir), "VOCdevkit2007", "VOC2007", "Annotations", d.image_index[0] + ".xml")
    st = os.stat(xml)
    os.utime(xml, ns=(st.st_atime_ns, st.st_mtime_ns + 10 ** 9))
    with pytest.raises(AssertionError, match="cache not used"):
        pascal_voc("trainval", "2007").gt_roidb()


def test_pascal_voc_errors(data_dir, tmp_path):
    with pytest.raises(DataError, match="image set 'nope' not found"):
        pascal_voc("nope", "2007")
    with pytest.raises(DataError, match="VOCdevkit folder not found"):
        pascal_voc("trainval", "2012")
    d = pascal_voc("trainval", "2007")
    with pytest.raises(DataError, match="valid: gt, rpn"):
        d.set_proposal_method("edge_boxes")
    with pytest.raises(DataError, match="selective-search"):
        d.set_proposal_method("selective_search")
        d.roidb
    # a 0-based box (xmin 0) is refused instead of wrapping around in uint16
    root = tmp_path / "VOCdevkit2007" / "VOC2007"
    for sub in ("Annotations", "ImageSets/Main", "JPEGImages"):
        (root / sub).mkdir(parents=True)
    (root / "ImageSets/Main/trainval.txt").write_text("x\n")
    (root / "Annotations/x.xml").write_text(
        "<annotation><object><name>cat</name><difficult>0</difficult><bndbox><xmin>0</xmin>"
        "<ymin>1</ymin><xmax>5</xmax><ymax>5</ymax></bndbox></object></annotation>")
    with temporary_cfg({"DATA_DIR": str(tmp_path)}):
        with pytest.raises(DataError, match="1-based"):
            pascal_voc("trainval", "2007").gt_roidb()
        (root / "Annotations/x.xml").write_text(
            "<annotation><object><name>unicorn</name><bndbox><xmin>1</xmin>"
            "<ymin>1</ymin><xmax>5</xmax><ymax>5</ymax></bndbox></object></annotation>")
        with pytest.raises(DataError, match="unknown class 'unicorn'"):
            pascal_voc("trainval", "2007").gt_roidb()


def test_evaluate_detections_perfect_and_one_false_positive(data_dir, tmp_path):
    d = pascal_voc("test", "2007")
    roidb = d.gt_roidb()
    # perfect detections: every non-difficult gt box with score 1
    all_boxes = [[np.zeros((0, 5), np.float32) for _ in range(d.num_images)] for _ in range(21)]
    counts = np.zeros(21, int)
    for i, e in enumerate(roidb):
        for b, c in zip(e["boxes"], e["gt_classes"]):
            all_boxes[c][i] = np.vstack([all_boxes[c][i], np.r_[b.astype(np.float32), 1.0]])
            counts[c] += 1
    res = d.evaluate_detections(all_boxes, str(tmp_path / "out"))
    assert res["use_07_metric"] is True
    present = [VOC_CLASSES[c] for c in range(1, 21) if counts[c]]
    for cls, ap in res["ap"].items():
        if cls in present:
            assert ap == pytest.approx(1.0)
        else:
            assert math.isnan(ap)
    assert res["mAP"] == pytest.approx(1.0)
    with np.load(tmp_path / "out" / f"{present[0]}_pr.npz") as pr:
        assert float(pr["ap"]) == pytest.approx(1.0) and pr["rec"][-1] == 1.0
    saved = json.loads((tmp_path / "out" / "voc_eval.json").read_text())
    assert saved["mAP"] == pytest.approx(1.0)
    assert {c for c, a in saved["ap"].items() if a is not None} == set(present)   # nan -> null
    # result files were removed (cleanup) and carried a random salt
    results = os.path.join(str(data_dir), "VOCdevkit2007", "results", "VOC2007", "Main")
    assert os.listdir(results) == []
    # one false positive above all n true positives of a class: precision 0, 1/2, ..., n/(n+1)
    # at recall 0, 1/n, ..., 1 -> both metrics give n/(n+1)
    c = int(np.argmax(counts))
    n = counts[c]
    all_boxes[c][0] = np.vstack([all_boxes[c][0], [0, 0, 3, 3, 2.0]]).astype(np.float32)
    d.competition_mode(True)
    res = d.evaluate_detections(all_boxes, None)
    assert res["ap"][VOC_CLASSES[c]] == pytest.approx(n / (n + 1))
    kept = sorted(os.listdir(results))
    assert len(kept) == 20 and kept[0] == "comp4_det_test_aeroplane.txt"
    lines = open(os.path.join(results, f"comp4_det_test_{VOC_CLASSES[c]}.txt")).read().splitlines()
    assert f"{d.image_index[0]} 2.000 1.0 1.0 4.0 4.0" in lines     # 1-based, VOC's format
    with pytest.raises(DataError, match="all_boxes has 3 classes"):
        d.evaluate_detections(all_boxes[:3])


# --------------------------------------------------------------------------- factory
def test_factory_names_and_unknown():
    names = list_imdbs()
    for n in ("voc_2007_trainval", "voc_2012_test", "coco_2014_minival", "coco_2015_test-dev"):
        assert n in names
    assert len(names) == 8 + 4 + 2
    with pytest.raises(DataError, match="unknown data set 'voc_2008_train'.*voc_2007_trainval"):
        get_imdb("voc_2008_train")


def test_factory_builds_voc(data_dir):
    d = get_imdb("voc_2007_test")
    assert isinstance(d, pascal_voc) and d.num_images == 2


# --------------------------------------------------------------------------- coco (JSON only)
def test_coco_gt_from_json(tmp_path):
    from caffe_compat.frcnn.datasets.coco import coco, crowd_iou, filter_crowd_proposals

    root = tmp_path / "coco"
    (root / "annotations").mkdir(parents=True)
    (root / "images" / "val2014").mkdir(parents=True)
    cats = [{"id": 5, "name": "zebra"}, {"id": 1, "name": "person"}, {"id": 3, "name": "car"}]
    images = [{"id": 42, "width": 50, "height": 40}, {"id": 7, "width": 30, "height": 30}]
    anns = [
        {"id": 1, "image_id": 42, "category_id": 1, "bbox": [10, 5, 20, 10], "area": 200, "iscrowd": 0},
        {"id": 2, "image_id": 42, "category_id": 5, "bbox": [-3, 30, 60, 20], "area": 10, "iscrowd": 1},
        {"id": 3, "image_id": 42, "category_id": 3, "bbox": [1, 1, 5, 5], "area": 0, "iscrowd": 0},
        {"id": 4, "image_id": 7, "category_id": 3, "bbox": [0, 0, 0.5, 3], "area": 1.5, "iscrowd": 0},
    ]
    (root / "annotations" / "instances_minival2014.json").write_text(
        json.dumps({"images": images, "categories": cats, "annotations": anns}))
    with temporary_cfg({"DATA_DIR": str(tmp_path)}):
        d = coco("minival", "2014")
        assert d.classes == ("__background__", "zebra", "person", "car")   # file order
        assert d.image_index == [42, 7]
        r = d.gt_roidb()
        # [10, 5, 20, 10] -> x1 10, x2 10 + 19; crowd [-3, 30, 60, 20] clipped to the image
        np.testing.assert_array_equal(r[0]["boxes"], [[10, 5, 29, 14], [0, 30, 49, 39]])
        np.testing.assert_array_equal(r[0]["gt_classes"], [2, 1])
        np.testing.assert_array_equal(r[0]["gt_overlaps"][1], -1)            # crowd: ignored
        np.testing.assert_array_equal(r[1]["boxes"], [[0, 0, 0, 2]])         # w - 1 < 0 -> 0 wide
        assert d._get_widths() == [50, 30]
        (root / "images" / "val2014" / "COCO_val2014_000000000042.jpg").write_bytes(b"")
        assert d.image_path_at(0).endswith("images/val2014/COCO_val2014_000000000042.jpg")
        with pytest.raises(DataError, match="image 7 not found"):
            d.image_path_at(1)
        try:
            import pycocotools  # noqa: F401
        except ImportError:
            with pytest.raises(DataError, match="pip install pycocotools"):
                d.evaluate_detections([[[]] * 2] * 4, str(tmp_path / "o"))
    # crowd IoU is intersection over the proposal's own area
    np.testing.assert_allclose(crowd_iou([[0, 0, 10, 10]], [[5, 0, 100, 100]]), [[0.5]])
    entry = {"boxes": np.array([[0, 30, 49, 39], [0, 30, 9, 39], [0, 0, 9, 9]], np.float32),
             "gt_classes": np.array([1, 0, 0]),
             "gt_overlaps": np.array([[-1, -1], [0, 0.2], [0, 0.3]], np.float32)}
    filter_crowd_proposals([entry], 0.7)
    np.testing.assert_allclose(entry["gt_overlaps"], [[-1, -1], [-1, -1], [0, 0.3]], rtol=1e-6)


# --------------------------------------------------------------------------- imdb helpers
class _Toy(imdb):
    def __init__(self, n=2):
        super().__init__("toy", ("__background__", "a", "b"))
        self._image_index = [str(i) for i in range(n)]

    def gt_roidb(self):
        return [{"boxes": np.array([[0, 0, 9, 9], [20, 20, 29, 39]], np.uint16),
                 "gt_classes": np.array([1, 2], np.int32),
                 "gt_overlaps": np.array([[0, 1, 0], [0, 0, 1]], np.float32),
                 "flipped": False, "seg_areas": np.array([100, 200], np.float32)}
                for _ in self._image_index]


def test_create_roidb_from_box_list_and_merge():
    d = _Toy()
    gt = d.gt_roidb()
    props = [np.array([[0, 0, 9, 4], [20, 20, 29, 39], [50, 50, 60, 60]], np.float32),
             np.zeros((0, 4), np.float32)]
    r = d.create_roidb_from_box_list(props, gt)
    # (0,0,9,4) vs gt a (0,0,9,9): 50 / 100 -> 0.5 in column 1; exact copy of gt b -> 1 in column 2
    np.testing.assert_allclose(r[0]["gt_overlaps"], [[0, 0.5, 0], [0, 0, 1], [0, 0, 0]])
    assert r[1]["gt_overlaps"].shape == (0, 3)
    m = imdb.merge_roidbs(gt, r)
    assert m[0]["boxes"].shape == (5, 4) and m[0]["boxes"].dtype == np.float32
    np.testing.assert_array_equal(m[0]["gt_classes"], [1, 2, 0, 0, 0])
    with pytest.raises(DataError, match="3 proposal lists for 2 images"):
        d.create_roidb_from_box_list(props + props[:1], gt)


def test_proposal_files_npz_and_legacy_pickle(tmp_path):
    boxes = [np.array([[1, 2, 3, 4], [5, 6, 7, 8]], np.float32), np.zeros((0, 4), np.float32),
             np.array([[0, 0, 1, 1]], np.float32)]
    save_proposals(tmp_path / "p.npz", boxes, scores=[np.ones(2), np.ones(0), np.ones(1)])
    got = load_proposals(tmp_path / "p.npz")
    assert len(got) == 3
    for a, b in zip(boxes, got):
        np.testing.assert_array_equal(a, b)
    # py-faster-rcnn's rpn_generate pickle: a list of (R, 4) arrays
    with open(tmp_path / "p.pkl", "wb") as f:
        pickle.dump([np.hstack([b, np.ones((len(b), 1), np.float32)]) for b in boxes], f, protocol=2)
    got = load_proposals(str(tmp_path / "p.pkl"))
    np.testing.assert_array_equal(got[0], boxes[0])
    with open(tmp_path / "p5.pkl", "wb") as f:
        pickle.dump(boxes, f, protocol=5)
    assert load_proposals(str(tmp_path / "p5.pkl"))[2].tolist() == [[0, 0, 1, 1]]

    class Evil:
        def __reduce__(self):
            return (os.system, ("true",))

    with open(tmp_path / "evil.pkl", "wb") as f:
        pickle.dump([Evil()], f)
    with pytest.raises(DataError, match="refusing to load"):
        load_proposals(str(tmp_path / "evil.pkl"))
    with pytest.raises(DataError, match="not found"):
        load_proposals(tmp_path / "missing.npz")


def test_rpn_roidb_uses_rpn_file(tmp_path):
    d = _Toy()
    save_proposals(tmp_path / "p.npz", [np.array([[0, 0, 9, 9]], np.float32)] * 2)
    d.set_proposal_method("rpn")
    with pytest.raises(DataError, match="rpn_file"):
        d.roidb
    d.config["rpn_file"] = str(tmp_path / "p.npz")
    d.set_proposal_method("rpn")
    r = d.roidb
    assert r[0]["boxes"].shape == (3, 4)
    np.testing.assert_allclose(r[0]["gt_overlaps"][2], [0, 1, 0])


def test_roidb_npz_roundtrip(tmp_path):
    d = _Toy(3)
    roidb = d.gt_roidb()
    roidb[1]["boxes"] = np.zeros((0, 4), np.uint16)
    roidb[1]["gt_classes"] = np.zeros((0,), np.int32)
    roidb[1]["gt_overlaps"] = np.zeros((0, 3), np.float32)
    roidb[1]["seg_areas"] = np.zeros((0,), np.float32)
    roidb[2]["flipped"] = True
    save_roidb(tmp_path / "r.npz", roidb, {"k": [1, "x"]})
    back, meta = load_roidb(tmp_path / "r.npz")
    assert meta == {"k": [1, "x"]}
    for a, b in zip(roidb, back):
        assert set(a) == set(b)
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])
            assert np.asarray(a[k]).dtype == np.asarray(b[k]).dtype
    assert back[1]["boxes"].shape == (0, 4) and back[2]["flipped"] is True


def test_box_utils():
    b = np.array([[0, 0, 10, 10], [0, 0, 10, 10], [1, 1, 2, 2], [0, 0, 10, 2]], np.float32)
    np.testing.assert_array_equal(unique_boxes(b), [0, 2, 3])
    # w >= 2 and h > 2: (1,1,2,2) has w 1; (0,0,10,2) has h 2 (not > 2)
    np.testing.assert_array_equal(filter_small_boxes(b, 2), [0, 1])


def test_coco_evaluation_with_pycocotools(tmp_path):
    import pycocotools  # noqa: F401 - make test installs it; without it this evaluation is refused
    from caffe_compat.frcnn.datasets.coco import _CocoJson, coco

    root = tmp_path / "coco" / "annotations"
    root.mkdir(parents=True)
    cats = [{"id": 2, "name": "b"}, {"id": 1, "name": "a"}]
    images = [{"id": 1, "width": 64, "height": 48}, {"id": 2, "width": 40, "height": 40}]
    anns = [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [4, 6, 20, 10], "area": 200, "iscrowd": 0},
            {"id": 2, "image_id": 1, "category_id": 2, "bbox": [30, 20, 25, 25], "area": 625, "iscrowd": 0},
            {"id": 3, "image_id": 2, "category_id": 1, "bbox": [0, 0, 39, 30], "area": 1170, "iscrowd": 0}]
    (root / "instances_val2014.json").write_text(json.dumps({"images": images, "categories": cats,
                                                             "annotations": anns}))
    with temporary_cfg({"DATA_DIR": str(tmp_path)}):
        d = coco("val", "2014")
        assert not isinstance(d._COCO, _CocoJson)
        r = d.gt_roidb()
        # the same ground truth as the JSON-only reader
        j = coco.__new__(coco)
        j.__dict__.update(d.__dict__)
        j._COCO = _CocoJson(d._get_ann_file())
        for a, b in zip(r, [j._load_coco_annotation(i) for i in j.image_index]):
            for k in a:
                np.testing.assert_array_equal(a[k], b[k])
        all_boxes = [[np.zeros((0, 5))] * 2 for _ in range(3)]
        for i, e in enumerate(r):
            for b, c in zip(e["boxes"], e["gt_classes"]):
                all_boxes[c][i] = np.vstack([all_boxes[c][i], np.r_[b, 0.9]])
        res = d.evaluate_detections(all_boxes, str(tmp_path / "out"))
        assert res["AP"] == pytest.approx(1.0) and res["ap"] == {"b": pytest.approx(1.0), "a": pytest.approx(1.0)}
        assert (tmp_path / "out" / "detection_results.json").exists()
        assert res["results_file"] is None                 # cleaned up
        # a missed object of class "a" (1 of 2 found): AP of "a" drops to ~0.5
        all_boxes[2][1] = np.zeros((0, 5))
        res = d.evaluate_detections(all_boxes, str(tmp_path / "out"))
        assert res["ap"]["a"] == pytest.approx(0.5, abs=0.01) and res["ap"]["b"] == pytest.approx(1.0)


def test_evaluate_recall():
    d = _Toy(1)
    gt = d.gt_roidb()
    # one exact proposal (IoU 1) and one covering 124 of the 200 pixels of the 2nd gt (IoU 0.62)
    props = [np.array([[0, 0, 9, 9], [20, 20, 29, 31.4]], np.float32)]
    d._roidb = imdb.merge_roidbs(gt, d.create_roidb_from_box_list(props, gt))
    res = d.evaluate_recall()
    # thresholds 0.50, 0.55, ..., 0.95: both found up to 0.60, one from 0.65 on
    np.testing.assert_allclose(res["recalls"], [1, 1, 1] + [0.5] * 7)
    assert res["ar"] == pytest.approx(0.65)
    np.testing.assert_allclose(res["gt_overlaps"], [0.62, 1.0], rtol=1e-6)
    assert d.evaluate_recall(area="small")["recalls"][0] == 1.0     # both areas < 32 ** 2
    with pytest.raises(DataError, match="unknown area range"):
        d.evaluate_recall(area="huge")


def test_flip_tolerates_overhanging_float_proposals():
    """Proposals mapped back from a resized image may overhang by under a pixel: clipped, not refused."""
    from caffe_compat.frcnn.datasets.imdb import imdb as Imdb

    class Tiny(Imdb):
        def __init__(self):
            super().__init__("tiny")
            self._classes = ("__background__", "a")
            self._image_index = ["0"]

        def _get_widths(self):
            return [100]

    d = Tiny()
    boxes = np.array([[10, 10, 50, 50], [20, 5, 99.4, 60]], np.float32)  # gt, then a proposal
    d._roidb = [{"boxes": boxes, "gt_classes": np.array([1, 0], np.int32), "flipped": False}]
    d._roidb_handler = lambda: d._roidb
    d.append_flipped_images()
    flipped = d.roidb[1]["boxes"]
    assert flipped[0].tolist() == [49, 10, 89, 50]
    assert flipped[1, 0] == 0 and abs(flipped[1, 2] - 79) < 1e-5
