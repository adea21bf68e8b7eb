"""VOC evaluation on hand-made detections whose AP is worked out by hand below."""
from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest

from caffe_compat.errors import DataError
from caffe_compat.frcnn.datasets.voc_eval import (load_annotations, mean_ap, parse_rec, read_detections_file,
                                                  voc_ap, voc_eval)


def obj(box, name="cat", difficult=0):
    return {"name": name, "pose": "Unspecified", "truncated": 0, "difficult": difficult, "bbox": list(box)}


# --------------------------------------------------------------------------- voc_ap
def test_voc_ap_tp_fp_tp():
    # 3 positives; detections TP, FP, TP by decreasing confidence:
    #   cum tp = 1, 1, 2   cum fp = 0, 1, 1
    #   recall    = 1/3, 1/3, 2/3
    #   precision = 1,   1/2, 2/3
    # 07 metric, thresholds t = 0, .1, ..., 1:
    #   t in {0, .1, .2, .3}: points with recall >= t are all three -> max precision 1
    #   t in {.4, .5, .6}:    only recall 2/3 -> precision 2/3
    #   t in {.7, ..., 1}:    no point -> 0
    #   AP = (4 * 1 + 3 * 2/3) / 11 = 6/11
    # area metric: recall 0, 1/3, 1/3, 2/3, 1 with precision 0, 1, 1/2, 2/3, 0;
    #   envelope (max to the right): 1, 1, 2/3, 2/3, 0
    #   recall steps: 0 -> 1/3 at precision 1, 1/3 -> 2/3 at 2/3, 2/3 -> 1 at 0
    #   AP = 1/3 * 1 + 1/3 * 2/3 = 5/9
    rec = np.array([1 / 3, 1 / 3, 2 / 3])
    prec = np.array([1.0, 0.5, 2 / 3])
    assert voc_ap(rec, prec, use_07_metric=True) == pytest.approx(6 / 11, abs=1e-12)
    assert voc_ap(rec, prec, use_07_metric=False) == pytest.approx(5 / 9, abs=1e-12)


def test_voc_ap_envelope_uses_later_higher_precision():
    # precision dips then rises: 1/2 at recall 1/2, then 2/3 at recall 1.
    # envelope at recall 1/2 is 2/3 -> AP = 1/2 * 2/3 + 1/2 * 2/3 = 2/3 (a plain
    # rectangle sum without the envelope would give 1/2 * 1/2 + 1/2 * 2/3 = 7/12)
    rec = np.array([0.5, 1.0])
    prec = np.array([0.5, 2 / 3])
    assert voc_ap(rec, prec) == pytest.approx(2 / 3, abs=1e-12)
    # 07: every t has a point with recall >= t whose precision is 2/3 -> 2/3
    assert voc_ap(rec, prec, True) == pytest.approx(2 / 3, abs=1e-12)


def test_voc_ap_empty():
    assert voc_ap(np.zeros(0), np.zeros(0), True) == 0.0
    assert voc_ap(np.zeros(0), np.zeros(0), False) == 0.0


# --------------------------------------------------------------------------- voc_eval
ANNOS = {
    "a": [obj((1, 1, 10, 10)), obj((21, 21, 40, 40)), obj((50, 50, 60, 60), name="dog")],
    "b": [obj((5, 5, 24, 24))],
    "c": [],
}


def test_voc_eval_tp_fp_tp_both_metrics():
    dets = [
        ("a", 0.7, 21, 21, 40, 41),   # IoU 400/420 with the second gt of "a" -> TP (3rd by score)
        ("a", 0.9, 1, 1, 10, 10),     # exact -> TP (1st)
        ("b", 0.8, 60, 60, 70, 70),   # no overlap -> FP (2nd)
        ("c", 0.1, 1, 1, 10, 10),     # image without cats -> FP (4th)
    ]
    rec, prec, ap07 = voc_eval(dets, ANNOS, "cat", use_07_metric=True)
    # sorted: TP, FP, TP, FP over 3 positives (see test_voc_ap_tp_fp_tp) + a last FP
    np.testing.assert_allclose(rec, [1 / 3, 1 / 3, 2 / 3, 2 / 3])
    np.testing.assert_allclose(prec, [1, 1 / 2, 2 / 3, 2 / 4])
    assert ap07 == pytest.approx(6 / 11, abs=1e-12)   # the trailing FP changes nothing
    _, _, ap = voc_eval(dets, ANNOS, "cat", use_07_metric=False)
    assert ap == pytest.approx(5 / 9, abs=1e-12)


