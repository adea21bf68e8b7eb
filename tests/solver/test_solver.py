"""The solvers against real Caffe (tests/golden/solver/*.npz from tests/golden/make_solver.py),
plus the solver's own machinery: lr policies, snapshots and exact resume, test nets, stop
requests, logging and refusals."""
from __future__ import annotations

import json
import logging
import math
import os

import numpy as np
import pytest
import torch

from caffe_compat.errors import SolverError
from caffe_compat.protos import caffe_pb2
from caffe_compat.solver import Solver, get_solver, learning_rate
from conftest import GOLDEN as GOLDEN_DIR

GOLDEN = GOLDEN_DIR / "solver"
CASES = sorted(p.stem for p in GOLDEN.glob("*.npz"))


def _rel_err(actual: np.ndarray, expected: np.ndarray) -> float:
    scale = max(float(np.abs(expected).max()), 1e-6)
    return float(np.abs(actual.astype(np.float64) - expected.astype(np.float64)).max()) / scale


def _params(solver: Solver) -> dict:
    out = {}
    for e in solver.net.entries:
        if e.module is not None:
            for i, b in enumerate(e.module.caffe_blobs()):
                out[(e.name, i)] = b.detach().cpu().numpy().copy()
    return out


class Golden:
    """One recorded Caffe run: net, solver text, initial weights, data, trajectory."""

    def __init__(self, name: str):
        self.name = name
        self.g = np.load(GOLDEN / f"{name}.npz", allow_pickle=False)
        self.steps = int(self.g["steps"])
        self.keys = list(self.g.keys())
        self.per_pass = any(k.startswith("input/data/") for k in self.keys)

    def param(self, lname: str, i: int, step: int) -> np.ndarray:
        return self.g[f"param/{lname}/{i}/{step}"]

    def param_keys(self):
        return sorted({(k.split("/")[1], int(k.split("/")[2])) for k in self.keys if k.startswith("param/")})

    def feed(self):
        if self.per_pass:
            g = self.g
            return lambda it, p: {"data": g[f"input/data/{it}/{p}"], "label": g[f"input/label/{it}/{p}"]}
        return {"data": self.g["input/data"], "label": self.g["input/label"]}

    def solver(self, tmp_path, *, extra: str = "", dtype=None, device=None) -> Solver:
        net_path = tmp_path / "net.prototxt"
        net_path.write_text(str(self.g["prototxt"]))
        sp = tmp_path / "solver.prototxt"
        sp.write_text(f'net: "{net_path}"\n{self.g["solver"]}\nsnapshot_prefix: "{tmp_path}/snap"\n'
                      f"random_seed: 1\n{extra}")
        s = Solver(str(sp), feed=self.feed(), dtype=dtype, device=device)
        self.load_initial(s, 0)
        return s

    def load_initial(self, s: Solver, step: int) -> None:
        with torch.no_grad():
            for lname, i in self.param_keys():
                b = s.net.layer(lname).caffe_blobs()[i]
                b.copy_(torch.from_numpy(self.param(lname, i, step)).to(b))


@pytest.mark.parametrize("case", CASES)
def test_matches_caffe(case, tmp_path):
    """Weights after each of 5 steps, the logged lr and loss, all as Caffe's."""
    gold = Golden(case)
    s = gold.solver(tmp_path)
    seen = []
    s.add_callback(lambda solver, info: seen.append(info))
    for step in range(1, gold.steps + 1):
        s.step(1)
        assert s.iter == step
        got = _params(s)
        for lname, i in gold.param_keys():
            err = _rel_err(got[(lname, i)], gold.param(lname, i, step))
            assert err <= 1e-5, f"{case}: {lname}[{i}] after step {step}: rel err {err:.3g}"
    # the weight *changes* too (so that lr errors cannot hide in the weights' magnitude)
    for lname, i in gold.param_keys():
        w0, w5 = gold.param(lname, i, 0), gold.param(lname, i, gold.steps)
        if np.abs(w5 - w0).max() > 0:
            err = _rel_err(got[(lname, i)] - w0, w5 - w0)
            assert err <= 1e-5, f"{case}: {lname}[{i}] update: rel err {err:.3g}"
        else:
            assert np.array_equal(got[(lname, i)], w0), f"{case}: {lname}[{i}] must stay frozen"
    np.testing.assert_allclose([x.lr for x in seen], gold.g["lr"], rtol=2e-5, atol=0)
    np.testing.assert_allclose([x.smoothed_loss for x in seen], gold.g["loss"], rtol=2e-5, atol=1e-6)


