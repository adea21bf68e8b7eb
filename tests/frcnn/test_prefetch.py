"""Minibatches built in worker processes (caffe_compat.frcnn.prefetch; issue 13).

Workers build minibatch ``slot`` of the loader's seeded stream: the same arrays, in the same
order, as the loader alone; a snapshot's position is the consumer's, so a resumed prefetching
loader continues exactly; a training run with workers equals one without.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from caffe_compat.frcnn.config import cfg, cfg_from_file, cfg_from_list, temporary_cfg
from caffe_compat.frcnn.datasets.synthetic_voc import write_dataset
from caffe_compat.frcnn.prefetch import PrefetchLoader, prefetch_workers
from caffe_compat.frcnn.roidb import MinibatchLoader
from caffe_compat.frcnn.train import combined_roidb, train_net
from caffe_compat.trainer import load_solver_param, resolve_net_paths, seed_everything
from conftest import ROOT

TINY = ROOT / "models" / "faster_rcnn_tiny"


@pytest.fixture(scope="module")
def voc(tmp_path_factory) -> str:
    d = tmp_path_factory.mktemp("voc_prefetch")
    write_dataset(str(d), 8, seed=2)
    return str(d)


def _roidb(voc: str, *extra: str):
    cfg_from_file(str(TINY / "faster_rcnn_tiny.yml"))
    # two scales and aspect grouping: the random draws a worker must reproduce
    cfg_from_list(["DATA_DIR", voc, "TRAIN.SCALES", "(96, 128)"] + list(extra))
    seed_everything(cfg.RNG_SEED)
    return combined_roidb("voc_2007_trainval")[1]


def _same(a, b) -> None:
    assert list(a) == list(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]), k


def test_workers_build_what_the_loader_builds_and_resume_exactly(voc):
    with temporary_cfg():
        roidb = _roidb(voc)
        plain = MinibatchLoader(roidb, 21, seed=5, has_rpn=True, shard=(0, 1, 2))
        pre = PrefetchLoader(MinibatchLoader(roidb, 21, seed=5, has_rpn=True, shard=(0, 1, 2)), workers=2)
        try:
            ref = [next(plain) for _ in range(9)]   # crosses an epoch (6 images)
            got = []
            for _ in range(4):
                got.append(next(pre))
                assert pre.last_slot == len(got) - 1
            state = pre.state_dict()               # the consumer's position: 4 taken
            assert state["slot"] == 4
            got += [next(pre) for _ in range(5)]
            for a, b in zip(got, ref):
                _same(a, b)
            # resume from the snapshot's position: the same minibatches again
            pre.load_state_dict(state)
            for b in ref[4:7]:
                _same(next(pre), b)
        finally:
            pre.close()


def test_how_many_workers():
    with temporary_cfg():
        assert prefetch_workers(None, "cpu") == 0                  # the CPU keeps its cores
        cfg.TRAIN.USE_PREFETCH = True
        assert prefetch_workers(None, "cpu") >= 1                  # py-faster-rcnn's switch
        cfg.TRAIN.PREFETCH_WORKERS = 0
        assert prefetch_workers(None, "cuda") == 0                 # never
        cfg.TRAIN.PREFETCH_WORKERS = -1
        assert 1 <= prefetch_workers(None, "cuda") <= 4


def test_training_with_workers_equals_training_without(voc, tmp_path):
    p = load_solver_param(str(TINY / "solver.prototxt"))
    resolve_net_paths(p, [str(ROOT)])
    weights = []
    for workers in (2, 1):
        with temporary_cfg():
            roidb = _roidb(voc, "TRAIN.PREFETCH_WORKERS", str(workers))
            r = train_net(p, roidb, str(tmp_path / f"w{workers}"), max_iters=3, progress=False,
                          handle_signals=False)
            weights.append(torch.load(r.final_model, weights_only=True)
                           if r.final_model.endswith(".pt") else r.final_model)
    from caffe_compat.weights import caffemodel_state_dict

    a, b = (caffemodel_state_dict(w) for w in weights)
    assert list(a) == list(b)
    for k in a:
        assert torch.equal(torch.as_tensor(a[k]), torch.as_tensor(b[k])), k
