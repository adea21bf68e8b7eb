"""SSD end to end against OpenCV dnn: the two tiny deploy nets of models/ssd_tiny.

Each net (a VGG-style body with an L2 Normalize head, a MobileNet-style body with depthwise
grouped convolutions and BatchNorm/Scale; five mbox heads each: conv -> Permute -> Flatten,
PriorBox per head, Concat, Softmax over (0, -1, num_classes), DetectionOutput) gets seeded
random weights, written as a caffemodel with the project's writer; OpenCV reads the same
prototxt and caffemodel and both run the same synthetic image.  The detections must be the
same rows (OpenCV orders them by score over all labels, the fork by label: compared as
sets), scores and boxes within 1e-5, and the seeds are chosen so that a non-trivial number
of boxes (5 to 50, over several labels) survives the confidence threshold and NMS.
"""
from __future__ import annotations

import os

import cv2
import numpy as np
import pytest
import torch

from caffe_compat.net import Net
from conftest import ROOT


MODELS = str(ROOT / "models" / "ssd_tiny")


def synthetic_image(size: int) -> np.ndarray:
    """A deterministic test picture: colour gradients and a few flat rectangles, scaled to
    [-1, 1] like MobileNet-SSD's preprocessing; shape (1, 3, size, size)."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    img = np.stack([yy * 200, xx * 200, (1 - xx) * 120 + 40], 0)
    rng = np.random.default_rng(7)
    for _ in range(6):
        x0, y0 = rng.integers(0, size - 20, 2)
        w, h = rng.integers(10, size // 2, 2)
        img[:, y0:y0 + h, x0:x0 + w] = rng.uniform(0, 255, (3, 1, 1))
    return ((img - 127.5) / 127.5)[None].astype(np.float32)


def seed_weights(net: Net, seed: int, conf_gain: float) -> None:
    """He-scaled gaussian convolutions (the conf predictors scaled by ``conf_gain``), small
    biases, BatchNorm statistics with positive variances, Scale near 1; Normalize keeps its
    filler's 20."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for e in net.entries:
            if e.module is None or not e.module.blob_names:
                continue
            blobs = e.module.caffe_blobs()
            if e.type == "Convolution":
                w = blobs[0]
                gain = conf_gain if "mbox_conf" in e.name else 1.0
                w.copy_(torch.randn(w.shape, generator=gen) * gain * (2.0 / w[0].numel()) ** 0.5)
                if len(blobs) > 1:
                    blobs[1].copy_(torch.randn(blobs[1].shape, generator=gen) * 0.1)
            elif e.type == "BatchNorm":
                blobs[0].copy_(torch.randn(blobs[0].shape, generator=gen) * 0.1)
                blobs[1].copy_(torch.rand(blobs[1].shape, generator=gen) + 0.5)
                blobs[2].fill_(1.0)
            elif e.type == "Scale":
                blobs[0].copy_(torch.rand(blobs[0].shape, generator=gen) * 0.4 + 0.8)
                if len(blobs) > 1:
                    blobs[1].copy_(torch.randn(blobs[1].shape, generator=gen) * 0.1)


def match_rows(ours: np.ndarray, theirs: np.ndarray, tol: float) -> None:
    assert ours.shape == theirs.shape, (ours.shape, theirs.shape)
    free = list(range(len(theirs)))
    for r in ours:
        cand = [j for j in free if theirs[j, 0] == r[0] and theirs[j, 1] == r[1]
                and np.abs(theirs[j, 2:] - r[2:]).max() <= tol]
        assert cand, f"no OpenCV detection matches {r}"
        free.remove(min(cand, key=lambda j: np.abs(theirs[j, 2:] - r[2:]).max()))


@pytest.mark.parametrize("model,seed,conf_gain,size", [
    ("vgg_ssd_deploy.prototxt", 0, 0.1, 160),
    ("mobilenet_ssd_deploy.prototxt", 0, 1.0, 160),
])
def test_ssd_detections_match_opencv(model, seed, conf_gain, size, tmp_path):
    path = os.path.join(MODELS, model)
    net = Net(path, phase="test")
    seed_weights(net, seed, conf_gain)
    x = synthetic_image(size)
    ours = net.forward(data=torch.from_numpy(x))["detection_out"].detach().numpy()
    blobs = {k: net.blobs[k].detach().numpy() for k in ("mbox_priorbox", "mbox_conf_flatten", "mbox_loc")}
    weights = tmp_path / "w.caffemodel"
    net.save_weights(str(weights))

    cvn = cv2.dnn.readNetFromCaffe(path, str(weights))
    cvn.setPreferableBackend(cv2.dnn.DNN_BACKEND_OPENCV)
    cvn.setInput(x, "data")
    names = ["detection_out", "mbox_priorbox", "mbox_conf_flatten", "mbox_loc"]
    theirs = dict(zip(names, cvn.forward(names)))

    # the heads agree before the detection layer ...
    np.testing.assert_allclose(blobs["mbox_priorbox"], theirs["mbox_priorbox"], atol=2e-7, rtol=0)
    np.testing.assert_allclose(blobs["mbox_conf_flatten"], theirs["mbox_conf_flatten"], atol=1e-5, rtol=0)
    np.testing.assert_allclose(blobs["mbox_loc"], theirs["mbox_loc"], atol=1e-4, rtol=1e-4)

    # ... and so do the detections
    rows = ours[0, 0]
    assert ours.shape[:2] == (1, 1) and rows.shape[1] == 7
    assert 5 <= len(rows) <= 50, f"{len(rows)} detections: retune the seed or conf_gain"
    assert rows[0, 1] >= 1 and len(set(rows[:, 1].tolist())) >= 2, "detections of several labels"
    # no candidate score sits within float noise of the threshold (0.5 in both nets), so
    # the comparison cannot flip on last-bit differences of the convolutions
    conf = blobs["mbox_conf_flatten"].reshape(-1, net.layer("detection_out").num_classes)[:, 1:]
    assert np.abs(conf - net.layer("detection_out").confidence_threshold).min() > 1e-5
    cv_rows = theirs["detection_out"][0, 0]
    cv_rows = cv_rows[cv_rows[:, 2] > 0]  # OpenCV pads to keep_top_k rows of zeros
    match_rows(rows, cv_rows, tol=1e-5)

    # the fork's row order: labels ascending, scores descending within a label
    labels, scores = rows[:, 1], rows[:, 2]
    assert np.all(np.diff(labels) >= 0)
    for lab in np.unique(labels):
        assert np.all(np.diff(scores[labels == lab]) <= 0)
