"""Data layers and Caffe's DataTransformer, on small files each test writes in tmp_path.

The oracle Caffe is built without OpenCV/LMDB (its Data, ImageData and WindowData layers do
not exist), so the transformer is checked against a numpy loop written from
``DataTransformer::Transform``'s index formulas, and readers against the files' contents.
"""
from __future__ import annotations


import cv2
import numpy as np
import pytest
import torch
from google.protobuf import text_format

from caffe_compat.errors import DataError, GraphError, SchemaError, ShapeError
from caffe_compat.layers import data as D
from caffe_compat.layers.base import BuildContext
from caffe_compat.protos import caffe_pb2
from caffe_compat.transform import DataTransformer


def build(text: str, phase: str = "TEST", seed: int = 0):
    from caffe_compat.layers.registry import resolve

    p = text_format.Parse(text, caffe_pb2.LayerParameter())
    g = torch.Generator()
    g.manual_seed(seed)
    return resolve(p)(p, [], BuildContext(phase=phase, generator=g))


def transform_param(text: str) -> caffe_pb2.TransformationParameter:
    return text_format.Parse(text, caffe_pb2.TransformationParameter())


def write_mean(path, mean: np.ndarray) -> None:
    from caffe_compat.io import array_to_blob

    path.write_bytes(array_to_blob(mean[None]).SerializeToString())


# ---------------------------------------------------------------------------- Input
def test_input_shapes_and_zeros():
    layer = build('name: "in" type: "Input" top: "a" top: "b" input_param { shape { dim: 2 dim: 3 } }')
    assert layer.accepts_feed and layer.infer_top_shapes([]) == [(2, 3), (2, 3)]
    a, b = layer()
    assert a.shape == (2, 3) and not a.any() and a.dtype == torch.float32
    layer = build('name: "in" type: "Input" top: "a" top: "b" '
                  'input_param { shape { dim: 2 } shape { dim: 1 dim: 4 dim: 5 dim: 5 } }')
    assert layer.infer_top_shapes([]) == [(2,), (1, 4, 5, 5)]
    layer.to(torch.float64)
    assert layer()[1].dtype == torch.float64  # follows the net's dtype
    assert layer.caffe_blobs() == [] and list(layer.state_dict()) == []


def test_input_errors():
    with pytest.raises(SchemaError, match="once per top"):
        build('name: "in" type: "Input" top: "a" top: "b" top: "c" '
              'input_param { shape { dim: 2 } shape { dim: 3 } }')
    with pytest.raises(GraphError):
        build('name: "in" type: "Input" input_param { shape { dim: 2 } }')
    with pytest.raises(ShapeError):
        build('name: "in" type: "Input" top: "a" input_param { shape { dim: -2 } }')
    layer = build('name: "in" type: "Input" top: "a"')
    assert layer.infer_top_shapes([]) == [None]
    with pytest.raises(DataError, match="'a'"):
        layer()


def test_input_through_net():
    from caffe_compat import Net

    net = Net('layer { name: "in" type: "Input" top: "x" input_param { shape { dim: 2 dim: 3 } } }\n'
              'layer { name: "in2" type: "Input" top: "y" input_param { shape { dim: 2 dim: 3 } } }\n'
              'layer { name: "loss" type: "EuclideanLoss" bottom: "x" bottom: "y" top: "loss" }')
    x = torch.arange(6.0).reshape(2, 3)
    out = net.forward(x=x, y=torch.zeros(2, 3))
    assert float(out["loss"]) == pytest.approx(float((x ** 2).sum() / 4))


# ---------------------------------------------------------------------------- DummyData
def test_dummy_data_constant_default_and_shapes():
    layer = build('name: "d" type: "DummyData" top: "a" top: "b" '
                  'dummy_data_param { shape { dim: 2 dim: 3 } shape { dim: 4 } }')
    assert layer.infer_top_shapes([]) == [(2, 3), (4,)]
    a, b = layer()
    assert not a.any() and not b.any()
    layer = build('name: "d" type: "DummyData" top: "a" dummy_data_param { num: 2 channels: 3 height: 4 '
                  'width: 5 data_filler { type: "constant" value: 1.5 } }')
    assert layer.infer_top_shapes([]) == [(2, 3, 4, 5)]
    assert torch.equal(layer()[0], torch.full((2, 3, 4, 5), 1.5))


