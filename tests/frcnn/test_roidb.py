"""roidb preparation, regression targets, image blobs and minibatches (RPN and Fast R-CNN)."""
from __future__ import annotations

import math

import cv2
import numpy as np
import pytest

from caffe_compat.errors import DataError
from caffe_compat.frcnn import roidb as R
from caffe_compat.frcnn.config import ConfigError, default_cfg, temporary_cfg
from caffe_compat.frcnn.datasets import synthetic_voc
from caffe_compat.frcnn.datasets.imdb import save_proposals
from caffe_compat.frcnn.datasets.pascal_voc import pascal_voc

MEANS = np.array([[[102.9801, 115.9465, 122.7717]]])


@pytest.fixture(scope="module")
def voc_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("synvoc_roidb")
    synthetic_voc.write_dataset(str(out), 6, seed=1, image_size=(48, 72), test_fraction=0.0)
    return out


@pytest.fixture
def small_cfg(voc_dir):
    with temporary_cfg({"DATA_DIR": str(voc_dir), "TRAIN.SCALES": (60,), "TRAIN.MAX_SIZE": 1000,
                        "TRAIN.BATCH_SIZE": 16, "TRAIN.IMS_PER_BATCH": 2}) as c:
        yield c


# --------------------------------------------------------------------------- image blobs
def test_prep_im_for_blob_scale_and_means():
    rng = np.random.default_rng(0)
    im = rng.integers(0, 256, size=(40, 60, 3)).astype(np.float32)
    keep = im.copy()
    out, scale = R.prep_im_for_blob(im, MEANS, 80, 1000)
    assert scale == 2.0 and out.shape == (80, 120, 3) and out.dtype == np.float32
    np.testing.assert_array_equal(im, keep)                # the input is not modified
    ref = cv2.resize((im.astype(np.float64) - MEANS).astype(np.float32), None, None, fx=2.0, fy=2.0,
                     interpolation=cv2.INTER_LINEAR)
    np.testing.assert_array_equal(out, ref)
    # scale 1: exactly the mean-subtracted image (float32 of a float64 difference)
    out1, s1 = R.prep_im_for_blob(im.astype(np.uint8), MEANS, 40, 1000)
    assert s1 == 1.0
    np.testing.assert_array_equal(out1, (im.astype(np.uint8).astype(np.float64) - MEANS).astype(np.float32))
    # the longest side is capped: 60 * 2 = 120 > 100 -> scale 100 / 60, 67 x 100
    out2, s2 = R.prep_im_for_blob(im, MEANS, 80, 100)
    assert s2 == pytest.approx(100 / 60) and out2.shape == (67, 100, 3)
    # the cap compares the *rounded* size: 60 * 101/60 rounds to 101, not > 101 -> kept
    _, s3 = R.prep_im_for_blob(im, MEANS, 40 * 101 / 60, 101)
    assert s3 == pytest.approx(101 / 60)


def test_im_list_to_blob_pads_with_zeros():
    a = np.arange(3 * 4 * 3, dtype=np.float32).reshape(3, 4, 3) + 1
    b = -np.arange(5 * 2 * 3, dtype=np.float32).reshape(5, 2, 3) - 1
    blob = R.im_list_to_blob([a, b])
    assert blob.shape == (2, 3, 5, 4) and blob.dtype == np.float32 and blob.flags.c_contiguous
    np.testing.assert_array_equal(blob[0, :, :3, :4], a.transpose(2, 0, 1))
    np.testing.assert_array_equal(blob[1, :, :5, :2], b.transpose(2, 0, 1))
    assert (blob[0, :, 3:, :] == 0).all() and (blob[1, :, :, 2:] == 0).all()