def test_difficult_objects_are_ignored():
    annos = {"a": [obj((1, 1, 10, 10)), obj((31, 31, 50, 50), difficult=1)]}
    dets = [("a", 0.95, 31, 31, 50, 50),   # hits the difficult object: neither TP nor FP
            ("a", 0.90, 1, 1, 10, 10)]     # TP
    rec, prec, ap = voc_eval(dets, annos, "cat", use_07_metric=True)
    # one positive (the difficult one does not count): cum tp 0, 1; cum fp 0, 0
    # precision 0/eps = 0, then 1; recall 0, 1 -> AP 1 for both metrics.
    # Counting the difficult hit as FP would give precision 1/2 at recall 1 (AP 1/2);
    # counting it as a positive would cap recall at 1/2.
    np.testing.assert_allclose(rec, [0, 1])
    np.testing.assert_allclose(prec, [0, 1])
    assert ap == pytest.approx(1.0)
    assert voc_eval(dets, annos, "cat")[2] == pytest.approx(1.0)
    # the same object not marked difficult: 2 positives, both found -> AP 1, recall 1/2, 1
    annos2 = {"a": [obj((1, 1, 10, 10)), obj((31, 31, 50, 50))]}
    rec2, _, _ = voc_eval(dets, annos2, "cat")
    np.testing.assert_allclose(rec2, [0.5, 1.0])


def test_duplicates_are_false_positives():
    annos = {"a": [obj((1, 1, 10, 10))], "b": [obj((1, 1, 20, 20))]}
    dets = [("a", 0.9, 1, 1, 10, 10),      # TP
            ("a", 0.8, 1, 1, 10, 10),      # same object again -> FP
            ("b", 0.7, 1, 1, 20, 20)]      # TP
    rec, prec, ap07 = voc_eval(dets, annos, "cat", use_07_metric=True)
    # recall 1/2, 1/2, 1; precision 1, 1/2, 2/3
    # 07: t = 0 .. .5 (6 values) -> 1; t = .6 .. 1 (5 values) -> 2/3: AP = (6 + 10/3)/11 = 28/33
    # area: envelope 1, 2/3, 2/3 -> 1/2 * 1 + 1/2 * 2/3 = 5/6
    np.testing.assert_allclose(rec, [0.5, 0.5, 1.0])
    np.testing.assert_allclose(prec, [1.0, 0.5, 2 / 3])
    assert ap07 == pytest.approx(28 / 33, abs=1e-12)
    assert voc_eval(dets, annos, "cat")[2] == pytest.approx(5 / 6, abs=1e-12)


def test_overlap_threshold_is_strict_and_uses_plus_one_widths():
    annos = {"a": [obj((0, 0, 9, 9))]}
    # +1 areas: gt 10x10 = 100, det 10x20 = 200, intersection 100 -> IoU exactly 0.5: not > 0.5
    dets = [("a", 1.0, 0, 0, 9, 19)]
    assert voc_eval(dets, annos, "cat")[2] == 0.0
    assert voc_eval(dets, annos, "cat", ovthresh=0.49)[2] == pytest.approx(1.0)
    # gt (0,0,3,3) and det (1,0,4,3): with +1 widths inter 3*4 = 12, union 16 + 16 - 12 = 20
    # -> IoU 0.6, a TP; without +1 it would be 6 / 12 = 0.5, a FP
    annos = {"a": [obj((0, 0, 3, 3))]}
    assert voc_eval([("a", 1.0, 1, 0, 4, 3)], annos, "cat")[2] == pytest.approx(1.0)


def test_sorted_by_confidence_and_ties_stable():
    annos = {"a": [obj((1, 1, 10, 10))]}
    fp_first = [("a", 0.5, 50, 50, 60, 60), ("a", 0.5, 1, 1, 10, 10)]
    # equal scores keep input order: FP then TP -> precision 0, 1/2
    np.testing.assert_allclose(voc_eval(fp_first, annos, "cat")[1], [0.0, 0.5])
    # a higher score for the TP puts it first whatever the input order
    fp_first[1] = ("a", 0.6, 1, 1, 10, 10)
    np.testing.assert_allclose(voc_eval(fp_first, annos, "cat")[1], [1.0, 0.5])