def test_dummy_data_refills_random_fillers_every_forward():
    layer = build('name: "d" type: "DummyData" top: "a" top: "b" dummy_data_param { '
                  'num: 200 num: 3 channels: 50 height: 1 width: 1 '
                  'data_filler { type: "gaussian" std: 2 } data_filler { type: "constant" value: 7 } }')
    assert layer.infer_top_shapes([]) == [(200, 50, 1, 1), (3, 50, 1, 1)]
    a1, b1 = layer()
    a2, b2 = layer()
    assert not torch.equal(a1, a2)
    assert torch.equal(b1, b2) and float(b1[0, 0]) == 7
    assert float(a1.std()) == pytest.approx(2.0, rel=0.05) and abs(float(a1.mean())) < 0.05


def test_dummy_data_errors():
    with pytest.raises(SchemaError, match="both shape and legacy"):
        build('name: "d" type: "DummyData" top: "a" dummy_data_param { shape { dim: 1 } num: 1 channels: 1 '
              'height: 1 width: 1 }')
    with pytest.raises(SchemaError, match="'channels'"):
        build('name: "d" type: "DummyData" top: "a" dummy_data_param { num: 1 }')
    with pytest.raises(SchemaError, match="data fillers"):
        build('name: "d" type: "DummyData" top: "a" top: "b" top: "c" dummy_data_param { shape { dim: 1 } '
              'data_filler { type: "constant" } data_filler { type: "constant" } }')
    with pytest.raises(SchemaError, match="'shape' once"):
        build('name: "d" type: "DummyData" top: "a" top: "b" top: "c" '
              'dummy_data_param { shape { dim: 1 } shape { dim: 2 } }')
    with pytest.raises(SchemaError, match="filler"):
        build('name: "d" type: "DummyData" top: "a" dummy_data_param { shape { dim: 1 } '
              'data_filler { type: "bogus" } }')


# ---------------------------------------------------------------------------- MemoryData
def test_memory_data():
    layer = build('name: "m" type: "MemoryData" top: "data" top: "label" '
                  'memory_data_param { batch_size: 2 channels: 3 height: 4 width: 5 }')
    assert layer.accepts_feed and layer.infer_top_shapes([]) == [(2, 3, 4, 5), (2,)]
    d, l = layer()
    assert d.shape == (2, 3, 4, 5) and l.shape == (2,)
    with pytest.raises(SchemaError, match="positive"):
        build('name: "m" type: "MemoryData" top: "data" top: "label" memory_data_param { batch_size: 2 }')
    with pytest.raises(GraphError):
        build('name: "m" type: "MemoryData" top: "data" memory_data_param { batch_size: 1 channels: 1 '
              'height: 1 width: 1 }')


def test_memory_data_fed_through_net():
    from caffe_compat import Net

    net = Net('layer { name: "m" type: "MemoryData" top: "data" top: "label" '
              'memory_data_param { batch_size: 2 channels: 3 height: 1 width: 1 } }\n'
              'layer { name: "loss" type: "SoftmaxWithLoss" bottom: "data" bottom: "label" top: "loss" }')
    x = torch.tensor([[0.0, 1.0, 2.0], [1.0, 1.0, 1.0]]).reshape(2, 3, 1, 1)
    out = net.forward(data=x, label=torch.tensor([2.0, 0.0]))
    ref = -(torch.log_softmax(x.reshape(2, 3), 1)[[0, 1], [2, 0]]).mean()
    assert float(out["loss"]) == pytest.approx(float(ref))