# --------------------------------------------------------------------------- regression targets
def test_compute_targets_by_hand():
    rois = np.array([[0, 0, 9, 9], [0, 0, 19, 9], [50, 50, 60, 60]], dtype=np.float32)
    overlaps = np.array([1.0, 0.5, 0.0])
    labels = np.array([3, 3, 0])
    t = R.compute_targets(rois, overlaps, labels, 0.5)
    # row 1: ex w 20 h 10, centre (10, 5); gt w 10 h 10, centre (5, 5)
    # dx = (5 - 10) / 20, dy = 0, dw = log(10 / 20), dh = log(1)
    np.testing.assert_allclose(t, [[3, 0, 0, 0, 0], [3, -0.25, 0, math.log(0.5), 0], [0, 0, 0, 0, 0]],
                               rtol=1e-6, atol=1e-7)
    assert t.dtype == np.float32
    assert (R.compute_targets(rois, overlaps, labels, 0.6)[1] == 0).all()   # below BBOX_THRESH
    assert (R.compute_targets(rois, np.zeros(3), labels, 0.5) == 0).all()   # no gt


def _entry(boxes, max_overlaps, max_classes, num_classes=4):
    boxes = np.asarray(boxes, dtype=np.float32)
    ov = np.zeros((len(boxes), num_classes), np.float32)
    ov[np.arange(len(boxes)), max_classes] = max_overlaps
    return {"boxes": boxes, "gt_overlaps": ov, "max_overlaps": np.asarray(max_overlaps, np.float32),
            "max_classes": np.asarray(max_classes), "gt_classes": np.zeros(len(boxes), np.int32),
            "flipped": False}


def test_bbox_targets_precomputed_normalization():
    c = default_cfg()
    c.TRAIN.BBOX_NORMALIZE_TARGETS_PRECOMPUTED = True
    roidb = [_entry([[0, 0, 9, 9], [0, 0, 19, 9]], [1.0, 0.5], [3, 3])]
    means, stds = R.add_bbox_regression_targets(roidb, c)
    assert means.shape == (16,) and stds.shape == (16,)
    np.testing.assert_array_equal(stds.reshape(4, 4), [[0.1, 0.1, 0.2, 0.2]] * 4)
    # (t - 0) / (0.1, 0.1, 0.2, 0.2)
    np.testing.assert_allclose(roidb[0]["bbox_targets"][1], [3, -2.5, 0, math.log(0.5) / 0.2, 0], rtol=1e-6)
    c.TRAIN.BBOX_NORMALIZE_TARGETS = False
    roidb = [_entry([[0, 0, 9, 9], [0, 0, 19, 9]], [1.0, 0.5], [3, 3])]
    R.add_bbox_regression_targets(roidb, c)
    np.testing.assert_allclose(roidb[0]["bbox_targets"][1], [3, -0.25, 0, math.log(0.5), 0], rtol=1e-6)


def test_bbox_targets_empirical_statistics():
    c = default_cfg()
    rng = np.random.default_rng(0)
    roidb, raw = [], []
    for _ in range(3):
        gt = np.array([[10, 10, 40, 30], [50, 5, 70, 45]], np.float32)
        ex = np.vstack([g + rng.integers(-3, 4, size=(4, 4)) for g in gt]).astype(np.float32)
        boxes = np.vstack([gt, ex])
        e = _entry(boxes, [1, 1] + [0.7] * 8, [1, 2] + [1] * 4 + [2] * 4)
        roidb.append(e)
        raw.append(R.compute_targets(boxes, e["max_overlaps"], e["max_classes"], 0.5))
    means, stds = R.add_bbox_regression_targets(roidb, c)
    allt = np.vstack(raw)
    for cls in (1, 2):
        rows = allt[allt[:, 0] == cls, 1:].astype(np.float64)
        m, s = rows.mean(0), rows.std(0)          # population std = sqrt(E[x^2] - E[x]^2)
        np.testing.assert_allclose(means.reshape(4, 4)[cls], m, rtol=1e-6)   # float32 sums
        np.testing.assert_allclose(stds.reshape(4, 4)[cls], s, rtol=1e-6)
        got = np.vstack([e["bbox_targets"] for e in roidb])
        np.testing.assert_allclose(got[got[:, 0] == cls, 1:], (rows - m) / s, rtol=1e-4, atol=1e-5)
    assert (means.reshape(4, 4)[[0, 3]] == 0).all()


