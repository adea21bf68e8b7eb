"""pycaffe basics, written against `import caffe`: net structure (splits, in-place blobs),
forward and backward (whole net, ranges, given diffs, loss weights), need-backward rules
(force_backward, lr_mult 0, propagate_down), and net surgery (params edits, save,
reload, copy_from, share_with, a fully-convolutional rewrite).

    python net_basics.py OUT.npz        (run by real Caffe and by `caffe-compat run`)
"""
import os
import sys
import tempfile

import numpy as np

import caffe

NET = """name: "basics"
force_backward: true
layer { name: "data" type: "Input" top: "data" top: "label"
  input_param { shape { dim: 2 dim: 3 dim: 6 dim: 6 } shape { dim: 2 } } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
  convolution_param { num_output: 4 kernel_size: 3 pad: 1 } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "pool1" type: "Pooling" bottom: "conv1" top: "pool1"
  pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
layer { name: "conv2" type: "Convolution" bottom: "pool1" top: "conv2"
  convolution_param { num_output: 4 kernel_size: 1 } }
layer { name: "sum" type: "Eltwise" bottom: "pool1" bottom: "conv2" top: "sum" }
layer { name: "ip" type: "InnerProduct" bottom: "sum" top: "ip"
  inner_product_param { num_output: 3 } }
layer { name: "prob" type: "Softmax" bottom: "ip" top: "prob" }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "label" top: "loss"
  loss_weight: 0.5 }
"""

# no force_backward; conv1 frozen; conv2 does not propagate into pool1
FROZEN = NET.replace("force_backward: true\n", "").replace(
    'top: "conv1"\n  convolution_param', 'top: "conv1"\n  param { lr_mult: 0 } param { lr_mult: 0 }\n  convolution_param').replace(
    'bottom: "pool1" top: "conv2"', 'bottom: "pool1" top: "conv2" propagate_down: false')

# the InnerProduct rewritten as a convolution over the whole 3x3 map
FULLCONV = NET.replace('layer { name: "ip" type: "InnerProduct" bottom: "sum" top: "ip"\n'
                       '  inner_product_param { num_output: 3 } }',
                       'layer { name: "ip-conv" type: "Convolution" bottom: "sum" top: "ip"\n'
                       '  convolution_param { num_output: 3 kernel_size: 3 } }')


# a deploy-style net (no loss) for forward_all / forward_backward_all
DEPLOY = """name: "deploy"
force_backward: true
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 3 dim: 6 dim: 6 } } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
  convolution_param { num_output: 4 kernel_size: 3 pad: 1 } }
layer { name: "ip" type: "InnerProduct" bottom: "conv1" top: "ip" inner_product_param { num_output: 3 } }
layer { name: "prob" type: "Softmax" bottom: "ip" top: "prob" }
"""


def write(tmp, name, text):
    path = os.path.join(tmp, name)
    with open(path, "w") as f:
        f.write(text)
    return path


def structure(net, out, prefix):
    out[prefix + "blob_names"] = np.array(list(net.blobs.keys()))
    out[prefix + "layer_names"] = np.array(list(net._layer_names))
    out[prefix + "layer_types"] = np.array([l.type for l in net.layers])
    out[prefix + "inputs"] = np.array(list(net.inputs))
    out[prefix + "outputs"] = np.array(list(net.outputs))
    out[prefix + "tops"] = np.array(["%s:%s" % (k, ",".join(v)) for k, v in net.top_names.items()])
    out[prefix + "bottoms"] = np.array(["%s:%s" % (k, ",".join(v)) for k, v in net.bottom_names.items()])
    out[prefix + "params"] = np.array(["%s:%d:%s" % (k, len(v), ";".join(
        "x".join(str(d) for d in b.data.shape) for b in v)) for k, v in net.params.items()])
    out[prefix + "loss_weights"] = np.array([float(w) for w in net.blob_loss_weights.values()])
    out[prefix + "shapes"] = np.array(["%s:%s" % (k, ",".join(str(d) for d in b.shape))
                                       for k, b in net.blobs.items()])
    out[prefix + "legacy"] = np.array([[b.num, b.channels, b.height, b.width, b.count]
                                       for k, b in net.blobs.items() if len(b.shape) <= 4])


def dump(net, out, prefix, diffs=True):
    for k, b in net.blobs.items():
        out[prefix + "data/" + k] = b.data.copy()
        if diffs:
            out[prefix + "diff/" + k] = b.diff.copy()
    if diffs:
        for k, v in net.params.items():
            for i, b in enumerate(v):
                out[prefix + "pdiff/%s/%d" % (k, i)] = b.diff.copy()


