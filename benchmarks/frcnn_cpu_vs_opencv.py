"""Benchmark: py-faster-rcnn's ZF / VGG16 test nets at 600x1000 on the CPU, against OpenCV dnn.

    CAFFE_COMPAT_ALLOW_PYTHON_LAYERS=1 .venv/bin/python benchmarks/frcnn_cpu_vs_opencv.py \
        [--nets ZF,VGG16] [--rounds 3] [--results benchmarks/RESULTS.md]

The corpus ``faster_rcnn_end2end/test.prototxt`` of each net, seeded random weights (RPN outputs scaled, below), one
600x1000 input (``im_info`` scale 1.6), batch 1.  OpenCV runs the same caffemodel with the
Python ``rpn.proposal_layer`` replaced by its built-in ``Proposal`` layer, as OpenCV's
Faster R-CNN sample does.  ms per forward (fastest of ``--rounds`` alternating rounds) for
caffe-compat's default path (``torch.inference_mode()``, no opt-ins), its
``exact_layout=True`` path and OpenCV.

Weights: seeded random (``randomize_weights``), then the RPN's two output layers scaled as a
trained RPN's are (``rpn_bbox_pred`` x 0.01, ``rpn_cls_score`` x 0.1).  Unscaled random
weights give objectness logits of +-50 and box deltas that throw every proposal onto the
image border, where NMS keeps a few dozen degenerate boxes whose order depends on fp32
rounding; with trained-like outputs both proposal layers keep 300 boxes and can be compared.

Outputs: the default path's blobs against the exact path's (largest difference relative to
each blob's largest magnitude), and against OpenCV's: the trunk and RPN outputs, the 300
proposals, and the heads' ``cls_prob`` / ``bbox_pred`` with rows matched by box (proposals
whose scores tie leave NMS in either order; OpenCV's time is its whole net).
"""
from __future__ import annotations

import argparse
import os
import pathlib
import re
import tempfile
import time

import numpy as np
import torch

from common import CORPUS, randomize_weights
from forward_speed import machine

FRCNN = CORPUS / "py-faster-rcnn"
PROPOSAL = ("type: 'Proposal'\\1proposal_param { feat_stride: 16 base_size: 16 min_size: 16 "
            "ratio: 0.5 ratio: 1 ratio: 2 scale: 8 scale: 16 scale: 32 pre_nms_topn: 6000 "
            "post_nms_topn: 300 nms_thresh: 0.7 }")


def rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float64) - b).max()) / max(float(np.abs(b).max()), 1e-30)