# ---------------------------------------------------------------------------- DataTransformer
def transform_ref(img, *, scale=1.0, mean=None, mean_values=(), crop=0, h_off=0, w_off=0, mirror=False):
    """DataTransformer::Transform(const Datum&, Dtype*) as its loops, with given offsets."""
    C, H, W = img.shape
    height, width = (crop, crop) if crop else (H, W)
    flat = img.reshape(-1).astype(np.float32)
    mflat = None if mean is None else mean.reshape(-1).astype(np.float32)
    mv = list(mean_values) * (C if len(mean_values) == 1 else 1)
    out = np.zeros(C * height * width, np.float32)
    for c in range(C):
        for h in range(height):
            for w in range(width):
                data_index = (c * H + h_off + h) * W + w_off + w
                top_index = (c * height + h) * width + ((width - 1 - w) if mirror else w)
                v = flat[data_index]
                if mflat is not None:
                    out[top_index] = (v - mflat[data_index]) * np.float32(scale)
                elif mv:
                    out[top_index] = (v - np.float32(mv[c])) * np.float32(scale)
                else:
                    out[top_index] = v * np.float32(scale)
    return out.reshape(C, height, width)


class FixedRand:
    """Replaces DataTransformer.rand with Caffe's draw order: mirror coin, h_off, w_off."""

    def __init__(self, values):
        self.values = list(values)
        self.asked = []

    def __call__(self, n):
        self.asked.append(n)
        return self.values.pop(0) % n


@pytest.mark.parametrize("phase", ["TRAIN", "TEST"])
@pytest.mark.parametrize("opts", [
    dict(text="scale: 0.5", kw=dict(scale=0.5)),
    dict(text="mean_value: 10 scale: 2", kw=dict(mean_values=(10,), scale=2)),
    dict(text="mean_value: 1 mean_value: 2 mean_value: 3", kw=dict(mean_values=(1, 2, 3))),
    dict(text="crop_size: 3 mean_value: 100", kw=dict(crop=3, mean_values=(100,))),
    dict(text="crop_size: 4 mirror: true scale: 0.1", kw=dict(crop=4, scale=0.1)),
    dict(text="mirror: true", kw=dict()),
    dict(text="crop_size: 3 mirror: true MEAN", kw=dict(crop=3)),
])
def test_transformer_matches_caffe_loops(phase, opts, tmp_path):
    rng = np.random.RandomState(0)
    img = rng.randint(0, 256, size=(3, 5, 6)).astype(np.uint8)
    text, kw = opts["text"], dict(opts["kw"])
    if "MEAN" in text:
        mean = rng.rand(3, 5, 6).astype(np.float32) * 50
        write_mean(tmp_path / "mean.binaryproto", mean)
        text = text.replace("MEAN", f'mean_file: "{tmp_path / "mean.binaryproto"}"')
        kw["mean"] = mean
    t = DataTransformer(transform_param(text), phase)
    for mirror_coin, h, w in [(0, 0, 0), (1, 1, 2), (1, 2, 3), (0, 1, 1)]:
        crop = kw.get("crop", 0)
        t.rand = FixedRand(([mirror_coin] if "mirror: true" in text else []) +
                           ([h, w] if crop and phase == "TRAIN" else []))
        out = t.transform(img)
        mirror = "mirror: true" in text and mirror_coin == 1
        if crop and phase == "TEST":
            h_off, w_off = (5 - crop) // 2, (6 - crop) // 2
        elif crop:
            h_off, w_off = h % (5 - crop + 1), w % (6 - crop + 1)
        else:
            h_off = w_off = 0
        ref = transform_ref(img, h_off=h_off, w_off=w_off, mirror=mirror, **kw)
        np.testing.assert_array_equal(out, ref)
        assert out.dtype == np.float32
        # Caffe draws the coin only with mirror, crop offsets only when cropping at TRAIN
        expected_draws = ([2] if "mirror: true" in text else []) + \
            ([5 - crop + 1, 6 - crop + 1] if crop and phase == "TRAIN" else [])
        assert t.rand.asked == expected_draws


