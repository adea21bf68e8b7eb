"""Fuzzing the readers and the net builder: nothing escapes but CaffeCompatError.

Four targets, each fed mutated versions of small valid inputs (byte flips, deletions,
duplications, insertions of syntax tokens, numbers replaced by edge values, blob names
swapped, lines duplicated or dropped):

- the text parser (``read_net_text``: decode, parse, upgrade) on mutated prototxts,
- the binary loader (``read_caffemodel``, ``caffemodel_state_dict``, loading into a net)
  on mutated small caffemodels (current and V1 formats),
- the net builder (``Net``) on mutated small prototxts, plus one forward pass when the
  result is small,
- Caffe's HDF5 formats (``.caffemodel.h5`` loaded into a net, ``.solverstate.h5`` read) on
  mutated small files (h5py raises many kinds of errors on damaged files: all must become
  one clear error).

Each example runs under a hard timeout (SIGALRM: no hang), its address space is capped and
filler allocations are capped far below ``caffe_compat.limits`` (bounded memory and time: a
mutated ``num_output`` must not eat the machine).  An input that makes the builder or a
layer raise something else is a bug: reproduce it exactly in ``KNOWN_BUGS`` (an xfail,
strict, test; the fuzzer then tolerates its signature and keeps finding new ones).  None
is known today.

Bounded by default (a few hundred examples per target, well under a minute in all);
``CAFFE_COMPAT_FUZZ_EXAMPLES=5000`` runs longer.  Deterministic (``derandomize``).
"""
from __future__ import annotations

import contextlib
import os
import re
import resource
import signal
import textwrap
from typing import List

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from caffe_compat import limits
from caffe_compat import weights as W
from caffe_compat.errors import CaffeCompatError
from caffe_compat.io import read_net_text
from caffe_compat.net import Net
from caffe_compat.protos import caffe_pb2

EXAMPLES = int(os.environ.get("CAFFE_COMPAT_FUZZ_EXAMPLES", "300"))
TIMEOUT_S = 20           # one example taking longer than this is a hang
ALLOC_LIMIT = 5 * 10 ** 6  # elements a fuzzed layer may ask a filler for
FORWARD_LIMIT = 200_000  # run forward only when all blobs together are this small
MEMORY_CAP = 2 << 30     # address space one example may add (bytes)

FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.filter_too_much])

