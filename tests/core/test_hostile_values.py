"""Hostile files, round 2 (issue 12): every value validated up front, no way to lose a file,
messages that say what happened.

``CASES`` (collected into docs/bad_inputs.md by tests/make_bad_inputs_doc.py) are the bad
values: solver fields Caffe would CHECK or compute as inf/NaN, net inputs that are not
numbers, a blob whose legacy dims and ``shape`` disagree, Python layer classes without
``setup``/``forward``, ``--input-shape`` for no input, outputs that are an input, missing
paths that look like text, a pickle asking for a global.  Below them, the rules that hold
what is accepted: integers and other float types as inputs, one-line prototxt text, Caffe's
legacy-dims rule, every corpus solver, rates past ``max_iter``.
"""
from __future__ import annotations

import os
import pickle
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from caffe_compat.errors import (GraphError, InputError, ParseError, PythonLayerError,
                                 SameFileError, SolverDefinitionError, WeightsError)
from caffe_compat.net import Net
from caffe_compat.solver import Solver
from test_errors import HEAD, SMALL, Case, blob_shape_data, check_bad_input, field, small_caffemodel, varint, write

# ---------------------------------------------------------------------- solvers
#: a train net for the solver cases (the checks run before it is built)
_TRAIN = SMALL + ('layer { name: "label" type: "Input" top: "label" input_param { shape { dim: 2 } } }\n'
                  'layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "label" top: "loss" }\n')


def _solver(body: str):
    """A solver file with ``body`` (its train net beside it), built as ``Solver``."""
    def run(d):
        net = write(d, "train.prototxt", _TRAIN)
        prefix = "" if "snapshot_prefix" in body else f'snapshot_prefix: "{d}/snap"\n'
        return Solver(str(write(d, "solver.prototxt", f'net: "{net}"\n{prefix}{body}\n')))
    return run


def _nul_prefix(d):
    net = write(d, "train.prototxt", _TRAIN)
    text = f'net: "{net}"\nlr_policy: "fixed"\nbase_lr: 0.1\nsnapshot: 10\nsnapshot_prefix: "{d}/sn\\000ap"\n'
    return Solver(str(write(d, "solver.prototxt", text)))


# ---------------------------------------------------------------------- net inputs
def _forward(value):
    return lambda d: Net(SMALL)(data=value)


def _pycaffe_forward(d):
    import caffe_compat.pycaffe as caffe

    net = caffe.Net(str(write(d, "net.prototxt", SMALL)), caffe.TEST)
    return net.forward(data="a path, not pixels")


# ---------------------------------------------------------------------- legacy dims vs shape
def _legacy_and_shape(d):
    """shape says (6,) and holds 6 values, legacy dims say 1x1x2x2: Caffe goes by the legacy."""
    legacy = field(1, 0, varint(1)) + field(2, 0, varint(1)) + field(3, 0, varint(2)) + field(4, 0, varint(2))
    blob = blob_shape_data((6,), [1.0] * 6) + legacy
    lp = field(1, 2, b"conv1") + field(2, 2, b"Convolution") + field(7, 2, blob)
    from caffe_compat import weights as W

    return W.read_caffemodel(str(write(d, "both.caffemodel", field(1, 2, b"small") + field(100, 2, lp))))


# ---------------------------------------------------------------------- Python layers
def _python_class(body: str, mod: str, cls: str = "Half"):
    def run(d):
        write(d, f"{mod}.py", "import caffe\n\n" + textwrap.dedent(body))
        text = HEAD + 'layer { name: "py" type: "Python" bottom: "data" top: "y" ' \
            f'python_param {{ module: "{mod}" layer: "{cls}" }} }}\n'
        try:
            return Net(str(write(d, "py.prototxt", text)), allow_python_layers=True)
        finally:
            sys.modules.pop(mod, None)
            if str(d) in sys.path:
                sys.path.remove(str(d))
    return run