def test_class_without_positives_is_nan_and_left_out_of_map():
    _, _, ap = voc_eval([("a", 0.9, 1, 1, 5, 5)], ANNOS, "horse")
    assert math.isnan(ap)
    assert mean_ap([0.5, float("nan"), 1.0]) == pytest.approx(0.75)
    assert math.isnan(mean_ap([float("nan")]))


def test_detection_on_unknown_image_raises():
    with pytest.raises(DataError, match="not in the evaluated image set"):
        voc_eval([("zzz", 0.9, 1, 1, 5, 5)], ANNOS, "cat")


def test_results_file_and_annotation_cache(tmp_path):
    det_file = tmp_path / "comp4_det_test_cat.txt"
    det_file.write_text("a 0.900 1.0 1.0 10.0 10.0\nb 0.800 60.0 60.0 70.0 70.0\n\n"
                        "a 0.700 21.0 21.0 40.0 41.0\n")
    dets = read_detections_file(det_file)
    assert dets[1] == ("b", 0.8, 60.0, 60.0, 70.0, 70.0)
    assert voc_eval(str(det_file), ANNOS, "cat", use_07_metric=True)[2] == pytest.approx(6 / 11)
    (tmp_path / "bad.txt").write_text("a 0.9 1 2 3\n")
    with pytest.raises(DataError, match="bad.txt:1"):
        read_detections_file(tmp_path / "bad.txt")

    xml = ("<annotation><object><name>cat</name><pose>Left</pose><truncated>1</truncated>"
           "<difficult>1</difficult><bndbox><xmin>3</xmin><ymin>4</ymin><xmax>30</xmax>"
           "<ymax>40</ymax></bndbox></object><object><name>dog</name><bndbox><xmin>1</xmin>"
           "<ymin>1</ymin><xmax>5.0</xmax><ymax>6</ymax></bndbox></object></annotation>")
    (tmp_path / "x1.xml").write_text(xml)
    recs = parse_rec(tmp_path / "x1.xml")
    assert recs[0] == {"name": "cat", "pose": "Left", "truncated": 1, "difficult": 1,
                       "bbox": [3, 4, 30, 40]}
    assert recs[1]["difficult"] == 0 and recs[1]["bbox"] == [1, 1, 5, 6]
    cache = tmp_path / "cache" / "annots.json"
    got = load_annotations(str(tmp_path / "{:s}.xml"), ["x1"], cache)
    assert got == {"x1": recs}
    assert json.loads(cache.read_text())["records"]["x1"] == recs
    # the cache is used (the XML is gone) ...
    os.remove(tmp_path / "x1.xml")
    assert load_annotations(str(tmp_path / "{:s}.xml"), ["x1"], cache) == {"x1": recs}
    # ... but an id it lacks forces a re-read
    with pytest.raises(DataError):
        load_annotations(str(tmp_path / "{:s}.xml"), ["x1", "x2"], cache)


def _ap_reference(rec, prec, use_07):
    """Plain-loop AP from the definitions (independent of voc_ap's vectorised code)."""
    if use_07:
        total = 0.0
        for k in range(11):
            t = k / 10.0   # recalls below are multiples of 1/12: never at arange's 0.30000000000000004
            ps = [p for r, p in zip(rec, prec) if r >= t]
            total += (max(ps) if ps else 0.0) / 11.0
        return total
    r = [0.0] + list(rec) + [1.0]
    p = [0.0] + list(prec) + [0.0]
    for i in range(len(p) - 2, -1, -1):
        p[i] = max(p[i], p[i + 1])
    return sum((r[i + 1] - r[i]) * p[i + 1] for i in range(len(r) - 1) if r[i + 1] != r[i])


@pytest.mark.parametrize("seed", range(5))
def test_voc_ap_matches_loop_reference_on_random_curves(seed):
    rng = np.random.default_rng(seed)
    n, npos = 30, 12
    tp = rng.uniform(size=n) < 0.5
    ctp = np.cumsum(tp)
    rec = ctp / npos
    prec = ctp / np.arange(1, n + 1)
    for use_07 in (True, False):
        assert voc_ap(rec, prec, use_07) == pytest.approx(_ap_reference(rec, prec, use_07), abs=1e-12)