def test_golden_cases_present():
    expected = {"sgd_step", "sgd_iter_size", "sgd_l1", "sgd_clip", "sgd_frozen", "sgd_conv", "nesterov",
                "adagrad", "rmsprop", "adadelta", "adam", "adam_iter_size", "lr_multistep", "lr_poly",
                "lr_inv", "lr_exp", "lr_sigmoid"}
    assert expected <= set(CASES)


def test_clip_case_clips(tmp_path, caplog):
    """The clipping golden must really exercise clipping (else it cannot catch a bug there)."""
    gold = Golden("sgd_clip")
    s = gold.solver(tmp_path)
    with caplog.at_level(logging.INFO, logger="caffe_compat.solver"):
        s.step(2)
    assert "Gradient clipping: scaling down gradients" in caplog.text


@pytest.mark.parametrize("case", ["sgd_step", "adam"])
def test_restore_caffe_solverstate(case, tmp_path):
    """Caffe's own .solverstate (history layout, iter) + .caffemodel continue like Caffe."""
    gold = Golden(case)
    k = int(gold.g["state_iter"])
    (tmp_path / f"snap_iter_{k}.caffemodel").write_bytes(gold.g["caffe_model"].tobytes())
    state = tmp_path / f"snap_iter_{k}.solverstate"
    state.write_bytes(gold.g["caffe_state"].tobytes())
    run = tmp_path / "run"
    run.mkdir()
    s = gold.solver(run)  # initial weights: overwritten by the restore
    s.restore(str(state))
    assert s.iter == k
    s.step(gold.steps - k)
    got = _params(s)
    for lname, i in gold.param_keys():
        err = _rel_err(got[(lname, i)], gold.param(lname, i, gold.steps))
        assert err <= 1e-5, f"{lname}[{i}]: rel err {err:.3g}"


# ---------------------------------------------------------------------- lr policies
def _sp(text: str) -> caffe_pb2.SolverParameter:
    from google.protobuf import text_format

    return text_format.Parse(text, caffe_pb2.SolverParameter())


