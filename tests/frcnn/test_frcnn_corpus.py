"""py-faster-rcnn's own net definitions, unchanged: forward and backward on a small image.

Every net in ../shared/corpus/py-faster-rcnn/models (VGG16, ZF, VGG_CNN_M_1024; end2end,
alt-opt stages, fast_rcnn, rpn_test; pascal_voc and coco) is built with its experiment's
cfg, given seeded random weights and run on a 128x224 image.  Training nets must give
finite losses and a finite gradient for every parameter with lr_mult > 0.
"""
from __future__ import annotations

import math
import pathlib

import numpy as np
import pytest
import torch

from caffe_compat import Net
from caffe_compat.frcnn.config import cfg_from_file, temporary_cfg

from conftest import CORPUS

FRCNN = CORPUS / "py-faster-rcnn"
H, W = 128, 224


def frcnn_nets():
    if not FRCNN.is_dir():
        return []
    return sorted(p for p in (FRCNN / "models").rglob("*")
                  if p.suffix in (".pt", ".prototxt") and "solver" not in p.name)


NETS = frcnn_nets()


def cfg_file(path: pathlib.Path):
    parts = path.parts
    if "faster_rcnn_end2end" in parts:
        return FRCNN / "experiments" / "cfgs" / "faster_rcnn_end2end.yml"
    if "faster_rcnn_alt_opt" in parts:
        return FRCNN / "experiments" / "cfgs" / "faster_rcnn_alt_opt.yml"
    return None  # fast_rcnn: py-faster-rcnn's defaults (HAS_RPN False)


def gt_boxes(k: int) -> np.ndarray:
    return np.array([[20, 16, 130, 100, 3 % k or 1], [90, 30, 210, 120, 7 % k or 1]], np.float32)


def sample_rois(k: int, rng: np.random.RandomState, n: int = 12):
    x1 = rng.uniform(0, W / 2, n)
    y1 = rng.uniform(0, H / 2, n)
    x2 = x1 + rng.uniform(16, W / 2, n)
    y2 = y1 + rng.uniform(16, H / 2, n)
    rois = np.stack([np.zeros(n), x1, y1, x2, y2], 1).astype(np.float32)
    labels = rng.randint(0, k, n).astype(np.float32)
    targets = np.zeros((n, 4 * k), np.float32)
    inside = np.zeros_like(targets)
    for i, c in enumerate(labels.astype(int)):
        if c > 0:
            targets[i, 4 * c:4 * c + 4] = rng.randn(4)
            inside[i, 4 * c:4 * c + 4] = 1
    return rois, labels, targets, inside


@pytest.mark.skipif(not NETS, reason=f"py-faster-rcnn corpus not found at {FRCNN}")
@pytest.mark.parametrize("path", NETS, ids=[str(p.relative_to(FRCNN / "models")) for p in NETS])
def test_frcnn_net_forward_backward(path: pathlib.Path):
    train = "train" in path.name
    rng = np.random.RandomState(0)
    torch.manual_seed(0)
    with temporary_cfg():
        yml = cfg_file(path)
        if yml is not None:
            cfg_from_file(str(yml))
        net = Net(path, phase="train" if train else "test", seed=0)
        with torch.no_grad():  # small random weights keep a 16-layer net's activations finite
            for info in net.learnable_params():
                p = info.param
                if p.dim() > 1:
                    p.normal_(0, math.sqrt(1.0 / max(1, p[0].numel())), generator=net.generator)
        image = rng.randn(1, 3, H, W).astype(np.float32) * 50
        if train:
            data_layer = next(e.module for e in net.entries if e.type == "Python" and not e.bottoms)
            k = data_layer.num_classes
            if "im_info" in data_layer.blob_order:
                blobs = {"data": image, "im_info": np.array([[H, W, 1.0]], np.float32), "gt_boxes": gt_boxes(k)}
            else:
                rois, labels, targets, inside = sample_rois(k, rng)
                blobs = {"data": image, "rois": rois, "labels": labels, "bbox_targets": targets,
                         "bbox_inside_weights": inside, "bbox_outside_weights": inside,
                         "bbox_loss_weights": inside}
                blobs = {b: blobs[b] for b in data_layer.blob_order}
            data_layer.feed(blobs)
            net.forward()
            assert net.loss is not None and torch.isfinite(net.loss), f"loss {net.loss}"
            net.backward()
            missing, bad = [], []
            for info in net.learnable_params():
                if info.lr_mult > 0:
                    g = info.param.grad
                    if g is None:
                        missing.append(info.key)
                    elif not torch.isfinite(g).all():
                        bad.append(info.key)
            assert not missing, f"no gradient for {missing}"
            assert not bad, f"non-finite gradient for {bad}"
        else:
            inputs = {"data": image}
            if "im_info" in net.input_names:
                inputs["im_info"] = np.array([[H, W, 1.0]], np.float32)
            if "rois" in net.input_names:
                inputs["rois"] = sample_rois(2, rng)[0]
            with torch.no_grad():
                out = net.forward(**inputs)
            assert out, "no outputs"
            for name, t in out.items():
                assert torch.isfinite(t).all(), f"{name} not finite"
            if "cls_prob" in out:
                probs = out["cls_prob"]
                assert torch.allclose(probs.sum(1), torch.ones(probs.shape[0]), atol=1e-5)
            if "rois" in net.blobs and "rois" not in inputs:
                rois = net.blobs["rois"]
                assert rois.shape[1] == 5 and rois.shape[0] >= 1
                assert (rois[:, 1] >= 0).all() and (rois[:, 3] <= W - 1).all()
