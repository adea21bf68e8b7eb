"""Distributed Faster R-CNN on the CPU (gloo): models/faster_rcnn_tiny end2end on 2 processes
== one process with doubled iter_size; a sharded test_net == the single-process one.

The references run in this process through the ordinary single-process entry points
(``train_from_solver`` with a one-process context, ``test_imdb``); the distributed runs
are the ``caffe-compat`` command with ``--gpus cpu:2``.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Dict, List

import numpy as np
import pytest
import torch

from caffe_compat.distributed import DistContext
from caffe_compat.frcnn.config import cfg_from_file, cfg_from_list, temporary_cfg
from caffe_compat.frcnn.datasets.synthetic_voc import write_dataset
from caffe_compat.frcnn import test as frcnn_test
from caffe_compat.frcnn.test import load_detections
from caffe_compat.frcnn.train import train_from_solver
from caffe_compat.proto_text import to_text
from caffe_compat.trainer import load_solver_param, resolve_net_paths
from caffe_compat.weights import caffemodel_state_dict

from conftest import ROOT

TINY = ROOT / "models" / "faster_rcnn_tiny"
YML = TINY / "faster_rcnn_tiny.yml"
ITERS = 2


def _solver(d: Path, iter_size: int) -> Path:
    p = load_solver_param(str(TINY / "solver.prototxt"))
    resolve_net_paths(p, [str(ROOT)])
    p.train_net = str(ROOT / p.train_net) if not os.path.isabs(p.train_net) else p.train_net
    p.iter_size = iter_size
    out = d / f"solver_{iter_size}.prototxt"
    out.write_text(to_text(p))
    return out


def _cli(args: List[str]) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return subprocess.run([sys.executable, "-m", "caffe_compat.cli"] + args, cwd=str(ROOT), env=env,
                          capture_output=True, text=True, timeout=300)


def _train_ref(d: Path, data: str, iter_size: int, name: str, one_process_ctx: bool):
    with temporary_cfg():
        cfg_from_file(str(YML))
        cfg_from_list(["DATA_DIR", data])
        return train_from_solver(str(_solver(d, iter_size)), "voc_2007_trainval", max_iters=ITERS,
                                 output_dir=str(d / name), progress=False,
                                 dist=DistContext() if one_process_ctx else None)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("dist_frcnn")
    data = str(d / "voc")
    write_dataset(data, 8, seed=1)
    ref = _train_ref(d, data, 2, "ref", True)
    return d, data, ref


def _close(a: Dict[str, torch.Tensor], b: Dict[str, torch.Tensor], tol: float) -> bool:
    return a.keys() == b.keys() and all(torch.allclose(a[k], b[k], rtol=tol, atol=tol) for k in a)


def test_end2end_two_processes_equal_one_with_doubled_iter_size(setup):
    """2 gloo processes (iter_size 1) == 1 process with iter_size 2 on the same minibatches
    (the sharded roidb stream; RoI/anchor sampling seeded per minibatch), to 1e-6; the
    single-process iter_size 1 run ends elsewhere."""
    d, data, ref = setup
    out = d / "two"
    r = _cli(["train", "--solver", str(_solver(d, 1)), "--cfg", str(YML), "--iters", str(ITERS),
              "--gpus", "cpu:2", "--output", str(out), "--no-progress", "--set", "DATA_DIR", data])
    assert r.returncode == 0, r.stderr[-3000:]
    got = caffemodel_state_dict(str(out / f"faster_rcnn_tiny_iter_{ITERS}.caffemodel"))
    want = caffemodel_state_dict(ref.final_model)
    for k in want:
        assert torch.allclose(got[k], want[k], rtol=1e-6, atol=1e-6), (k, (got[k] - want[k]).abs().max())
    one = _train_ref(d, data, 1, "one", True)
    assert not _close(caffemodel_state_dict(one.final_model), want, 1e-4)


def test_sharded_test_net_same_detections_and_map(setup):
    """`test --imdb --gpus cpu:2`: each rank detects on half the images, rank 0 writes the
    same detections file and prints the same mAP as one process."""
    d, data, ref = setup
    with temporary_cfg():
        cfg_from_file(str(YML))
        cfg_from_list(["DATA_DIR", data])
        one = frcnn_test.test_imdb(str(TINY / "test.prototxt"), ref.final_model, "voc_2007_test",
                        output_dir=str(d / "test1"), thresh=0.0, log_fn=lambda s: None,
                        note_fn=lambda s: None)
    r = _cli(["test", "--model", str(TINY / "test.prototxt"), "--weights", ref.final_model, "--imdb",
              "voc_2007_test", "--cfg", str(YML), "--set", "DATA_DIR", data, "--thresh", "0",
              "--gpus", "cpu:2", "--output", str(d / "test2")])
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("Mean AP") == 1, r.stdout
    assert f"Mean AP = {one['mAP']:.4f}" in r.stdout, (one["mAP"], r.stdout)
    a = load_detections(one["det_file"])
    b = load_detections(str(d / "test2" / "detections.npz"))
    assert sum(len(x) for row in a for x in row) > 0    # something to compare
    assert len(a) == len(b)
    for ra, rb in zip(a, b):
        assert len(ra) == len(rb)
        for x, y in zip(ra, rb):
            assert np.array_equal(np.asarray(x), np.asarray(y))


FRCNN = Path(os.environ.get("CAFFE_COMPAT_CORPUS", ROOT.parent / "shared" / "corpus")) / "py-faster-rcnn"


@pytest.mark.slow
@pytest.mark.heavy  # full-size ZF stage nets, four stages: ~30 s, make test-heavy
@pytest.mark.skipif(not FRCNN.is_dir(), reason="py-faster-rcnn corpus not found")
def test_alt_opt_runs_on_two_processes(setup, tmp_path):
    """`train-alt-opt --gpus cpu:2` (ZF's stage prototxts, 1-2 iterations per stage, 200 px
    images): every stage trains on both ranks, proposals are generated on shares of the
    images and gathered, rank 0 writes the final model."""
    d, data, _ = setup
    out = tmp_path / "out"
    stage_dir = FRCNN / "models" / "pascal_voc" / "ZF" / "faster_rcnn_alt_opt"
    r = _cli(["train-alt-opt", "--net_name", str(stage_dir), "--iters", "2,1,2,1", "--output", str(out),
              "--cfg", str(FRCNN / "experiments" / "cfgs" / "faster_rcnn_alt_opt.yml"), "--gpus", "cpu:2",
              "--no-progress", "--set", "DATA_DIR", data, "TRAIN.SCALES", "(200,)", "TRAIN.MAX_SIZE", "300",
              "TEST.SCALES", "(200,)", "TEST.MAX_SIZE", "300", "TRAIN.BATCH_SIZE", "16",
              "TRAIN.RPN_BATCHSIZE", "32"])
    try:
        assert r.returncode == 0, r.stderr[-3000:]
        assert r.stdout.count("final model:") == 1, r.stdout
        assert (out / "ZF_faster_rcnn_final.caffemodel").is_file()
        from caffe_compat.frcnn.datasets.imdb import load_proposals
        props = sorted(out.glob("*_proposals.npz"))
        assert len(props) == 2
        boxes = load_proposals(str(props[0]))
        assert len(boxes) == 6 and all(len(b) for b in boxes)   # every trainval image, gathered
    finally:   # ZF snapshots are large
        for f in out.glob("*.caffemodel"):
            f.unlink()
