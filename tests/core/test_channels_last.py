"""The opt-in channels-last (NHWC) mode gives Caffe's numbers too.

Every golden net recorded from real Caffe runs again with ``net.channels_last()``: forward
and gradients within 1e-5 of each blob's largest magnitude, as in the default layout.  Also
the real ResNet-50.
"""
from __future__ import annotations

import pytest
import torch

from golden_util import check_golden, golden_files

FILES = [p for fam in ("vision", "neuron", "common", "loss", "python") for p in golden_files(fam)]


@pytest.mark.parametrize("path", FILES, ids=[f"{p.parent.name}/{p.stem}" for p in FILES])
def test_golden_channels_last(path, monkeypatch):
    if path.parent.name == "python":
        monkeypatch.setenv("CAFFE_COMPAT_ALLOW_PYTHON_LAYERS", "1")
        monkeypatch.syspath_prepend(str(path.parent.parent.parent / "data" / "pylayers"))
    net = check_golden(path, channels_last=True)
    for p in net.parameters():
        if p.dim() == 4:
            assert p.is_contiguous(memory_format=torch.channels_last)


def test_nsfw_resnet50_channels_last():
    import numpy as np

    from conftest import GOLDEN
    from test_nsfw_resnet50 import nsfw_dir
    from make_nsfw import nsfw_input
    from caffe_compat import Net

    d = nsfw_dir()
    g = np.load(GOLDEN / "nsfw_resnet50.npz")
    net = Net(d / "deploy.prototxt", weights=str(d / "resnet_50_1by2_nsfw.caffemodel")).channels_last()
    with torch.no_grad():
        prob = net.forward(data=nsfw_input())["prob"].numpy()
    np.testing.assert_allclose(prob, g["blob/prob"], rtol=1e-5)
