"""Hostile definitions against the net builder: bounded totals and counts, linear building.

Issue 12, item 1: limits cover what a definition declares *together* (one budget the builder
charges every blob to before allocating it: ``caffe_compat.limits.NetBudget``) and its counts
(layers, list lengths, Caffe's 32 axes: ``caffe_compat.net.check_definition``), all checked
before anything is allocated; and building is linear in the layers, whatever their names,
in-place tops or splits (work is counted in executed lines, not timed).  ``CASES`` join the
table of docs/bad_inputs.md (``tests/make_bad_inputs_doc.py``).
"""
from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import textwrap
from typing import Callable, List

import pytest

from caffe_compat import limits
from caffe_compat.errors import CaffeCompatError, LimitError, ShapeError
from caffe_compat.net import Net
from caffe_compat.protos import caffe_pb2

from conftest import ROOT  # noqa: E402  (the repository root)
from test_errors import Case, check_bad_input, write  # noqa: E402

# ---------------------------------------------------------------------- the case table
_IP5 = 'input: "data" input_shape { dim: 1 dim: 20000 }\n' + "".join(
    f'layer {{ name: "ip{i}" type: "InnerProduct" bottom: "{"data" if i == 1 else f"ip{i - 1}"}" '
    f'top: "ip{i}" inner_product_param {{ num_output: {25000 if i % 2 else 20000} }} }}\n'
    for i in range(1, 6))


def _net(text: str, name: str = "net.prototxt") -> Callable[[pathlib.Path], object]:
    return lambda d: Net(str(write(d, name, text)))


def _with_limit(run: Callable[[pathlib.Path], object], **values: int) -> Callable[[pathlib.Path], object]:
    def go(d: pathlib.Path):
        with limits.raised(**values):
            return run(d)
    return go


def _relus(n: int) -> caffe_pb2.NetParameter:
    """An Input and ``n`` in-place ReLUs, built in code (no text reader in between)."""
    net = caffe_pb2.NetParameter()
    net.layer.add(name="data", type="Input", top=["data"]).input_param.shape.add(dim=[1, 2])
    for i in range(n):
        net.layer.add(name=f"r{i}", type="ReLU", bottom=["data"], top=["data"])
    return net


def _slice(n: int) -> caffe_pb2.NetParameter:
    net = caffe_pb2.NetParameter()
    net.layer.add(name="data", type="Input", top=["data"]).input_param.shape.add(dim=[1, n])
    net.layer.add(name="s", type="Slice", bottom=["data"], top=[f"s{i}" for i in range(n)])
    return net


CASES: List[Case] = [
    Case("net-total-elements", "five InnerProduct layers, each under the blob limit, 10 GB together",
         _net(_IP5), LimitError,
         r"blob 'weight' shape \(25000, 20000\) \(500000000 elements\) brings the net's parameters and "
         r"inputs to 500020000 elements together, over the limit of 268435456 \(raise it with "
         r"CAFFE_COMPAT_MAX_TOTAL_ELEMENTS=N", where=r"net\.prototxt:2$", layer="ip1"),
    Case("dummydata-total", "DummyData tops each under the blob limit, over the net's total together",
         _net('layer { name: "d" type: "DummyData" top: "a" top: "b" dummy_data_param { '
              'shape { dim: 20000 dim: 10000 } data_filler { type: "gaussian" } } }'),
         LimitError, r"top 1 shape \(20000, 10000\) \(200000000 elements\) brings the net's parameters and "
                     r"inputs to 400000000 elements together, over the limit of 268435456", layer="d"),
    Case("axes-33", "input shape with 33 axes (Caffe's kMaxBlobAxes is 32)",
         _net('input: "data" input_shape { ' + "dim: 1 " * 33 + '}\n'
              'layer { name: "r" type: "ReLU" bottom: "data" top: "r" }'),
         ShapeError, r"input_param\.shape\[0\]\.dim has 33 dims; Caffe allows at most 32 axes "
                     r"\(kMaxBlobAxes\)", where=r"net\.prototxt$", layer="input"),
    Case("too-many-layers", "NetParameter built in code with more layers than max_layers (limit "
         "lowered to 3 here; a prototxt is refused while it is read)",
         _with_limit(lambda d: Net(_relus(4)), max_layers=3), LimitError,
         r"the net has 5 layers, over the limit of 3 \(raise it with CAFFE_COMPAT_MAX_LAYERS=N"),
    Case("long-list", "NetParameter built in code with a list longer than max_list_length (5 tops, "
         "limit lowered to 4 here)",
         _with_limit(lambda d: Net(_slice(5)), max_list_length=4), LimitError,
         r"top has 5 values, over the limit of 4 \(raise it with CAFFE_COMPAT_MAX_LIST_LENGTH=N",
         layer="s"),
    Case("long-bottom-name", "a bottom name of 100,000 characters in an error (the message shows 80)",
         _net('input: "data" input_shape { dim: 1 dim: 2 }\n'
              'layer { name: "r" type: "ReLU" bottom: "' + "x" * 100_000 + '" top: "r" }'),
         CaffeCompatError, r"unknown bottom blob 'x{80}\.\.\. \(100000 characters\)'", layer="r"),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, tmp_path):
    check_bad_input(case, tmp_path)