def test_bbox_targets_zero_variance_class_gets_std_one():
    roidb = [_entry([[0, 0, 9, 9]], [1.0], [2])]       # only a gt box: its targets are all 0
    means, stds = R.add_bbox_regression_targets(roidb, default_cfg())
    np.testing.assert_array_equal(stds.reshape(4, 4)[2], 1.0)
    assert np.isfinite(roidb[0]["bbox_targets"]).all()
    with pytest.raises(DataError, match="prepare_roidb"):
        R.add_bbox_regression_targets([{"boxes": np.zeros((0, 4))}])


def test_filter_roidb():
    c = default_cfg()
    keep_fg = _entry([[0, 0, 5, 5]], [0.6], [1])
    keep_bg = _entry([[0, 0, 5, 5]], [0.1], [1])          # BG_THRESH_LO is inclusive
    drop_low = _entry([[0, 0, 5, 5]], [0.05], [1])
    drop_empty = _entry(np.zeros((0, 4)), [], [])
    out = R.filter_roidb([keep_fg, drop_low, keep_bg, drop_empty], c)
    assert out == [keep_fg, keep_bg]


# --------------------------------------------------------------------------- with the synthetic set
def test_prepare_roidb_on_synthetic(small_cfg):
    d = pascal_voc("trainval", "2007")
    roidb = R.get_training_roidb(d)
    assert len(roidb) == d.num_images == 12
    for i, e in enumerate(roidb):
        im = cv2.imread(e["image"])
        assert (e["width"], e["height"]) == (im.shape[1], im.shape[0])
        assert e["image"] == roidb[i % 6]["image"] and e["flipped"] == (i >= 6)
        np.testing.assert_array_equal(e["max_overlaps"], 1.0)
        np.testing.assert_array_equal(e["max_classes"], e["gt_classes"])


def test_rpn_minibatch(small_cfg):
    small_cfg.TRAIN.IMS_PER_BATCH = 1
    d = pascal_voc("trainval", "2007")
    roidb = R.filter_roidb(R.get_training_roidb(d))
    rng = np.random.default_rng(0)
    e = roidb[0]
    blobs = R.get_minibatch([e], 21, rng, has_rpn=True)
    assert list(blobs) == ["data", "im_info", "gt_boxes"]
    h, w = e["height"], e["width"]
    scale = 60.0 / min(h, w)
    H, W = blobs["data"].shape[2:]
    assert blobs["data"].shape[:2] == (1, 3) and (H, W) == (round(h * scale), round(w * scale))
    assert min(H, W) == 60
    np.testing.assert_allclose(blobs["im_info"], [[H, W, scale]], rtol=1e-6)
    gt = blobs["gt_boxes"]
    assert gt.shape == (len(e["gt_classes"]), 5) and gt.dtype == np.float32
    np.testing.assert_allclose(gt[:, :4], e["boxes"] * scale, rtol=1e-6)
    np.testing.assert_array_equal(gt[:, 4], e["gt_classes"])
    # the data blob is the BGR image minus the means, resized
    im = cv2.imread(e["image"])
    ref, _ = R.prep_im_for_blob(im, MEANS, 60, 1000)
    np.testing.assert_array_equal(blobs["data"][0], ref.transpose(2, 0, 1))
    # a flipped entry at scale 1 is exactly the mirrored image
    small_cfg.TRAIN.SCALES = (min(h, w),)
    a = R.get_minibatch([roidb[0]], 21, rng, has_rpn=True)
    b = R.get_minibatch([roidb[6]], 21, rng, has_rpn=True)
    np.testing.assert_array_equal(b["data"], a["data"][..., ::-1])
    np.testing.assert_array_equal(b["gt_boxes"][:, [0, 2]], w - 1 - a["gt_boxes"][:, [2, 0]])
    with pytest.raises(ConfigError, match="one image per batch"):
        R.get_minibatch(roidb[:2], 21, rng, has_rpn=True)


