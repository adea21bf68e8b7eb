"""A detector test in the manner of py-faster-rcnn's tools/test_net.py and demo.py, written
against `import caffe`: Python layers (a toy proposal layer reading `param_str` and
`im_info`, a numpy RoI max-pooling layer), `caffe.Net(prototxt, caffemodel, caffe.TEST)`,
per-image `blobs[...].reshape` + `net.forward(**kwargs)`, reading `net.blobs['rois']`, then
numpy box decoding, clipping and NMS.

    python frcnn_style.py OUT.npz        (run by real Caffe and by `caffe-compat run`)

The layers live in this file: the prototxt names this module (`frcnn_style`), which is
importable because the script's folder is first on sys.path.
"""
import ast
import os
import sys
import tempfile

import numpy as np

import caffe

PIXEL_MEANS = np.array([[[102.9801, 115.9465, 122.7717]]])


class ToyProposalLayer(caffe.Layer):
    """Top-N score positions of channel 0 of the feature map -> square boxes (image coords)."""

    def setup(self, bottom, top):
        params = ast.literal_eval(self.param_str)
        self._feat_stride = params["feat_stride"]
        self._num = params.get("num", 6)
        top[0].reshape(1, 5)

    def reshape(self, bottom, top):
        pass

    def forward(self, bottom, top):
        scores = bottom[0].data[0, 0]
        im_info = bottom[1].data[0, :]
        order = np.argsort(-scores.ravel(), kind="stable")[:self._num]
        ys, xs = np.unravel_index(order, scores.shape)
        half = 6.0 * im_info[2]
        cx = (xs + 0.5) * self._feat_stride
        cy = (ys + 0.5) * self._feat_stride
        boxes = np.stack([cx - half, cy - half, cx + half, cy + half], axis=1)
        boxes[:, 0::2] = np.clip(boxes[:, 0::2], 0, im_info[1] - 1)
        boxes[:, 1::2] = np.clip(boxes[:, 1::2], 0, im_info[0] - 1)
        rois = np.hstack([np.zeros((len(boxes), 1)), boxes]).astype(np.float32)
        top[0].reshape(*rois.shape)
        top[0].data[...] = rois

    def backward(self, top, propagate_down, bottom):
        pass