NO_FORWARD = """
    class Half(caffe.Layer):
        def setup(self, bottom, top):
            pass
        def reshape(self, bottom, top):
            top[0].reshape(*bottom[0].data.shape)
"""
NO_SETUP = """
    class Half(object):  # duck-typed, not even a caffe.Layer
        def reshape(self, bottom, top):
            top[0].reshape(*bottom[0].data.shape)
        def forward(self, bottom, top):
            top[0].data[...] = bottom[0].data / 2
"""


# ---------------------------------------------------------------------- outputs that are inputs
def _cli_raise(*args):
    """Run a command with --debug, so its CaffeCompatError comes back as an exception."""
    from caffe_compat.cli.main import main

    r = CliRunner().invoke(main, ["--debug"] + [str(a) for a in args])
    if r.exception is not None:
        raise r.exception
    return r


def _convert_onto_itself(d):
    src = small_caffemodel(d, "x.caffemodel")
    before = src.read_bytes()
    smaller = write(d, "smaller.prototxt", SMALL.split('layer { name: "ip"')[0])
    try:
        return _cli_raise("convert", src, "-o", src, "--model", smaller)
    finally:
        assert src.read_bytes() == before


def _upgrade_onto_hard_link(d):
    src = write(d, "net.prototxt", SMALL)
    os.link(src, d / "same.prototxt")
    return _cli_raise("upgrade-net-text", src, d / "same.prototxt")


def _snapshot_onto_weights(d):
    from caffe_compat.trainer import TrainSolver

    weights = small_caffemodel(d, "run_iter_20.caffemodel")  # an earlier run's snapshot
    net = write(d, "train.prototxt", _TRAIN)
    solver = write(d, "solver.prototxt", f'net: "{net}"\nlr_policy: "fixed"\nbase_lr: 0.01\nmax_iter: 40\n'
                                         f'snapshot: 10\nsnapshot_prefix: "{d}/run"\n')
    return TrainSolver(str(solver), weights=str(weights))


# ---------------------------------------------------------------------- messages
def _evil_system_pt(d):
    class Boom:
        def __reduce__(self):
            return (os.system, (f"touch {d / 'PWNED'}",))

    (d / "evil.pt").write_bytes(pickle.dumps({"ip.weight": Boom()}, protocol=2))
    try:
        return Net(SMALL).load_weights(str(d / "evil.pt"))
    finally:
        assert not (d / "PWNED").exists(), "the pickle ran"