def test_transformer_random_crop_and_mirror_vary():
    img = np.arange(2 * 6 * 6, dtype=np.float32).reshape(2, 6, 6)
    g = torch.Generator()
    g.manual_seed(1)
    t = DataTransformer(transform_param("crop_size: 4 mirror: true"), "TRAIN", generator=g)
    seen = set()
    for _ in range(60):
        out = t.transform(img)
        found = [(h, w, m) for h in range(3) for w in range(3) for m in (False, True)
                 if np.array_equal(out, transform_ref(img, crop=4, h_off=h, w_off=w, mirror=m))]
        assert len(found) == 1
        seen.add(found[0])
    assert len(seen) > 10  # offsets in 0..2 both ways, mirrored or not


def test_transformer_float_data_and_errors(tmp_path):
    t = DataTransformer(transform_param("crop_size: 8"), "TEST", layer="L")
    with pytest.raises(DataError, match="smaller than crop_size"):
        t.infer_shape((3, 4, 9))
    with pytest.raises(SchemaError, match="mean_file and mean_value"):
        DataTransformer(transform_param('mean_file: "m" mean_value: 1'), "TEST")
    with pytest.raises(SchemaError, match="force_color and force_gray"):
        DataTransformer(transform_param("force_color: true force_gray: true"), "TEST")
    t = DataTransformer(transform_param("mean_value: 1 mean_value: 2"), "TEST")
    with pytest.raises(DataError, match="mean_value"):
        t.transform(np.zeros((3, 2, 2), np.uint8))
    t = DataTransformer(transform_param(f'mean_file: "{tmp_path}/missing.binaryproto"'), "TEST", layer="L")
    with pytest.raises(DataError, match="missing.binaryproto"):
        t.transform(np.zeros((3, 2, 2), np.uint8))
    write_mean(tmp_path / "m.binaryproto", np.zeros((3, 4, 4), np.float32))
    t = DataTransformer(transform_param(f'mean_file: "{tmp_path}/m.binaryproto"'), "TEST")
    with pytest.raises(DataError, match="does not match"):
        t.transform(np.zeros((3, 2, 2), np.uint8))
    datum = caffe_pb2.Datum(channels=1, height=2, width=2, float_data=[0.5, 1.5, 2.5, 3.5])
    np.testing.assert_array_equal(t.decode_datum(datum), np.array([[[0.5, 1.5], [2.5, 3.5]]], np.float32))


# ---------------------------------------------------------------------------- Data (LMDB)
def make_lmdb(path, datums):
    import lmdb

    env = lmdb.open(str(path), map_size=1 << 22)
    with env.begin(write=True) as txn:
        for i, d in enumerate(datums):
            txn.put(b"%08d_item" % i, d.SerializeToString())
    env.close()


def raw_datum(img: np.ndarray, label: int) -> caffe_pb2.Datum:
    c, h, w = img.shape
    return caffe_pb2.Datum(channels=c, height=h, width=w, data=img.tobytes(), label=label)


def test_data_lmdb_batches_wrap_and_transform(tmp_path, monkeypatch):
    rng = np.random.RandomState(0)
    imgs = [rng.randint(0, 256, size=(3, 6, 5)).astype(np.uint8) for _ in range(5)]
    make_lmdb(tmp_path / "db", [raw_datum(im, 10 + i) for i, im in enumerate(imgs)])
    monkeypatch.chdir(tmp_path)  # relative sources resolve against the current directory
    layer = build('name: "data" type: "Data" top: "data" top: "label" '
                  'data_param { source: "db" backend: LMDB batch_size: 3 } '
                  'transform_param { crop_size: 4 mean_value: 104 mean_value: 117 mean_value: 123 scale: 0.5 }')
    assert layer.infer_top_shapes([]) == [(3, 3, 4, 4), (3,)]
    order = [0, 1, 2, 3, 4, 0, 1, 2, 3]
    for b in range(3):
        data, label = layer()
        idx = order[3 * b:3 * b + 3]
        assert label.tolist() == [10.0 + i for i in idx]
        for j, i in enumerate(idx):
            ref = transform_ref(imgs[i], crop=4, h_off=1, w_off=0, mean_values=(104, 117, 123), scale=0.5)
            np.testing.assert_array_equal(data[j].numpy(), ref)


