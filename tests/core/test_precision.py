"""True fp32 on CUDA: Caffe had no TF32, so a Net turns it off for its own passes.

CPU part: the flags are set during forward/backward and restored after (torch's flags are
global and settable without a GPU).  GPU part (marked ``gpu``): every golden net recorded
from real Caffe runs on CUDA in both memory layouts within the CPU tolerances, a wide
convolution + inner product agrees with float64 to 1e-5 (TF32 would miss by ~1e-3), and the
real ResNet-50 gives Caffe's numbers on the card.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from caffe_compat import Net
from caffe_compat.precision import exact_fp32, tf32_state
from golden_util import check_golden, golden_files

WIDE = """
input: "data" input_shape { dim: 2 dim: 256 dim: 24 dim: 24 }
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv"
        convolution_param { num_output: 256 kernel_size: 3 pad: 1
                            weight_filler { type: "gaussian" std: 0.02 } } }
layer { name: "fc" type: "InnerProduct" bottom: "conv" top: "fc"
        inner_product_param { num_output: 512 weight_filler { type: "gaussian" std: 0.002 } } }
"""


EXACT = (False, False)


@pytest.fixture
def restore_tf32_flags():
    """Tests here change torch's global switches on purpose: put the defaults back."""
    yield
    torch.set_float32_matmul_precision("highest")
    conv = getattr(torch.backends.cudnn, "conv", None)
    if conv is not None and hasattr(conv, "fp32_precision"):
        torch.backends.cudnn.conv.fp32_precision = "tf32"
        torch.backends.cudnn.rnn.fp32_precision = "tf32"
    torch.backends.cudnn.allow_tf32 = True


def test_exact_fp32_sets_and_restores():
    before = tf32_state()
    assert before[0], "torch's default allows TF32 for cuDNN convolutions"
    with exact_fp32():
        assert tf32_state() == EXACT
        with exact_fp32():                  # nested: still exact, outer restore unaffected
            assert tf32_state() == EXACT
        assert tf32_state() == EXACT
    assert tf32_state() == before
    with pytest.raises(RuntimeError):
        with exact_fp32():
            raise RuntimeError("boom")
    assert tf32_state() == before           # restored on error too
    with exact_fp32(False):
        assert tf32_state() == before


@pytest.mark.parametrize("user", ["legacy matmul", "matmul precision high", "legacy cudnn", "per-op conv"])
def test_users_own_tf32_settings_survive_and_stay_consistent(user, restore_tf32_flags):
    """torch >= 2.9 raises when legacy and per-op switches disagree: a Net pass must neither
    cause that (cuBLAS/cuDNN read the legacy getters) nor lose the user's setting."""
    if user == "legacy matmul":
        torch.backends.cuda.matmul.allow_tf32 = True
    elif user == "matmul precision high":
        torch.set_float32_matmul_precision("high")
    elif user == "legacy cudnn":
        torch.backends.cudnn.allow_tf32 = True
    else:
        if not hasattr(getattr(torch.backends.cudnn, "conv", None), "fp32_precision"):
            pytest.skip("this torch has no per-operator TF32 switches")
        torch.backends.cudnn.conv.fp32_precision = "tf32"
        torch.backends.cudnn.rnn.fp32_precision = "ieee"   # a mix: the legacy getter raises
    before = tf32_state()
    with exact_fp32():
        assert tf32_state() == EXACT
        assert torch._C._get_cublas_allow_tf32() is False   # what cuBLAS calls read
        if user != "per-op conv":
            assert torch._C._get_cudnn_allow_tf32() is False
    assert tf32_state() == before


def test_threads_keep_exact_until_the_last_pass_ends():
    import threading

    inside, release, seen = threading.Event(), threading.Event(), []

    def long_pass():
        with exact_fp32():
            inside.set()
            release.wait(5)
            seen.append(tf32_state())

    t = threading.Thread(target=long_pass)
    t.start()
    inside.wait(5)
    with exact_fp32():      # a short pass in this thread ends first...
        pass
    release.set()
    t.join(5)
    assert seen == [EXACT]  # ...and did not switch TF32 back on under the long one
    assert tf32_state()[0]


