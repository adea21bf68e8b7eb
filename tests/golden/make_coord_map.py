"""Record real pycaffe's ``caffe.coord_map`` on FCN-like NetSpecs.  Runs under the Caffe oracle:

    ../shared/tools/caffe-oracle/py tests/golden/make_coord_map.py

Each case below builds a NetSpec from whatever ``caffe`` module it is given, so the very same
builders run under real pycaffe (here) and under caffe-compat's emulation
(tests/pycaffe/test_coord_map.py imports this file without importing ``caffe``).  A case returns its
NetSpec, the ``results`` of ``coord_map_from_to``/``crop``/``coord_map`` calls (values, or the
name of the exception raised), and whether real Caffe should build the net.  For nets that
build, every blob's shape after Caffe's reshape is recorded too, so the Crop offsets are known
to cut the right sizes.  Everything goes to tests/golden/coord_map.json.

Channel counts are tiny (the maps depend on kernels, strides and pads only).
"""
import json
import os
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "coord_map.json")


def attempt(fn):
    """``fn()`` as JSON: a (axis, a, b) triple, a crop's parameters, or the exception's name."""
    try:
        value = fn()
    except Exception as e:  # the class name is the recorded result
        return {"error": type(e).__name__}
    if isinstance(value, tuple):
        return {"map": [as_json(v) for v in value]}
    p = value.fn.params["crop_param"]
    return {"crop": {"axis": int(p["axis"]), "offset": [int(o) for o in p["offset"]]}}


def as_json(v):
    if v is None or isinstance(v, (int, float)):
        return v
    try:
        return [float(x) for x in v]
    except TypeError:
        return float(v)


# ============================================================================ builders
def conv_relu(L, bottom, nout, ks=3, stride=1, pad=1):
    conv = L.Convolution(bottom, kernel_size=ks, stride=stride, num_output=nout, pad=pad,
                         param=[dict(lr_mult=1, decay_mult=1), dict(lr_mult=2, decay_mult=0)])
    return conv, L.ReLU(conv, in_place=True)


def max_pool(L, P, bottom, ks=2, stride=2):
    return L.Pooling(bottom, pool=P.Pooling.MAX, kernel_size=ks, stride=stride)


def deconv(L, bottom, nout, ks, stride):
    return L.Deconvolution(bottom, convolution_param=dict(num_output=nout, kernel_size=ks,
                                                          stride=stride, bias_term=False),
                           param=[dict(lr_mult=0)])


def vgg_trunk(caffe, shape=(1, 3, 45, 38), width=2, ncls=3):
    """voc-fcn*s/net.py's VGG16 trunk (conv1_1 pad 100, fc6 a 7x7 conv) up to score_fr."""
    L, P = caffe.layers, caffe.params
    n = caffe.NetSpec()
    n.data = L.Input(shape=dict(dim=list(shape)))
    blocks = [2, 2, 3, 3, 3]
    bottom = n.data
    for b, convs in enumerate(blocks, 1):
        for c in range(1, convs + 1):
            conv, relu = conv_relu(L, bottom, width, pad=100 if (b, c) == (1, 1) else 1)
            n["conv%d_%d" % (b, c)], n["relu%d_%d" % (b, c)] = conv, relu
            bottom = relu
        n["pool%d" % b] = max_pool(L, P, bottom)
        bottom = n["pool%d" % b]
    n.fc6, n.relu6 = conv_relu(L, n.pool5, 4, ks=7, pad=0)
    n.drop6 = L.Dropout(n.relu6, dropout_ratio=0.5, in_place=True)
    n.fc7, n.relu7 = conv_relu(L, n.drop6, 4, ks=1, pad=0)
    n.drop7 = L.Dropout(n.relu7, dropout_ratio=0.5, in_place=True)
    n.score_fr = L.Convolution(n.drop7, num_output=ncls, kernel_size=1, pad=0)
    return n


