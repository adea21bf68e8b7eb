"""``make demo``: py-faster-rcnn's training and testing, end to end on the CPU.

1. write a synthetic PASCAL VOC (``caffe-compat synthetic-voc``): 400 images of the 20
   VOC classes drawn as coloured shapes on textured noise, 300 trainval / 100 test;
2. train ``models/faster_rcnn_tiny`` -- an end-to-end Faster R-CNN (RPN with
   py-faster-rcnn's anchor-target / proposal / proposal-target layers, RoI pooling, a
   21-class head) -- from scratch with py-faster-rcnn's pipeline (imdb -> roidb ->
   RoIDataLayer -> SGD solver -> snapshot with un-normalized bbox_pred), as
   ``caffe-compat train`` does, showing Caffe's log and a progress bar;
3. test the snapshot on the test images (``test_net``: im_detect, NMS, VOC07 mAP);
4. write detection pictures and the loss curve.

About 1-2 minutes on 2 idle CPU cores (7 measured on a busy one).  ``DEMO_OUT`` picks the
output folder (default: a new temporary one), ``DEMO_ITERS`` the iterations (default
1300), ``DEMO_IMAGES`` the data set size (default 400).
"""
from __future__ import annotations

import logging
import os
import pathlib
import sys
import tempfile
import time
from typing import List, Optional

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[2]
MODEL_DIR = ROOT / "models" / "faster_rcnn_tiny"
#: with 1000+ iterations, a mAP below this is reported as a failure (1300 measured about 0.9)
MIN_MAP = 0.5


def _montage(paths: List[str], out: str, cols: int = 3, cell: int = 300) -> Optional[str]:
    """A grid of the first detection pictures, one overview image."""
    import cv2

    ims = [cv2.imread(p) for p in paths]
    ims = [im for im in ims if im is not None]
    if not ims:
        return None
    tiles = []
    for im in ims:
        s = cell / max(im.shape[:2])
        im = cv2.resize(im, (int(im.shape[1] * s), int(im.shape[0] * s)), interpolation=cv2.INTER_AREA)
        tile = np.full((cell, cell, 3), 255, np.uint8)
        tile[:im.shape[0], :im.shape[1]] = im
        tiles.append(tile)
    while len(tiles) % cols:
        tiles.append(np.full((cell, cell, 3), 255, np.uint8))
    rows = [np.hstack(tiles[i:i + cols]) for i in range(0, len(tiles), cols)]
    from caffe_compat.frcnn.vis import write_image

    write_image(out, np.vstack(rows))
    return out


def main(out_dir: Optional[str] = None, iters: Optional[int] = None, images: Optional[int] = None) -> int:
    from caffe_compat.frcnn.config import cfg, cfg_from_file, cfg_from_list, temporary_cfg
    from caffe_compat.frcnn.datasets.factory import get_imdb
    from caffe_compat.frcnn.datasets.synthetic_voc import write_dataset
    from caffe_compat.frcnn.test import test_net
    from caffe_compat.frcnn.train import combined_roidb, train_net
    from caffe_compat.net import Net
    from caffe_compat.progress import setup_logging
    from caffe_compat.trainer import load_solver_param, resolve_net_paths, seed_everything

    iters = int(iters or os.environ.get("DEMO_ITERS") or 1300)
    images = int(images or os.environ.get("DEMO_IMAGES") or 400)
    out = pathlib.Path(out_dir or tempfile.mkdtemp(prefix="caffe-compat-demo-")).resolve()
    out.mkdir(parents=True, exist_ok=True)
    data_dir, train_dir, test_dir = out / "data", out / "train", out / "test"
    t_start = time.perf_counter()

    print(f"[1] writing a synthetic VOC data set ({images} images) to {data_dir}", flush=True)
    s = write_dataset(str(data_dir), images, seed=0)
    print(f"    {s['splits']['trainval']} trainval + {s['splits']['test']} test images, "
          f"{s['num_objects']} objects of 20 classes", flush=True)

    setup_logging(level=logging.INFO)
    # Caffe's per-output lines every 20 iterations are a lot for a demo: keep the loss lines
    logging.getLogger("caffe_compat.solver").addFilter(
        lambda r: "net output" not in r.getMessage() and ", lr = " not in r.getMessage())
    for name in ("caffe_compat.frcnn.roidb", "caffe_compat.frcnn.datasets", "caffe_compat.frcnn.test"):
        logging.getLogger(name).setLevel(logging.WARNING)

    with temporary_cfg():
        cfg_from_file(str(MODEL_DIR / "faster_rcnn_tiny.yml"))
        cfg_from_list(["DATA_DIR", str(data_dir)])
        seed_everything(cfg.RNG_SEED)
        print(f"[2] training {MODEL_DIR.relative_to(ROOT)} from scratch on the CPU: {iters} iterations"
              "\n    (from the checkout root, the same as: caffe-compat train --solver models/faster_rcnn_tiny/solver.prototxt "
              f"--cfg models/faster_rcnn_tiny/faster_rcnn_tiny.yml --iters {iters} "
              f"--output {train_dir} --set DATA_DIR {data_dir})", flush=True)
        imdb, roidb = combined_roidb("voc_2007_trainval")
        solver = load_solver_param(str(MODEL_DIR / "solver.prototxt"))
        resolve_net_paths(solver, [str(ROOT)])
        t0 = time.perf_counter()
        result = train_net(solver, roidb, str(train_dir), max_iters=iters)
        t_train = time.perf_counter() - t0
        if result.interrupted or not result.final_model:
            print(f"training stopped early ({result.signal}); snapshot: {result.final_model}")
            return 130
        h = np.array(result.history)
        k = max(1, min(50, len(h) // 4))
        print(f"    {t_train:.0f} s ({t_train / max(1, len(h)):.3f} s/iteration); loss "
              f"{h[:k, 1].mean():.3f} (first {k} iterations) -> {h[-k:, 1].mean():.3f} (last {k})",
              flush=True)

        print(f"[3] testing {os.path.basename(result.final_model)} on voc_2007_test", flush=True)
        net = Net(str(MODEL_DIR / "test.prototxt"), weights=result.final_model, phase="test")
        t0 = time.perf_counter()
        res = test_net(net, get_imdb("voc_2007_test"), vis=True, output_dir=str(test_dir),
                       log_fn=lambda msg: None)
        t_test = time.perf_counter() - t0
    m = float(res["mAP"])
    aps = res["ap"]
    print(f"    {res['num_images']} images in {t_test:.1f} s; per-class AP:")
    names = sorted(aps)
    for i in range(0, len(names), 5):
        print("      " + "  ".join(f"{n:>11s} {aps[n]:.3f}" for n in names[i:i + 5]))
    print(f"    mAP (VOC07 11-point) = {m:.4f}", flush=True)

    vis_dir = test_dir / "vis"
    pics = sorted(str(p) for p in vis_dir.glob("*.jpg"))
    overview = _montage(pics[:6], str(out / "detections.jpg")) if pics else None
    print("[4] outputs:")
    print(f"    data set            {data_dir}")
    print(f"    trained model       {result.final_model}")
    print(f"    loss curve          {result.loss_curve}")
    print(f"    detection pictures  {vis_dir} ({len(pics)} images)")
    if overview:
        print(f"    overview            {overview}")
    print(f"    detections, AP      {test_dir}")
    print(f"done in {time.perf_counter() - t_start:.0f} s")
    if iters >= 1000 and not m >= MIN_MAP:
        print(f"mAP {m:.3f} is below {MIN_MAP}: something is wrong", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(os.environ.get("DEMO_OUT")))
