"""Wiring warnings (``Layer.lint``, ``net.warnings``): the double-softmax trap of old models."""
from __future__ import annotations

import logging

import pytest

from caffe_compat import Net
from conftest import corpus_or_skip

HEAD = """
input: "data" input_shape { dim: 2 dim: 4 }
input: "label" input_shape { dim: 2 }
input: "H" input_shape { dim: 1 dim: 1 dim: 4 dim: 4 }
layer { name: "ip" type: "InnerProduct" bottom: "data" top: "ip" inner_product_param { num_output: 4 } }
"""
SOFTMAX = 'layer { name: "prob" type: "Softmax" bottom: "ip" top: "prob" }\n'


@pytest.mark.parametrize("loss,bottoms", [("InfogainLoss", '"label" bottom: "H"'),
                                          ("SoftmaxWithLoss", '"label"')])
def test_softmax_before_a_softmax_loss_warns(loss, bottoms, caplog):
    text = HEAD + SOFTMAX + f'layer {{ name: "loss" type: "{loss}" bottom: "prob" bottom: {bottoms} top: "loss" }}'
    with caplog.at_level(logging.WARNING, logger="caffe_compat.net"):
        net = Net(text, phase="train")
    assert len(net.warnings) == 1 and net.warnings[0].startswith("layer 'loss': bottom 0 is")
    assert "softmaxed twice" in net.warnings[0]
    assert any("softmaxed twice" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("loss,bottoms", [("InfogainLoss", '"label" bottom: "H"'),
                                          ("SoftmaxWithLoss", '"label"')])
def test_scores_into_a_softmax_loss_do_not(loss, bottoms):
    text = HEAD + SOFTMAX + f'layer {{ name: "loss" type: "{loss}" bottom: "ip" bottom: {bottoms} top: "loss" }}'
    assert Net(text, phase="train").warnings == []


@pytest.mark.slow
def test_corpus_nets_have_no_wiring_warnings():
    corpus = corpus_or_skip()
    warned, checked = {}, 0
    for p in sorted(corpus.rglob("*.prototxt")):
        if "solver" in p.name:
            continue
        try:
            net = Net(str(p), phase="train")
        except Exception:  # nets needing data, Python layers etc. are covered by test_corpus
            continue
        checked += 1
        if net.warnings:
            warned[str(p.relative_to(corpus))] = net.warnings
    assert checked >= 40, f"only {checked} corpus nets built: the check checked little"
    assert warned == {}