def case_fcn32s(caffe, cm):
    n = vgg_trunk(caffe)
    n.upscore = deconv(caffe.layers, n.score_fr, 3, 64, 32)
    n.score = cm.crop(n.upscore, n.data)
    results = {"upscore->data": attempt(lambda: cm.coord_map_from_to(n.upscore, n.data)),
               "data->upscore": attempt(lambda: cm.coord_map_from_to(n.data, n.upscore)),
               "pool5->data": attempt(lambda: cm.coord_map_from_to(n.pool5, n.data)),
               "score->data": attempt(lambda: cm.coord_map_from_to(n.score, n.data))}
    return n, results, True


def fcn16_head(caffe, cm, n):
    L = caffe.layers
    n.upscore2 = deconv(L, n.score_fr, 3, 4, 2)
    n.score_pool4 = L.Convolution(n.pool4, num_output=3, kernel_size=1, pad=0)
    n.score_pool4c = cm.crop(n.score_pool4, n.upscore2)
    n.fuse_pool4 = L.Eltwise(n.upscore2, n.score_pool4c, operation=caffe.params.Eltwise.SUM)


def case_fcn16s(caffe, cm):
    n = vgg_trunk(caffe, shape=(1, 3, 50, 61))
    fcn16_head(caffe, cm, n)
    n.upscore16 = deconv(caffe.layers, n.fuse_pool4, 3, 32, 16)
    n.score = cm.crop(n.upscore16, n.data)
    results = {"score_pool4->upscore2":
               attempt(lambda: cm.coord_map_from_to(n.score_pool4, n.upscore2)),
               "upscore16->data": attempt(lambda: cm.coord_map_from_to(n.upscore16, n.data)),
               "fuse_pool4->data": attempt(lambda: cm.coord_map_from_to(n.fuse_pool4, n.data))}
    return n, results, True


def case_fcn8s(caffe, cm):
    L = caffe.layers
    n = vgg_trunk(caffe, shape=(2, 3, 33, 40))
    fcn16_head(caffe, cm, n)
    n.upscore_pool4 = deconv(L, n.fuse_pool4, 3, 4, 2)
    n.score_pool3 = L.Convolution(n.pool3, num_output=3, kernel_size=1, pad=0)
    n.score_pool3c = cm.crop(n.score_pool3, n.upscore_pool4)
    n.fuse_pool3 = L.Eltwise(n.upscore_pool4, n.score_pool3c, operation=caffe.params.Eltwise.SUM)
    n.upscore8 = deconv(L, n.fuse_pool3, 3, 16, 8)
    n.score = cm.crop(n.upscore8, n.data)
    results = {"score_pool3->upscore_pool4":
               attempt(lambda: cm.coord_map_from_to(n.score_pool3, n.upscore_pool4)),
               "upscore8->data": attempt(lambda: cm.coord_map_from_to(n.upscore8, n.data)),
               "data->fuse_pool3": attempt(lambda: cm.coord_map_from_to(n.data, n.fuse_pool3)),
               # the other way round needs padding, not cropping
               "crop data to upscore8": attempt(lambda: cm.crop(n.data, n.upscore8))}
    return n, results, True


def case_dilated(caffe, cm):
    """Atrous convolutions (DeepLab-style): a skip of the input cropped to the conv's size."""
    L, P = caffe.layers, caffe.params
    n = caffe.NetSpec()
    n.data = L.Input(shape=dict(dim=[1, 2, 30, 27]))
    n.conv_d2 = L.Convolution(n.data, num_output=2, kernel_size=3, dilation=2, pad=0)
    n.bn = L.BatchNorm(n.conv_d2)
    n.sc = L.Scale(n.bn, bias_term=True)
    n.conv_d4 = L.Convolution(n.sc, num_output=2, kernel_size=3, dilation=4, pad=2)
    n.skip = cm.crop(n.data, n.conv_d4)
    n.sum = L.Eltwise(n.skip, n.conv_d4)
    n.conv_s = L.Convolution(n.sum, num_output=2, kernel_size=[3, 5], dilation=[2, 1],
                             stride=2, pad=[1, 0])
    n.pool = L.Pooling(n.conv_s, pool=P.Pooling.AVE, kernel_size=3, stride=1, pad=1)
    n.up = deconv(L, n.pool, 2, 4, 2)
    results = {"conv_d4->data": attempt(lambda: cm.coord_map_from_to(n.conv_d4, n.data)),
               "up->data": attempt(lambda: cm.coord_map_from_to(n.up, n.data)),
               "crop up to sum": attempt(lambda: cm.crop(n.up, n.sum)),
               "crop sum to up": attempt(lambda: cm.crop(n.sum, n.up))}
    return n, results, True


