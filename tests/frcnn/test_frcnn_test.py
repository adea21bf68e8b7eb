"""py-faster-rcnn's test-time pipeline (im_detect, test_net) and the `test`/`detect` commands.

The references here are independent: image blobs rebuilt with plain OpenCV/numpy, box
regression recomputed in numpy from the net's raw blobs, hand-made score/box cases for
thresholding, NMS and the per-image cap, and a "perfect detector" whose detections are
the ground truth, which must score mAP 1 through the whole evaluation plumbing.
"""
from __future__ import annotations

import json
import os
import re

import cv2
import numpy as np
import pytest
import torch
from click.testing import CliRunner

import caffe_compat.frcnn.test as T
from caffe_compat.cli.main import main
from caffe_compat.score import caffe_test
from caffe_compat.errors import DataError, GraphError
from caffe_compat.frcnn.config import ConfigError, cfg, temporary_cfg
from caffe_compat.frcnn.datasets.pascal_voc import VOC_CLASSES, pascal_voc
from caffe_compat.frcnn.datasets.synthetic_voc import write_dataset
from caffe_compat.frcnn.vis import class_colour, class_colours, draw_detections
from caffe_compat.net import Net

SMALL = {"TEST.SCALES": (96,), "TEST.MAX_SIZE": 128}

_TRUNK = """
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
  convolution_param { num_output: 4 kernel_size: 3 pad: 1 stride: 4
    weight_filler { type: "gaussian" std: 0.05 } bias_filler { type: "constant" value: 0.1 } } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "conv2" type: "Convolution" bottom: "conv1" top: "conv2"
  convolution_param { num_output: 8 kernel_size: 3 pad: 1 stride: 4
    weight_filler { type: "gaussian" std: 0.1 } bias_filler { type: "constant" value: 0.1 } } }
layer { name: "relu2" type: "ReLU" bottom: "conv2" top: "conv2" }
"""

_HEAD = """
layer { name: "roi_pool" type: "ROIPooling" bottom: "conv2" bottom: "rois" top: "pool"
  roi_pooling_param { pooled_w: 2 pooled_h: 2 spatial_scale: 0.0625 } }
layer { name: "fc6" type: "InnerProduct" bottom: "pool" top: "fc6"
  inner_product_param { num_output: 16 weight_filler { type: "gaussian" std: 0.2 } } }
layer { name: "relu6" type: "ReLU" bottom: "fc6" top: "fc6" }
layer { name: "cls_score" type: "InnerProduct" bottom: "fc6" top: "cls_score"
  inner_product_param { num_output: 21 weight_filler { type: "gaussian" std: 0.02 } } }
layer { name: "bbox_pred" type: "InnerProduct" bottom: "fc6" top: "bbox_pred"
  inner_product_param { num_output: 84 weight_filler { type: "gaussian" std: 0.005 } } }
"""

_SOFTMAX = 'layer { name: "cls_prob" type: "Softmax" bottom: "cls_score" top: "cls_prob" }\n'

# A tiny Faster R-CNN TEST net: stride-16 trunk, the RPN with py-faster-rcnn's proposal
# layer (6 anchors), ROIPooling and the two heads, as in the corpus' end2end test.prototxt.
RPN_NET = """name: "tiny_frcnn"
input: "data"
input_shape { dim: 1 dim: 3 dim: 64 dim: 64 }
input: "im_info"
input_shape { dim: 1 dim: 3 }
""" + _TRUNK + """
layer { name: "rpn_cls_score" type: "Convolution" bottom: "conv2" top: "rpn_cls_score"
  convolution_param { num_output: 12 kernel_size: 1 weight_filler { type: "gaussian" std: 0.1 } } }
layer { name: "rpn_bbox_pred" type: "Convolution" bottom: "conv2" top: "rpn_bbox_pred"
  convolution_param { num_output: 24 kernel_size: 1 weight_filler { type: "gaussian" std: 0.01 } } }
layer { name: "rpn_cls_score_reshape" type: "Reshape" bottom: "rpn_cls_score" top: "rpn_cls_score_reshape"
  reshape_param { shape { dim: 0 dim: 2 dim: -1 dim: 0 } } }
layer { name: "rpn_cls_prob" type: "Softmax" bottom: "rpn_cls_score_reshape" top: "rpn_cls_prob" }
layer { name: "rpn_cls_prob_reshape" type: "Reshape" bottom: "rpn_cls_prob" top: "rpn_cls_prob_reshape"
  reshape_param { shape { dim: 0 dim: 12 dim: -1 dim: 0 } } }
layer { name: "proposal" type: "Python" bottom: "rpn_cls_prob_reshape" bottom: "rpn_bbox_pred"
  bottom: "im_info" top: "rois"
  python_param { module: "rpn.proposal_layer" layer: "ProposalLayer"
    param_str: "'feat_stride': 16\\n'scales': !!python/tuple [2, 4]" } }
""" + _HEAD

# The Fast R-CNN variant: proposals come in through a 'rois' input.
ROIS_NET = """name: "tiny_fast_rcnn"
input: "data"
input_shape { dim: 1 dim: 3 dim: 64 dim: 64 }
input: "rois"
input_shape { dim: 1 dim: 5 }
""" + _TRUNK + _HEAD


@pytest.fixture(autouse=True)
def _isolate_cfg():
    with temporary_cfg():
        yield