@pytest.mark.parametrize("text,formula", [
    ('lr_policy: "fixed" base_lr: 0.5', lambda it: 0.5),
    ('lr_policy: "step" base_lr: 0.5 gamma: 0.1 stepsize: 7', lambda it: 0.5 * 0.1 ** (it // 7)),
    ('lr_policy: "exp" base_lr: 0.5 gamma: 0.97', lambda it: 0.5 * 0.97 ** it),
    ('lr_policy: "inv" base_lr: 0.5 gamma: 0.01 power: 0.75', lambda it: 0.5 * (1 + 0.01 * it) ** -0.75),
    ('lr_policy: "poly" base_lr: 0.5 power: 1.5 max_iter: 40', lambda it: 0.5 * (1 - it / 40) ** 1.5),
    ('lr_policy: "sigmoid" base_lr: 0.5 gamma: -0.2 stepsize: 20',
     lambda it: 0.5 / (1 + math.exp(0.2 * (it - 20)))),
])
def test_lr_policies(text, formula):
    p = _sp(text)
    step = 0
    for it in range(40):
        rate, step = learning_rate(p, it, step)
        assert rate == pytest.approx(formula(it), rel=2e-6), it


def test_multistep_advances_once_per_call():
    """Caffe's multistep moves at most one step per iteration: stepvalues 2, 2, 5 give
    step 1 at iteration 2, step 2 at iteration 3 (not 2), step 3 at 5."""
    p = _sp('lr_policy: "multistep" base_lr: 1 gamma: 0.5 stepvalue: 2 stepvalue: 2 stepvalue: 5')
    step, rates = 0, []
    for it in range(7):
        rate, step = learning_rate(p, it, step)
        rates.append(rate)
    assert rates == [1, 1, 0.5, 0.25, 0.25, 0.125, 0.125]


# ---------------------------------------------------------------------- nets for the rest
MLP_DROP = """name: "drop"
layer { name: "data" type: "Input" top: "data" top: "label"
  input_param { shape { dim: 8 dim: 6 } shape { dim: 8 } } }
layer { name: "ip1" type: "InnerProduct" bottom: "data" top: "ip1"
  inner_product_param { num_output: 10 weight_filler { type: "gaussian" std: 0.3 } } }
layer { name: "relu1" type: "ReLU" bottom: "ip1" top: "ip1" }
layer { name: "drop1" type: "Dropout" bottom: "ip1" top: "ip1" dropout_param { dropout_ratio: 0.5 } }
layer { name: "ip2" type: "InnerProduct" bottom: "ip1" top: "ip2"
  inner_product_param { num_output: 3 weight_filler { type: "gaussian" std: 0.3 } } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip2" bottom: "label" top: "loss" }
layer { name: "acc" type: "Accuracy" bottom: "ip2" bottom: "label" top: "acc"
  include { phase: TEST } }
"""


def _batch(k: int, n: int = 8):
    rng = np.random.RandomState(100 + k)
    return {"data": rng.randn(n, 6).astype(np.float32),
            "label": rng.randint(0, 3, size=n).astype(np.float32)}


def _solver_text(tmp_path, body: str, net: str = MLP_DROP) -> str:
    net_path = tmp_path / "net.prototxt"
    net_path.write_text(net)
    prefix = "" if "snapshot_prefix" in body else f'snapshot_prefix: "{tmp_path}/snap"\n'
    return f'net: "{net_path}"\n{prefix}random_seed: 7\n{body}\n'


@pytest.mark.parametrize("body", [
    # stepvalues 1, 1, 1: the step counter lags the iteration, so it must be restored too
    'type: "SGD" lr_policy: "multistep" stepvalue: 1 stepvalue: 1 stepvalue: 1 stepvalue: 5 gamma: 0.5 '
    'base_lr: 0.1 '
    'momentum: 0.9 weight_decay: 0.01',
    'type: "Adam" lr_policy: "fixed" base_lr: 0.01',
    'type: "AdaDelta" lr_policy: "fixed" base_lr: 1 momentum: 0.9 iter_size: 2',
])
def test_resume_is_bit_identical(body, tmp_path):
    """6 steps straight == 3 steps, snapshot, a new solver restored, 3 steps (Dropout draws
    random masks, so the generator states must come back too)."""
    text = _solver_text(tmp_path, body + " max_iter: 6")
    feed = lambda it, p: _batch(10 * it + p)  # noqa: E731
    a = Solver(text, feed=feed)
    a.step(6)
    b = Solver(text, feed=feed)
    b.step(3)
    model, state = b.snapshot()
    assert model == f"{tmp_path}/snap_iter_3.caffemodel" and os.path.exists(model)
    assert state == f"{tmp_path}/snap_iter_3.solverstate" and os.path.exists(state)
    b.step(1)  # move on, then come back: the restore must undo this
    torch.manual_seed(1234)  # and scramble the global generator
    c = Solver(text, feed=feed)
    c.restore(state)
    assert c.iter == 3
    c.step(3)
    pa, pc = _params(a), _params(c)
    for k in pa:
        assert np.array_equal(pa[k], pc[k]), k
    # control: a run with different dropout masks does not end on the same weights
    d = Solver(text, feed=feed)
    d.step(3)
    d.step(3)
    assert all(np.array_equal(pa[k], _params(d)[k]) for k in pa)  # same seed: same run
    e = Solver(text.replace("random_seed: 7", "random_seed: 8"), feed=feed)
    with torch.no_grad():
        for (ln, i), v in _params(Solver(text, feed=feed)).items():
            e.net.layer(ln).caffe_blobs()[i].copy_(torch.from_numpy(v))
    e.step(6)
    assert any(not np.array_equal(pa[k], _params(e)[k]) for k in pa)


def test_update_rules_are_registered_by_caffe_type_name(tmp_path):
    """Caffe's SolverRegistry: one rule class per type name; a rule registered under a new
    name trains a solver of that type inside the shared ApplyUpdate (rate, lr_mult, ...)."""
    from caffe_compat.solver import SOLVER_TYPES, UPDATE_RULES, UpdateRule, register_update_rule

    assert SOLVER_TYPES == ("SGD", "Nesterov", "AdaGrad", "RMSProp", "AdaDelta", "Adam")
    assert [UPDATE_RULES[t].__name__ for t in SOLVER_TYPES] == list(SOLVER_TYPES)
    assert [UPDATE_RULES[t].history_sets for t in SOLVER_TYPES] == [1, 1, 1, 1, 2, 2]

    @register_update_rule("HalfSGD")
    class HalfSGD(UpdateRule):
        def compute_update_value(self, history, grad, local_rate, iteration):
            return grad * (0.5 * local_rate)

    try:
        body = 'lr_policy: "fixed" base_lr: 0.1 max_iter: 1'
        sgd = Solver(_solver_text(tmp_path, 'type: "SGD" ' + body), feed=lambda it: _batch(it))
        half = Solver(_solver_text(tmp_path, 'type: "HalfSGD" ' + body), feed=lambda it: _batch(it))
        assert isinstance(half.rule, HalfSGD) and len(half.history) == len(sgd.history)
        before = _params(sgd)
        sgd.step(1)
        half.step(1)
        after_sgd, after_half = _params(sgd), _params(half)
        for k, w0 in before.items():
            np.testing.assert_allclose(after_half[k] - w0, (after_sgd[k] - w0) * 0.5, rtol=1e-5, atol=1e-7)
    finally:
        del UPDATE_RULES["HalfSGD"]
    with pytest.raises(SolverError, match="unknown solver type 'HalfSGD'"):
        Solver(_solver_text(tmp_path, 'type: "HalfSGD" ' + body))

def test_solverstate_format(tmp_path):
    text = _solver_text(tmp_path, 'type: "Adam" lr_policy: "fixed" base_lr: 0.01 max_iter: 2')
    s = Solver(text, feed=lambda it: _batch(it))
    s.step(2)
    model, state = s.snapshot()
    from safetensors import safe_open

    with safe_open(state, "pt") as f:
        fmeta = f.metadata()
        keys = sorted(f.keys())
        h0 = f.get_tensor("history.0")
    meta = json.loads(fmeta["state"])
    assert fmeta["format"] == "caffe-compat-solverstate"
    assert meta["iter"] == 2 and meta["type"] == "Adam" and meta["learned_net"] == model
    assert len(keys) == 2 * len(s.net.learnable_params()) == meta["history_size"]
    assert torch.equal(h0, s.history[0].cpu())
    assert "torch_cpu" in meta["rng"] and "train" in meta["rng"]["nets"]
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]  # atomic writes
    # a state of another solver type is refused clearly
    other = Solver(text.replace('"Adam"', '"SGD"'), feed=lambda it: _batch(it))
    with pytest.raises(SolverError, match="Adam solver"):
        other.restore(state)
    with pytest.raises(SolverError, match="cannot read"):
        other.restore(str(tmp_path / "missing.solverstate"))
    (tmp_path / "junk.solverstate").write_bytes(b"\xff\xff\xff junk")
    with pytest.raises(SolverError):
        other.restore(str(tmp_path / "junk.solverstate"))


# ---------------------------------------------------------------------- solve / snapshots / stop
def test_solve_snapshots_and_after_train(tmp_path):
    text = _solver_text(tmp_path, 'lr_policy: "fixed" base_lr: 0.01 max_iter: 5 snapshot: 2')
    s = Solver(text, feed=lambda it: _batch(it))
    snaps = []
    s.add_callback(lambda solver, info: snaps.append(info.iter), on="snapshot")
    s.solve()
    assert s.iter == 5 and snaps == [2, 4, 5]
    for n in (2, 4, 5):
        assert (tmp_path / f"snap_iter_{n}.caffemodel").exists()
        assert (tmp_path / f"snap_iter_{n}.solverstate").exists()
    # resume from iteration 4 via solve(resume_file): ends on the same weights
    r = Solver(text.replace("snapshot: 2", "snapshot: 0 snapshot_after_train: false"),
               feed=lambda it: _batch(it))
    r.solve(str(tmp_path / "snap_iter_4.solverstate"))
    assert r.iter == 5
    for k, v in _params(s).items():
        assert np.array_equal(v, _params(r)[k]), k


def test_request_stop(tmp_path):
    text = _solver_text(tmp_path, 'lr_policy: "fixed" base_lr: 0.01 max_iter: 10')
    s = Solver(text, feed=lambda it: _batch(it))
    s.add_callback(lambda solver, info: info.iter == 3 and solver.request_stop(snapshot=True))
    s.solve()
    assert s.iter == 3 and s.requested_early_exit
    assert sorted(os.listdir(tmp_path)) == ["net.prototxt", "snap_iter_3.caffemodel", "snap_iter_3.solverstate"]
    t = Solver(text.replace("/snap", "/other"), feed=lambda it: _batch(it))
    t.add_callback(lambda solver, info: info.iter == 2 and solver.request_stop(snapshot=False))
    t.solve()
    assert t.iter == 2 and not list(tmp_path.glob("other*"))
    u = Solver(text.replace("/snap", "/hup"), feed=lambda it: _batch(it))
    u.add_callback(lambda solver, info: info.iter == 1 and solver.request_snapshot())
    u.step(3)
    assert u.iter == 3 and [p.name for p in tmp_path.glob("hup*.caffemodel")] == ["hup_iter_1.caffemodel"]


def test_nan_loss_stops_with_iteration_and_top(tmp_path):
    text = _solver_text(tmp_path, 'lr_policy: "fixed" base_lr: 0.01 max_iter: 10')

    def feed(it):
        b = _batch(it)
        if it == 2:
            b["data"][0, 0] = np.nan
        return b

    s = Solver(text, feed=feed)
    s.step(2)
    before = _params(s)
    with pytest.raises(SolverError, match=r"iteration 2.*'loss' \(layer 'loss'\)"):
        s.step(1)
    assert s.iter == 2
    for k, v in _params(s).items():
        assert np.array_equal(v, before[k]), k


# ---------------------------------------------------------------------- display
def test_display_lines_and_average_loss(tmp_path, caplog):
    text = _solver_text(tmp_path, 'lr_policy: "fixed" base_lr: 0.01 max_iter: 10 display: 2 '
                                  'average_loss: 3', net=MLP_DROP.replace('top: "loss" }',
                                                                          'top: "loss" loss_weight: 2 }'))
    s = Solver(text, feed=lambda it: _batch(it))
    infos = []
    s.add_callback(lambda solver, info: infos.append(info))
    with caplog.at_level(logging.INFO, logger="caffe_compat.solver"):
        s.step(5)
    losses = [i.loss for i in infos]
    # Caffe's UpdateSmoothedLoss: mean of the last average_loss losses
    for k, info in enumerate(infos):
        window = losses[max(0, k - 2):k + 1]
        assert info.smoothed_loss == pytest.approx(sum(window) / len(window), rel=1e-6)
    msgs = [r.getMessage() for r in caplog.records]
    assert f"Iteration 0, loss = {infos[0].smoothed_loss:.6g}" in msgs
    assert f"Iteration 4, loss = {infos[4].smoothed_loss:.6g}" in msgs
    assert not any(m.startswith("Iteration 1,") for m in msgs)
    out = infos[4].outputs["loss"][0]
    assert f"    Train net output #0: loss = {out:.6g} (* 2 = {2 * out:.6g} loss)" in msgs
    assert infos[4].loss == pytest.approx(2 * out, rel=1e-6)
    assert "Iteration 4, lr = 0.01" in msgs
    assert infos[1].outputs is None


# ---------------------------------------------------------------------- test nets
def test_test_nets_share_weights_and_average(tmp_path, caplog):
    from caffe_compat import Net

    body = ('lr_policy: "fixed" base_lr: 0.05 max_iter: 4 test_iter: 3 test_interval: 2 '
            'test_compute_loss: true display: 0')
    text = _solver_text(tmp_path, body)
    test_batches = {i: _batch(50 + i, n=5) for i in range(3)}
    s = Solver(text, feed=lambda it: _batch(it), test_feed=lambda net_id, i: test_batches[i])
    assert len(s.test_nets) == 1 and s.test_nets[0].phase == "TEST"
    results = []
    s.add_callback(lambda solver, r: results.append(r), on="test")
    with caplog.at_level(logging.INFO, logger="caffe_compat.solver"):
        s.solve()
    # test_initialization (default true): at 0, at 2, and after training at 4
    assert [r.iter for r in results] == [0, 2, 4]
    ref = Net(str(tmp_path / "net.prototxt"), phase="test")
    with torch.no_grad():
        for (ln, i), v in _params(s).items():
            ref.layer(ln).caffe_blobs()[i].copy_(torch.from_numpy(v))
        outs = [ref.forward(**test_batches[i]) for i in range(3)]
    acc = sum(float(o["acc"]) for o in outs) / 3
    loss = sum(float(o["loss"]) for o in outs) / 3
    assert results[-1]["acc"] == pytest.approx(acc, rel=1e-6)
    assert results[-1]["loss"] == pytest.approx(loss, rel=1e-6)
    assert results[-1].loss == pytest.approx(loss, rel=1e-6)
    assert results[0]["loss"] != pytest.approx(loss, rel=1e-6)  # weights moved in between
    msgs = [r.getMessage() for r in caplog.records]
    assert "Iteration 4, Testing net (#0)" in msgs
    assert f"    Test net output #0: acc = {acc:.6g}" in msgs
    assert f"    Test net output #1: loss = {loss:.6g} (* 1 = {loss:.6g} loss)" in msgs


def test_states_and_stages(tmp_path):
    net = MLP_DROP + ('layer { name: "extra" type: "Power" bottom: "ip2" top: "p" '
                      'include { stage: "deploy" } }\n')
    body = ('lr_policy: "fixed" base_lr: 0.05 max_iter: 1 test_iter: 1 test_iter: 1 test_interval: 5 '
            'train_state { stage: "deploy" } test_state { } test_state { stage: "deploy" }')
    s = Solver(_solver_text(tmp_path, body, net=net), feed=lambda it: _batch(it))
    assert "extra" in s.net.layer_names
    assert [("extra" in n.layer_names) for n in s.test_nets] == [False, True]
    assert all(n.phase == "TEST" for n in s.test_nets)


def test_net_param_inline_and_weights(tmp_path):
    """net_param inline; fine-tuning from a weights file (solver field and argument)."""
    from google.protobuf import text_format

    p = _sp('lr_policy: "fixed" base_lr: 0.1 random_seed: 3')
    text_format.Parse(MLP_DROP, p.net_param)
    a = Solver(p, feed=lambda it: _batch(it))
    a.net.save_weights(str(tmp_path / "w.caffemodel"))
    p.random_seed = 4
    b = Solver(p, feed=lambda it: _batch(it))
    assert not np.array_equal(_params(a)[("ip1", 0)], _params(b)[("ip1", 0)])
    p.weights.append(str(tmp_path / "w.caffemodel"))
    c = Solver(p, feed=lambda it: _batch(it))
    del p.weights[:]
    d = Solver(p, feed=lambda it: _batch(it), weights=str(tmp_path / "w.caffemodel"))
    for k, v in _params(a).items():
        assert np.array_equal(v, _params(c)[k]) and np.array_equal(v, _params(d)[k]), k


def test_data_from_the_net_without_feed(tmp_path):
    """No feed: the net's own data layers give the data (here Input blobs set beforehand)."""
    text = _solver_text(tmp_path, 'lr_policy: "fixed" base_lr: 0.1 momentum: 0.9')
    a = Solver(text, feed=_batch(0))
    a.step(3)
    b = Solver(text)
    b.net.feed(**_batch(0))
    b.step(3)
    for k, v in _params(a).items():
        assert np.array_equal(v, _params(b)[k]), k


def test_snapshot_prefix_from_solver_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "net.prototxt").write_text(MLP_DROP)
    (tmp_path / "lenet_solver.prototxt").write_text('net: "net.prototxt" lr_policy: "fixed" base_lr: 0.1')
    s = Solver("lenet_solver.prototxt")
    assert s.param.snapshot_prefix == "lenet_solver"
    (tmp_path / "snaps").mkdir()
    (tmp_path / "s2.prototxt").write_text('net: "net.prototxt" lr_policy: "fixed" snapshot_prefix: "snaps"')
    assert Solver("s2.prototxt").param.snapshot_prefix == os.path.join("snaps", "s2")
    assert isinstance(get_solver("s2.prototxt"), Solver)