# ---------------------------------------------------------------------- seeds
NETS = [textwrap.dedent(t) for t in (
    """\
    name: "a"
    input: "data" input_shape { dim: 2 dim: 3 dim: 6 dim: 6 }
    input: "label" input_shape { dim: 2 }
    layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
      convolution_param { num_output: 4 kernel_size: 3 pad: 1 stride: 1 weight_filler { type: "xavier" } } }
    layer { name: "bn1" type: "BatchNorm" bottom: "conv1" top: "conv1" }
    layer { name: "sc1" type: "Scale" bottom: "conv1" top: "conv1" scale_param { bias_term: true } }
    layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
    layer { name: "pool1" type: "Pooling" bottom: "conv1" top: "pool1"
      pooling_param { pool: MAX kernel_size: 3 stride: 2 } }
    layer { name: "ip1" type: "InnerProduct" bottom: "pool1" top: "ip1"
      inner_product_param { num_output: 5 weight_filler { type: "gaussian" std: 0.1 } } }
    layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip1" bottom: "label" top: "loss" }
    """,
    """\
    name: "b"
    input: "data" input_shape { dim: 2 dim: 4 dim: 5 dim: 5 }
    layer { name: "split" type: "Slice" bottom: "data" top: "s1" top: "s2" slice_param { axis: 1 slice_point: 2 } }
    layer { name: "e" type: "Eltwise" bottom: "s1" bottom: "s2" top: "e" eltwise_param { operation: SUM coeff: 1 coeff: -1 } }
    layer { name: "cat" type: "Concat" bottom: "e" bottom: "s1" top: "cat" concat_param { axis: 1 } }
    layer { name: "lrn" type: "LRN" bottom: "cat" top: "lrn" lrn_param { local_size: 3 alpha: 0.1 beta: 0.75 } }
    layer { name: "dc" type: "Deconvolution" bottom: "lrn" top: "dc"
      convolution_param { num_output: 2 kernel_size: 2 stride: 2 group: 2 } }
    layer { name: "crop" type: "Crop" bottom: "dc" bottom: "data" top: "crop" crop_param { axis: 2 offset: 1 } }
    layer { name: "flat" type: "Flatten" bottom: "crop" top: "flat" }
    layer { name: "red" type: "Reduction" bottom: "flat" top: "red" reduction_param { operation: SUMSQ axis: 1 } }
    """,
    """\
    name: "c"
    layer { name: "d" type: "DummyData" top: "x" top: "y"
      dummy_data_param { shape { dim: 2 dim: 3 dim: 4 } shape { dim: 2 dim: 3 dim: 4 }
        data_filler { type: "gaussian" std: 1 } } }
    layer { name: "r" type: "Reshape" bottom: "x" top: "r" reshape_param { shape { dim: 0 dim: -1 } } }
    layer { name: "t" type: "Tile" bottom: "r" top: "t" tile_param { axis: 1 tiles: 2 } }
    layer { name: "am" type: "ArgMax" bottom: "t" top: "am" argmax_param { top_k: 2 axis: 1 } }
    layer { name: "p" type: "Power" bottom: "y" top: "p" power_param { power: 2 scale: 0.5 shift: 1 } }
    layer { name: "mvn" type: "MVN" bottom: "p" top: "mvn" }
    layer { name: "prelu" type: "PReLU" bottom: "mvn" top: "prelu" }
    layer { name: "sm" type: "Softmax" bottom: "prelu" top: "sm" softmax_param { axis: 2 } }
    layer { name: "eu" type: "EuclideanLoss" bottom: "sm" bottom: "y" top: "eu" }
    """,
    """\
    name: "d"
    input: "data" input_shape { dim: 3 dim: 4 }
    input: "ids" input_shape { dim: 3 }
    layer { name: "emb" type: "Embed" bottom: "ids" top: "emb" embed_param { num_output: 4 input_dim: 5 } }
    layer { name: "ip" type: "InnerProduct" bottom: "data" top: "ip" param { name: "w" }
      inner_product_param { num_output: 4 } }
    layer { name: "ip2" type: "InnerProduct" bottom: "ip" top: "ip2" param { name: "w" }
      inner_product_param { num_output: 4 } }
    layer { name: "bias" type: "Bias" bottom: "ip2" top: "bias" }
    layer { name: "sig" type: "Sigmoid" bottom: "bias" top: "sig" }
    layer { name: "th" type: "Threshold" bottom: "emb" top: "th" threshold_param { threshold: 0.1 } }
    layer { name: "elu" type: "ELU" bottom: "th" top: "elu" }
    layer { name: "sce" type: "SigmoidCrossEntropyLoss" bottom: "sig" bottom: "elu" top: "sce" loss_weight: 2 }
    layer { name: "drop" type: "Dropout" bottom: "ip" top: "drop" include { phase: TRAIN } }
    """,
    """\
    name: "v1"
    input: "data"
    input_dim: 1 input_dim: 2 input_dim: 5 input_dim: 5
    layers { name: "conv" type: CONVOLUTION bottom: "data" top: "conv"
      blobs_lr: 1 blobs_lr: 2 weight_decay: 1 weight_decay: 0
      convolution_param { num_output: 3 kernel_size: 2 } }
    layers { name: "relu" type: RELU bottom: "conv" top: "conv" }
    layers { name: "pool" type: POOLING bottom: "conv" top: "pool" pooling_param { pool: AVE kernel_size: 2 } }
    layers { name: "spp" type: SPLIT bottom: "pool" top: "p1" top: "p2" }
    layers { name: "tanh" type: TANH bottom: "p1" top: "tanh" }
    """,
)]