class NumpyRoIPool(caffe.Layer):
    """Max pooling of each RoI into a 2 x 2 grid (Fast R-CNN's RoI pooling, simplified)."""

    def setup(self, bottom, top):
        params = ast.literal_eval(self.param_str)
        self._scale = params["spatial_scale"]
        self._out = 2

    def reshape(self, bottom, top):
        top[0].reshape(bottom[1].data.shape[0], bottom[0].data.shape[1], self._out, self._out)

    def _bins(self, roi, h, w):
        x1, y1, x2, y2 = [int(round(v * self._scale)) for v in roi[1:5]]
        x2, y2 = max(x2, x1), max(y2, y1)
        rh, rw = y2 - y1 + 1, x2 - x1 + 1
        for i in range(self._out):
            for j in range(self._out):
                hs = min(max(y1 + (i * rh) // self._out, 0), h)
                he = min(max(y1 + -(-((i + 1) * rh) // self._out), 0), h)
                ws = min(max(x1 + (j * rw) // self._out, 0), w)
                we = min(max(x1 + -(-((j + 1) * rw) // self._out), 0), w)
                yield i, j, hs, he, ws, we

    def forward(self, bottom, top):
        feat, rois = bottom[0].data, bottom[1].data
        h, w = feat.shape[2:]
        out = np.zeros(top[0].data.shape, np.float32)
        self._argmax = np.full(out.shape, -1, np.int64)
        for r, roi in enumerate(rois):
            for i, j, hs, he, ws, we in self._bins(roi, h, w):
                if he <= hs or we <= ws:
                    continue
                patch = feat[int(roi[0]), :, hs:he, ws:we].reshape(feat.shape[1], -1)
                k = patch.argmax(axis=1)
                out[r, :, i, j] = patch[np.arange(len(k)), k]
                self._argmax[r, :, i, j] = (hs + k // (we - ws)) * w + ws + k % (we - ws)
        top[0].data[...] = out

    def backward(self, top, propagate_down, bottom):
        if not propagate_down[0]:
            return
        grad = np.zeros(bottom[0].data.shape, np.float32)
        flat = grad.reshape(grad.shape[0], grad.shape[1], -1)
        rois = bottom[1].data
        for r in range(top[0].diff.shape[0]):
            for c in range(top[0].diff.shape[1]):
                for idx, g in zip(self._argmax[r, c].ravel(), top[0].diff[r, c].ravel()):
                    if idx >= 0:
                        flat[int(rois[r, 0]), c, idx] += g
        bottom[0].diff[...] = grad


NET = """name: "ToyFasterRCNN"
force_backward: true
input: "data"
input_shape { dim: 1 dim: 3 dim: 32 dim: 32 }
input: "im_info"
input_shape { dim: 1 dim: 3 }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
  convolution_param { num_output: 6 kernel_size: 3 pad: 1 stride: 2 } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "conv2" type: "Convolution" bottom: "conv1" top: "conv2"
  convolution_param { num_output: 8 kernel_size: 3 pad: 1 stride: 2 } }
layer { name: "relu2" type: "ReLU" bottom: "conv2" top: "conv2" }
layer { name: "proposal" type: "Python" bottom: "conv2" bottom: "im_info" top: "rois"
  python_param { module: "frcnn_style" layer: "ToyProposalLayer"
                 param_str: "{'feat_stride': 4, 'num': 5}" } }
layer { name: "roi_pool" type: "Python" bottom: "conv2" bottom: "rois" top: "pool"
  python_param { module: "frcnn_style" layer: "NumpyRoIPool" param_str: "{'spatial_scale': 0.25}" } }
layer { name: "fc" type: "InnerProduct" bottom: "pool" top: "fc" inner_product_param { num_output: 16 } }
layer { name: "relu_fc" type: "ReLU" bottom: "fc" top: "fc" }
layer { name: "cls_score" type: "InnerProduct" bottom: "fc" top: "cls_score"
  inner_product_param { num_output: 3 } }
layer { name: "bbox_pred" type: "InnerProduct" bottom: "fc" top: "bbox_pred"
  inner_product_param { num_output: 12 } }
layer { name: "cls_prob" type: "Softmax" bottom: "cls_score" top: "cls_prob" }
"""


def resize_nearest(im, scale):
    h, w = im.shape[:2]
    nh, nw = int(round(h * scale)), int(round(w * scale))
    ys = np.minimum((np.arange(nh) / scale).astype(int), h - 1)
    xs = np.minimum((np.arange(nw) / scale).astype(int), w - 1)
    return im[ys][:, xs]


def get_blobs(im, target=40, max_size=64):
    im_orig = im.astype(np.float32, copy=True) - PIXEL_MEANS
    shape = im_orig.shape
    scale = float(target) / min(shape[:2])
    if round(scale * max(shape[:2])) > max_size:
        scale = float(max_size) / max(shape[:2])
    im_s = resize_nearest(im_orig, scale).astype(np.float32)
    data = im_s[np.newaxis].transpose(0, 3, 1, 2)
    im_info = np.array([[data.shape[2], data.shape[3], scale]], dtype=np.float32)
    return {"data": data, "im_info": im_info}, scale


def bbox_transform_inv(boxes, deltas):
    widths = boxes[:, 2] - boxes[:, 0] + 1.0
    heights = boxes[:, 3] - boxes[:, 1] + 1.0
    ctr_x = boxes[:, 0] + 0.5 * widths
    ctr_y = boxes[:, 1] + 0.5 * heights
    dx, dy, dw, dh = deltas[:, 0::4], deltas[:, 1::4], deltas[:, 2::4], deltas[:, 3::4]
    pcx = dx * widths[:, None] + ctr_x[:, None]
    pcy = dy * heights[:, None] + ctr_y[:, None]
    pw = np.exp(dw) * widths[:, None]
    ph = np.exp(dh) * heights[:, None]
    out = np.zeros(deltas.shape, dtype=deltas.dtype)
    out[:, 0::4] = pcx - 0.5 * pw
    out[:, 1::4] = pcy - 0.5 * ph
    out[:, 2::4] = pcx + 0.5 * pw
    out[:, 3::4] = pcy + 0.5 * ph
    return out


def clip_boxes(boxes, shape):
    boxes[:, 0::4] = np.maximum(np.minimum(boxes[:, 0::4], shape[1] - 1), 0)
    boxes[:, 1::4] = np.maximum(np.minimum(boxes[:, 1::4], shape[0] - 1), 0)
    boxes[:, 2::4] = np.maximum(np.minimum(boxes[:, 2::4], shape[1] - 1), 0)
    boxes[:, 3::4] = np.maximum(np.minimum(boxes[:, 3::4], shape[0] - 1), 0)
    return boxes


def nms(dets, thresh):
    x1, y1, x2, y2, scores = dets[:, 0], dets[:, 1], dets[:, 2], dets[:, 3], dets[:, 4]
    areas = (x2 - x1 + 1) * (y2 - y1 + 1)
    order = scores.argsort(kind="stable")[::-1]
    keep = []
    while order.size > 0:
        i = order[0]
        keep.append(i)
        xx1 = np.maximum(x1[i], x1[order[1:]])
        yy1 = np.maximum(y1[i], y1[order[1:]])
        xx2 = np.minimum(x2[i], x2[order[1:]])
        yy2 = np.minimum(y2[i], y2[order[1:]])
        inter = np.maximum(0.0, xx2 - xx1 + 1) * np.maximum(0.0, yy2 - yy1 + 1)
        ovr = inter / (areas[i] + areas[order[1:]] - inter)
        order = order[np.where(ovr <= thresh)[0] + 1]
    return keep


def im_detect(net, im):
    blobs, scale = get_blobs(im)
    net.blobs["data"].reshape(*(blobs["data"].shape))
    net.blobs["im_info"].reshape(*(blobs["im_info"].shape))
    forward_kwargs = {"data": blobs["data"].astype(np.float32, copy=False),
                      "im_info": blobs["im_info"].astype(np.float32, copy=False)}
    blobs_out = net.forward(**forward_kwargs)
    rois = net.blobs["rois"].data.copy()
    boxes = rois[:, 1:5] / scale
    scores = blobs_out["cls_prob"]
    pred_boxes = bbox_transform_inv(boxes, blobs_out["bbox_pred"])
    pred_boxes = clip_boxes(pred_boxes, im.shape)
    return scores, pred_boxes


def main(out_path):
    rng = np.random.RandomState(3)
    tmp = tempfile.mkdtemp()
    prototxt = os.path.join(tmp, "test.prototxt")
    with open(prototxt, "w") as f:
        f.write(NET)
    caffe.set_mode_cpu()
    init = caffe.Net(prototxt, caffe.TEST)
    for name, blobs in init.params.items():
        for b in blobs:
            b.data[...] = rng.randn(*b.data.shape) * {"conv1": 0.01, "conv2": 0.2, "bbox_pred": 0.02, "cls_score": 0.1, "fc": 0.1}[name]
    caffemodel = os.path.join(tmp, "toy_frcnn.caffemodel")
    init.save(caffemodel)

    net = caffe.Net(prototxt, caffemodel, caffe.TEST)
    net.name = os.path.splitext(os.path.basename(caffemodel))[0]
    out = {"name": np.array(net.name), "inputs": np.array(list(net.inputs)),
           "outputs": np.array(list(net.outputs)), "blob_names": np.array(list(net.blobs.keys())),
           "layer_types": np.array([l.type for l in net.layers])}
    for n, (h, w) in enumerate([(50, 70), (64, 40)]):
        im = rng.uniform(0, 255, size=(h, w, 3))
        scores, boxes = im_detect(net, im)
        out["im%d/scores" % n] = scores
        out["im%d/boxes" % n] = boxes
        for k, b in net.blobs.items():
            out["im%d/blob/%s" % (n, k)] = b.data.copy()
        for j in range(1, 3):
            dets = np.hstack((boxes[:, 4 * j:4 * (j + 1)], scores[:, [j]])).astype(np.float32)
            keep = nms(dets, 0.3)
            out["im%d/dets%d" % (n, j)] = dets[keep]
    # backward through both Python layers with given diffs on the outputs
    for name in net.outputs:
        net.blobs[name].diff[...] = rng.randn(*net.blobs[name].data.shape)
    net.backward()
    out["diff_conv2"] = net.blobs["conv2"].diff.copy()
    out["diff_pool"] = net.blobs["pool"].diff.copy()
    out["pdiff_fc"] = net.params["fc"][0].diff.copy()
    out["pdiff_conv1"] = net.params["conv1"][0].diff.copy()
    np.savez(out_path, **out)


if __name__ == "__main__":
    main(sys.argv[1])