@pytest.mark.parametrize("allow", [False, True])
def test_net_passes_run_exact_unless_allowed(allow, monkeypatch):
    net = Net(WIDE.replace("dim: 256 dim: 24 dim: 24", "dim: 2 dim: 3 dim: 3")
              .replace("num_output: 256", "num_output: 2"), allow_tf32=allow, phase="train")
    seen = {"fwd": [], "bwd": []}
    conv = net.layer("conv")
    orig = conv.forward

    def spy(*a):
        seen["fwd"].append(tf32_state())
        return orig(*a)

    monkeypatch.setattr(conv, "forward", spy)
    conv.register_full_backward_hook(lambda m, gi, go: seen["bwd"].append(tf32_state()))
    before = tf32_state()
    x = torch.randn(2, 2, 3, 3, requires_grad=True)
    out = net.forward(data=x)["fc"]
    net.loss = out.sum()           # a loss for Net.backward
    net.backward()
    want = before if allow else EXACT
    assert seen == {"fwd": [want], "bwd": [want]}
    assert tf32_state() == before


# ------------------------------------------------------------------------------------ GPU
FILES = [p for fam in ("vision", "neuron", "common", "loss", "python") for p in golden_files(fam)]


@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize("path", FILES, ids=[f"{p.parent.name}/{p.stem}" for p in FILES])
def test_golden_on_cuda(path, layout, monkeypatch):
    if path.parent.name == "python":
        monkeypatch.setenv("CAFFE_COMPAT_ALLOW_PYTHON_LAYERS", "1")
        monkeypatch.syspath_prepend(str(path.parent.parent.parent / "data" / "pylayers"))
    g = np.load(str(path))
    skip = [k[len("blob/"):] for k in g.files if k.startswith("blob/") and "_split_" in k]
    net = check_golden(path, skip_blobs=skip, device="cuda", channels_last=layout == "nhwc")
    assert all(p.device.type == "cuda" for p in net.parameters())


@pytest.mark.gpu
def test_cuda_convolution_and_inner_product_are_true_fp32():
    net = Net(WIDE, seed=1)
    x = torch.randn(2, 256, 24, 24, generator=torch.Generator().manual_seed(2))
    ref = net.to(torch.float64).forward(data=x.double())["fc"].detach()
    gnet = net.to(torch.float32).to("cuda")
    out = gnet.forward(data=x.cuda())["fc"].detach().cpu().double()
    err = (out - ref).abs().max().item() / ref.abs().max().item()
    assert err < 1e-5, f"relative error {err:.2e}: TF32 leaked into a Caffe pass"


@pytest.mark.gpu
def test_nsfw_resnet50_on_cuda():
    from conftest import GOLDEN
    from test_nsfw_resnet50 import nsfw_dir
    from make_nsfw import nsfw_input

    d = nsfw_dir()
    g = np.load(GOLDEN / "nsfw_resnet50.npz")
    for layout in ("nchw", "nhwc"):
        net = Net(d / "deploy.prototxt", weights=str(d / "resnet_50_1by2_nsfw.caffemodel"), device="cuda")
        if layout == "nhwc":
            net.channels_last()
        with torch.no_grad():
            prob = net.forward(data=torch.from_numpy(nsfw_input()).cuda())["prob"].cpu().numpy()
        np.testing.assert_allclose(prob, g["blob/prob"], rtol=1e-5, err_msg=layout)


def test_a_net_without_parameters_remembers_its_device():
    net = Net('input: "data" input_shape { dim: 1 dim: 3 } '
              'layer { name: "r" type: "ReLU" bottom: "data" top: "r" }')
    assert net.device.type == "cpu"
    assert net.to(torch.float64) is net and net.device.type == "cpu"
    if torch.cuda.is_available():
        net.to("cuda")
        assert net.device.type == "cuda"
        out = net.forward(data=[[1.0, -2.0, 3.0]])["r"]   # a list becomes a tensor on the net's device
        assert out.device.type == "cuda"
        assert net.cpu().device.type == "cpu"