@pytest.fixture(scope="module")
def rpn_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("rpn_net")
    (d / "test.prototxt").write_text(RPN_NET + _SOFTMAX)
    (d / "no_prob.prototxt").write_text(RPN_NET)
    (d / "rois.prototxt").write_text(ROIS_NET + _SOFTMAX)
    Net(str(d / "test.prototxt"), seed=1).save_weights(str(d / "tiny.caffemodel"))
    Net(str(d / "rois.prototxt"), seed=1).save_weights(str(d / "rois.caffemodel"))
    return d


@pytest.fixture(scope="module")
def voc_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("voc")
    write_dataset(str(d), 8, seed=3, image_size=(64, 96), num_classes=3, test_fraction=0.5)
    return d


def rpn_net(seed=1):
    return Net(RPN_NET + _SOFTMAX, seed=seed)


def rois_net(seed=1):
    return Net(ROIS_NET + _SOFTMAX, seed=seed)


def noise_image(h=70, w=100, seed=0):
    return np.random.RandomState(seed).randint(0, 256, size=(h, w, 3)).astype(np.uint8)


# ----------------------------------------------------------------------------- blobs
def test_image_blob_matches_opencv_reference():
    im = noise_image(50, 120)
    with temporary_cfg({"TEST.SCALES": (40, 60), "TEST.MAX_SIZE": 130}):
        blob, scales = T._get_image_blob(im)
        means = cfg.PIXEL_MEANS
    # scale 40: 40/50 -> longest 96 (ok); scale 60: 60/50 -> 144 > 130, capped to 130/120
    np.testing.assert_allclose(scales, [40 / 50, 130 / 120])
    ref0 = cv2.resize(im.astype(np.float32) - means.astype(np.float32), None, None,
                      fx=40 / 50, fy=40 / 50, interpolation=cv2.INTER_LINEAR)
    ref1 = cv2.resize(im.astype(np.float32) - means.astype(np.float32), None, None,
                      fx=130 / 120, fy=130 / 120, interpolation=cv2.INTER_LINEAR)
    assert blob.shape == (2, 3, max(ref0.shape[0], ref1.shape[0]), max(ref0.shape[1], ref1.shape[1]))
    np.testing.assert_allclose(blob[0, :, :ref0.shape[0], :ref0.shape[1]], ref0.transpose(2, 0, 1), atol=1e-4)
    np.testing.assert_allclose(blob[1, :, :ref1.shape[0], :ref1.shape[1]], ref1.transpose(2, 0, 1), atol=1e-4)
    assert not blob[0, :, ref0.shape[0]:, :].any()          # zero padding of the smaller level


def test_project_rois_chooses_level_closest_to_224_squared():
    rois = torch.tensor([[0, 0, 99, 99], [0, 0, 399, 399], [10, 20, 10, 20]], dtype=torch.float64)
    scales = torch.tensor([0.5, 2.0], dtype=torch.float64)
    out, levels = T._project_im_rois(rois, scales)
    # areas 1e4, 1.6e5, 1: scaled by 0.25 / 4 -> closest to 50176: 4e4 (lvl 1), 4e4 (lvl 0), 4 (lvl 1)
    assert levels.reshape(-1).tolist() == [1, 0, 1]
    np.testing.assert_allclose(out.numpy(), rois.numpy() * np.array([[2.0], [0.5], [2.0]]))
    blob = T._get_rois_blob(rois, scales)
    assert blob.dtype == torch.float32 and blob.shape == (3, 5)
    assert blob[:, 0].tolist() == [1, 0, 1]
    _, lv = T._project_im_rois(rois, torch.tensor([1.5], dtype=torch.float64))
    assert lv.reshape(-1).tolist() == [0, 0, 0]