def coord_net(caffe, ks=3, stride=1, pad=0, pool=2, dstride=2, dpad=0):
    """pycaffe's own test net: conv, pool, deconv on a 100x100 input and a 20x20 aux."""
    L, P = caffe.layers, caffe.params
    n = caffe.NetSpec()
    n.data = L.Input(shape=dict(dim=[2, 1, 100, 100]))
    n.aux = L.Input(shape=dict(dim=[2, 1, 20, 20]))
    n.conv = L.Convolution(n.data, num_output=2, kernel_size=ks, stride=stride, pad=pad)
    n.pool = L.Pooling(n.conv, pool=P.Pooling.MAX, kernel_size=pool, stride=pool, pad=0)
    dks = [2 * s for s in dstride] if isinstance(dstride, list) else 2 * dstride
    n.deconv = L.Deconvolution(n.pool, convolution_param=dict(num_output=2, kernel_size=dks,
                                                              stride=dstride, pad=dpad))
    return n


def case_crop_chain(caffe, cm):
    """A hand-written Crop (per-axis offsets) whose output is cropped again by crop()."""
    L = caffe.layers
    n = coord_net(caffe, pool=4, dstride=4, pad=5)
    n.mid = L.Input(shape=dict(dim=[2, 1, 108, 106]))
    n.c1 = L.Crop(n.deconv, n.mid, axis=2, offset=[1, 2])
    n.c2 = cm.crop(n.c1, n.data)
    n.c3 = L.Crop(n.c2, n.aux, crop_param=dict(axis=2, offset=3))
    n.relu = L.ReLU(n.c3)
    results = {"deconv->data": attempt(lambda: cm.coord_map_from_to(n.deconv, n.data)),
               "c1->data": attempt(lambda: cm.coord_map_from_to(n.c1, n.data)),
               "relu->data": attempt(lambda: cm.coord_map_from_to(n.relu, n.data)),
               "data->relu": attempt(lambda: cm.coord_map_from_to(n.data, n.relu)),
               # aux is not an ancestor of c3's coordinates: only its shape is used
               "c3->aux": attempt(lambda: cm.coord_map_from_to(n.c3, n.aux))}
    return n, results, True


def case_rect(caffe, cm):
    """Anisotropic kernels, strides and pads map each axis on its own."""
    n = coord_net(caffe, ks=[3, 5], stride=[1, 2], pad=[0, 10], dstride=[2, 4])
    n.deconv2 = caffe.layers.Deconvolution(n.pool, convolution_param=dict(
        num_output=2, kernel_size=[4, 7], stride=[2, 4]))
    n.crop2 = cm.crop(n.deconv2, n.data)
    results = {"deconv->data": attempt(lambda: cm.coord_map_from_to(n.deconv, n.data)),
               "crop deconv to data": attempt(lambda: cm.crop(n.deconv, n.data)),
               "deconv2->data": attempt(lambda: cm.coord_map_from_to(n.deconv2, n.data))}
    n2 = coord_net(caffe, ks=[3, 5], stride=[1, 2], pad=[0, 10], dstride=[2, 2])
    results["scale mismatch on one axis"] = attempt(lambda: cm.crop(n2.deconv, n2.data))
    return n, results, True


def case_nd(caffe, cm):
    """3 spatial axes (maps only: Caffe's Pooling is 2-D).  The Deconvolution's keywords are
    given bare, as in pycaffe's own test: the maps read them, but to_proto cannot place them
    (pycaffe has no ``deconvolution_param``)."""
    L, P = caffe.layers, caffe.params
    n = caffe.NetSpec()
    n.data = L.Input(shape=dict(dim=[2, 3, 20, 20, 20]))
    n.conv = L.Convolution(n.data, num_output=2, kernel_size=[3, 3, 3], stride=[1, 1, 1],
                           pad=[0, 1, 2])
    n.pool = L.Pooling(n.conv, pool=P.Pooling.MAX, kernel_size=2, stride=2, pad=0)
    n.deconv = L.Deconvolution(n.pool, num_output=2, kernel_size=4, stride=2, pad=0)
    results = {"deconv->data": attempt(lambda: cm.coord_map_from_to(n.deconv, n.data)),
               "conv->data": attempt(lambda: cm.coord_map_from_to(n.conv, n.data))}
    return n, results, False


