"""Image classification as in Caffe's 00-classification example and python/classify.py,
written against `import caffe`: a mean read from a .binaryproto, `caffe.io.Transformer`
(transpose, mean, raw scale, channel swap, input scale, deprocess), feeding a reshaped
batch, reading features and weights, `caffe.Classifier.predict` (oversampled and centre
crop, batched through forward_all), and caffe.io's proto/datum conversions.

    python classify.py OUT.npz        (run by real Caffe and by `caffe-compat run`)

Images are made with numpy: the oracle's caffe.io has no scikit-image, so its
resize_image (always called by Classifier.predict) is replaced there by an identity for
same-size images; caffe-compat's own resize_image runs unpatched.
"""
import os
import sys
import tempfile

import numpy as np

import caffe
from caffe.proto import caffe_pb2

DEPLOY = """name: "TinyNet"
layer { name: "data" type: "Input" top: "data"
  input_param { shape { dim: 4 dim: 3 dim: 10 dim: 10 } } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
  convolution_param { num_output: 5 kernel_size: 3 } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "pool1" type: "Pooling" bottom: "conv1" top: "pool1"
  pooling_param { pool: AVE kernel_size: 2 stride: 2 } }
layer { name: "norm1" type: "LRN" bottom: "pool1" top: "norm1"
  lrn_param { local_size: 3 alpha: 0.0001 beta: 0.75 } }
layer { name: "fc" type: "InnerProduct" bottom: "norm1" top: "fc"
  inner_product_param { num_output: 4 } }
layer { name: "prob" type: "Softmax" bottom: "fc" top: "prob" }
"""


def _same_size_resize(im, new_dims, interp_order=1):
    if tuple(im.shape[:2]) != tuple(new_dims):
        raise ValueError("this oracle shim only handles same-size images")
    return np.asarray(im, dtype=np.float32).copy()


def ensure_resize():
    try:
        caffe.io.resize_image(np.arange(12, dtype=np.float32).reshape(2, 2, 3), (2, 2))
    except NameError:  # no scikit-image in this Caffe's environment
        caffe.io.resize_image = _same_size_resize


def main(out_path):
    ensure_resize()
    rng = np.random.RandomState(5)
    tmp = tempfile.mkdtemp()
    deploy = os.path.join(tmp, "deploy.prototxt")
    with open(deploy, "w") as f:
        f.write(DEPLOY)
    caffe.set_mode_cpu()
    out = {}

    net = caffe.Net(deploy, caffe.TEST)
    for name, blobs in net.params.items():
        for b in blobs:
            b.data[...] = rng.randn(*b.data.shape) * 0.1
    weights = os.path.join(tmp, "tiny.caffemodel")
    net.save(weights)

    # a mean image stored as .binaryproto, read back as in the examples
    mean_img = rng.uniform(90, 130, size=(1, 3, 10, 10)).astype(np.float32)
    mean_file = os.path.join(tmp, "mean.binaryproto")
    with open(mean_file, "wb") as f:
        f.write(caffe.io.array_to_blobproto(mean_img).SerializeToString())
    blob = caffe_pb2.BlobProto()
    with open(mean_file, "rb") as f:
        blob.ParseFromString(f.read())
    mu_full = np.array(caffe.io.blobproto_to_array(blob))[0]
    mu = mu_full.mean(1).mean(1)
    out["mu"] = mu

    net = caffe.Net(deploy, weights, caffe.TEST)
    transformer = caffe.io.Transformer({"data": net.blobs["data"].data.shape})
    transformer.set_transpose("data", (2, 0, 1))
    transformer.set_mean("data", mu)
    transformer.set_raw_scale("data", 255)
    transformer.set_channel_swap("data", (2, 1, 0))
    net.blobs["data"].reshape(2, 3, 10, 10)
    images = [rng.uniform(0, 1, size=(10, 10, 3)).astype(np.float32) for _ in range(2)]
    for i, im in enumerate(images):
        net.blobs["data"].data[i] = transformer.preprocess("data", im)
    output = net.forward()
    out["prob"] = output["prob"].copy()
    out["top"] = output["prob"].argmax(axis=1)
    out["conv1_feat"] = net.blobs["conv1"].data[0, :3].copy()
    out["conv1_filters"] = net.params["conv1"][0].data.copy()
    out["norm1"] = net.blobs["norm1"].data.copy()
    out["deprocessed"] = transformer.deprocess("data", net.blobs["data"].data[1])
    out["layer_shapes"] = np.array(["%s %s" % (k, v.data.shape) for k, v in net.blobs.items()])
    out["param_shapes"] = np.array(["%s %s %s" % (k, v[0].data.shape, v[1].data.shape)
                                    for k, v in net.params.items()])

    # per-pixel mean and an input scale
    t2 = caffe.io.Transformer({"data": (1, 3, 10, 10)})
    t2.set_transpose("data", (2, 0, 1))
    t2.set_mean("data", mu_full / 255.0)
    t2.set_input_scale("data", 0.5)
    out["pre_pixel_mean"] = t2.preprocess("data", images[0].copy())
    out["de_pixel_mean"] = t2.deprocess("data", out["pre_pixel_mean"])

    # Classifier: ten crops (oversample) of 12x12 images, and the centre crop
    clf = caffe.Classifier(deploy, weights, image_dims=(12, 12), mean=mu, raw_scale=255,
                           channel_swap=(2, 1, 0))
    inputs = [rng.uniform(0, 1, size=(12, 12, 3)).astype(np.float32) for _ in range(3)]
    out["clf_over"] = clf.predict(inputs)
    out["clf_center"] = clf.predict(inputs, oversample=False)
    out["clf_dims"] = np.array(list(clf.crop_dims) + list(clf.image_dims))
    out["oversample"] = caffe.io.oversample(inputs[:1], (10, 10))

    # conversions
    u8 = rng.randint(0, 255, size=(3, 4, 5)).astype(np.uint8)
    d = caffe.io.array_to_datum(u8, label=3)
    d2 = caffe_pb2.Datum()
    d2.ParseFromString(d.SerializeToString())
    out["datum_u8"] = caffe.io.datum_to_array(d2)
    out["datum_label"] = np.array(d2.label)
    f = rng.randn(2, 3, 4)
    out["datum_float"] = caffe.io.datum_to_array(caffe.io.array_to_datum(f))
    vec = caffe.io.arraylist_to_blobprotovector_str([f, u8.astype(np.float32)])
    arrays = caffe.io.blobprotovector_str_to_arraylist(vec)
    out["vec0"] = arrays[0]
    out["vec1"] = arrays[1]
    bp = caffe.io.array_to_blobproto(f, diff=-f)
    out["bp_diff"] = caffe.io.blobproto_to_array(bp, return_diff=True)
    legacy = caffe_pb2.BlobProto(num=1, channels=2, height=1, width=3)
    legacy.data.extend([1, 2, 3, 4, 5, 6])
    out["bp_legacy"] = caffe.io.blobproto_to_array(legacy)
    np.savez(out_path, **out)


if __name__ == "__main__":
    main(sys.argv[1])