def compare_heads(got: dict, rois: np.ndarray, cls_prob: np.ndarray, bbox_pred: np.ndarray) -> str:
    """Proposals and heads against OpenCV's, rows matched by box: proposals whose scores tie
    (or differ by less than fp32 rounding) may come out of NMS in another order."""
    ours = got["rois"]
    if ours.shape != rois.shape:
        return f"proposals differ in number: {ours.shape[0]} vs OpenCV's {rois.shape[0]}"
    d = np.abs(rois[:, None, 1:].astype(np.float64) - ours[None, :, 1:]).max(-1)   # (cv, ours)
    match = d.argmin(1)
    if len(set(match.tolist())) != len(match) or float(d.min(1).max()) > 1e-2:
        return f"proposals differ: {int((d.min(1) > 1e-2).sum())} of {len(rois)} boxes have no match"
    moved = int((match != np.arange(len(match))).sum())
    return (f"same {len(rois)} proposals (max coordinate diff {float(d.min(1).max()):.1e} px; {moved} in "
            f"another order: score ties), rows matched: cls_prob {rel(got['cls_prob'][match], cls_prob):.1e}, "
            f"bbox_pred {rel(got['bbox_pred'][match], bbox_pred):.1e}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--nets", default="ZF,VGG16")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--results", default=str(pathlib.Path(__file__).resolve().parent / "RESULTS.md"))
    a = ap.parse_args()
    import cv2

    from caffe_compat import Net
    from caffe_compat.frcnn.config import cfg_from_file, temporary_cfg

    tmp = pathlib.Path(os.environ.get("BENCH_DIR", tempfile.mkdtemp(prefix="cc-frcnn-cpu-")))
    tmp.mkdir(parents=True, exist_ok=True)
    head = (f"{machine()}; torch {torch.__version__} ({torch.get_num_threads()} threads), "
            f"OpenCV {cv2.__version__} ({cv2.getNumThreads()} threads)")
    print(head)
    rows = []
    x = torch.from_numpy(np.random.RandomState(0).randn(1, 3, 600, 1000).astype(np.float32) * 50)
    info = torch.tensor([[600.0, 1000.0, 1.6]])
    for name in a.nets.split(","):
        proto = FRCNN / "models" / "pascal_voc" / name / "faster_rcnn_end2end" / "test.prototxt"
        w = tmp / f"frcnn_{name}_rpn_scaled.caffemodel"
        with temporary_cfg():
            cfg_from_file(str(FRCNN / "experiments" / "cfgs" / "faster_rcnn_end2end.yml"))
            if not w.exists():
                n = Net(str(proto), seed=0)
                randomize_weights(n)
                with torch.no_grad():  # trained-like RPN outputs (see the module docstring)
                    for layer, scale in (("rpn_bbox_pred", 0.01), ("rpn_cls_score", 0.1)):
                        for p in n.layer(layer).parameters():
                            p.mul_(scale)
                n.save_weights(str(w))
                del n
            shapes = {"data": (1, 3, 600, 1000)}
            fast = Net(str(proto), weights=str(w), input_shapes=shapes)
            exact = Net(str(proto), weights=str(w), input_shapes=shapes, exact_layout=True)

            def run(net):
                def f():
                    with torch.inference_mode():
                        return net.forward(data=x, im_info=info)
                return f

            run(fast)()
            got = {k: v.numpy().copy() for k, v in fast.blobs.items()}
            run(exact)()
            ref = {k: v.numpy() for k, v in exact.blobs.items()}
            before_rois = list(ref)[:list(ref).index("rois")]   # the trunk and RPN: no NMS yet
            worst = max((rel(got[k], ref[k]), k) for k in before_rois)
            vs_exact = compare_heads(got, ref["rois"], ref["cls_prob"], ref["bbox_pred"])
            trunk = fast.layer("roi_pool_conv5" if name == "ZF" else "roi_pool5")
            trunk_blob = next(e.bottoms[0] for e in fast.entries if e.module is trunk)
            cvp = tmp / f"{name}_opencv.prototxt"
            cvp.write_text(re.sub(r"type: 'Python'(.*?)python_param \{.*?\}", PROPOSAL,
                                  proto.read_text(), flags=re.S))
            cv = cv2.dnn.readNetFromCaffe(str(cvp), str(w))
            blobs = [trunk_blob, "rpn_cls_prob_reshape", "rpn_bbox_pred"]
            # OpenCV names outputs by layer: the last layer writing each blob (in-place ReLU)
            writer = {t: e.name for e in fast.entries for t in e.tops}

            def run_cv(outs=("cls_prob", "bbox_pred")):
                cv.setInput(x.numpy(), "data")
                cv.setInput(info.numpy(), "im_info")
                return cv.forward(list(outs))

            o = run_cv([writer[b] for b in blobs] + ["proposal", "cls_prob", "bbox_pred"])
            vs_cv = max(rel(ref[k], v) for k, v in zip(blobs, o))
            heads = compare_heads(got, *o[-3:])
            fns = [run(fast), run(exact), run_cv]
            best = [float("inf")] * 3
            for _ in range(a.rounds):
                for i, f in enumerate(fns):
                    t = time.perf_counter()
                    f()
                    best[i] = min(best[i], (time.perf_counter() - t) * 1e3)
        print(f"{name}: default {best[0]:.0f} ms ({best[0] / best[2]:.2f}x OpenCV), exact_layout "
              f"{best[1]:.0f} ms ({best[1] / best[2]:.2f}x), OpenCV {best[2]:.0f} ms; default vs exact "
              f"trunk+RPN worst blob {worst[0]:.1e} ({worst[1]}), {vs_exact}; vs OpenCV: trunk+RPN {vs_cv:.1e}, {heads}", flush=True)
        rows.append((name, best, worst, vs_cv, heads, vs_exact))
    if a.results and rows:
        import shlex
        import sys
        import datetime

        cmd = "python benchmarks/frcnn_cpu_vs_opencv.py " + " ".join(shlex.quote(s) for s in sys.argv[1:])
        when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        out = [f"\n## frcnn_cpu_vs_opencv, {when}\n\n`{cmd.strip()}`\n\n{head}.  py-faster-rcnn "
               "`faster_rcnn_end2end/test.prototxt`, seeded weights, 1x3x600x1000, ms per forward "
               "(OpenCV with its `Proposal` layer in place of the Python one); `xOpenCV` = this time / "
               "OpenCV's.  Blob diff: relative to each blob's largest magnitude.\n",
               "| net | OpenCV ms | default ms (xOpenCV) | exact_layout ms (xOpenCV) | default vs exact: trunk + RPN "
               "worst blob; proposals and heads | trunk + RPN vs OpenCV | proposals and heads vs OpenCV (default path) |",
               "|---|---|---|---|---|---|---|"]
        for name, best, worst, vs_cv, heads, vs_exact in rows:
            out.append(f"| {name} | {best[2]:.0f} | {best[0]:.0f} ({best[0] / best[2]:.2f}x) | "
                       f"{best[1]:.0f} ({best[1] / best[2]:.2f}x) | {worst[0]:.1e} (`{worst[1]}`); {vs_exact} | {vs_cv:.1e} "
                       f"| {heads} |")
        with open(a.results, "a") as f:
            f.write("\n".join(out) + "\n")


if __name__ == "__main__":
    main()