def case_multi_top(caffe, cm):
    """A two-bottom, two-top convolution maps each pair the same way."""
    L = caffe.layers
    n = coord_net(caffe)
    n.conv_data, n.conv_aux = L.Convolution(n.data, n.aux, ntop=2, num_output=2, kernel_size=5,
                                            stride=2, pad=0)
    results = {"conv_data->data": attempt(lambda: cm.coord_map_from_to(n.conv_data, n.data)),
               "conv_aux->aux": attempt(lambda: cm.coord_map_from_to(n.conv_aux, n.aux)),
               "conv_aux->data": attempt(lambda: cm.coord_map_from_to(n.conv_aux, n.data)),
               "crop data to conv_data": attempt(lambda: cm.crop(n.data, n.conv_data))}
    return n, results, False


def case_refusals(caffe, cm):
    """What pycaffe refuses, and with which exception."""
    L = caffe.layers
    n = coord_net(caffe)
    n.ip = L.InnerProduct(n.deconv, num_output=2)
    n.crop_axis1 = L.Crop(n.deconv, n.data, axis=1, offset=0)
    mismatch = coord_net(caffe, pool=3, dstride=2)
    negative = coord_net(caffe, dpad=10)
    fraction = coord_net(caffe, ks=2)
    results = {
        "coord_map InnerProduct": attempt(lambda: cm.coord_map(n.ip.fn)),
        "coord_map Deconvolution": attempt(lambda: cm.coord_map(n.deconv.fn)),
        "coord_map Pooling": attempt(lambda: cm.coord_map(n.pool.fn)),
        "coord_map Crop": attempt(lambda: cm.coord_map(n.crop_axis1.fn)),
        "unconnected ip->data": attempt(lambda: cm.coord_map_from_to(n.ip, n.data)),
        "crop ip to data": attempt(lambda: cm.crop(n.ip, n.data)),
        "aux->data (no common top)": attempt(lambda: cm.coord_map_from_to(n.aux, n.data)),
        "axis mismatch": attempt(lambda: cm.coord_map_from_to(n.crop_axis1, n.data)),
        "scale mismatch": attempt(lambda: cm.crop(mismatch.deconv, mismatch.data)),
        "negative offset": attempt(lambda: cm.crop(negative.deconv, negative.data)),
        "noninteger offset": attempt(lambda: cm.crop(fraction.deconv, fraction.data)),
        "noninteger map": attempt(lambda: cm.coord_map_from_to(fraction.deconv, fraction.data)),
    }
    return n, results, False


CASES = {name[len("case_"):]: fn for name, fn in sorted(globals().items())
         if name.startswith("case_")}


# ============================================================================ recording
def blob_shapes(caffe, prototxt):
    with tempfile.NamedTemporaryFile("w", suffix=".prototxt", delete=False) as f:
        f.write(prototxt)
        path = f.name
    try:
        net = caffe.Net(path, caffe.TEST)
    finally:
        os.unlink(path)
    return {name: list(b.data.shape) for name, b in net.blobs.items()}


def main():
    import caffe  # the oracle's pycaffe
    import caffe.coord_map as cm

    caffe.set_mode_cpu()
    golden = {}
    for name, case in CASES.items():
        n, results, build = case(caffe, cm)
        try:
            prototxt = str(n.to_proto())
        except Exception as e:
            prototxt = None
            results["to_proto"] = {"error": type(e).__name__}
        entry = {"prototxt": prototxt, "results": results}
        if build:
            entry["shapes"] = blob_shapes(caffe, prototxt)
        golden[name] = entry
        print("%s: %s" % (name, json.dumps(results)), file=sys.stderr)
    with open(OUT, "w") as f:
        json.dump(golden, f, indent=1, sort_keys=True)
        f.write("\n")
    print("wrote %s (%d bytes)" % (OUT, os.path.getsize(OUT)), file=sys.stderr)


if __name__ == "__main__":
    main()