# ---------------------------------------------------------------------- the budget
def _count_fills(monkeypatch) -> List[int]:
    """Element counts of every filler allocation, in order (the budget is charged before)."""
    import caffe_compat.fillers as fillers

    real, seen = fillers.fill, []

    def fill(shape, *a, **k):
        seen.append(limits.element_count(shape))
        return real(shape, *a, **k)

    for mod in list(sys.modules.values()):
        if getattr(mod, "fill", None) is real:
            monkeypatch.setattr(mod, "fill", fill)
    return seen


def test_budget_is_charged_before_each_allocation(monkeypatch):
    """InnerProduct layers under a total of 1000 elements (the input's 10 count too): the
    weight that would cross it is refused before it is filled."""
    fills = _count_fills(monkeypatch)

    def text(outputs) -> str:
        return 'input: "data" input_shape { dim: 1 dim: 10 }\n' + "".join(
            f'layer {{ name: "ip{i}" type: "InnerProduct" bottom: "{"data" if i == 0 else f"ip{i - 1}"}" '
            f'top: "ip{i}" inner_product_param {{ num_output: {n} }} }}\n' for i, n in enumerate(outputs))

    with limits.raised(max_total_elements=1000):
        with pytest.raises(LimitError, match=r"layer 'ip1': blob 'weight' shape \(30, 30\) \(900 elements\) "
                                             r"brings the net's parameters and inputs to 1240 elements"):
            Net(text([30, 30, 30]))
        assert fills == [300, 30]  # ip1's weight was never filled
        fills.clear()
        net = Net(text([30, 10, 10]))  # 10 + 300 + 30 + 300 + 10 + 100 + 10
    assert net._ctx.budget.elements == 760 and fills == [300, 30, 300, 10, 100, 10]


def test_shared_parameters_count_once():
    text = textwrap.dedent("""\
        input: "data" input_shape { dim: 1 dim: 20 }
        layer { name: "a" type: "InnerProduct" bottom: "data" top: "a" param { name: "w" }
          inner_product_param { num_output: 20 bias_term: false } }
        layer { name: "b" type: "InnerProduct" bottom: "a" top: "b" param { name: "w" }
          inner_product_param { num_output: 20 bias_term: false } }
        """)
    with limits.raised(max_total_elements=20 + 400 + 400):  # b's own copy is made, then dropped
        net = Net(text)
    assert net._ctx.budget.elements == 20 + 400
    assert net.layer("a").weight is net.layer("b").weight


def test_corpus_fits_the_default_total():
    """The budget counts a real net's parameters and inputs (CaffeNet: 6.1e7) under the default
    total; every corpus net builds under it (tests/core/test_corpus.py; VGG16's 1.4e8 is the most)."""
    from conftest import CORPUS

    path = CORPUS / "bvlc-caffe" / "models" / "bvlc_reference_caffenet" / "deploy.prototxt"
    if not path.exists():
        pytest.skip(f"shared corpus not found at {CORPUS}")
    net = Net(path)
    assert 6e7 < net._ctx.budget.elements < limits.get("max_total_elements")


# ---------------------------------------------------------------------- linear building
_PROJECT = tuple(str(ROOT / d) + os.sep for d in ("caffe_compat", "layers"))