CASES = [
    # --- solver values (SolverDefinitionError: a bad solver file, exit 2)
    Case("solver-test-iter-0", "solver with test_iter: 0 (Caffe divides the test loss by it)",
         _solver('lr_policy: "fixed" base_lr: 0.1 test_iter: 0 test_interval: 10'), SolverDefinitionError,
         r"test_iter must be positive, got test_iter 0 \(entry 0\)"),
    Case("solver-test-iter-count", "solver with more test_iter than test nets (train_net + one test_net)",
         lambda d: Solver(str(write(d, "s.prototxt",
                                    f'train_net: "{write(d, "t.prototxt", _TRAIN)}"\n'
                                    f'test_net: "{d / "t.prototxt"}"\ntest_iter: 5 test_iter: 5 '
                                    'test_interval: 10 lr_policy: "fixed"\n'))),
         SolverDefinitionError, r"test_iter must be given once per test net \(1 test nets, 2 test_iter\)"),
    Case("solver-exp-overflow", "lr_policy exp whose rate overflows before max_iter",
         _solver('lr_policy: "exp" base_lr: 0.01 gamma: 1.5 max_iter: 5000'), SolverDefinitionError,
         r"lr_policy 'exp' gives a learning rate of inf at iteration 5000 \(max_iter\): base_lr \* gamma\^iter "
         r"with base_lr 0.01, gamma 1.5 is not a finite float"),
    Case("solver-poly-negative-power", "lr_policy poly with a negative power (inf at max_iter)",
         _solver('lr_policy: "poly" base_lr: 0.01 power: -0.5 max_iter: 100'), SolverDefinitionError,
         r"lr_policy 'poly' gives a learning rate of inf at iteration 100 \(max_iter\)"),
    Case("solver-inv-overflow", "lr_policy inv with a negative power that overflows",
         _solver('lr_policy: "inv" base_lr: 1e30 gamma: 1e30 power: -2 max_iter: 10'), SolverDefinitionError,
         r"lr_policy 'inv' gives a learning rate of inf at iteration 10"),
    Case("solver-step-stepsize-0", "lr_policy step with stepsize 0 (Caffe divides by it)",
         _solver('lr_policy: "step" base_lr: 0.01 gamma: 0.1 stepsize: 0'), SolverDefinitionError,
         r"lr_policy 'step' needs a positive stepsize \(got 0\)"),
    Case("solver-step-negative-gamma", "lr_policy step with a negative gamma (Caffe CHECKs gamma >= 0)",
         _solver('lr_policy: "step" base_lr: 0.01 gamma: -0.1 stepsize: 10'), SolverDefinitionError,
         r"lr_policy 'step' needs gamma >= 0"),
    Case("solver-multistep-unsorted", "lr_policy multistep with decreasing stepvalues",
         _solver('lr_policy: "multistep" base_lr: 0.01 gamma: 0.1 stepvalue: 200 stepvalue: 100'),
         SolverDefinitionError, r"needs stepvalue entries in increasing order, got stepvalue 200 then 100"),
    Case("solver-nan", "solver with base_lr: nan",
         _solver('lr_policy: "fixed" base_lr: nan'), SolverDefinitionError, r"base_lr must be a finite number, got nan"),
    Case("solver-inf-momentum", "solver with momentum: inf",
         _solver('lr_policy: "fixed" base_lr: 0.1 momentum: inf'), SolverDefinitionError,
         r"momentum must be a finite number, got inf"),
    Case("solver-negative-max-iter", "solver with a negative max_iter",
         _solver('lr_policy: "fixed" base_lr: 0.1 max_iter: -5'), SolverDefinitionError,
         r"max_iter must not be negative, got -5"),
    Case("solver-negative-display", "solver with a negative display interval",
         _solver('lr_policy: "fixed" base_lr: 0.1 display: -1'), SolverDefinitionError,
         r"display must not be negative, got -1"),
    Case("solver-nul-prefix", "snapshot_prefix with a NUL byte",
         _nul_prefix, SolverDefinitionError, r"snapshot_prefix contains a NUL byte \(at character \d+\)"),
    Case("solver-prefix-under-a-file", "snapshot_prefix inside a regular file (a folder that cannot exist)",
         lambda d: _solver(f'lr_policy: "fixed" base_lr: 0.1 snapshot: 10\n'
                           f'snapshot_prefix: "{write(d, "notes.txt", "x")}/snap"')(d),
         SolverDefinitionError, r"cannot write to snapshot prefix '.*notes\.txt/snap': make sure the directory "
                                r".*notes\.txt exists and is writable"),
    Case("solver-adam-momentum-1", "Adam with momentum 1 (its bias correction divides by 0)",
         _solver('type: "Adam" lr_policy: "fixed" base_lr: 0.1 momentum: 1'), SolverDefinitionError,
         r"momentum should lie in \[0, 1\) for Adam, got momentum 1"),
    Case("solver-adagrad-delta-0", "AdaGrad with delta 0 (0/0 for a zero gradient)",
         _solver('type: "AdaGrad" lr_policy: "fixed" base_lr: 0.1 delta: 0'), SolverDefinitionError,
         r"delta must be positive for AdaGrad \(got delta 0\)"),
    Case("solver-unknown-type", "unknown solver type (a long misspelling)",
         _solver('type: "' + "Adamm" * 40 + '" lr_policy: "fixed"'), SolverDefinitionError,
         r"unknown solver type 'AdammAdamm.*\.\.\. \(200 characters\)' \(types are case-sensitive; known: SGD, "),
    # --- net inputs (InputError)
    Case("input-string", "a string given as a net input", _forward("cat.jpg"), InputError,
         r"input 'data' is not numeric data \(expected numbers a float blob holds.*got a str of 7 characters\)"),
    Case("input-none", "None given as a net input", _forward(None), InputError,
         r"input 'data' is not numeric data .*got None\)"),
    Case("input-complex", "a complex array given as a net input",
         _forward(np.ones((2, 3, 6, 6), np.complex64)), InputError,
         r"input 'data' holds complex numbers \(a blob has no imaginary part\)"),
    Case("input-object", "an object array given as a net input",
         _forward(np.array([[object()]], dtype=object)), InputError, r"input 'data' holds Python objects"),
    Case("input-ragged", "a ragged nested list given as a net input", _forward([[1.0, 2.0], [3.0]]), InputError,
         r"input 'data' does not convert to an array"),
    Case("input-big-int", "int64 values a float32 blob would round", _forward(torch.full((2, 3, 6, 6), 2 ** 40)),
         InputError, r"holds the integer 1099511627776, which a float32 blob cannot hold exactly"),
    Case("pycaffe-input-string", "pycaffe net.forward(data=<str>)", _pycaffe_forward, InputError,
         r"input 'data' is not numeric data"),
    # --- blob shapes
    Case("legacy-dims-win", "blob with shape (6,) and legacy dims 1x1x2x2: the legacy dims decide, as in Caffe",
         _legacy_and_shape, WeightsError, r"blob declares shape \(1, 1, 2, 2\) but holds 6 values",
         layer="conv1", blob=0),
    # --- Python layers
    Case("python-no-forward", "Python layer class without forward", _python_class(NO_FORWARD, "cc_hostile_no_forward"),
         PythonLayerError, r"Python layer class 'cc_hostile_no_forward\.Half' does not define forward", layer="py"),
    Case("python-no-setup", "duck-typed Python layer class without setup", _python_class(NO_SETUP, "cc_hostile_no_setup"),
         PythonLayerError, r"does not define setup \(Caffe calls setup\(bottom, top\) once", layer="py"),
    # --- input shapes
    Case("input-shape-unknown", "--input-shape naming no input of the net",
         lambda d: Net(str(write(d, "net.prototxt", SMALL)), input_shapes={"image": (1, 3, 6, 6)}),
         GraphError, r"input shape given for 'image', which is not an input of this net; its inputs are: data",
         where=r"net\.prototxt$"),
    # --- outputs that are inputs (SameFileError)
    Case("convert-onto-input", "convert x.caffemodel -o x.caffemodel --model smaller.prototxt",
         _convert_onto_itself, SameFileError,
         r"refusing to write --output: it is the same file as the input SRC .*x\.caffemodel, which writing "
         r"would replace", where=r"x\.caffemodel$"),
    Case("upgrade-onto-hard-link", "upgrade-net-text onto a hard link of its input",
         _upgrade_onto_hard_link, SameFileError, r"same file as the input IN .*net\.prototxt \(a hard link to it\)"),
    Case("snapshot-onto-weights", "train --weights run_iter_20.caffemodel with snapshots run_iter_N",
         _snapshot_onto_weights, SameFileError,
         r"the snapshot of iteration 20 would replace the input weights .*run_iter_20\.caffemodel"),
    # --- messages
    Case("missing-colon-path", "missing prototxt path with ':' in its name",
         lambda d: Net(str(d / "models/a:b.prototxt")), ParseError,
         r"cannot read net prototxt: No such file or directory", where=r"a:b\.prototxt$"),
    Case("missing-brace-path", "missing prototxt path with '{' in its name",
         lambda d: Net(str(d / "x{1}.prototxt")), ParseError, r"cannot read net prototxt: No such file or directory"),
    Case("pickle-system", "pickle calling os.system in a .pt (never executed)", _evil_system_pt, ParseError,
         r"the pickle asks for the Python global '\w+\.system', which was blocked \(nothing ran\)$"),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, tmp_path):
    e = check_bad_input(case, tmp_path)
    assert "weights_only" not in str(e) and "trusted source" not in str(e)