def test_data_lmdb_encoded_float_and_single_top(tmp_path):
    rng = np.random.RandomState(1)
    bgr = rng.randint(0, 256, size=(4, 5, 3)).astype(np.uint8)
    ok, png = cv2.imencode(".png", bgr)
    enc = caffe_pb2.Datum(data=png.tobytes(), encoded=True, label=3)
    make_lmdb(tmp_path / "enc", [enc])
    layer = build(f'name: "d" type: "Data" top: "data" data_param {{ source: "{tmp_path / "enc"}" '
                  f'backend: LMDB batch_size: 2 }}')
    assert layer.infer_top_shapes([]) == [(2, 3, 4, 5)]
    (data,) = layer()
    np.testing.assert_array_equal(data[0].numpy(), bgr.transpose(2, 0, 1))  # BGR kept, like Caffe
    np.testing.assert_array_equal(data[1].numpy(), bgr.transpose(2, 0, 1))
    gray = build(f'name: "d" type: "Data" top: "data" top: "l" data_param {{ source: "{tmp_path / "enc"}" '
                 f'backend: LMDB batch_size: 1 }} transform_param {{ force_gray: true }}')
    assert gray.infer_top_shapes([]) == [(1, 1, 4, 5), (1,)]
    d, l = gray()
    # Caffe's DecodeDatumToCVMat(datum, false): imdecode in grey (not cvtColor: rounding differs)
    np.testing.assert_array_equal(d[0, 0].numpy(), cv2.imdecode(png, cv2.IMREAD_GRAYSCALE))
    assert l.tolist() == [3.0]
    fl = caffe_pb2.Datum(channels=2, height=1, width=2, float_data=[0.25, -1, 3, 4], label=1)
    make_lmdb(tmp_path / "fl", [fl])
    layer = build(f'name: "d" type: "Data" top: "data" data_param {{ source: "{tmp_path / "fl"}" '
                  f'backend: LMDB batch_size: 1 }} transform_param {{ scale: 2 }}')
    np.testing.assert_array_equal(layer()[0].numpy(), np.array([[[[0.5, -2]], [[6, 8]]]], np.float32))


def test_data_mixed_sizes_in_a_batch_is_an_error(tmp_path):
    make_lmdb(tmp_path / "db", [raw_datum(np.zeros((1, 3, 3), np.uint8), 0),
                                raw_datum(np.zeros((1, 4, 4), np.uint8), 1)])
    layer = build(f'name: "d" type: "Data" top: "data" data_param {{ source: "{tmp_path / "db"}" '
                  f'backend: LMDB batch_size: 2 }}')
    with pytest.raises(DataError, match="first image"):
        layer()


def test_data_missing_source_and_leveldb(tmp_path):
    layer = build(f'name: "train_data" type: "Data" top: "data" top: "label" '
                  f'data_param {{ source: "{tmp_path}/nope_lmdb" backend: LMDB batch_size: 7 }}')
    assert layer.infer_top_shapes([]) == [None, (7,)]
    with pytest.raises(DataError, match="train_data.*nope_lmdb"):
        layer()
    layer = build(f'name: "d" type: "Data" top: "data" top: "label" '
                  f'data_param {{ source: "{tmp_path}" batch_size: 7 }}')  # default backend LEVELDB
    assert layer.infer_top_shapes([]) == [None, (7,)]
    with pytest.raises(DataError, match="LEVELDB.*not supported"):
        layer()


def test_net_with_missing_data_source_builds(tmp_path):
    from caffe_compat import Net

    net = Net(f'layer {{ name: "data" type: "Data" top: "data" top: "label" '
              f'data_param {{ source: "{tmp_path}/none" backend: LMDB batch_size: 4 }} }}\n'
              'layer { name: "loss" type: "SoftmaxWithLoss" bottom: "data" bottom: "label" top: "loss" }',
              phase="train")
    assert net.blob_shapes["label"] == (4,) and net.blob_shapes["data"] is None
    with pytest.raises(DataError, match="none"):
        net.forward()