# ----------------------------------------------------------------------------- im_detect
def numpy_regression(rois, scale, deltas, im_shape):
    """py-faster-rcnn's bbox_transform_inv + clip_boxes, written out in numpy."""
    boxes = rois[:, 1:5].astype(np.float32) / np.float32(scale)
    w = boxes[:, 2] - boxes[:, 0] + 1.0
    h = boxes[:, 3] - boxes[:, 1] + 1.0
    cx = boxes[:, 0] + 0.5 * w
    cy = boxes[:, 1] + 0.5 * h
    out = np.zeros_like(deltas)
    for k in range(deltas.shape[1] // 4):
        dx, dy, dw, dh = (deltas[:, 4 * k + i] for i in range(4))
        pcx, pcy = dx * w + cx, dy * h + cy
        pw, ph = np.exp(dw) * w, np.exp(dh) * h
        out[:, 4 * k + 0] = np.clip(pcx - 0.5 * pw, 0, im_shape[1] - 1)
        out[:, 4 * k + 1] = np.clip(pcy - 0.5 * ph, 0, im_shape[0] - 1)
        out[:, 4 * k + 2] = np.clip(pcx + 0.5 * pw, 0, im_shape[1] - 1)
        out[:, 4 * k + 3] = np.clip(pcy + 0.5 * ph, 0, im_shape[0] - 1)
    return out


def test_im_detect_rpn_net_shapes_inputs_and_box_regression():
    net = rpn_net()
    im = noise_image(70, 80)
    with temporary_cfg(dict(SMALL, **{"TEST.HAS_RPN": True})):
        scores, boxes = T.im_detect(net, im)
    R = net.blobs["rois"].shape[0]
    assert R > 10
    assert scores.shape == (R, 21) and boxes.shape == (R, 84)
    assert scores.dtype == torch.float32 and boxes.dtype == torch.float32
    np.testing.assert_allclose(scores.sum(1).numpy(), 1.0, rtol=1e-5)
    scale = 96 / 70
    # the net saw a (1, 3, 96, 110) blob and im_info [[96, 110, scale]]
    assert tuple(net.blobs["data"].shape) == (1, 3, 96, 110)
    np.testing.assert_allclose(net.blobs["im_info"].numpy(), [[96, 110, scale]], rtol=1e-6)
    ref = numpy_regression(net.blobs["rois"].numpy(), scale, net.blobs["bbox_pred"].numpy(), im.shape)
    np.testing.assert_allclose(boxes.numpy(), ref, rtol=1e-5, atol=1e-3)
    np.testing.assert_array_equal(scores.numpy(), net.blobs["cls_prob"].numpy())
    b = boxes.numpy()
    assert b.min() >= 0 and b[:, 0::2].max() <= 79 and b[:, 1::2].max() <= 69


def test_im_detect_clips_boxes_to_the_image():
    net = rpn_net()
    with torch.no_grad():   # huge widths/heights: every box must be clipped to the border
        net.layer("bbox_pred").caffe_blobs()[0].zero_()
        net.layer("bbox_pred").caffe_blobs()[1].copy_(torch.tensor([0.0, 0.0, 4.0, 4.0] * 21))
    im = noise_image(60, 90, seed=2)
    with temporary_cfg(dict(SMALL, **{"TEST.HAS_RPN": True})):
        _, boxes = T.im_detect(net, im)
    b = boxes.numpy()
    assert b.min() >= 0 and b[:, 0::2].max() <= 89 and b[:, 1::2].max() <= 59
    # exp(4) = 55 times every proposal (at least RPN_MIN_SIZE wide): the whole image
    np.testing.assert_array_equal(b, np.tile([0, 0, 89, 59], (len(b), 21)))


def test_im_detect_without_any_proposal():
    with temporary_cfg(dict(SMALL, **{"TEST.HAS_RPN": True, "TEST.RPN_MIN_SIZE": 10000})):
        net = rpn_net()                    # the RPN layer reads its cfg keys when it is built
        scores, boxes = T.im_detect(net, noise_image())
    assert net.blobs["rois"].shape == (0, 5)
    assert scores.shape == (0, 21) and boxes.shape == (0, 84)
    dets = T.detections_per_class(scores, boxes, 0.05, 0.3)
    assert len(dets) == 21 and all(d.shape == (0, 5) for d in dets)


def test_im_detect_with_proposals_dedups_like_the_original():
    net = rois_net()
    im = noise_image(80, 64, seed=4)
    rng = np.random.RandomState(0)
    x1 = rng.randint(0, 40, 12)
    y1 = rng.randint(0, 50, 12)
    props = np.stack([x1, y1, x1 + rng.randint(5, 23, 12), y1 + rng.randint(5, 29, 12)], 1).astype(np.float32)
    # exact duplicates and near-duplicates that land on the same 1/16 cells
    props = np.concatenate([props, props[:3], props[3:5] + 1.0], 0)
    with temporary_cfg(dict(SMALL, **{"TEST.HAS_RPN": False})):
        s_dedup, b_dedup = T.im_detect(net, im, props)
        fed = net.blobs["rois"].clone()
        cfg.DEDUP_BOXES = 0.0
        s_all, b_all = T.im_detect(net, im, props)
        fed_all = net.blobs["rois"].clone()
    scale = 96 / 64
    rois_blob = np.hstack([np.zeros((len(props), 1)), props * scale]).astype(np.float32)
    hashes = np.round(rois_blob / 16.0).dot(np.array([1, 1e3, 1e6, 1e9, 1e12]))
    _, first = np.unique(hashes, return_index=True)
    assert len(first) < len(props)
    # the net sees the first roi of each hash, in np.unique's (sorted-hash) order
    np.testing.assert_allclose(fed.numpy(), rois_blob[first], rtol=1e-6)
    np.testing.assert_allclose(fed_all.numpy(), rois_blob, rtol=1e-6)
    assert s_dedup.shape == (len(props), 21) and b_dedup.shape == (len(props), 84)
    # rows of exact duplicates are identical; everything equals the un-deduplicated run
    np.testing.assert_array_equal(s_dedup[12:15].numpy(), s_dedup[:3].numpy())
    np.testing.assert_allclose(s_dedup[:12].numpy(), s_all[:12].numpy(), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(b_dedup[:12].numpy(), b_all[:12].numpy(), rtol=1e-5, atol=1e-4)


def test_im_detect_svm_scores_and_no_box_regression():
    net = rois_net()
    im = noise_image(64, 64, seed=5)
    props = np.array([[0, 0, 20, 30], [10, 5, 60, 40]], dtype=np.float32)
    with temporary_cfg(dict(SMALL, **{"TEST.SVM": True, "TEST.BBOX_REG": False})):
        scores, boxes = T.im_detect(net, im, props)
    np.testing.assert_array_equal(scores.numpy(), net.blobs["cls_score"].numpy())
    np.testing.assert_array_equal(boxes.numpy(), np.tile(props, (1, 21)))


def test_im_detect_on_the_corpus_zf_end2end_net(corpus):
    proto = corpus / "py-faster-rcnn" / "models" / "pascal_voc" / "ZF" / "faster_rcnn_end2end" / "test.prototxt"
    if not proto.is_file():
        pytest.skip(f"{proto} not in the corpus")
    im = noise_image(70, 100)
    with temporary_cfg(dict(SMALL, **{"TEST.HAS_RPN": True, "TEST.RPN_POST_NMS_TOP_N": 20})):
        net = Net(str(proto), seed=1)      # fillers only: the point is the wiring, not the numbers
        scores, boxes = T.im_detect(net, im)
    R = net.blobs["rois"].shape[0]
    assert 0 < R <= 20 and scores.shape == (R, 21) and boxes.shape == (R, 84)
    np.testing.assert_allclose(scores.sum(1).numpy(), 1.0, rtol=1e-5)
    ref = numpy_regression(net.blobs["rois"].numpy(), net.blobs["im_info"][0, 2].item(),
                           net.blobs["bbox_pred"].numpy(), im.shape)
    np.testing.assert_allclose(boxes.numpy(), ref, rtol=1e-5, atol=1e-3)


@pytest.mark.gpu
def test_im_detect_on_cuda_matches_cpu():
    cpu = rpn_net()
    gpu = rpn_net().to("cuda")
    im = noise_image(70, 80)
    with temporary_cfg(dict(SMALL, **{"TEST.HAS_RPN": True})):
        s_c, b_c = T.im_detect(cpu, im)
        s_g, b_g = T.im_detect(gpu, im)
        props = np.array([[0, 0, 20, 30], [10, 5, 60, 40], [10, 5, 60, 40]], np.float32)
        cfg.TEST.HAS_RPN = False
        rc, rg = rois_net(), rois_net().to("cuda")
        sr_c, br_c = T.im_detect(rc, im, props)
        sr_g, br_g = T.im_detect(rg, im, props)
    assert s_g.device.type == "cuda" and b_g.device.type == "cuda" and sr_g.device.type == "cuda"
    assert s_g.shape == s_c.shape
    np.testing.assert_allclose(s_g.cpu().numpy(), s_c.numpy(), rtol=1e-3, atol=1e-5)
    np.testing.assert_allclose(b_g.cpu().numpy(), b_c.numpy(), rtol=1e-3, atol=1e-2)
    np.testing.assert_allclose(sr_g.cpu().numpy(), sr_c.numpy(), rtol=1e-3, atol=1e-5)
    np.testing.assert_allclose(br_g.cpu().numpy(), br_c.numpy(), rtol=1e-3, atol=1e-2)
    dets = T.detections_per_class(s_g, b_g, 0.0, 0.3)
    assert len(dets) == 21 and all(d.dtype == np.float32 for d in dets)


def test_im_detect_errors_are_clear(rpn_files):
    im = noise_image()
    with temporary_cfg(dict(SMALL, **{"TEST.HAS_RPN": True})):
        with pytest.raises(GraphError, match="cls_prob"):
            T.im_detect(Net(str(rpn_files / "no_prob.prototxt"), seed=1), im)
        with pytest.raises(GraphError, match="HAS_RPN False"):
            T.im_detect(rois_net(), im)
        cfg.TEST.SCALES = (64, 96)
        with pytest.raises(ConfigError, match="one scale"):
            T.im_detect(rpn_net(), im)
    with temporary_cfg(dict(SMALL, **{"TEST.HAS_RPN": False})):
        with pytest.raises(GraphError, match="HAS_RPN True"):
            T.im_detect(rpn_net(), im)
        with pytest.raises(DataError, match="needs boxes"):
            T.im_detect(rois_net(), im, None)
        with pytest.raises(DataError, match="H x W x 3"):
            T.im_detect(rois_net(), np.zeros((10, 10)), np.zeros((1, 4)))


# ----------------------------------------------------------------------------- test_net, hand-made
class FakeImdb:
    """An imdb that records what test_net hands to evaluate_detections."""

    def __init__(self, tmp_path, num_images=1, classes=("__background__", "a", "b")):
        self.name = "fake"
        self.classes = tuple(classes)
        self.num_classes = len(classes)
        self.image_index = [f"im{i}" for i in range(num_images)]
        self.paths = []
        for i in range(num_images):
            p = tmp_path / f"im{i}.png"
            cv2.imwrite(str(p), noise_image(40, 50, seed=i))
            self.paths.append(str(p))
        self.evaluated = None

    def image_path_at(self, i):
        return self.paths[i]

    def evaluate_detections(self, all_boxes, output_dir):
        self.evaluated = all_boxes
        return {"ap": {"a": 0.5, "b": 1.0}, "mAP": 0.75}


def rows_to_outputs(rows, num_classes=3):
    """rows: (class, score, box): one proposal per row, scoring only its class."""
    scores = torch.zeros(len(rows), num_classes)
    boxes = torch.zeros(len(rows), 4 * num_classes)
    for r, (c, s, box) in enumerate(rows):
        scores[r, c] = s
        boxes[r, 4 * c:4 * c + 4] = torch.tensor(box, dtype=torch.float32)
    return scores, boxes


def test_test_net_threshold_nms_and_cap(tmp_path):
    rows = [(1, 0.9, [0, 0, 10, 10]),      # kept
            (1, 0.8, [1, 1, 11, 11]),      # IoU 0.70 with the first: suppressed at NMS 0.3
            (1, 0.7, [20, 20, 30, 30]),    # no overlap: kept
            (1, 0.05, [30, 0, 40, 5]),     # not above thresh (strict >): dropped
            (1, 0.04, [0, 30, 5, 39]),     # below: dropped
            (2, 0.6, [0, 0, 10, 10]),      # other class, same box: NMS is per class
            (2, 0.3, [2, 2, 12, 12])]      # IoU 0.53 with the 0.6 box of class 2: suppressed
    imdb = FakeImdb(tmp_path)
    calls = []

    def detect(net, im, boxes):
        calls.append((im.shape, boxes))
        return rows_to_outputs(rows)

    lines = []
    with temporary_cfg({"TEST.HAS_RPN": True, "TEST.NMS": 0.3}):
        res = T.test_net(object(), imdb, thresh=0.05, output_dir=str(tmp_path / "out"), detect_fn=detect,
                         log_fn=lines.append)
    assert calls == [((40, 50, 3), None)]
    ab = imdb.evaluated
    assert ab[0][0] == []
    np.testing.assert_allclose(ab[1][0], [[0, 0, 10, 10, 0.9], [20, 20, 30, 30, 0.7]], rtol=1e-6)
    np.testing.assert_allclose(ab[2][0], [[0, 0, 10, 10, 0.6]], rtol=1e-6)
    assert ab[1][0].dtype == np.float32
    assert res["mAP"] == 0.75 and res["ap"] == {"a": 0.5, "b": 1.0} and res["num_images"] == 1
    assert re.fullmatch(r"im_detect: 1/1 \d+\.\d{3}s \d+\.\d{3}s", lines[0])
    loaded = T.load_detections(res["det_file"])
    assert res["det_file"].endswith(".npz") and len(loaded) == 3 and len(loaded[1]) == 1
    for c in (1, 2):
        np.testing.assert_array_equal(loaded[c][0], ab[c][0])
    with np.load(res["det_file"], allow_pickle=False) as z:
        assert list(z["classes"]) == ["__background__", "a", "b"] and list(z["image_ids"]) == ["im0"]

    # max_per_image over classes: 0.9, 0.7 (class 1), 0.6 (class 2) -> keep the best 2
    with temporary_cfg({"TEST.HAS_RPN": True, "TEST.NMS": 0.3}):
        T.test_net(object(), imdb, max_per_image=2, output_dir=str(tmp_path / "o2"), detect_fn=detect,
                   log_fn=lambda s: None)
    assert imdb.evaluated[1][0][:, 4].tolist() == pytest.approx([0.9, 0.7])
    assert imdb.evaluated[2][0].shape == (0, 5)
    # ties at the cut all stay, as in the original (>= the max_per_image-th best score)
    tie_rows = [(1, 0.9, [0, 0, 10, 10]), (1, 0.5, [20, 20, 30, 30]), (2, 0.5, [0, 0, 10, 10])]
    with temporary_cfg({"TEST.HAS_RPN": True}):
        T.test_net(object(), imdb, max_per_image=2, output_dir=str(tmp_path / "o3"),
                   detect_fn=lambda n, im, b: rows_to_outputs(tie_rows), log_fn=lambda s: None)
    assert len(imdb.evaluated[1][0]) + len(imdb.evaluated[2][0]) == 3
    # a higher threshold, no cap
    with temporary_cfg({"TEST.HAS_RPN": True}):
        T.test_net(object(), imdb, thresh=0.65, max_per_image=0, output_dir=str(tmp_path / "o4"),
                   detect_fn=detect, log_fn=lambda s: None)
    assert imdb.evaluated[1][0][:, 4].tolist() == pytest.approx([0.9, 0.7])
    assert imdb.evaluated[2][0].shape == (0, 5)


def test_test_net_feeds_only_non_gt_proposals(tmp_path):
    imdb = FakeImdb(tmp_path, num_images=2)
    props = np.array([[1, 1, 20, 20], [3, 4, 30, 30], [5, 5, 9, 9]], dtype=np.float32)
    imdb.roidb = [{"boxes": props, "gt_classes": np.array([2, 0, 0], np.int32)},
                  {"boxes": props[:1], "gt_classes": np.array([1], np.int32)}]
    seen = []

    def detect(net, im, boxes):
        seen.append(boxes.copy())
        return rows_to_outputs([(1, 0.9, [0, 0, 5, 5])] * len(boxes))

    with temporary_cfg({"TEST.HAS_RPN": False}):
        T.test_net(object(), imdb, output_dir=str(tmp_path / "o"), detect_fn=detect, log_fn=lambda s: None)
    assert len(seen) == 1                          # image 2 has only ground truth: nothing to score
    np.testing.assert_array_equal(seen[0], props[1:])
    assert imdb.evaluated[1][1].shape == (0, 5)


def test_apply_nms():
    dets = np.array([[0, 0, 10, 10, 0.9], [1, 1, 11, 11, 0.8], [20, 20, 30, 30, 0.7]], np.float32)
    out = T.apply_nms([[[], []], [dets, []]], 0.3)
    assert out[0] == [[], []] and out[1][1] == []
    np.testing.assert_array_equal(out[1][0], dets[[0, 2]])
    np.testing.assert_array_equal(T.apply_nms([[dets]], 0.8)[0][0], dets)


# ----------------------------------------------------------------------------- test_net, real data
def _gt_outputs(imdb):
    """Per image: scores/boxes whose rows are the ground-truth objects with score 1."""
    out = []
    for e in imdb.gt_roidb():
        n, K = len(e["boxes"]), imdb.num_classes
        scores = torch.zeros(n, K)
        boxes = torch.zeros(n, 4 * K)
        for r, (c, b) in enumerate(zip(e["gt_classes"], e["boxes"].astype(np.float32))):
            scores[r, c] = 1.0
            boxes[r, 4 * c:4 * c + 4] = torch.from_numpy(b)
        out.append((scores, boxes))
    return out


def test_perfect_detector_scores_map_one(voc_dir, tmp_path):
    with temporary_cfg({"DATA_DIR": str(voc_dir), "TEST.HAS_RPN": True}):
        imdb = pascal_voc("test", "2007")
        outs = iter(_gt_outputs(imdb))
        res = T.test_net(object(), imdb, output_dir=str(tmp_path / "out"),
                         detect_fn=lambda net, im, boxes: next(outs), log_fn=lambda s: None)
    aps = {c: a for c, a in res["ap"].items() if not np.isnan(a)}
    # (the VOC07 11-point sum of 11 x 1/11 is 1 up to one ulp)
    assert len(aps) >= 2 and all(a == pytest.approx(1.0, abs=1e-12) for a in aps.values())
    assert res["mAP"] == pytest.approx(1.0, abs=1e-12)
    assert os.path.isfile(os.path.join(tmp_path, "out", "voc_eval.json"))


class GroundTruthNet:
    """A stand-in net whose RPN 'proposes' the ground truth and whose heads are certain:
    exercises im_detect's inputs, rescaling and regression plumbing end to end."""

    input_names = ["data", "im_info"]

    def __init__(self, gt_entries):
        self.gt = list(gt_entries)
        self.i = 0
        self.blobs = {}
        self.seen_info = []

    def forward(self, data, im_info):
        e = self.gt[self.i]
        self.i += 1
        scale = float(im_info[0, 2])
        self.seen_info.append(im_info.clone())
        n, K = len(e["boxes"]), 21
        rois = torch.zeros(n, 5)
        rois[:, 1:] = torch.from_numpy(e["boxes"].astype(np.float32)) * scale
        prob = torch.zeros(n, K)
        prob[torch.arange(n), torch.from_numpy(e["gt_classes"].astype(np.int64))] = 1.0
        self.blobs = {"data": data, "im_info": im_info, "rois": rois}
        return {"bbox_pred": torch.zeros(n, 4 * K), "cls_prob": prob}


def test_perfect_net_through_im_detect_scores_map_one(voc_dir, tmp_path):
    with temporary_cfg(dict(SMALL, **{"DATA_DIR": str(voc_dir), "TEST.HAS_RPN": True})):
        imdb = pascal_voc("test", "2007")
        net = GroundTruthNet(imdb.gt_roidb())
        res = T.test_net(net, imdb, output_dir=str(tmp_path / "out"), log_fn=lambda s: None)
    assert net.i == imdb.num_images
    h, w = cv2.imread(imdb.image_path_at(0)).shape[:2]
    s = min(96 / min(h, w), 128 / max(h, w))
    np.testing.assert_allclose(net.seen_info[0].numpy(), [[round(h * s), round(w * s), s]], rtol=1e-6)
    assert res["mAP"] == pytest.approx(1.0, abs=1e-12)


def test_test_net_tiny_rpn_net_on_synthetic_voc(voc_dir, tmp_path):
    net = rpn_net()
    net.name = "tiny"
    lines = []
    with temporary_cfg(dict(SMALL, **{"DATA_DIR": str(voc_dir), "TEST.HAS_RPN": True})):
        imdb = pascal_voc("test", "2007")
        res = T.test_net(net, imdb, max_per_image=5, thresh=0.0, vis=True,
                         output_dir=str(tmp_path / "out"), log_fn=lines.append)
    n = imdb.num_images
    assert sum(1 for ln in lines if ln.startswith("im_detect: ")) == n
    assert lines[n - 1].startswith(f"im_detect: {n}/{n} ")
    assert set(res["ap"]) == set(VOC_CLASSES[1:])
    assert 0.0 <= res["mAP"] <= 1.0
    ab = res["all_boxes"]
    for i in range(n):
        h, w = cv2.imread(imdb.image_path_at(i)).shape[:2]
        dets = np.concatenate([ab[j][i] for j in range(1, 21)])
        assert 1 <= len(dets) <= 5                     # scores are never all 0; capped at 5
        assert dets[:, :4].min() >= 0 and dets[:, 2].max() <= w - 1 and dets[:, 3].max() <= h - 1
    loaded = T.load_detections(res["det_file"])
    for j in range(21):
        for i in range(n):
            np.testing.assert_array_equal(np.asarray(loaded[j][i]).reshape(-1, 5),
                                          np.asarray(ab[j][i], np.float32).reshape(-1, 5))
    assert len(os.listdir(tmp_path / "out" / "vis")) == n


# ----------------------------------------------------------------------------- vis
def test_draw_detections_colours_and_box_position():
    cols = class_colours(21)
    assert len(set(cols)) == 21
    im = np.zeros((60, 80, 3), np.uint8)
    out = draw_detections(im, [("cat", 8, np.array([[10, 30, 50, 55, 0.9]])),
                               ("dog", 12, np.array([[5, 5, 6, 6, 0.1]]))], thresh=0.5)
    assert not im.any()                                 # the input is untouched
    c = class_colour(8)
    assert tuple(out[42, 10]) == c and tuple(out[42, 50]) == c and tuple(out[55, 30]) == c
    assert tuple(out[42, 30]) == (0, 0, 0)              # inside the box: not filled
    assert not out[:8, :8].any()                        # the 0.1 'dog' is below thresh: not drawn
    assert (out[:30, 10:60] != 0).any()                 # the label above the box


# ----------------------------------------------------------------------------- CLI: detect
def run_cli(args):
    return CliRunner().invoke(main, [str(a) for a in args])


def write_images(tmp_path, n=2):
    from caffe_compat.frcnn.datasets.synthetic_voc import render_image

    paths = []
    for i in range(n):
        img, _ = render_image(7, i, image_size=(64, 96), num_classes=3)
        p = tmp_path / (f"img{i}.jpg" if i % 2 == 0 else f"img{i}.bmp")
        cv2.imwrite(str(p), img)
        paths.append(p)
    return paths


def test_detect_command_writes_images_and_json(rpn_files, tmp_path):
    imgs = write_images(tmp_path)
    out = tmp_path / "out"
    r = run_cli(["detect", "--model", rpn_files / "test.prototxt", "--weights", rpn_files / "tiny.caffemodel",
                 *imgs, "--out", out, "--set", "TEST.SCALES", "(96,)", "--set", "TEST.MAX_SIZE", "128",
                 "--thresh", "0.06", "--nms", "0.3"])
    assert r.exit_code == 0, r.output
    assert len([ln for ln in r.stdout.splitlines() if " detections in " in ln]) == 2
    doc = json.loads((out / "detections.json").read_text())
    assert doc["classes"] == list(VOC_CLASSES) and doc["thresh"] == 0.06
    assert [os.path.basename(e["output"]) for e in doc["images"]] == ["img0.jpg", "img1.png"]
    total = 0
    for e, p in zip(doc["images"], imgs):
        src = cv2.imread(str(p))
        drawn = cv2.imread(e["output"])
        assert drawn.shape == src.shape and (e["height"], e["width"]) == src.shape[:2]
        for d in e["detections"]:
            assert d["class"] in VOC_CLASSES[1:] and d["score"] >= 0.06
            x1, y1, x2, y2 = d["box"]
            assert 0 <= x1 <= x2 <= e["width"] - 1 and 0 <= y1 <= y2 <= e["height"] - 1
        scores = [d["score"] for d in e["detections"]]
        assert scores == sorted(scores, reverse=True)
        total += len(e["detections"])
        if e["detections"]:
            assert np.abs(drawn.astype(int) - src.astype(int)).max() > 60     # boxes drawn
    assert total > 0
    # the module is deterministic: the same run gives the same JSON detections, also with its
    # forwards through torch.compile (Dynamo's eager backend: tracing and graph breaks, no codegen)
    r2 = run_cli(["detect", "--model", rpn_files / "test.prototxt", "--weights", rpn_files / "tiny.caffemodel",
                  imgs[0], "--out", tmp_path / "out2", "--set", "TEST.SCALES", "(96,)", "--set", "TEST.MAX_SIZE",
                  "128", "--thresh", "0.06", "--compile", "eager"])
    assert r2.exit_code == 0, r2.output
    assert "torch.compile" not in r2.output  # compiled, not fallen back
    doc2 = json.loads((tmp_path / "out2" / "detections.json").read_text())
    assert doc2["images"][0]["detections"] == doc["images"][0]["detections"]


def test_detect_command_errors(rpn_files, tmp_path):
    imgs = write_images(tmp_path, 1)
    base = ["--model", rpn_files / "test.prototxt", "--weights", rpn_files / "tiny.caffemodel",
            "--out", tmp_path / "o", "--set", "TEST.SCALES", "(96,)"]
    r = run_cli(["detect", *base, tmp_path / "missing.jpg"])
    assert r.exit_code != 0 and "missing.jpg" in r.stderr and "not found" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    r = run_cli(["detect", "--model", rpn_files / "test.prototxt", "--weights", tmp_path / "nope.caffemodel",
                 "--out", tmp_path / "o", imgs[0]])
    assert r.exit_code != 0 and "nope.caffemodel" in r.stderr
    r = run_cli(["detect", *base, imgs[0], "--classes", "a,b,c"])
    assert r.exit_code != 0 and "21 classes" in r.stderr and "--classes" in r.stderr
    r = run_cli(["detect", "--model", rpn_files / "no_prob.prototxt", "--weights", rpn_files / "tiny.caffemodel",
                 "--out", tmp_path / "o", imgs[0]])
    assert r.exit_code != 0 and "cls_prob" in r.stderr
    r = run_cli(["detect", "--model", rpn_files / "rois.prototxt", "--weights", rpn_files / "rois.caffemodel",
                 "--out", tmp_path / "o", imgs[0]])
    assert r.exit_code != 0 and "im_info" in r.stderr
    r = run_cli(["detect", *base, imgs[0], "--set", "TEST.NOPE", "1"])
    assert r.exit_code != 0 and "TEST.NOPE" in r.stderr
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image")
    r = run_cli(["detect", *base, bad])
    assert r.exit_code != 0 and "cannot read image" in r.stderr


# ----------------------------------------------------------------------------- CLI: test
PLAIN_NET = """name: "plain"
layer { name: "data" type: "DummyData" top: "data" top: "label"
  dummy_data_param { shape { dim: 4 dim: 5 } shape { dim: 4 }
    data_filler { type: "gaussian" std: 1 } data_filler { type: "constant" value: 1 } } }
layer { name: "ip" type: "InnerProduct" bottom: "data" top: "ip"
  inner_product_param { num_output: 3 weight_filler { type: "gaussian" std: 1 } } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "label" top: "loss" loss_weight: 2 }
layer { name: "acc" type: "Accuracy" bottom: "ip" bottom: "label" top: "accuracy" }
layer { name: "prob" type: "Softmax" bottom: "ip" top: "prob" }
"""

INPUT_NET = """name: "inp"
layer { name: "in" type: "Input" top: "x" input_param { shape { dim: 1 dim: 2 } } }
layer { name: "ip" type: "InnerProduct" bottom: "x" top: "y"
  inner_product_param { num_output: 2 bias_filler { type: "constant" value: 0.25 } } }
"""


def parse_caffe_lines(text):
    batches, means, loss = {}, {}, None
    for ln in text.splitlines():
        m = re.fullmatch(r"Batch (\d+), (\S+) = (\S+)", ln)
        if m:
            batches.setdefault(m.group(2), {}).setdefault(int(m.group(1)), []).append(float(m.group(3)))
            continue
        m = re.fullmatch(r"Loss: (\S+)", ln)
        if m:
            loss = float(m.group(1))
            continue
        m = re.fullmatch(r"(\S+) = (\S+)( \(\* (\S+) = (\S+) loss\))?", ln)
        if m:
            means.setdefault(m.group(1), []).append((float(m.group(2)), m.group(4), m.group(5)))
    return batches, means, loss


def test_caffe_style_test_averages_outputs_like_caffe(tmp_path):
    model = tmp_path / "plain.prototxt"
    model.write_text(PLAIN_NET)
    Net(str(model)).save_weights(str(tmp_path / "plain.caffemodel"))
    r = run_cli(["test", "--model", model, "--weights", tmp_path / "plain.caffemodel", "--iterations", "3"])
    assert r.exit_code == 0, r.output
    batches, means, loss = parse_caffe_lines(r.stdout)
    assert list(batches) == ["accuracy", "loss", "prob"]              # Caffe's sorted output order
    assert all(sorted(v) == [0, 1, 2] for v in batches.values()) and len(batches["prob"][0]) == 12

    # an independent run of the same net (same seed, same weights): float32 sums / N
    ref = Net(str(model))
    ref.load_weights(str(tmp_path / "plain.caffemodel"))
    outs = []
    with torch.no_grad():
        for _ in range(3):
            o = ref.forward()
            outs.append({k: v.numpy().reshape(-1).astype(np.float32) for k, v in o.items()})
    for name in ("accuracy", "loss", "prob"):
        for b in range(3):
            np.testing.assert_allclose(batches[name][b], outs[b][name], rtol=1e-5)
        s = outs[0][name].copy()
        for b in (1, 2):
            s = (s + outs[b][name]).astype(np.float32)
        np.testing.assert_allclose([m[0] for m in means[name]], s / np.float32(3), rtol=1e-5)
    (lm, w, wl), = means["loss"]
    assert w == "2" and float(wl) == pytest.approx(2 * lm, rel=1e-5)
    assert means["accuracy"][0][1] is None
    assert loss == pytest.approx(2 * np.mean([o["loss"][0] for o in outs]), rel=1e-5)
    # the gaussian DummyData refills each pass: the batches differ
    assert batches["prob"][0] != batches["prob"][1]


def test_caffe_test_function_with_input_layer(tmp_path):
    net = Net(INPUT_NET)
    lines = []
    res = caffe_test(net, 4, lines.append)
    y = np.full(2, 0.25, np.float32)                   # zero input: the bias, every pass
    np.testing.assert_array_equal(res["scores"]["y"], y)
    assert lines[0] == "Running for 4 iterations."
    assert lines[1:3] == ["Batch 0, y = 0.25", "Batch 0, y = 0.25"]
    assert lines[-3:] == ["Loss: 0", "y = 0.25", "y = 0.25"]
    assert res["loss"] == 0.0 and len(res["batches"]) == 4


def test_test_command_errors(rpn_files, tmp_path):
    r = run_cli(["test", "--model", rpn_files / "test.prototxt"])
    assert r.exit_code != 0 and "--weights" in r.stderr
    r = run_cli(["test", "--def", rpn_files / "test.prototxt", "--net", tmp_path / "w.caffemodel"])
    assert r.exit_code != 0 and "w.caffemodel" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = run_cli(["test", "--model", tmp_path / "none.prototxt", "--weights", rpn_files / "tiny.caffemodel"])
    assert r.exit_code != 0 and "none.prototxt" in r.stderr
    r = run_cli(["test", "--model", rpn_files / "test.prototxt", "--weights", rpn_files / "tiny.caffemodel",
                 "--imdb", "voc_2099_test"])
    assert r.exit_code != 0 and "unknown data set" in r.stderr
    r = run_cli(["test", "--model", rpn_files / "test.prototxt", "--weights", rpn_files / "tiny.caffemodel",
                 "stray"])
    assert r.exit_code != 0 and "stray" in r.stderr
    if not torch.cuda.is_available():
        r = run_cli(["test", "--model", rpn_files / "test.prototxt", "--weights", rpn_files / "tiny.caffemodel",
                     "--gpu", "0"])
        assert r.exit_code != 0 and "CUDA" in r.stderr


def test_test_command_detection_mode(rpn_files, voc_dir, tmp_path):
    out = tmp_path / "out"
    # py-faster-rcnn's style: one --set followed by KEY VALUE pairs; HAS_RPN comes from the net
    r = run_cli(["test", "--def", rpn_files / "test.prototxt", "--net", rpn_files / "tiny.caffemodel",
                 "--imdb", "voc_2007_test", "--output", out, "--num_dets", "10",
                 "--set", "DATA_DIR", voc_dir, "TEST.SCALES", "(96,)", "TEST.MAX_SIZE", "128"])
    assert r.exit_code == 0, r.output
    assert "HAS_RPN True" in r.stderr
    assert re.search(r"im_detect: 4/4 \d+\.\d{3}s \d+\.\d{3}s", r.stdout)
    assert re.search(r"^Mean AP = \d\.\d{4}$", r.stdout, re.M)
    assert r.stdout.count("AP for ") == 20
    all_boxes = T.load_detections(str(out / "detections.npz"))
    assert len(all_boxes) == 21 and len(all_boxes[1]) == 4
    assert all(sum(len(all_boxes[j][i]) for j in range(21)) <= 10 for i in range(4))
    assert (out / "voc_eval.json").is_file()
    assert cfg.TEST.SCALES == (600,) and cfg.DATA_DIR != str(voc_dir)    # the CLI restored cfg