# ---------------------------------------------------------------------- what stays accepted
def test_corpus_solvers_pass_the_value_checks(corpus):
    from caffe_compat.io import read_solver_text
    from caffe_compat.solver.solver import check_solver_values
    from caffe_compat.solver.update_rules import update_rule_class

    paths = [p for p in corpus.rglob("*solver*") if p.is_file() and p.suffix in (".prototxt", ".pt")]
    assert len(paths) >= 40
    for p in paths:
        sp = read_solver_text(str(p))
        check_solver_values(sp)
        update_rule_class(sp.type or "SGD")(sp)


def test_rates_past_max_iter_never_raise():
    """pycaffe may step past max_iter: a rate overflowing there is inf (as C's pow), not a crash."""
    from caffe_compat.protos import caffe_pb2
    from caffe_compat.solver.lr_policy import learning_rate

    p = caffe_pb2.SolverParameter(lr_policy="exp", base_lr=0.01, gamma=2.0, max_iter=10)
    assert learning_rate(p, 10)[0] == pytest.approx(0.01 * 2 ** 10)
    assert learning_rate(p, 100000)[0] == float("inf")
    p = caffe_pb2.SolverParameter(lr_policy="multistep", base_lr=1.0, gamma=0.5, max_iter=10)
    p.stepvalue.extend([3, 3, 5])  # equal values step on consecutive iterations, as in Caffe
    from caffe_compat.solver.lr_policy import check_lr_policy

    check_lr_policy(p)
    p = caffe_pb2.SolverParameter(lr_policy="sigmoid", base_lr=1.0, gamma=-1.0, stepsize=2, max_iter=10)
    check_lr_policy(p)  # a negative sigmoid gamma (a warm-up) is Caffe 1.0's and finite


