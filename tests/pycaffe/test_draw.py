"""``caffe.draw`` and ``caffe-compat draw`` (pycaffe's draw.py / draw_net.py, without pydot).

The DOT text is checked node by node and edge by edge against the hand-read wiring of a
small net; images are rendered only where Graphviz's ``dot`` is installed (skipped
otherwise), and its absence must give one clear error.
"""
from __future__ import annotations

import re
import shutil
import subprocess
import textwrap

import pytest
from click.testing import CliRunner

import caffe_compat.pycaffe as caffe
from caffe_compat.cli.main import main
from caffe_compat.errors import CaffeCompatError, SchemaError
from caffe_compat.io import parse_text, read_net_text
from caffe_compat.protos import caffe_pb2
from caffe_compat.pycaffe import draw
from caffe_compat.pycaffe.runner import run_script
from conftest import CORPUS

HAVE_DOT = shutil.which("dot") is not None
needs_dot = pytest.mark.skipif(not HAVE_DOT, reason="Graphviz's dot is not installed here")

SMALL = """name: "small"
layer { name: "data" type: "Data" top: "data" top: "label" include { phase: TRAIN }
  data_param { source: "x" batch_size: 32 } }
layer { name: "data" type: "Input" top: "data" top: "label" include { phase: TEST }
  input_param { shape { dim: 1 dim: 3 dim: 16 dim: 16 } shape { dim: 1 } } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
  param { lr_mult: 1 } param { lr_mult: 2 }
  convolution_param { num_output: 8 kernel_size: 3 stride: 2 pad: 1 } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "pool1" type: "Pooling" bottom: "conv1" top: "pool1"
  pooling_param { pool: AVE kernel_h: 3 kernel_w: 2 stride: 2 } }
layer { name: "ip1" type: "InnerProduct" bottom: "pool1" top: "ip1" inner_product_param { num_output: 5 } }
layer { name: "drop" type: "Dropout" bottom: "ip1" top: "ip1" exclude { phase: TEST } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip1" bottom: "label" top: "loss" }
layer { name: "acc" type: "Accuracy" bottom: "ip1" bottom: "label" top: "acc" include { phase: TEST } }
"""

LAYERS_ALL = ["data_Data", "data_Input", "conv1_Convolution", "relu1_ReLU", "pool1_Pooling",
              "ip1_InnerProduct", "drop_Dropout", "loss_SoftmaxWithLoss", "acc_Accuracy"]
BLOBS = ["data_blob", "label_blob", "conv1_blob", "pool1_blob", "ip1_blob", "loss_blob", "acc_blob"]


def small_net() -> caffe_pb2.NetParameter:
    return parse_text(SMALL, caffe_pb2.NetParameter())


def edges_of(graph):
    return {(e.src, e.dst) for e in graph.edges}


def expected_edges(phase=None):
    e = {("conv1_Convolution", "conv1_blob"), ("conv1_blob", "relu1_ReLU"), ("relu1_ReLU", "conv1_blob"),
         ("data_blob", "conv1_Convolution"), ("conv1_blob", "pool1_Pooling"), ("pool1_Pooling", "pool1_blob"),
         ("pool1_blob", "ip1_InnerProduct"), ("ip1_InnerProduct", "ip1_blob"), ("ip1_blob", "loss_SoftmaxWithLoss"),
         ("label_blob", "loss_SoftmaxWithLoss"), ("loss_SoftmaxWithLoss", "loss_blob")}
    if phase in (None, "train"):
        e |= {("data_Data", "data_blob"), ("data_Data", "label_blob"),
              ("ip1_blob", "drop_Dropout"), ("drop_Dropout", "ip1_blob")}
    if phase in (None, "test"):
        e |= {("data_Input", "data_blob"), ("data_Input", "label_blob"),
              ("ip1_blob", "acc_Accuracy"), ("label_blob", "acc_Accuracy"), ("acc_Accuracy", "acc_blob")}
    return e


def node_lines(dot: str):
    """node id -> its attribute text, from the DOT source."""
    return {m.group(1): m.group(2) for m in re.finditer(r'^  "([^"]+)" \[(.*)\];$', dot, re.M)}