def _proposal_roidb(c, voc_dir, tmp_path):
    """Synthetic trainval with proposals: jittered gt copies (fg) and shifted ones (bg)."""
    d = pascal_voc("trainval", "2007")
    rng = np.random.default_rng(0)
    box_list = []
    for i, e in enumerate(d.gt_roidb()):
        w, h = cv2.imread(d.image_path_at(i)).shape[1::-1]
        props = []
        for b in e["boxes"].astype(np.float32):
            bw = b[2] - b[0] + 1
            for k in range(8):
                if k < 4:
                    props.append(b + rng.uniform(-1, 1, 4))                  # fg: IoU ~0.9
                f = rng.uniform(0.45, 0.75) * (1 if k % 2 else -1)           # bg: IoU ~0.15-0.4
                props.append(b + np.array([f, 0, f, 0]) * bw)
        props = np.array(props, np.float32)
        props[:, [0, 2]] = np.clip(props[:, [0, 2]], 0, w - 1)
        props[:, [1, 3]] = np.clip(props[:, [1, 3]], 0, h - 1)
        box_list.append(props)
    save_proposals(tmp_path / "props.npz", box_list)
    d.config["rpn_file"] = str(tmp_path / "props.npz")
    d.set_proposal_method("rpn")
    roidb = R.filter_roidb(R.get_training_roidb(d))
    R.add_bbox_regression_targets(roidb)
    return d, roidb


def test_fast_rcnn_minibatch(small_cfg, voc_dir, tmp_path):
    d, roidb = _proposal_roidb(small_cfg, voc_dir, tmp_path)
    rng = np.random.default_rng(1)
    ents = [roidb[0], roidb[7]]
    blobs = R.get_minibatch(ents, 21, rng, has_rpn=False)
    assert list(blobs) == R.top_names(False)
    rois, labels = blobs["rois"], blobs["labels"]
    # BATCH_SIZE 16 over 2 images: 8 RoIs each, round(0.25 * 8) = 2 of them fg (where there
    # are that many), the rest bg (where there are that many)
    n_total = 0
    for im_i, e in enumerate(ents):
        sel = rois[:, 0] == im_i
        n_fg = (e["max_overlaps"] >= 0.5).sum()
        n_bg = ((e["max_overlaps"] < 0.5) & (e["max_overlaps"] >= 0.1)).sum()
        assert n_fg >= 2 and n_bg >= 1
        fg_this = min(2, n_fg)
        assert sel.sum() == fg_this + min(8 - fg_this, n_bg)
        n_total += sel.sum()
        lab = labels[sel]
        assert (lab[:2] > 0).all() and (lab[2:] == 0).all()
        scale = 60.0 / min(e["height"], e["width"])
        boxes = rois[sel, 1:] / scale
        # every RoI is one of the image's boxes, fg ones with overlap >= 0.5 and their class
        d2 = np.abs(boxes[:, None, :] - e["boxes"][None, :, :].astype(np.float32)).max(-1)
        idx = d2.argmin(1)
        assert (d2.min(1) < 1e-3).all()
        assert (e["max_overlaps"][idx[:2]] >= 0.5).all()
        np.testing.assert_array_equal(lab[:2], e["max_classes"][idx[:2]])
        assert ((e["max_overlaps"][idx[2:]] < 0.5) & (e["max_overlaps"][idx[2:]] >= 0.1)).all()
        # fg rows carry their RoI's (normalized) targets in their class's 4 columns
        tr = blobs["bbox_targets"][sel]
        for j in range(2):
            cl = int(lab[j])
            np.testing.assert_array_equal(tr[j, 4 * cl:4 * cl + 4], e["bbox_targets"][idx[j], 1:])
    assert rois.shape == (n_total, 5) and labels.shape == (n_total,) and n_total >= 12
    t, wi, wo = blobs["bbox_targets"], blobs["bbox_inside_weights"], blobs["bbox_outside_weights"]
    assert t.shape == (n_total, 84) and wi.shape == (n_total, 84)
    for r in range(n_total):
        cols = np.nonzero(wi[r])[0]
        if labels[r] > 0:
            np.testing.assert_array_equal(cols, 4 * int(labels[r]) + np.arange(4))
        else:
            assert cols.size == 0 and (t[r] == 0).all()
        assert (t[r][np.setdiff1d(np.arange(84), cols)] == 0).all()
    np.testing.assert_array_equal(wo, (wi > 0).astype(np.float32))
    assert all(b.dtype == np.float32 for b in blobs.values())
    small_cfg.TRAIN.BATCH_SIZE = 15
    with pytest.raises(ConfigError, match="must divide"):
        R.get_minibatch(ents, 21, rng, has_rpn=False)


