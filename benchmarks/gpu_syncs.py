"""GPU check: the host syncs of a Faster R-CNN forward as CUDA itself reports them.

    python benchmarks/gpu_syncs.py        (needs CUDA)

Runs the tiny Faster R-CNN's test forward and train forward (models/faster_rcnn_tiny) and
py-faster-rcnn's ZF test net (corpus) on CUDA under ``torch.cuda.set_sync_debug_mode('warn')``
and counts the synchronizing calls per Caffe layer (forward hooks name the layer), beside
``caffe_compat.host_sync.audit_host_syncs``'s count of the same forward.  The audit is what
the CPU test suite checks; this is the device's ground truth for it.
"""
from __future__ import annotations

import collections
import os
import pathlib
import sys
import tempfile
import warnings

import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def cuda_syncs(net, run) -> "collections.Counter[str]":
    where = {"layer": "(outside layers)"}
    handles = []
    for e in net.entries:
        if e.module is not None:
            handles.append(e.module.register_forward_pre_hook(
                lambda m, a, n=e.name: where.__setitem__("layer", n)))
            handles.append(e.module.register_forward_hook(
                lambda m, a, o: where.__setitem__("layer", "(end of forward)")))
    counts: "collections.Counter[str]" = collections.Counter()
    old = warnings.showwarning

    def show(message, category, *rest, **kw):
        if "synchroniz" in str(message):
            counts[where["layer"]] += 1
        else:
            old(message, category, *rest, **kw)

    warnings.showwarning = show
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = show
            run()
            torch.cuda.synchronize()
    finally:
        torch.cuda.set_sync_debug_mode(0)
        warnings.showwarning = old
        for h in handles:
            h.remove()
    return counts


def report(name, net, run) -> None:
    from caffe_compat.host_sync import audit_host_syncs

    run()  # warm-up: constants, anchors, cuDNN choices
    torch.cuda.synchronize()
    c = cuda_syncs(net, run)
    audit = audit_host_syncs(net, phase_forward=run)
    print(f"{name}: CUDA reports {sum(c.values())} synchronizing calls: {dict(c)}")
    print(f"{name}: the audit counts {audit.total}: "
          f"{ {k: len(v) for k, v in audit.by_layer.items()} }", flush=True)


def main() -> None:
    if not torch.cuda.is_available():
        raise SystemExit("needs CUDA")
    from caffe_compat import Net
    from caffe_compat.frcnn.config import cfg, cfg_from_file, cfg_from_list, temporary_cfg
    from caffe_compat.frcnn.datasets.synthetic_voc import write_dataset
    from caffe_compat.frcnn.train import SolverWrapper, combined_roidb
    from caffe_compat.trainer import load_solver_param, resolve_net_paths, seed_everything

    tiny = ROOT / "models" / "faster_rcnn_tiny"
    with temporary_cfg(), torch.no_grad():
        cfg_from_file(str(tiny / "faster_rcnn_tiny.yml"))
        net = Net(str(tiny / "test.prototxt"), seed=0, device="cuda")
        x = dict(data=torch.rand(1, 3, 240, 320, device="cuda") * 50,
                 im_info=torch.tensor([[240.0, 320.0, 1.0]], device="cuda"))
        report("tiny test forward", net, lambda: net.forward(**x))
    with temporary_cfg():
        cfg_from_file(str(tiny / "faster_rcnn_tiny.yml"))
        d = tempfile.mkdtemp()
        write_dataset(d, 4, seed=1)
        cfg_from_list(["DATA_DIR", d])
        seed_everything(cfg.RNG_SEED)
        roidb = combined_roidb("voc_2007_trainval")[1]
        p = load_solver_param(str(tiny / "solver.prototxt"))
        resolve_net_paths(p, [str(ROOT)])
        sw = SolverWrapper(p, roidb, tempfile.mkdtemp(), save_state=False, device="cuda")
        tn = sw.solver.net
        report("tiny train forward", tn, lambda: tn.forward())
    corpus = pathlib.Path(os.environ.get("CAFFE_COMPAT_CORPUS", ROOT.parent / "shared" / "corpus"))
    zf = corpus / "py-faster-rcnn" / "models" / "pascal_voc" / "ZF" / "faster_rcnn_end2end" / "test.prototxt"
    if zf.exists():
        with temporary_cfg(), torch.no_grad():
            cfg_from_file(str(corpus / "py-faster-rcnn" / "experiments" / "cfgs" / "faster_rcnn_end2end.yml"))
            net = Net(str(zf), seed=0, device="cuda")
            x = dict(data=torch.rand(1, 3, 600, 800, device="cuda") * 50,
                     im_info=torch.tensor([[600.0, 800.0, 1.0]], device="cuda"))
            report("ZF test forward", net, lambda: net.forward(**x))


if __name__ == "__main__":
    main()