# ---------------------------------------------------------------------- refusals
@pytest.mark.parametrize("body,match", [
    ('type: "sgd" lr_policy: "fixed"', r"unknown solver type 'sgd'.*Did you mean 'SGD'"),
    ('type: "AdaGrad" lr_policy: "fixed" momentum: 0.9', "momentum cannot be used with AdaGrad"),
    ('type: "RMSProp" lr_policy: "fixed" rms_decay: 1.0', "rms_decay"),
    ('lr_policy: "cosine"', "unknown lr_policy 'cosine'"),
    ('base_lr: 0.1', "lr_policy is not set"),
    ('lr_policy: "step"', "positive stepsize"),
    ('lr_policy: "fixed" weight_decay: 0.1 regularization_type: "L3"', "regularization_type 'L3'"),
    ('lr_policy: "fixed" iter_size: 0', "iter_size"),
    ('lr_policy: "fixed" average_loss: 0', "average_loss"),
    ('lr_policy: "fixed" test_iter: 2', "test_interval must be positive"),
    ('lr_policy: "fixed" test_net: "x.prototxt" test_interval: 5', "not found"),
    ('lr_policy: "fixed" snapshot: 5 snapshot_prefix: "/nonexistent/dir/snap"', "cannot write to snapshot"),
])
def test_refusals(body, match, tmp_path):
    with pytest.raises(SolverError, match=match):
        Solver(_solver_text(tmp_path, body))