# ---------------------------------------------------------------------------- ImageData
def write_images(root, n, size=(6, 7), seed=0):
    rng = np.random.RandomState(seed)
    imgs = []
    for i in range(n):
        img = rng.randint(0, 256, size=size + (3,)).astype(np.uint8)
        name = f"img {i}.png" if i == 1 else f"img{i}.png"  # a space in a path is fine
        cv2.imwrite(str(root / name), img)
        imgs.append((name, img))
    return imgs


def test_image_data_reads_list_in_order(tmp_path, monkeypatch):
    (tmp_path / "pics").mkdir()
    imgs = write_images(tmp_path / "pics", 3)
    (tmp_path / "list.txt").write_text("".join(f"{n} {i * 2}\n" for i, (n, _) in enumerate(imgs)) + "\n")
    monkeypatch.chdir(tmp_path)
    layer = build('name: "img" type: "ImageData" top: "data" top: "label" image_data_param { '
                  'source: "list.txt" root_folder: "pics/" batch_size: 2 } '
                  'transform_param { mean_value: 100 mirror: false }')
    assert layer.infer_top_shapes([]) == [(2, 3, 6, 7), (2,)]
    seq = [0, 1, 2, 0]
    for b in range(2):
        data, label = layer()
        for j in range(2):
            i = seq[2 * b + j]
            np.testing.assert_array_equal(data[j].numpy(), imgs[i][1].transpose(2, 0, 1).astype(np.float32) - 100)
            assert float(label[j]) == 2 * i


def test_image_data_resize_gray_shuffle(tmp_path):
    imgs = write_images(tmp_path, 4, size=(9, 11))
    (tmp_path / "list.txt").write_text("".join(f"{tmp_path}/{n} {i}\n" for i, (n, _) in enumerate(imgs)))
    layer = build(f'name: "img" type: "ImageData" top: "data" top: "label" image_data_param {{ '
                  f'source: "{tmp_path}/list.txt" batch_size: 4 new_height: 5 new_width: 6 is_color: false '
                  f'shuffle: true }}', phase="TRAIN", seed=3)
    assert layer.infer_top_shapes([]) == [(4, 1, 5, 6), (4,)]
    orders = []
    for _ in range(3):
        data, label = layer()
        order = [int(v) for v in label]
        assert sorted(order) == [0, 1, 2, 3]  # one epoch per batch, reshuffled at wrap-around
        orders.append(order)
        for j, i in enumerate(order):
            gray = cv2.imread(str(tmp_path / imgs[i][0]), cv2.IMREAD_GRAYSCALE)
            np.testing.assert_array_equal(data[j, 0].numpy(), cv2.resize(gray, (6, 5)).astype(np.float32))
    assert len({tuple(o) for o in orders}) > 1


def test_image_data_errors(tmp_path):
    layer = build(f'name: "imgs" type: "ImageData" top: "data" top: "label" '
                  f'image_data_param {{ source: "{tmp_path}/absent.txt" batch_size: 3 }}')
    assert layer.infer_top_shapes([]) == [None, (3,)]
    with pytest.raises(DataError, match="imgs.*absent.txt"):
        layer()
    (tmp_path / "list.txt").write_text("missing.jpg 0\n")
    layer = build(f'name: "imgs" type: "ImageData" top: "data" top: "label" '
                  f'image_data_param {{ source: "{tmp_path}/list.txt" batch_size: 1 }}')
    assert layer.infer_top_shapes([]) == [None, (1,)]
    with pytest.raises(DataError, match="missing.jpg"):
        layer()
    with pytest.raises(SchemaError, match="together"):
        build('name: "i" type: "ImageData" top: "d" top: "l" image_data_param { source: "x" new_height: 3 }')
    with pytest.raises(SchemaError, match="batch_size"):
        build('name: "i" type: "ImageData" top: "d" top: "l" image_data_param { source: "x" batch_size: 0 }')