def test_numeric_inputs_convert_without_loss():
    net = Net(SMALL, seed=1)
    x = np.random.RandomState(0).randint(0, 255, (2, 3, 6, 6))
    want = net(data=torch.from_numpy(x).float())["prob"]
    for v in (x, torch.from_numpy(x), x.astype(np.uint8), x.astype(np.float64), x.astype(np.float16),
              torch.from_numpy(x).double(), x.tolist()):
        got = net(data=v)["prob"]
        assert got.dtype == torch.float32 and torch.allclose(got, want), type(v)
    assert net(data=np.ones((2, 3, 6, 6), bool))["prob"].shape == (2, 3)
    # a float64 tensor is cast differentiably: its gradient still arrives
    leaf = torch.from_numpy(x).double().requires_grad_(True)
    net(data=leaf)["prob"][:, 0].sum().backward()
    assert leaf.grad is not None and leaf.grad.dtype == torch.float64
    # a float tensor of the net's type is used as it is
    t = torch.ones(2, 3, 6, 6)
    net(data=t)
    assert net.blobs["data"] is t
    # the largest integers float32 holds exactly pass
    net(data=torch.full((2, 3, 6, 6), 2 ** 24))


def test_one_line_prototxt_text_and_missing_paths():
    from caffe_compat.io import _looks_like_text

    text = ['name: "a"', 'input: "data" input_dim: 2', "base_lr: 0.01", 'layer { name: "x" }', "a\nb",
            'name: "x"  # see a.prototxt', "# a comment"]
    paths = ["models/a:b.prototxt", "x{1}.prototxt", "models/a:b", "nope.caffemodel", "http://host/n.prototxt",
             "C:\\models\\n", ""]
    assert [s for s in text if not _looks_like_text(s)] == []
    assert [s for s in paths if _looks_like_text(s)] == []
    assert Net('input: "data" input_shape { dim: 1 dim: 2 }').input_names == ["data"]