# ----------------------------------------------------------------------------- DOT text
def test_dot_text_has_every_layer_blob_and_edge():
    g = draw.get_pydot_graph(small_net(), "LR")
    assert [n.name for n in g.nodes if not n.name.endswith("_blob")] == LAYERS_ALL
    assert sorted(n.name for n in g.nodes if n.name.endswith("_blob")) == sorted(BLOBS)
    assert edges_of(g) == expected_edges()
    assert len(g.edges) == len(expected_edges())             # no edge twice
    dot = g.to_string()
    assert dot.startswith('digraph "small" {\n  rankdir="LR";\n') and dot.rstrip().endswith("}")
    nodes = node_lines(dot)
    assert set(nodes) == set(LAYERS_ALL) | set(BLOBS)
    for b in BLOBS:
        assert 'shape="octagon"' in nodes[b] and f'label="{b[:-5]}"' in nodes[b]
    # Caffe's labels and colours
    assert nodes["conv1_Convolution"].startswith(
        r'label="conv1\n(Convolution)\nkernel size: 3\nstride: 2\npad: 1", shape="record", fillcolor="#FF5050"')
    assert r'label="pool1\n(AVE Pooling)\nkernel size: 3x2\nstride: 2\npad: 0"' in nodes["pool1_Pooling"]
    assert 'fillcolor="#FF9900"' in nodes["pool1_Pooling"]
    assert r'label="ip1\n(InnerProduct)"' in nodes["ip1_InnerProduct"] and "#CC33FF" in nodes["ip1_InnerProduct"]
    for in_place in ("relu1_ReLU", "drop_Dropout"):                      # neuron style
        assert 'fillcolor="#90EE90"' in nodes[in_place]
    assert 'fillcolor="#6495ED"' in nodes["loss_SoftmaxWithLoss"]
    # edge labels: batch size, num_output; none elsewhere
    assert '"data_Data" -> "label_blob" [label="Batch 32"];' in dot
    assert '"conv1_Convolution" -> "conv1_blob" [label="8"];' in dot
    assert '"ip1_InnerProduct" -> "ip1_blob" [label="5"];' in dot
    assert '"conv1_blob" -> "pool1_Pooling";' in dot
    unlabelled = draw.get_pydot_graph(small_net(), "LR", label_edges=False).to_string()
    assert not [ln for ln in unlabelled.splitlines() if " -> " in ln and "label=" in ln]
    assert str(g) == dot and draw.draw_net(small_net(), "LR", ext="dot") == dot.encode()


def test_rankdir_learning_rates_and_escaping():
    g = draw.get_pydot_graph(small_net(), "TB", display_lrm=True)
    assert g.rankdir == "TB"
    conv = node_lines(g.to_string())["conv1_Convolution"]
    assert 'label="conv1 (Convolution) kernel size: 3 stride: 2 pad: 1 lr mult: 1.0, 2.0"' in conv
    assert "lr mult: 1.0, 1.0" in node_lines(g.to_string())["ip1_InnerProduct"]
    assert draw.get_layer_lr_mult(small_net().layer[2]) == (1.0, 2.0)
    with pytest.raises(CaffeCompatError, match="rankdir"):
        draw.get_pydot_graph(small_net(), "XY")
    with pytest.raises(CaffeCompatError, match="NetParameter"):
        draw.get_pydot_graph("net.prototxt")
    # names with DOT/record syntax in them stay inside their strings
    odd = parse_text('name: "a\\"b" layer { name: "x{|}<y>\\\\" type: "ReLU" bottom: "in\\"put" top: "o" }',
                     caffe_pb2.NetParameter())
    dot = draw.get_pydot_graph(odd, "LR").to_string()
    assert dot.startswith('digraph "a\\"b" {')
    assert r'label="x\{\|\}\<y\>\\\n(ReLU)"' in dot           # the name ends in one backslash
    assert r'"in\"put_blob" [label="in\"put"' in dot
    if HAVE_DOT:    # Graphviz parses it
        subprocess.run(["dot", "-Tcanon"], input=dot.encode(), check=True, capture_output=True)


def test_phase_filtering_uses_caffes_rules():
    for phase, want in ((caffe.TRAIN, "train"), ("train", "train"), (caffe.TEST, "test"), ("TEST", "test")):
        g = draw.get_pydot_graph(small_net(), "LR", phase=phase)
        assert edges_of(g) == expected_edges(want), phase
    train = [n.name for n in draw.get_pydot_graph(small_net(), "LR", phase=caffe.TRAIN).nodes]
    assert "data_Data" in train and "drop_Dropout" in train
    assert "data_Input" not in train and "acc_Accuracy" not in train and "acc_blob" not in train
    # stages, as a net built with them
    staged = parse_text('layer { name: "d" type: "Input" top: "x" include { phase: TEST stage: "deploy" } }',
                        caffe_pb2.NetParameter())
    assert draw.get_pydot_graph(staged, "LR", phase="test").nodes == []
    assert len(draw.get_pydot_graph(staged, "LR", phase="test", stages=["deploy"]).nodes) == 2
    both = parse_text('layer { name: "d" type: "Input" top: "x" include { phase: TEST } exclude { phase: TRAIN } }',
                      caffe_pb2.NetParameter())
    with pytest.raises(SchemaError, match="include"):
        draw.get_pydot_graph(both, "LR", phase="test")
    with pytest.raises(SchemaError, match="phase"):
        draw.get_pydot_graph(small_net(), "LR", phase="deploy")