# ---------------------------------------------------------------------------- HDF5Data
def _fake_hdf5(files):
    def read(path, names):
        if path not in files:
            raise DataError(f"failed opening HDF5 file '{path}'")
        return [np.asarray(files[path][n], np.float64) for n in names]
    return read


def test_hdf5_data_rows_across_files_logic(tmp_path, monkeypatch):
    """The batching logic with the reader replaced (runs without h5py)."""
    a = {"data": np.arange(3 * 2, dtype=float).reshape(3, 2), "label": np.array([0.0, 1, 2])}
    b = {"data": 100 + np.arange(2 * 2, dtype=float).reshape(2, 2), "label": np.array([3.0, 4])}
    for n in ("a.h5", "b.h5"):
        (tmp_path / n).write_bytes(b"")
    (tmp_path / "list.txt").write_text(f"{tmp_path}/a.h5\n  {tmp_path}/b.h5 \n")
    monkeypatch.setattr(D, "read_hdf5", _fake_hdf5({f"{tmp_path}/a.h5": a, f"{tmp_path}/b.h5": b}))
    layer = build(f'name: "h" type: "HDF5Data" top: "data" top: "label" '
                  f'hdf5_data_param {{ source: "{tmp_path}/list.txt" batch_size: 4 }}')
    assert layer.infer_top_shapes([]) == [(4, 2), (4,)]
    d, l = layer()
    assert l.tolist() == [0, 1, 2, 3]
    np.testing.assert_array_equal(d.numpy(), np.concatenate([a["data"], b["data"][:1]]).astype(np.float32))
    d, l = layer()
    assert l.tolist() == [4, 0, 1, 2]


def test_hdf5_data_shuffle_and_errors(tmp_path, monkeypatch):
    a = {"x": np.arange(6, dtype=float)}
    (tmp_path / "a.h5").write_bytes(b"")
    (tmp_path / "list.txt").write_text(f"{tmp_path}/a.h5\n")
    monkeypatch.setattr(D, "read_hdf5", _fake_hdf5({f"{tmp_path}/a.h5": a}))
    layer = build(f'name: "h" type: "HDF5Data" top: "x" hdf5_data_param {{ source: "{tmp_path}/list.txt" '
                  f'batch_size: 6 shuffle: true }}', seed=5)
    assert layer.infer_top_shapes([]) == [(6,)]
    epochs = [tuple(layer()[0].tolist()) for _ in range(4)]
    assert all(sorted(e) == list(range(6)) for e in epochs) and len(set(epochs)) > 1
    with pytest.raises(SchemaError, match="transform"):
        build('name: "h" type: "HDF5Data" top: "x" hdf5_data_param { source: "l" batch_size: 1 } '
              'transform_param { scale: 2 }')
    layer = build(f'name: "h5" type: "HDF5Data" top: "x" hdf5_data_param {{ source: "{tmp_path}/no.txt" '
                  f'batch_size: 2 }}')
    assert layer.infer_top_shapes([]) == [None]
    with pytest.raises(DataError, match="h5.*no.txt"):
        layer()


def test_hdf5_data_real_file(tmp_path):
    import h5py

    with h5py.File(tmp_path / "a.h5", "w") as f:
        f["data"] = np.arange(24, dtype=np.float32).reshape(3, 2, 4)
        f["label"] = np.array([5, 6, 7], dtype=np.int32)
    (tmp_path / "list.txt").write_text(str(tmp_path / "a.h5"))
    layer = build(f'name: "h" type: "HDF5Data" top: "data" top: "label" '
                  f'hdf5_data_param {{ source: "{tmp_path}/list.txt" batch_size: 2 }}')
    assert layer.infer_top_shapes([]) == [(2, 2, 4), (2,)]
    d, l = layer()
    np.testing.assert_array_equal(d.numpy(), np.arange(16, dtype=np.float32).reshape(2, 2, 4))
    assert l.tolist() == [5, 6]
    assert layer()[1].tolist() == [7, 5]