def _work(fn: Callable[[], object]) -> int:
    """Lines of the project's own code that ``fn()`` executes (sys.settrace): a measure of
    work that does not depend on the machine or its load."""
    count = 0

    def local(frame, event, arg):
        nonlocal count
        if event == "line":
            count += 1
        return local

    def calls(frame, event, arg):
        return local if frame.f_code.co_filename.startswith(_PROJECT) else None

    old = sys.gettrace()
    sys.settrace(calls)
    try:
        fn()
    finally:
        sys.settrace(old)
    return count


def _chain(n: int, variant: str) -> caffe_pb2.NetParameter:
    """A NetParameter of one Input and ``n`` layers (see benchmarks/build_200k.py)."""
    net = caffe_pb2.NetParameter(name=variant)
    width = n if variant == "wide" else 2
    net.layer.add(name="data", type="Input", top=["data"]).input_param.shape.add(dim=[1, width])
    prev = "data"
    if variant == "wide":  # one Slice of n tops, one Concat of n bottoms
        tops = [f"s{i}" for i in range(n)]
        net.layer.add(name="slice", type="Slice", bottom=["data"], top=tops).slice_param.axis = 1
        net.layer.add(name="cat", type="Concat", bottom=tops, top=["cat"])
        return net
    for i in range(n):
        if variant == "duplicate":
            net.layer.add(name="r", type="ReLU", bottom=[prev], top=[f"t{i}"])
            prev = f"t{i}"
        elif variant == "inplace":
            net.layer.add(name=f"r{i}", type="ReLU", bottom=["data"], top=["data"])
        elif variant == "splits":
            net.layer.add(name=f"p{i}", type="Power", bottom=["data"], top=[f"t{i}"])
        elif variant == "params":  # parameters everywhere (and shared names, half of them)
            lp = net.layer.add(name=f"ip{i}", type="InnerProduct", bottom=[prev], top=[f"ip{i}"])
            lp.inner_product_param.num_output = 2
            lp.param.add(name=f"w{i // 2}")
            prev = f"ip{i}"
    return net


@pytest.mark.parametrize("variant", ["duplicate", "inplace", "splits", "params", "wide"])
def test_building_is_linear(variant):
    """Twice the layers (or tops) is about twice the work: a quadratic step (20,000 duplicate
    names took 49 s) makes it about four times."""
    def build(n: int) -> Callable[[], object]:
        param = _chain(n, variant)

        def go():
            net = Net(param)
            net.caffe_steps  # noqa: B018  (Caffe's splits and need-backward too)
        return go

    small, large = _work(build(400)), _work(build(800))
    assert large < 2.25 * small, f"{variant}: {small} lines for 400 layers, {large} for 800"


def test_layer_by_layer_passes_are_linear():
    """Caffe's ForwardFromTo/BackwardFromTo over n layers (what pycaffe runs) look the net's
    steps, device and dtype up once, not once per blob."""
    import torch

    def run(n: int) -> Callable[[], object]:
        param = _chain(n, "duplicate")
        param.force_backward = True
        net = Net(param)
        net.caffe_steps  # noqa: B018  (built outside the count)

        def go():
            net.forward(start=0, data=torch.zeros(1, 2))
            net.backward(**{f"t{n - 1}": torch.ones(1, 2)})
        return go

    small, large = _work(run(400)), _work(run(800))
    assert large < 2.25 * small, f"{small} lines for 400 layers, {large} for 800"


@pytest.mark.slow
def test_20000_duplicate_names_build(tmp_path):
    """The issue's case, in a subprocess under a generous bound (a limit, not a timing)."""
    code = textwrap.dedent("""\
        import sys
        sys.path[:0] = [sys.argv[1]]
        from test_hostile_build import _chain
        from caffe_compat.net import Net
        net = Net(_chain(20000, "duplicate"))
        steps = net.caffe_steps
        names = list(net._modules)
        assert len(set(names)) == len(names) == 20001, len(names)
        assert names[1:4] == ["r", "r_1", "r_2"] and names[-1] == "r_19999", names[-1]
        print("built", len(steps))
        """)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "tests"), str(ROOT)]))
    res = subprocess.run([sys.executable, "-c", code, str(pathlib.Path(__file__).parent)], env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip() == "built 20001"