def test_refusals_nets(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SolverError, match="must specify a train net"):
        Solver(_sp('lr_policy: "fixed"'))
    (tmp_path / "net.prototxt").write_text(MLP_DROP)
    with pytest.raises(SolverError, match="more than one"):
        Solver(_sp('lr_policy: "fixed" net: "net.prototxt" train_net: "net.prototxt"'))
    with pytest.raises(SolverError, match="relative to the current directory"):
        Solver(_sp('lr_policy: "fixed" net: "missing.prototxt"'))
    with pytest.raises(SolverError, match="test_iter must be given once per test net"):
        Solver(_sp('lr_policy: "fixed" train_net: "net.prototxt" test_net: "net.prototxt" '
                   'test_interval: 3'))
    with pytest.raises(SolverError, match="test_state"):
        Solver(_sp('lr_policy: "fixed" net: "net.prototxt" test_iter: 1 test_interval: 3 '
                   'test_state {} test_state {}'))


@pytest.mark.gpu
def test_golden_on_cuda(tmp_path):
    gold = Golden("adam")
    s = gold.solver(tmp_path, device="cuda")
    s.step(gold.steps)
    assert all(h.device.type == "cuda" for h in s.history)
    got = _params(s)
    for lname, i in gold.param_keys():
        assert _rel_err(got[(lname, i)], gold.param(lname, i, gold.steps)) <= 1e-5