TEXT_TOKENS = [b"{", b"}", b":", b'"', b"\\", b"#", b"<", b">", b"[", b"]", b"layer {", b"layers {",
               b'bottom: "data"', b'top: "x"', b"-1", b"0", b"4294967296", b"9" * 30, b"1e39", b"nan",
               b"-inf", b"\xff", b"\x00", b"\xe2\x82", b"\\u12", b"\\x", b"MAX", b"TRAIN", b"dim: 0",
               b"input_dim: 1", b'type: "Python"', b'type: "Nope"', b"\n", b"  ", b";", b",",
               b"num_output: 7", b"kernel_size: 0", b"axis: -9", b"include { phase: TEST }",
               b"param { name: \"w\" }", b"loss_weight: 1", b"propagate_down: false"]
INTS = ["0", "1", "2", "3", "-1", "-2", "7", "100", "65536", "2147483647"]
FLOATS = ["0", "-1", "0.5", "1", "2", "1e-30", "1e30", "-1e30", "nan", "inf", "-inf"]
BOTTOMLESS = ["Input", "DummyData", "Parameter"]


def _field_value(fd, arg: int) -> str:
    """An edge value of the right type for field ``fd`` (so the text still parses)."""
    from google.protobuf.descriptor import FieldDescriptor as FD

    if fd.type == FD.TYPE_ENUM:
        return fd.enum_type.values[arg % len(fd.enum_type.values)].name
    if fd.type == FD.TYPE_BOOL:
        return ["true", "false"][arg % 2]
    if fd.type in (FD.TYPE_FLOAT, FD.TYPE_DOUBLE):
        return FLOATS[arg % len(FLOATS)]
    if fd.type == FD.TYPE_STRING:
        return ['""', '"data"', '"x"', '"/nonexistent"'][arg % 4]
    if fd.type == FD.TYPE_MESSAGE:
        if fd.message_type.name == "BlobShape":
            return "{ " + " ".join(f"dim: {INTS[(arg >> (3 * i)) % len(INTS)]}" for i in range(1 + arg % 4)) + " }"
        if fd.message_type.name == "FillerParameter":
            return '{ type: "%s" }' % ["constant", "gaussian", "xavier", "msra", "bilinear", "uniform",
                                       "positive_unitball"][arg % 7]
        return "{ }"
    vals = [v for v in INTS if not (v.startswith("-") and fd.type in (FD.TYPE_UINT32, FD.TYPE_UINT64))]
    return vals[arg % len(vals)]