def main(out_path):
    rng = np.random.RandomState(7)
    tmp = tempfile.mkdtemp()
    out = {}
    caffe.set_mode_cpu()
    net = caffe.Net(write(tmp, "net.prototxt", NET), caffe.TEST)
    structure(net, out, "struct/")
    for name, blobs in net.params.items():
        for b in blobs:
            b.data[...] = rng.randn(*b.data.shape)
    data = rng.randn(2, 3, 6, 6).astype(np.float32)
    label = np.array([0, 2], np.float32)
    net.blobs["data"].data[...] = data
    net.blobs["label"].data[...] = label
    fwd = net.forward()
    out["fwd_keys"] = np.array(sorted(fwd.keys()))
    out["fwd_prob"] = fwd["prob"].copy()
    out["fwd_loss"] = np.array(fwd["loss"]).copy()
    # loss-driven backward: prob's diff is still zero, loss's diff holds its loss weight
    bwd = net.backward()
    out["bwd_keys"] = np.array(sorted(bwd.keys()))
    dump(net, out, "b1/")
    # diffs written into the outputs (a 0-d loss cannot go through backward(**diffs):
    # pycaffe's batch-size check indexes its shape); parameter diffs accumulate
    net.blobs["prob"].diff[...] = rng.randn(*net.blobs["prob"].data.shape)
    net.blobs["loss"].diff[...] = 2.0
    net.backward()
    dump(net, out, "b2/")
    net.clear_param_diffs()
    # ranges: forward to pool1, edit an intermediate blob, run the rest; backward part way
    net.blobs["data"].data[...] = rng.randn(2, 3, 6, 6)
    part = net.forward(end="pool1", blobs=["conv1"])
    out["part_keys"] = np.array(sorted(part.keys()))
    out["part_pool1"] = part["pool1"].copy()
    out["part_conv1"] = part["conv1"].copy()
    net.blobs["conv2"].data[...] = 0.5
    net.forward(start="sum")
    dump(net, out, "range_fwd/", diffs=False)
    d = net.backward(start="ip", end="conv2", diffs=["sum"])
    out["range_bwd_keys"] = np.array(sorted(d.keys()))
    dump(net, out, "range_bwd/")
    # input reshape: a batch of 1 at another size needs net.reshape() for the shapes
    net.blobs["data"].reshape(1, 3, 6, 6)
    net.blobs["label"].reshape(1)
    net.reshape()
    out["reshaped"] = np.array([list(b.data.shape) + [0] * (4 - b.data.ndim) for b in net.blobs.values()])
    res = net.forward(data=rng.randn(1, 3, 6, 6).astype(np.float32), label=np.array([1.0], np.float32))
    out["reshaped_prob"] = res["prob"].copy()

    # the same net without force_backward, conv1 frozen, conv2 not propagating down
    frozen = caffe.Net(write(tmp, "frozen.prototxt", FROZEN), caffe.TRAIN)
    for name, blobs in frozen.params.items():
        for b, src in zip(blobs, net.params[name]):
            b.data[...] = src.data
    frozen.forward(data=data, label=label)
    frozen.backward()
    dump(frozen, out, "frozen/")

    # net surgery: edit, save, reload (both constructors), copy_from, share_with
    net.blobs["data"].reshape(2, 3, 6, 6)
    net.blobs["label"].reshape(2)
    net.reshape()
    net.params["conv2"][0].data[...] *= -1
    net.params["conv2"][1].data[:] = 0.25
    w = os.path.join(tmp, "surgery.caffemodel")
    net.save(w)
    out["surgery_prob"] = net.forward(data=data, label=label)["prob"].copy()
    legacy = caffe.Net(os.path.join(tmp, "net.prototxt"), w, caffe.TEST)
    out["legacy_prob"] = legacy.forward(data=data, label=label)["prob"].copy()
    kw = caffe.Net(os.path.join(tmp, "net.prototxt"), caffe.TEST, weights=w)
    out["weights_kw_conv2"] = kw.params["conv2"][0].data.copy()
    fresh = caffe.Net(os.path.join(tmp, "net.prototxt"), caffe.TEST)
    fresh.copy_from(w)
    out["copy_from_prob"] = fresh.forward(data=data, label=label)["prob"].copy()
    shared = caffe.Net(os.path.join(tmp, "net.prototxt"), caffe.TEST)
    shared.share_with(net)
    net.params["ip"][1].data[...] = [1.0, -1.0, 0.5]
    out["shared_prob"] = shared.forward(data=data, label=label)["prob"].copy()
    fc = caffe.Net(write(tmp, "fullconv.prototxt", FULLCONV), caffe.TEST)
    for name in fc.params:
        src = "ip" if name == "ip-conv" else name
        fc.params[name][0].data.flat = net.params[src][0].data.flat
        fc.params[name][1].data[...] = net.params[src][1].data
    out["fullconv_params"] = np.array(list(fc.params.keys()))
    out["fullconv_ip"] = fc.forward(data=data, label=label)["prob"].copy()
    out["orig_ip"] = net.forward(data=data, label=label)["prob"].copy()

    # batched helpers: 5 items through batches of 2 (the last one zero-padded)
    dep = caffe.Net(write(tmp, "deploy.prototxt", DEPLOY), caffe.TEST)
    dep.params["conv1"][0].data[...] = net.params["conv1"][0].data
    dep.params["ip"][0].data[...] = rng.randn(3, 144) * 0.1
    x5 = rng.randn(5, 3, 6, 6).astype(np.float32)
    fa = dep.forward_all(data=x5, blobs=["conv1"])
    out["fa_keys"] = np.array(sorted(fa.keys()))
    out["fa_prob"] = fa["prob"]
    out["fa_conv1"] = fa["conv1"]
    blobs, diffs = dep.forward_backward_all(blobs=["ip"], diffs=["conv1"], data=x5,
                                            prob=rng.randn(5, 3).astype(np.float32))
    out["fba_keys"] = np.array(sorted(blobs.keys()) + sorted(diffs.keys()))
    out["fba_ip"] = blobs["ip"]
    out["fba_prob"] = blobs["prob"]
    out["fba_data_diff"] = diffs["data"]
    out["fba_conv1_diff"] = diffs["conv1"]
    np.savez(out_path, **out)


if __name__ == "__main__":
    main(sys.argv[1])
