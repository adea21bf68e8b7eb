"""Shared test fixtures: corpus location, golden files, GPU marker."""
from __future__ import annotations

import os
import pathlib

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parent.parent
CORPUS = pathlib.Path(os.environ.get("CAFFE_COMPAT_CORPUS", ROOT.parent / "shared" / "corpus"))
GOLDEN = ROOT / "tests" / "golden"

#: a py-faster-rcnn ProposalLayer net on Input blobs; its param_str is "PARAM" (replace it)
PROPOSAL_NET = """
name: "proposals"
layer { name: 'in' type: 'Input' top: 'prob' top: 'pred' top: 'im_info'
  input_param { shape { dim: 1 dim: 12 dim: 4 dim: 5 } shape { dim: 1 dim: 24 dim: 4 dim: 5 }
                shape { dim: 1 dim: 3 } } }
layer { name: 'proposal' type: 'Python' bottom: 'prob' bottom: 'pred' bottom: 'im_info'
  top: 'rois' top: 'scores' python_param { module: 'rpn.proposal_layer' layer: 'ProposalLayer'
                 param_str: "PARAM" } }
"""


def corpus_or_skip() -> pathlib.Path:
    if not CORPUS.is_dir():
        pytest.skip(f"shared corpus not found at {CORPUS} (set CAFFE_COMPAT_CORPUS)")
    return CORPUS


@pytest.fixture
def corpus() -> pathlib.Path:
    return corpus_or_skip()


def pytest_collection_modifyitems(config, items):
    # the long tests (marked slow: trainings, subprocess runs, big files) first, so that the
    # xdist workers share them from the start instead of one finishing them alone at the end
    items.sort(key=lambda item: "slow" not in item.keywords)
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="no CUDA device here")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