def _insert_field(text: str, pos: int, arg: int) -> str:
    """Add a random field of the right message, with an edge value, to some ``*_param {``."""
    spots = [(m.end(), m.group(1)) for m in re.finditer(r"(\w+_param) \{", text)]
    if not spots:
        return text
    at, pname = spots[pos % len(spots)]
    fd = caffe_pb2.LayerParameter.DESCRIPTOR.fields_by_name.get(pname) or \
        caffe_pb2.V1LayerParameter.DESCRIPTOR.fields_by_name.get(pname)
    if fd is None or fd.message_type is None:
        return text
    fields = fd.message_type.fields
    block = text[at:text.find("}", at)]
    for k in range(len(fields)):  # skip singular fields the block already sets
        f = fields[(arg + k) % len(fields)]
        if f.is_repeated or not re.search(rf"\b{f.name}\b", block):
            break
    value = _field_value(f, arg // len(fields))
    sep = " " if f.type == f.TYPE_MESSAGE else ": "
    return text[:at] + f" {f.name}{sep}{value}" + text[at:]


def _insert_layer(text: str, pos: int, arg: int) -> str:
    from caffe_compat.layers.registry import registered_types

    types = [t for t in registered_types() if t != "Python"]
    blobs = sorted(set(re.findall(r'top: "([^"]+)"', text)) | set(re.findall(r'input: "([^"]+)"', text)))
    if not blobs:
        return text
    t = types[arg % len(types)]
    from caffe_compat.layers.registry import lookup

    cls = lookup(t)
    if t in BOTTOMLESS:
        n_bottom = 0
    elif (arg // len(types)) % 4 == 0:  # now and then a count the layer may refuse
        n_bottom = 1 + (arg // 7) % 3
    else:
        n_bottom = cls.exact_bottoms if cls.exact_bottoms is not None else (cls.min_bottoms or 1)
    bottoms = " ".join(f'bottom: "{blobs[(pos + 7 * i) % len(blobs)]}"' for i in range(n_bottom))
    n_top = cls.exact_tops if cls.exact_tops is not None else (cls.min_tops or 1)
    tops = " ".join(f'top: "z{pos % 1000}_{i}"' for i in range(n_top))
    pname = _PARAM_OF.get(t)
    params = f" {pname} {{ }}" if pname else ""
    layer = f'layer {{ name: "z{pos % 1000}" type: "{t}" {bottoms} {tops}{params} }}\n'
    return text + layer


def _param_of(type_name: str):
    """The LayerParameter field holding ``type_name``'s parameters (by Caffe's naming)."""
    special = {"Deconvolution": "convolution_param", "ROIPooling": "roi_pooling_param",
               "SoftmaxWithLoss": "loss_param"}
    if type_name in special:
        return special[type_name]
    snake = re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", type_name).lower()
    for cand in (snake + "_param", snake.replace("_", "") + "_param"):
        if cand in caffe_pb2.LayerParameter.DESCRIPTOR.fields_by_name:
            return cand
    return None


_PARAM_OF = {t: _param_of(t) for t in (
    "ArgMax", "BatchNorm", "Bias", "Clip", "Concat", "ContrastiveLoss", "Convolution", "Crop",
    "Deconvolution", "Dropout", "DummyData", "ELU", "Eltwise", "Embed", "Exp", "Flatten", "HingeLoss",
    "InfogainLoss", "InnerProduct", "Input", "LRN", "Log", "MVN", "PReLU", "Parameter", "Pooling", "Power",
    "ROIPooling", "ReLU", "Reduction", "Reshape", "SPP", "Scale", "Sigmoid", "Slice", "Softmax",
    "SoftmaxWithLoss", "Swish", "TanH", "Threshold", "Tile", "SmoothL1Loss", "Accuracy")}


NUMBERS = [b"0", b"1", b"-1", b"2", b"3", b"7", b"-7", b"1000", b"100000", b"2147483647", b"0.5", b"-0.0"]


def mutate_bytes(data: bytes, ops, tokens=TEXT_TOKENS) -> bytes:
    """Apply byte-level mutations (positions wrap around the current length)."""
    b = bytearray(data)
    for op, pos, arg in ops:
        p = pos % (len(b) + 1)
        if op == "flip" and b:
            p %= len(b)
            b[p] ^= (arg % 255) + 1
        elif op == "del":
            del b[p:p + 1 + arg % 32]
        elif op == "dup":
            b[p:p] = b[p:p + 1 + arg % 64]
        elif op == "ins":
            b[p:p] = tokens[arg % len(tokens)]
        elif op == "set" and b:
            b[p % len(b)] = arg % 256
    return bytes(b)


def mutate_text(text: str, ops) -> str:
    """Structure-aware mutations: numbers, names, lines (keeps most outputs parseable)."""
    numbers = [m.span() for m in re.finditer(r"(?<![\w.])-?\d+(\.\d+)?(?![\w.])", text)]
    names = [m.span(1) for m in re.finditer(r'(?:bottom|top): ("[^"\n]*")', text)]
    for op, pos, arg in ops:
        lines = text.split("\n")
        if op == "num" and numbers:
            a, b = numbers[pos % len(numbers)]
            text = text[:a] + NUMBERS[arg % len(NUMBERS)].decode() + text[b:]
        elif op == "name" and names:
            a, b = names[pos % len(names)]
            c, d = names[arg % len(names)]
            text = text[:a] + text[c:d] + text[b:]
        elif op == "dupline":
            i = pos % len(lines)
            lines.insert(i, lines[arg % len(lines)])
            text = "\n".join(lines)
        elif op == "delline" and len(lines) > 1:
            del lines[pos % len(lines)]
            text = "\n".join(lines)
        elif op == "field":
            text = _insert_field(text, pos, arg)
        elif op == "layer":
            text = _insert_layer(text, pos, arg)
        numbers = [m.span() for m in re.finditer(r"(?<![\w.])-?\d+(\.\d+)?(?![\w.])", text)]
        names = [m.span(1) for m in re.finditer(r'(?:bottom|top): ("[^"\n]*")', text)]
    return text


byte_ops = st.lists(st.tuples(st.sampled_from(["flip", "del", "dup", "ins", "set"]),
                              st.integers(0, 1 << 16), st.integers(0, 1 << 16)), min_size=1, max_size=6)
TEXT_OPS = ["num", "num", "name", "dupline", "delline", "field", "field", "field", "layer", "layer", "layer"]
text_ops = st.lists(st.tuples(st.sampled_from(TEXT_OPS),
                              st.integers(0, 1 << 16), st.integers(0, 1 << 16)), min_size=1, max_size=4)


# ---------------------------------------------------------------------- guards
class Hang(Exception):
    """An example that ran past TIMEOUT_S."""


class TooBig(Exception):
    """A filler asked for more than ALLOC_LIMIT elements: within caffe_compat.limits (2^31),
    but too much to allocate while fuzzing."""


@contextlib.contextmanager
def hard_timeout(seconds: int):
    def on_alarm(signum, frame):
        raise Hang(f"example ran past {seconds} s")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


@contextlib.contextmanager
def capped_fillers():
    """Fillers refuse more than ALLOC_LIMIT elements while fuzzing (a speed and memory guard:
    the builder's own check is caffe_compat.limits' max_blob_elements)."""
    import sys

    import caffe_compat.fillers as fillers

    real = fillers.fill

    def fill(shape, *a, **k):
        n = limits.element_count(shape)
        if n > ALLOC_LIMIT:
            raise TooBig(f"filler asked for {n} elements ({tuple(shape)})")
        return real(shape, *a, **k)

    users = [m for m in list(sys.modules.values()) if getattr(m, "fill", None) is real]
    for m in users:
        m.fill = fill
    try:
        yield
    finally:
        for m in users:
            m.fill = real


def _vm_size() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    raise OSError("no VmSize")


@contextlib.contextmanager
def memory_cap(extra_bytes: int = MEMORY_CAP):
    """Cap the address space at its current size + ``extra_bytes`` (bounded memory: an
    allocation past it fails at once instead of swapping the machine to death)."""
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_AS)
        cap = _vm_size() + extra_bytes
        if hard != resource.RLIM_INFINITY:
            cap = min(cap, hard)
        resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    except (OSError, ValueError, AttributeError):  # no /proc or no rlimits: run uncapped
        yield
        return
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


@contextlib.contextmanager
def guarded():
    with hard_timeout(TIMEOUT_S), capped_fillers(), memory_cap():
        yield


def signature(exc: BaseException) -> str:
    """'ExcType@file:function' of the innermost project frame (how known bugs are matched)."""
    import traceback

    where = "?"
    for fr in traceback.extract_tb(exc.__traceback__):
        path = fr.filename.replace(os.sep, "/")
        if ("/caffe_compat/" in path or "/layers/" in path) and "/tests/" not in path:
            where = f"{os.path.basename(path)}:{fr.name}"
    return f"{type(exc).__name__}@{where}"


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


_RSS_AT_START: List[float] = []


def test_fuzz_memory_baseline():
    _RSS_AT_START.append(peak_rss_mb())


# ---------------------------------------------------------------------- known bugs
#: (id, exact prototxt, signature prefix it fails with today, reason).  Each is an
#: xfail(strict=True) test below; the fuzzer tolerates failures with these signatures, so
#: it keeps looking for new ones.  Fixed?  Delete the entry (its test then XPASSes).
#: Empty today (every bug the fuzzer found is fixed).
KNOWN_BUGS: List[tuple] = [
]
#: plus any filler asked for more than ALLOC_LIMIT elements (legal, see TooBig, but not
#: worth allocating here)
KNOWN_SIGNATURES = [b[2] for b in KNOWN_BUGS] + ["TooBig@"]


def _known(exc: BaseException) -> bool:
    sig = signature(exc)
    return any(sig.startswith(k) for k in KNOWN_SIGNATURES)


if KNOWN_BUGS:  # an empty parameter set would show up as a skip
    @pytest.mark.parametrize("bug", [pytest.param(b, marks=pytest.mark.xfail(strict=True, reason=b[3]))
                                     for b in KNOWN_BUGS], ids=[b[0] for b in KNOWN_BUGS])
    def test_known_bug(bug):
        """Must raise nothing or only CaffeCompatError once fixed (then drop it from KNOWN_BUGS)."""
        _, text, sig, _ = bug
        try:
            with guarded():
                _build_and_run(text)
        except CaffeCompatError:
            pass


# ---------------------------------------------------------------------- targets
def _build_and_run(text: str) -> None:
    """Build a net from ``text``; run forward (and backward) when it is small enough."""
    net = Net(text, seed=0)
    shapes = [s for s in net.blob_shapes.values()]
    if any(s is None for s in shapes) or sum(limits.element_count(s) for s in shapes) > FORWARD_LIMIT:
        return
    g = torch.Generator().manual_seed(0)
    inputs = {}
    for name in net.input_names:
        shape = net.blob_shapes[name]
        if "label" in name or name == "ids":
            inputs[name] = torch.randint(0, 3, shape, generator=g).float()
        else:
            inputs[name] = torch.randn(shape, generator=g)
    net(**inputs)
    if net.loss is not None and net.loss.requires_grad:
        net.backward()


def _expect_only_caffe_errors(fn, *args):
    try:
        with guarded():
            fn(*args)
    except CaffeCompatError:
        pass
    except Exception as e:
        if isinstance(e, Hang) or not _known(e):
            raise


SEED_BYTES = [t.encode() for t in NETS]


@FUZZ
@given(seed=st.integers(0, len(NETS) - 1), ops=byte_ops)
def test_fuzz_text_parser(tmp_path_factory, seed, ops):
    data = mutate_bytes(SEED_BYTES[seed], ops)
    path = tmp_path_factory.getbasetemp() / "fuzz_text.prototxt"
    path.write_bytes(data)
    _expect_only_caffe_errors(read_net_text, str(path))


@FUZZ
@given(seed=st.integers(0, len(NETS) - 1), ops=text_ops, raw=st.lists(
    st.tuples(st.sampled_from(["del", "dup", "ins"]), st.integers(0, 1 << 16), st.integers(0, 1 << 16)),
    max_size=1))
def test_fuzz_net_builder(seed, ops, raw):
    text = mutate_text(NETS[seed], ops)
    text = mutate_bytes(text.encode(), raw).decode("utf-8", "replace") if raw else text
    with capped_fillers():
        _expect_only_caffe_errors(_build_and_run, text)


def _seed_caffemodels(folder) -> List[bytes]:
    out = []
    net = Net(NETS[0], seed=1)
    net.save_weights(str(folder / "a.caffemodel"))
    out.append((folder / "a.caffemodel").read_bytes())
    msg = caffe_pb2.NetParameter(name="v1")
    lp = msg.layers.add(name="conv", type=caffe_pb2.V1LayerParameter.CONVOLUTION)
    for dims in ((3, 2, 2, 2), (1, 1, 1, 3)):
        b = lp.blobs.add()
        b.num, b.channels, b.height, b.width = dims
        b.data.extend(np.arange(int(np.prod(dims)), dtype=np.float32).tolist())
    lp = msg.layers.add(name="relu", type=caffe_pb2.V1LayerParameter.RELU)
    out.append(msg.SerializeToString())
    d = caffe_pb2.NetParameter(name="dbl")
    lp = d.layer.add(name="ip1", type="InnerProduct")
    b = lp.blobs.add()
    b.shape.dim.extend([4, 4])
    b.double_data.extend(np.linspace(-1, 1, 16).tolist())
    out.append(d.SerializeToString())
    return out


_SEED_MODELS: List[bytes] = []
BIN_TOKENS = [b"\x00", b"\xff" * 10, b"\x80" * 10, b"\x0a\xff\xff\xff\xff\x0f", b"\x3a\x05\x0a\x03\xff\xff\x7f",
              b"\x2a\x04", b"\xa2\x06", b"\x12\x00", b"\x08\x80\x80\x80\x80\x08", b"\x0b", b"\x0c", b"\x0f"]


@FUZZ
@given(seed=st.integers(0, 2), ops=byte_ops)
def test_fuzz_binary_loader(tmp_path_factory, seed, ops):
    folder = tmp_path_factory.getbasetemp()
    if not _SEED_MODELS:
        _SEED_MODELS.extend(_seed_caffemodels(folder))
    data = mutate_bytes(_SEED_MODELS[seed], ops, BIN_TOKENS)
    path = folder / "fuzz.caffemodel"
    path.write_bytes(data)

    _expect_only_caffe_errors(W.read_caffemodel, str(path))
    _expect_only_caffe_errors(W.caffemodel_state_dict, str(path))
    if seed == 0:
        _expect_only_caffe_errors(lambda: Net(NETS[0]).load_weights(str(path)))


_SEED_H5: List[bytes] = []


@FUZZ
@given(ops=byte_ops)
def test_fuzz_hdf5_loader(tmp_path_factory, ops):
    """Mutated Caffe HDF5 weights (``.caffemodel.h5``): a clear error or a load, nothing else."""
    import h5py  # noqa: F401 - without it every load is refused and nothing is fuzzed
    folder = tmp_path_factory.getbasetemp()
    if not _SEED_H5:
        seed = folder / "seed.caffemodel.h5"
        Net(NETS[0], seed=0).save_weights(str(seed))
        _SEED_H5.append(seed.read_bytes())
    if len(_SEED_H5) == 1:
        from caffe_compat.solver import SolverState, state_hdf5

        state = folder / "seed.solverstate.h5"
        state_hdf5.write_state(str(state), SolverState(iter=7, current_step=1, learned_net="m.caffemodel.h5",
                                                       history=[torch.ones(3, 2), torch.zeros(3)]))
        _SEED_H5.append(state.read_bytes())
    path = folder / "fuzz.caffemodel.h5"
    path.write_bytes(mutate_bytes(_SEED_H5[0], ops, BIN_TOKENS))
    _expect_only_caffe_errors(lambda: Net(NETS[0]).load_weights(str(path)))
    from caffe_compat.solver import state_hdf5

    path = folder / "fuzz.solverstate.h5"
    path.write_bytes(mutate_bytes(_SEED_H5[1], ops, BIN_TOKENS))
    _expect_only_caffe_errors(state_hdf5.read_state, str(path))


def test_fuzz_memory_stayed_bounded():
    """Runs after the targets: fuzzing raised the process's peak RSS by under 1 GiB."""
    if not _RSS_AT_START:
        pytest.skip("measures the fuzz targets: run the whole file")
    start = _RSS_AT_START[0]
    assert peak_rss_mb() - start < 1024, f"peak RSS grew from {start:.0f} to {peak_rss_mb():.0f} MB"
