"""The compatibility suite: every net definition in ../shared/corpus builds, in both phases.

Nets whose data sources are absent still build: their unknown shapes print as '?'.
"""
from __future__ import annotations

import pathlib
import re

import pytest
from click.testing import CliRunner

from caffe_compat import Net
from caffe_compat.errors import GraphError
from caffe_compat.summary import format_table

from conftest import CORPUS


def net_files():
    if not CORPUS.is_dir():
        return []
    out = []
    for p in sorted(CORPUS.rglob("*")):
        if p.suffix not in (".prototxt", ".pt") or not p.is_file():
            continue
        if "base_lr" in p.read_text(errors="replace"):
            continue  # a solver
        out.append(p)
    return out


NETS = net_files()


@pytest.mark.skipif(not NETS, reason=f"shared corpus not found at {CORPUS}")
@pytest.mark.parametrize("phase", ["train", "test"])
@pytest.mark.parametrize("path", NETS, ids=[str(p.relative_to(CORPUS)) for p in NETS])
def test_corpus_net_builds(path: pathlib.Path, phase: str):
    try:
        net = Net(path, phase=phase, allow_python_layers=False)
    except GraphError as e:
        # Nets whose phase needs a stage (mnist_autoencoder's TEST data layers are
        # 'test-on-train'/'test-on-test') do not build without one, in Caffe either.
        stages = sorted(set(re.findall(r'stage:\s*"([^"]+)"', path.read_text())))
        if "unknown bottom" not in str(e) or not stages:
            raise
        net = Net(path, phase=phase, stages=[stages[-1]], allow_python_layers=False)
    table = format_table(net)
    assert net.entries, "no layers kept"
    assert "layers" in table
    for e in net.entries:
        assert e.module is not None or e.unbuilt_reason


def test_corpus_count():
    if not NETS:
        pytest.skip(f"shared corpus not found at {CORPUS}")
    assert len(NETS) == 88


def test_inspect_cli_on_corpus_net():
    if not NETS:
        pytest.skip(f"shared corpus not found at {CORPUS}")
    from caffe_compat.cli.main import main

    p = CORPUS / "bvlc-caffe" / "models" / "bvlc_alexnet" / "deploy.prototxt"
    res = CliRunner().invoke(main, ["inspect", str(p)])
    assert res.exit_code == 0, res.output
    assert "conv1" in res.output and "10 3 227 227" in res.output
    assert "FLOPs" in res.output