def test_v1_nets_are_upgraded_before_drawing():
    v1 = parse_text("""name: "old"
        layers { name: "conv" type: CONVOLUTION bottom: "data" top: "conv"
          convolution_param { num_output: 4 kernel_size: 5 } }
        layers { name: "relu" type: RELU bottom: "conv" top: "conv" }""", caffe_pb2.NetParameter())
    g = draw.get_pydot_graph(v1, "LR")
    assert [n.name for n in g.nodes] == ["conv_Convolution", "data_blob", "conv_blob", "relu_ReLU"]
    assert edges_of(g) == {("data_blob", "conv_Convolution"), ("conv_Convolution", "conv_blob"),
                           ("conv_blob", "relu_ReLU"), ("relu_ReLU", "conv_blob")}


def test_dotgraph_pydot_subset(tmp_path):
    g = draw.get_pydot_graph(small_net(), "LR")
    assert g.create(format="raw") == g.to_string().encode() == g.create_dot()
    assert g.write(str(tmp_path / "g.gv"), format="gv") is True
    assert (tmp_path / "g.gv").read_text() == g.to_string()
    g.write_raw(str(tmp_path / "g.raw"))
    assert (tmp_path / "g.raw").read_text() == g.to_string()
    assert [n.get_name() for n in g.get_node("conv1_blob")] == ["conv1_blob"]
    assert g.get_node("conv1_blob")[0].get_label() == "conv1"
    assert {(e.get_source(), e.get_destination()) for e in g.get_edges()} == expected_edges()
    with pytest.raises(AttributeError):
        g.no_such_method


# ----------------------------------------------------------------------------- files and rendering
def test_draw_net_to_file_dot_and_errors(tmp_path):
    out = tmp_path / "net.dot"
    draw.draw_net_to_file(small_net(), str(out), "LR", phase=caffe.TEST)
    assert out.read_text() == draw.get_pydot_graph(small_net(), "LR", phase=caffe.TEST).to_string()
    with pytest.raises(CaffeCompatError, match="extension"):
        draw.draw_net_to_file(small_net(), str(tmp_path / "noext"))
    assert not (tmp_path / "noext").exists()


def test_image_without_graphviz_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda *a, **k: None)
    with pytest.raises(draw.GraphvizNotFound, match=r"Graphviz's `dot`.*\.dot file"):
        draw.draw_net(small_net(), "LR", ext="png")
    with pytest.raises(draw.GraphvizNotFound, match=r"\.svg"):
        draw.draw_net_to_file(small_net(), str(tmp_path / "n.svg"))
    assert not (tmp_path / "n.svg").exists()
    draw.draw_net_to_file(small_net(), str(tmp_path / "n.gv"))         # text needs no Graphviz
    assert (tmp_path / "n.gv").read_text().startswith("digraph")
    # the CLI, with a PATH that has no dot
    monkeypatch.undo()
    monkeypatch.setenv("PATH", str(tmp_path))
    proto = tmp_path / "small.prototxt"
    proto.write_text(SMALL)
    r = CliRunner().invoke(main, ["draw", str(proto), str(tmp_path / "n.png")])
    assert r.exit_code == 2 and "Graphviz" in r.stderr and "dot" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "n.png").exists()


@needs_dot
def test_png_and_svg_with_graphviz(tmp_path):
    png = draw.draw_net(small_net(), "LR", ext="png", phase=caffe.TRAIN)
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 1000
    draw.draw_net_to_file(small_net(), str(tmp_path / "n.svg"), "TB")
    svg = (tmp_path / "n.svg").read_text()
    assert "<svg" in svg and "conv1" in svg and "kernel size: 3" in svg
    assert draw.get_pydot_graph(small_net(), "LR").create_png().startswith(b"\x89PNG")
    with pytest.raises(draw.DrawError, match="failed to render"):
        draw.draw_net(small_net(), "LR", ext="nosuchformat")