def test_legacy_dims_decide_when_both_are_given(tmp_path):
    """Caffe's Blob::FromProto: num/channels/height/width, when present, win over ``shape``."""
    from caffe_compat import weights as W
    from caffe_compat.io import blob_shape, blob_to_array
    from caffe_compat.protos import caffe_pb2

    b = caffe_pb2.BlobProto(num=1, channels=1, height=2, width=3)
    b.shape.dim.extend([3, 2])
    b.data.extend(range(6))
    assert blob_shape(b) == (1, 1, 2, 3) and blob_to_array(b).shape == (1, 1, 2, 3)
    b = caffe_pb2.BlobProto(width=4)  # the unset legacy dims are 0, as in Caffe
    assert blob_shape(b) == (0, 0, 0, 4)
    legacy = field(1, 0, varint(1)) + field(2, 0, varint(1)) + field(3, 0, varint(2)) + field(4, 0, varint(3))
    lp = field(1, 2, b"conv1") + field(2, 2, b"Convolution") + field(7, 2, blob_shape_data((3, 2), range(6)) + legacy)
    _, layers = W.read_caffemodel(str(write(tmp_path, "m.caffemodel", field(100, 2, lp))))
    blob = layers[0].blobs[0]
    assert blob.shape == (1, 1, 2, 3) and blob.legacy and blob.data.shape == (1, 1, 2, 3)


def test_input_shape_option_is_checked():
    from caffe_compat.cli.options import parse_input_shapes
    from caffe_compat.errors import SchemaError

    assert parse_input_shapes(["data=1,3,4,4", " im_info = 1,3"]) == {"data": (1, 3, 4, 4), "im_info": (1, 3)}
    for bad, msg in (("data", "expected NAME=D1"), ("=1,2", "expected NAME=D1"), ("data=1,x", "expected NAME"),
                     ("data=1,-2", "must not be negative")):
        with pytest.raises(SchemaError, match=msg):
            parse_input_shapes([bad])
    with pytest.raises(SchemaError, match="gives 'data' twice"):
        parse_input_shapes(["data=1", "data=2"])


def test_pickle_refusals_never_advise_turning_the_safety_off(tmp_path):
    from caffe_compat.weights.state_dict import read_pt

    for obj in ({"w": np.zeros(2)}, {"w": print}, {"w": os.getcwd}):
        for raw in (True, False):  # a bare pickle, and torch.save's zip
            if raw:
                (tmp_path / "x.pt").write_bytes(pickle.dumps(obj, protocol=2))
            else:
                torch.save(obj, str(tmp_path / "x.pt"))
            with pytest.raises(ParseError) as ei:
                read_pt(str(tmp_path / "x.pt"))
            msg = str(ei.value)
            assert "Python global '" in msg and "weights_only" not in msg and "\x1b" not in msg, msg


def test_solver_definition_errors_exit_2_on_the_command_line(tmp_path):
    net = write(tmp_path, "train.prototxt", _TRAIN)
    solver = write(tmp_path, "solver.prototxt", f'net: "{net}"\nlr_policy: "fixed"\nbase_lr: 0.1\ntest_iter: 0\n'
                                                'test_interval: 5\nmax_iter: 1\n')
    p = subprocess.run([sys.executable, "-m", "caffe_compat.cli", "train", "--solver", str(solver),
                        "--output", str(tmp_path / "out"), "--no-progress"],
                       capture_output=True, text=True, timeout=120, cwd=str(tmp_path))
    assert p.returncode == 2, p.stderr
    assert p.stderr.strip().splitlines()[-1].startswith("error: test_iter must be positive")


def test_input_shape_for_no_input_on_the_command_line(tmp_path):
    from caffe_compat.cli.main import main

    net = write(tmp_path, "net.prototxt", SMALL)
    r = CliRunner().invoke(main, ["inspect", str(net), "--input-shape", "image=1,3,6,6"])
    assert r.exit_code == 2
    assert r.stderr.strip() == (f"error: {net}: input shape given for 'image', which is not an input of this "
                                "net; its inputs are: data")
    r = CliRunner().invoke(main, ["inspect", str(net), "--input-shape", "data=1,3,8,8"])
    assert r.exit_code == 0, r.output
