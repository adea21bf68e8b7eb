"""Nets written from Python with `caffe.NetSpec`, `caffe.layers`, `caffe.params` and
`caffe.to_proto` (as in Caffe's examples/pycaffe/caffenet.py and the LeNet notebook),
then built and run, written against `import caffe`.

    python netspec.py OUT.npz        (run by real Caffe and by `caffe-compat run`)
"""
import os
import sys
import tempfile

import numpy as np

import caffe
from caffe import layers as L
from caffe import params as P


def conv_relu(bottom, nout, ks=3, stride=1, pad=0):
    conv = L.Convolution(bottom, kernel_size=ks, stride=stride, num_output=nout, pad=pad,
                         param=[dict(lr_mult=1, decay_mult=1), dict(lr_mult=2, decay_mult=0)],
                         weight_filler=dict(type="gaussian", std=0.1), bias_filler=dict(type="constant", value=0.1))
    return conv, L.ReLU(conv, in_place=True)


def tinynet(batch):
    n = caffe.NetSpec()
    n.data, n.label = L.Input(shape=[dict(dim=[batch, 3, 8, 8]), dict(dim=[batch])], ntop=2)
    n.conv1, n.relu1 = conv_relu(n.data, 4, pad=1)
    n.pool1 = L.Pooling(n.relu1, pool=P.Pooling.MAX, kernel_size=2, stride=2)
    n.conv2, n.relu2 = conv_relu(n.pool1, 4, ks=1)
    n.sum = L.Eltwise(n.pool1, n.relu2, operation=P.Eltwise.SUM)
    n.drop = L.Dropout(n.sum, dropout_ratio=0.5, in_place=True, include=dict(phase=caffe.TRAIN))
    n.fc = L.InnerProduct(n.sum, num_output=3, weight_filler=dict(type="xavier"))
    n.loss = L.SoftmaxWithLoss(n.fc, n.label, loss_weight=1.5)
    n.acc = L.Accuracy(n.fc, n.label, include=dict(phase=caffe.TEST))
    n.silence = L.Silence(n.label, ntop=0)
    return n


def main(out_path):
    rng = np.random.RandomState(2)
    tmp = tempfile.mkdtemp()
    out = {}
    n = tinynet(2)
    text = str(n.to_proto())
    out["netspec_text"] = np.array(text)
    # auto-naming of unnamed layers and tops
    data = L.Input(shape=dict(dim=[1, 2, 4, 4]))
    auto = L.Softmax(L.InnerProduct(L.Pooling(data, pool=P.Pooling.AVE, global_pooling=True),
                                    num_output=2), axis=1)
    out["auto_text"] = np.array(str(caffe.to_proto(auto)))
    out["auto_top_text"] = np.array(str(auto.to_proto()))
    py = L.Python(data, module="mymod", layer="MyLayer", param_str="{'a': 1}", ntop=2)
    out["python_text"] = np.array(str(caffe.to_proto(*py)))
    out["enum_values"] = np.array([P.Pooling.MAX, P.Pooling.AVE, P.Eltwise.PROD, P.Eltwise.MAX])

    path = os.path.join(tmp, "tiny.prototxt")
    with open(path, "w") as f:
        f.write(text)
    caffe.set_mode_cpu()
    net = caffe.Net(path, caffe.TEST)
    out["test_layers"] = np.array(list(net._layer_names))
    for name, blobs in net.params.items():
        for b in blobs:
            b.data[...] = rng.randn(*b.data.shape) * 0.3
    res = net.forward(data=rng.randn(2, 3, 8, 8).astype(np.float32), label=np.array([0, 2], np.float32))
    out["test_loss"] = np.array(res["loss"]).copy()
    out["test_acc"] = np.array(res["acc"]).copy()
    train = caffe.Net(path, caffe.TRAIN)
    out["train_layers"] = np.array(list(train._layer_names))
    out["train_loss_weights"] = np.array([float(v) for v in train.blob_loss_weights.values()])
    np.savez(out_path, **out)


if __name__ == "__main__":
    main(sys.argv[1])