def test_minibatch_loader_determinism_and_resume(small_cfg, voc_dir, tmp_path):
    _, roidb = _proposal_roidb(small_cfg, voc_dir, tmp_path)
    a = R.MinibatchLoader(roidb, 21, seed=7, has_rpn=False)
    b = R.MinibatchLoader(roidb, 21, seed=7, has_rpn=False)
    c = R.MinibatchLoader(roidb, 21, seed=8, has_rpn=False)
    assert a.top_names == ["data", "rois", "labels", "bbox_targets", "bbox_inside_weights",
                           "bbox_outside_weights"]
    ba, bb, bc = next(a), next(b), next(c)
    for k in ba:
        np.testing.assert_array_equal(ba[k], bb[k])
    assert any(ba[k].shape != bc[k].shape or not np.array_equal(ba[k], bc[k]) for k in ba)
    next(a)
    state = a.state_dict()
    third = next(a)
    c.load_state_dict(state)
    again = next(c)
    for k in third:
        np.testing.assert_array_equal(third[k], again[k])


def _fake_roidb(shapes):
    return [{"width": w, "height": h} for w, h in shapes]


def test_loader_order_aspect_grouping_and_reshuffle():
    c = default_cfg()
    c.TRAIN.IMS_PER_BATCH = 2
    shapes = [(80, 40)] * 6 + [(40, 80)] * 4          # 6 landscape, 4 portrait
    L = R.MinibatchLoader(_fake_roidb(shapes), 21, seed=0, config=c, has_rpn=True)
    seen = []
    for _ in range(4):                                 # 10 entries: 4 batches, then reshuffle
        inds = L.next_indices()
        assert len(inds) == 2
        o = {shapes[i][0] >= shapes[i][1] for i in inds}
        assert len(o) == 1                             # each pair shares an orientation
        seen += inds.tolist()
    assert len(set(seen)) == 8                         # a permutation: no repeats in a pass
    L.next_indices()                                   # 8 + 2 >= 10: a new permutation
    assert sorted(L._perm.tolist()) == list(range(10)) and L._cur == 2
    # an odd number of entries still gives full permutations
    L = R.MinibatchLoader(_fake_roidb(shapes[:5] + shapes[6:8]), 21, seed=0, config=c, has_rpn=True)
    assert sorted(L._perm.tolist()) == list(range(7))
    c.TRAIN.ASPECT_GROUPING = False
    L = R.MinibatchLoader(_fake_roidb(shapes), 21, seed=0, config=c, has_rpn=True)
    assert sorted(L._perm.tolist()) == list(range(10))
    with pytest.raises(DataError, match="empty roidb"):
        R.MinibatchLoader([], 21, config=c)
    assert R.top_names(True) == ["data", "im_info", "gt_boxes"]
    assert R.top_names(False, bbox_reg=False) == ["data", "rois", "labels"]