# ---------------------------------------------------------------------------- WindowData
def test_window_data(tmp_path):
    rng = np.random.RandomState(0)
    img = rng.randint(0, 256, size=(20, 30, 3)).astype(np.uint8)
    cv2.imwrite(str(tmp_path / "a.png"), img)
    (tmp_path / "windows.txt").write_text(
        f"# 0\n{tmp_path}/a.png\n3\n20\n30\n3\n"
        "2 0.9 0 0 9 9\n"      # foreground, class 2
        "1 0.4 5 5 25 15\n"    # between thresholds 0.3 and 0.5: dropped
        "3 0.1 10 2 29 19\n")  # background
    text = (f'name: "win" type: "WindowData" top: "data" top: "label" window_data_param {{ '
            f'source: "{tmp_path}/windows.txt" batch_size: 4 fg_threshold: 0.5 bg_threshold: 0.3 '
            f'fg_fraction: 0.5 scale: 0.5 }} transform_param {{ crop_size: 8 mean_value: 10 }}')
    layer = build(text, phase="TRAIN")
    assert layer.infer_top_shapes([]) == [(4, 3, 8, 8), (4,)]
    data, label = layer()
    assert label.tolist() == [0, 0, 2, 2]  # background first, then foreground
    bg = cv2.resize(img[2:20, 10:30], (8, 8), interpolation=cv2.INTER_LINEAR)
    fg = cv2.resize(img[0:10, 0:10], (8, 8), interpolation=cv2.INTER_LINEAR)
    for j, patch in enumerate([bg, bg, fg, fg]):
        ref = (patch.transpose(2, 0, 1).astype(np.float32) - 10) * np.float32(0.5)
        np.testing.assert_array_equal(data[j].numpy(), ref)
    # context padding: the window grows, the part outside the image stays zero
    padded = build(text.replace("scale: 0.5", "context_pad: 2").replace(" mean_value: 10", ""), phase="TRAIN")
    data, label = padded()
    assert data.shape == (4, 3, 8, 8)
    assert float(data[2, :, :, 0].abs().sum()) == 0 and float(data[2, :, 0, :].abs().sum()) == 0
    assert float(data[2, :, 2:, 2:].abs().sum()) > 0


def test_window_data_missing_and_errors(tmp_path):
    layer = build(f'name: "win" type: "WindowData" top: "data" top: "label" window_data_param {{ '
                  f'source: "{tmp_path}/w.txt" batch_size: 5 }} transform_param {{ crop_size: 8 }}')
    assert layer.infer_top_shapes([]) == [None, (5,)]
    with pytest.raises(DataError, match="win.*w.txt"):
        layer()
    with pytest.raises(SchemaError, match="crop_size"):
        build('name: "w" type: "WindowData" top: "d" top: "l" window_data_param { source: "x" batch_size: 1 }')
    (tmp_path / "w.txt").write_text("# 0\nimg.png\n3\n10\n10\n1\n0 0.9 0 0 4 4\n")
    layer = build(f'name: "win" type: "WindowData" top: "data" top: "label" window_data_param {{ '
                  f'source: "{tmp_path}/w.txt" batch_size: 5 }} transform_param {{ crop_size: 8 }}')
    assert layer.infer_top_shapes([]) == [None, (5,)]  # malformed (fg window with label 0)
    with pytest.raises(DataError, match="label 0"):
        layer()


def test_data_layers_follow_device_and_dtype():
    layer = build('name: "d" type: "DummyData" top: "a" dummy_data_param { shape { dim: 2 } '
                  'data_filler { type: "constant" value: 1 } }')
    layer.to(torch.float64)
    assert layer()[0].dtype == torch.float64
    if torch.cuda.is_available():  # pragma: no cover - GPU machines
        layer.to("cuda")
        assert layer()[0].device.type == "cuda"