# ----------------------------------------------------------------------------- CLI
def test_draw_command(tmp_path):
    proto = tmp_path / "small.prototxt"
    proto.write_text(SMALL)
    out = tmp_path / "small.dot"
    r = CliRunner().invoke(main, ["draw", str(proto), str(out), "--phase", "TEST", "--rankdir", "tb"])
    assert r.exit_code == 0, r.output
    assert f"to {out}" in r.stdout
    assert out.read_text() == draw.get_pydot_graph(small_net(), "TB", phase="test").to_string()
    r = CliRunner().invoke(main, ["draw", str(proto), str(out), "--display_lrm"])
    assert r.exit_code == 0 and "lr mult: 1.0, 2.0" in out.read_text() and '"data_Data"' in out.read_text()
    r = CliRunner().invoke(main, ["draw", str(tmp_path / "none.prototxt"), str(out)])
    assert r.exit_code == 2 and "none.prototxt" in r.stderr
    bad = tmp_path / "bad.prototxt"
    bad.write_text("layer { name: ")
    r = CliRunner().invoke(main, ["draw", str(bad), str(out)])
    assert r.exit_code == 2 and "bad.prototxt:1" in r.stderr
    if HAVE_DOT:
        r = CliRunner().invoke(main, ["draw", str(proto), str(tmp_path / "small.png")])
        assert r.exit_code == 0 and (tmp_path / "small.png").read_bytes().startswith(b"\x89PNG")


CORPUS_NETS = [
    "bvlc-caffe/examples/mnist/lenet_train_test.prototxt",
    "forresti-SqueezeNet/SqueezeNet_v1.1/train_val.prototxt",
    "py-faster-rcnn/models/pascal_voc/VGG16/faster_rcnn_end2end/train.prototxt",
]


@pytest.mark.parametrize("rel", CORPUS_NETS)
def test_corpus_net_renders_to_dot(rel, tmp_path, corpus):
    path = corpus / rel
    if not path.is_file():
        pytest.skip(f"{rel} not in the corpus")
    net = read_net_text(str(path), upgrade=False)
    out = tmp_path / "net.dot"
    r = CliRunner().invoke(main, ["draw", str(path), str(out)])
    assert r.exit_code == 0, r.output
    nodes = node_lines(out.read_text())
    layers = {f"{lp.name}_{lp.type}" for lp in net.layer}
    blobs = {f"{b}_blob" for lp in net.layer for b in list(lp.bottom) + list(lp.top)}
    assert set(nodes) == layers | blobs
    n_edges = sum(len(lp.bottom) + len(lp.top) for lp in net.layer)
    assert len(re.findall(r"^  \S+ -> ", out.read_text(), re.M)) == n_edges
    for phase in ("train", "test"):
        g = draw.get_pydot_graph(net, "LR", phase=phase)
        assert 0 < len(g.nodes) <= len(nodes)
    if HAVE_DOT:
        draw.draw_net_to_file(net, str(tmp_path / "net.svg"), "TB")
        assert "<svg" in (tmp_path / "net.svg").read_text()


def test_corpus_present_or_skipped():
    if not CORPUS.is_dir():
        pytest.skip("no corpus")
    assert any((CORPUS / rel).is_file() for rel in CORPUS_NETS)


# ----------------------------------------------------------------------------- pycaffe scripts
def test_pycaffe_style_draw_script(tmp_path):
    (tmp_path / "net.prototxt").write_text(SMALL)
    script = tmp_path / "draw_it.py"
    script.write_text(textwrap.dedent("""
        import sys
        import caffe
        import caffe.draw
        from caffe.proto import caffe_pb2
        from google.protobuf import text_format

        net = caffe_pb2.NetParameter()
        text_format.Merge(open(sys.argv[1]).read(), net)
        caffe.draw.draw_net_to_file(net, sys.argv[2], "LR", phase=caffe.TEST)
        graph = caffe.draw.get_pydot_graph(net, "TB")
        open(sys.argv[3], "w").write(graph.to_string())
        assert caffe.draw is sys.modules["caffe.draw"]
        print("Drawing net to %s" % sys.argv[2])
    """))
    out, full = tmp_path / "test_phase.dot", tmp_path / "all.dot"
    run_script(str(script), [str(tmp_path / "net.prototxt"), str(out), str(full)], shadow=True)
    assert out.read_text() == draw.get_pydot_graph(small_net(), "LR", phase=caffe.TEST).to_string()
    assert full.read_text() == draw.get_pydot_graph(small_net(), "TB").to_string()
    # and through the command line runner, as draw_net.py users run it
    r = CliRunner().invoke(main, ["run", "--shadow", str(script), str(tmp_path / "net.prototxt"),
                                  str(tmp_path / "again.dot"), str(full)])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "again.dot").read_text() == out.read_text()
    assert caffe.draw is draw
