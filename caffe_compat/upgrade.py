"""Upgrading old Caffe net and solver definitions to the current schema, step for step as Caffe.

Caffe runs every prototxt and every caffemodel it reads through ``UpgradeNetAsNeeded``
(src/caffe/util/upgrade_proto.cpp), so legacy files keep loading.  This module reproduces
those steps, in Caffe's order, with Caffe's exact output (golden-tested against the C++):

1. ``v0_to_v1``: ``layers { layer { type: "conv" ... } }`` (V0LayerParameter) become V1
   layers; ``"padding"`` layers are folded into the conv/pool that consumes them.
2. ``data_transform``: scale/mean_file/crop_size/mirror on old Data/ImageData/WindowData
   params move into ``transform_param``.
3. ``v1_to_v2``: ``layers { type: CONVOLUTION }`` become ``layer { type: "Convolution" }``;
   ``blobs_lr``/``weight_decay``/``param``/``blob_share_mode`` become ``param {}`` specs;
   ``blobs`` (a caffemodel's weights) are carried over.
4. ``input``: net-level ``input`` + ``input_shape``/``input_dim`` become one Input layer
   named "input" placed first (a bare ``input`` without shapes -- old caffemodels -- is dropped).
5. ``batch_norm``: BatchNorm layers that declare exactly three ``param {}`` lose them.

Where Caffe aborts (CHECK / LOG(FATAL)) we raise ``SchemaError``.  Where Caffe only logs an
error and goes on ("continuing anyway"), we go on identically and record the message in
``UpgradeReport.problems``; ``strict=True`` turns those into errors.  Nothing is logged.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

from caffe_compat.errors import SchemaError
from caffe_compat.protos import caffe_pb2

__all__ = [
    "UpgradeReport",
    "upgrade_net",
    "upgrade_net_with_report",
    "needs_upgrade",
    "upgrade_solver",
    "solver_needs_upgrade",
    "V1_TYPE_NAMES",
    "V0_TYPE_TO_V1",
    "SOLVER_TYPE_NAMES",
]

V1 = caffe_pb2.V1LayerParameter
V0 = caffe_pb2.V0LayerParameter

# V1LayerParameter.LayerType -> current type string (UpgradeV1LayerType).
V1_TYPE_NAMES: Dict[int, str] = {
    V1.NONE: "",
    V1.ABSVAL: "AbsVal",
    V1.ACCURACY: "Accuracy",
    V1.ARGMAX: "ArgMax",
    V1.BNLL: "BNLL",
    V1.CONCAT: "Concat",
    V1.CONTRASTIVE_LOSS: "ContrastiveLoss",
    V1.CONVOLUTION: "Convolution",
    V1.DECONVOLUTION: "Deconvolution",
    V1.DATA: "Data",
    V1.DROPOUT: "Dropout",
    V1.DUMMY_DATA: "DummyData",
    V1.EUCLIDEAN_LOSS: "EuclideanLoss",
    V1.ELTWISE: "Eltwise",
    V1.EXP: "Exp",
    V1.FLATTEN: "Flatten",
    V1.HDF5_DATA: "HDF5Data",
    V1.HDF5_OUTPUT: "HDF5Output",
    V1.HINGE_LOSS: "HingeLoss",
    V1.IM2COL: "Im2col",
    V1.IMAGE_DATA: "ImageData",
    V1.INFOGAIN_LOSS: "InfogainLoss",
    V1.INNER_PRODUCT: "InnerProduct",
    V1.LRN: "LRN",
    V1.MEMORY_DATA: "MemoryData",
    V1.MULTINOMIAL_LOGISTIC_LOSS: "MultinomialLogisticLoss",
    V1.MVN: "MVN",
    V1.POOLING: "Pooling",
    V1.POWER: "Power",
    V1.RELU: "ReLU",
    V1.SIGMOID: "Sigmoid",
    V1.SIGMOID_CROSS_ENTROPY_LOSS: "SigmoidCrossEntropyLoss",
    V1.SILENCE: "Silence",
    V1.SOFTMAX: "Softmax",
    V1.SOFTMAX_LOSS: "SoftmaxWithLoss",
    V1.SPLIT: "Split",
    V1.SLICE: "Slice",
    V1.TANH: "TanH",
    V1.WINDOW_DATA: "WindowData",
    V1.THRESHOLD: "Threshold",
}

# V0 type string -> V1 enum (UpgradeV0LayerType); anything else is fatal in Caffe.
V0_TYPE_TO_V1: Dict[str, int] = {
    "accuracy": V1.ACCURACY,
    "bnll": V1.BNLL,
    "concat": V1.CONCAT,
    "conv": V1.CONVOLUTION,
    "data": V1.DATA,
    "dropout": V1.DROPOUT,
    "euclidean_loss": V1.EUCLIDEAN_LOSS,
    "flatten": V1.FLATTEN,
    "hdf5_data": V1.HDF5_DATA,
    "hdf5_output": V1.HDF5_OUTPUT,
    "im2col": V1.IM2COL,
    "images": V1.IMAGE_DATA,
    "infogain_loss": V1.INFOGAIN_LOSS,
    "innerproduct": V1.INNER_PRODUCT,
    "lrn": V1.LRN,
    "multinomial_logistic_loss": V1.MULTINOMIAL_LOGISTIC_LOSS,
    "pool": V1.POOLING,
    "relu": V1.RELU,
    "sigmoid": V1.SIGMOID,
    "softmax": V1.SOFTMAX,
    "softmax_loss": V1.SOFTMAX_LOSS,
    "split": V1.SPLIT,
    "tanh": V1.TANH,
    "window_data": V1.WINDOW_DATA,
}

# SolverParameter.SolverType -> type string (UpgradeSolverType).
SOLVER_TYPE_NAMES: Dict[int, str] = {
    caffe_pb2.SolverParameter.SGD: "SGD",
    caffe_pb2.SolverParameter.NESTEROV: "Nesterov",
    caffe_pb2.SolverParameter.ADAGRAD: "AdaGrad",
    caffe_pb2.SolverParameter.RMSPROP: "RMSProp",
    caffe_pb2.SolverParameter.ADADELTA: "AdaDelta",
    caffe_pb2.SolverParameter.ADAM: "Adam",
}

# The per-type sub-messages UpgradeV1LayerParameter copies, in Caffe's order.
_V1_COPIED_PARAMS: Tuple[str, ...] = (
    "accuracy_param", "argmax_param", "concat_param", "contrastive_loss_param",
    "convolution_param", "data_param", "dropout_param", "dummy_data_param", "eltwise_param",
    "exp_param", "hdf5_data_param", "hdf5_output_param", "hinge_loss_param",
    "image_data_param", "infogain_loss_param", "inner_product_param", "lrn_param",
    "memory_data_param", "mvn_param", "pooling_param", "power_param", "relu_param",
    "sigmoid_param", "softmax_param", "slice_param", "tanh_param", "threshold_param",
    "window_data_param", "transform_param", "loss_param",
)

# Old data layers whose own params carried the transformation fields.
_DATA_TRANSFORM_LAYERS: Tuple[Tuple[int, str], ...] = (
    (V1.DATA, "data_param"),
    (V1.IMAGE_DATA, "image_data_param"),
    (V1.WINDOW_DATA, "window_data_param"),
)
_TRANSFORM_FIELDS: Tuple[str, ...] = ("scale", "mean_file", "crop_size", "mirror")

STEPS: Tuple[str, ...] = ("v0_to_v1", "data_transform", "v1_to_v2", "input", "batch_norm")


@dataclass
class UpgradeReport:
    """What an upgrade did.

    ``applied``: the steps that ran, in order (names from ``STEPS``).
    ``problems``: what Caffe logs as an error but upgrades past (its ``UpgradeNetAsNeeded``
    then returns false, "continuing anyway"): e.g. a V0 parameter given to a layer type that
    has no such parameter, which is dropped.
    ``notes``: information Caffe discards without a word (extra input_dim values, V2 layers
    next to V0 ones, ...); not counted against ``success``.
    """

    applied: List[str] = field(default_factory=list)
    problems: List[str] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)

    @property
    def success(self) -> bool:
        """Caffe's return value of UpgradeNetAsNeeded."""
        return not self.problems


# ----------------------------------------------------------------------------- predicates

def _needs_v0_to_v1(net: caffe_pb2.NetParameter) -> bool:
    return any(l.HasField("layer") for l in net.layers)


def _needs_data_upgrade(net: caffe_pb2.NetParameter) -> bool:
    for l in net.layers:
        for ltype, pname in _DATA_TRANSFORM_LAYERS:
            if l.type == ltype:
                p = getattr(l, pname)
                if any(p.HasField(f) for f in _TRANSFORM_FIELDS):
                    return True
    return False


def _needs_v1_to_v2(net: caffe_pb2.NetParameter) -> bool:
    return len(net.layers) > 0


def _needs_input_upgrade(net: caffe_pb2.NetParameter) -> bool:
    return len(net.input) > 0


def _needs_batch_norm_upgrade(net: caffe_pb2.NetParameter) -> bool:
    return any(l.type == "BatchNorm" and len(l.param) == 3 for l in net.layer)


# ----------------------------------------------------------------------------- V0 -> V1

def _v0_name(conn: "caffe_pb2.V1LayerParameter", index: int) -> str:
    if conn.HasField("layer") and conn.layer.name:
        return conn.layer.name
    return conn.name or f"#{index}"


def _fold_v0_padding(net: caffe_pb2.NetParameter, source: str) -> caffe_pb2.NetParameter:
    """UpgradeV0PaddingLayers: drop "padding" layers, moving their pad into the consumer.

    Caffe also checks here that every bottom is a net input or an earlier top (fatal).
    """
    out = caffe_pb2.NetParameter()
    out.CopyFrom(net)
    del out.layers[:]
    last_top: Dict[str, int] = {name: -1 for name in net.input}
    for i, conn in enumerate(net.layers):
        v0 = conn.layer
        if v0.type != "padding":
            out.layers.add().CopyFrom(conn)
        for j, blob in enumerate(conn.bottom):
            if blob not in last_top:
                raise SchemaError(
                    f"V0 upgrade: unknown bottom blob '{blob}' (bottom {j}): it is neither a "
                    f"net input nor a top of an earlier layer", where=source,
                    layer=_v0_name(conn, i))
            src_idx = last_top[blob]
            if src_idx == -1:
                continue
            src = net.layers[src_idx]
            if src.layer.type != "padding":
                continue
            name = _v0_name(conn, i)
            if v0.type not in ("conv", "pool"):
                raise SchemaError(
                    f"V0 upgrade: padding layer '{src.layer.name}' feeds a layer of type "
                    f"'{v0.type}'; a V0 padding layer may only feed a 'conv' or 'pool' layer",
                    where=source, layer=name)
            if len(conn.bottom) != 1:
                raise SchemaError(
                    f"V0 upgrade: a conv/pool layer fed by padding layer '{src.layer.name}' "
                    f"must have exactly 1 bottom, has {len(conn.bottom)}",
                    where=source, layer=name)
            if len(src.bottom) != 1:
                raise SchemaError(
                    f"V0 upgrade: padding layer must have exactly 1 bottom, has "
                    f"{len(src.bottom)}", where=source, layer=src.layer.name or name)
            if len(src.top) != 1:
                raise SchemaError(
                    f"V0 upgrade: padding layer must have exactly 1 top, has {len(src.top)}",
                    where=source, layer=src.layer.name or name)
            target = out.layers[len(out.layers) - 1]
            target.layer.pad = src.layer.pad
            target.bottom[j] = src.bottom[0]
        for blob in conn.top:
            last_top[blob] = i
    return out


def _upgrade_v0_layer(conn: "caffe_pb2.V1LayerParameter", out: "caffe_pb2.V1LayerParameter",
                      problems: List[str], source: str, index: int) -> None:
    """UpgradeV0LayerParameter: one V0 layer into V1 fields (only bottom/top/`layer` are read)."""
    out.Clear()
    out.bottom.extend(conn.bottom)
    out.top.extend(conn.top)
    if not conn.HasField("layer"):
        return
    v0 = conn.layer
    lname = v0.name or f"#{index}"
    if v0.HasField("name"):
        out.name = v0.name
    t = v0.type
    if v0.HasField("type"):
        if t not in V0_TYPE_TO_V1:
            raise SchemaError(
                f"V0 upgrade: unknown V0 layer type '{t}'; known: "
                + ", ".join(sorted(V0_TYPE_TO_V1)), where=source, layer=lname)
        out.type = V0_TYPE_TO_V1[t]
    for b in v0.blobs:
        out.blobs.add().CopyFrom(b)
    out.blobs_lr.extend(v0.blobs_lr)
    out.weight_decay.extend(v0.weight_decay)

    def bad(fname: str, shown: Optional[str] = None) -> None:
        problems.append(f"{source}: layer '{lname}': V0 parameter {shown or fname} is not "
                        f"valid for layer type '{t}'; dropped")

    def has(fname: str) -> bool:
        return v0.HasField(fname)

    if has("num_output"):
        if t == "conv":
            out.convolution_param.num_output = v0.num_output
        elif t == "innerproduct":
            out.inner_product_param.num_output = v0.num_output
        else:
            bad("num_output")
    if has("biasterm"):
        if t == "conv":
            out.convolution_param.bias_term = v0.biasterm
        elif t == "innerproduct":
            out.inner_product_param.bias_term = v0.biasterm
        else:
            bad("biasterm")
    for fname in ("weight_filler", "bias_filler"):
        if has(fname):
            if t == "conv":
                getattr(out.convolution_param, fname).CopyFrom(getattr(v0, fname))
            elif t == "innerproduct":
                getattr(out.inner_product_param, fname).CopyFrom(getattr(v0, fname))
            else:
                bad(fname)
    if has("pad"):
        if t == "conv":
            out.convolution_param.pad.append(v0.pad)
        elif t == "pool":
            out.pooling_param.pad = v0.pad
        else:
            bad("pad")
    if has("kernelsize"):
        if t == "conv":
            out.convolution_param.kernel_size.append(v0.kernelsize)
        elif t == "pool":
            out.pooling_param.kernel_size = v0.kernelsize
        else:
            bad("kernelsize")
    if has("group"):
        if t == "conv":
            out.convolution_param.group = v0.group
        else:
            bad("group")
    if has("stride"):
        if t == "conv":
            out.convolution_param.stride.append(v0.stride)
        elif t == "pool":
            out.pooling_param.stride = v0.stride
        else:
            bad("stride")
    if has("pool"):
        if t == "pool":
            # V0 PoolMethod and PoolingParameter.PoolMethod share MAX/AVE/STOCHASTIC = 0/1/2.
            out.pooling_param.pool = {V0.MAX: caffe_pb2.PoolingParameter.MAX,
                                      V0.AVE: caffe_pb2.PoolingParameter.AVE,
                                      V0.STOCHASTIC: caffe_pb2.PoolingParameter.STOCHASTIC}[
                                          v0.pool]
        else:
            bad("pool")
    if has("dropout_ratio"):
        if t == "dropout":
            out.dropout_param.dropout_ratio = v0.dropout_ratio
        else:
            bad("dropout_ratio")
    for fname in ("local_size", "alpha", "beta", "k"):
        if has(fname):
            if t == "lrn":
                setattr(out.lrn_param, fname, getattr(v0, fname))
            else:
                bad(fname)
    if has("source"):
        target = {"data": "data_param", "hdf5_data": "hdf5_data_param",
                  "images": "image_data_param", "window_data": "window_data_param",
                  "infogain_loss": "infogain_loss_param"}.get(t)
        if target:
            getattr(out, target).source = v0.source
        else:
            bad("source")
    # The transformation fields go to transform_param whatever the layer type.
    if has("scale"):
        out.transform_param.scale = v0.scale
    if has("meanfile"):
        out.transform_param.mean_file = v0.meanfile
    if has("batchsize"):
        target = {"data": "data_param", "hdf5_data": "hdf5_data_param",
                  "images": "image_data_param", "window_data": "window_data_param"}.get(t)
        if target:
            getattr(out, target).batch_size = v0.batchsize
        else:
            bad("batchsize")
    if has("cropsize"):
        out.transform_param.crop_size = v0.cropsize
    if has("mirror"):
        out.transform_param.mirror = v0.mirror
    if has("rand_skip"):
        target = {"data": "data_param", "images": "image_data_param"}.get(t)
        if target:
            getattr(out, target).rand_skip = v0.rand_skip
        else:
            bad("rand_skip")
    if has("shuffle_images"):
        if t == "images":
            out.image_data_param.shuffle = v0.shuffle_images
        else:
            bad("shuffle_images", "shuffle")
    for fname in ("new_height", "new_width"):
        if has(fname):
            if t == "images":
                setattr(out.image_data_param, fname, getattr(v0, fname))
            else:
                bad(fname)
    if has("concat_dim"):
        if t == "concat":
            out.concat_param.concat_dim = v0.concat_dim
        else:
            bad("concat_dim")
    for v0_name, v1_name in (("det_fg_threshold", "fg_threshold"),
                             ("det_bg_threshold", "bg_threshold"),
                             ("det_fg_fraction", "fg_fraction"),
                             ("det_context_pad", "context_pad"),
                             ("det_crop_mode", "crop_mode")):
        if has(v0_name):
            if t == "window_data":
                setattr(out.window_data_param, v1_name, getattr(v0, v0_name))
            else:
                bad(v0_name)
    if has("hdf5_output_param"):
        if t == "hdf5_output":
            out.hdf5_output_param.CopyFrom(v0.hdf5_output_param)
        else:
            bad("hdf5_output_param")
    # new_num / new_channels are read by nothing in Caffe's upgrade: silently dropped.


def _upgrade_v0_net(net: caffe_pb2.NetParameter, problems: List[str], notes: List[str],
                    source: str) -> caffe_pb2.NetParameter:
    """UpgradeV0Net: keeps only name, layers, input, input_dim and force_backward."""
    padded = _fold_v0_padding(net, source)
    out = caffe_pb2.NetParameter()
    if padded.HasField("name"):
        out.name = padded.name
    for i, conn in enumerate(padded.layers):
        _upgrade_v0_layer(conn, out.layers.add(), problems, source, i)
    out.input.extend(padded.input)
    out.input_dim.extend(padded.input_dim)
    if padded.HasField("force_backward"):
        out.force_backward = padded.force_backward
    if len(net.layer):
        notes.append(f"{source}: the V0 upgrade keeps only V0 'layers' entries; "
                     f"{len(net.layer)} 'layer {{}}' entries were dropped (as in Caffe)")
    dropped = [f for f in ("state", "debug_info") if net.HasField(f)]
    if len(net.input_shape):
        dropped.insert(0, "input_shape")
    for fname in dropped:
        notes.append(f"{source}: the V0 upgrade drops '{fname}' (as in Caffe)")
    lost = sum(1 for c in net.layers if not c.HasField("layer")
               and any(f.name not in ("bottom", "top") for f, _ in c.ListFields()))
    if lost:
        notes.append(f"{source}: the V0 upgrade keeps only bottom/top of {lost} 'layers' "
                     f"entries without a V0 'layer' part (as in Caffe)")
    return out


# ----------------------------------------------------------------------------- data transform

def _upgrade_data_transform(net: caffe_pb2.NetParameter) -> None:
    """UpgradeNetDataTransformation: old data-layer transform fields into transform_param.

    Like Caffe, every Data/ImageData/WindowData layer of the net gets a (possibly empty)
    type param and transform_param, which then survive into the V2 layer.
    """
    for l in net.layers:
        for ltype, pname in _DATA_TRANSFORM_LAYERS:
            if l.type != ltype:
                continue
            p = getattr(l, pname)
            p.SetInParent()
            l.transform_param.SetInParent()
            for f in _TRANSFORM_FIELDS:
                if p.HasField(f):
                    setattr(l.transform_param, f, getattr(p, f))
                    p.ClearField(f)


# ----------------------------------------------------------------------------- V1 -> V2

def _unknown_enum(msg, field_number: int) -> List[int]:
    """Enum numbers this schema does not know, kept by the parser as unknown fields."""
    try:
        from google.protobuf.unknown_fields import UnknownFieldSet  # protobuf >= 4.23
    except ImportError:  # pragma: no cover - older protobuf: Caffe's behaviour (type "")
        return []
    return [f.data for f in UnknownFieldSet(msg)
            if f.field_number == field_number and f.wire_type == 0]


def _upgrade_v1_layer(v1: "caffe_pb2.V1LayerParameter", out: "caffe_pb2.LayerParameter",
                      problems: List[str], source: str, index: int) -> None:
    """UpgradeV1LayerParameter."""
    out.Clear()
    lname = v1.name or f"#{index}"
    out.bottom.extend(v1.bottom)
    out.top.extend(v1.top)
    if v1.HasField("name"):
        out.name = v1.name
    for r in v1.include:
        out.include.add().CopyFrom(r)
    for r in v1.exclude:
        out.exclude.add().CopyFrom(r)
    if v1.HasField("type"):
        # Every value of the schema's enum is mapped; kept for safety against schema drift.
        if v1.type not in V1_TYPE_NAMES:
            raise SchemaError(f"unknown V1 layer type enum {v1.type}", where=source,
                              layer=lname)
        out.type = V1_TYPE_NAMES[v1.type]
    else:
        bad = _unknown_enum(v1, V1.DESCRIPTOR.fields_by_name["type"].number)
        if bad:
            raise SchemaError(
                f"unknown V1 layer type enum value {bad[-1]}; known: "
                + ", ".join(f"{V1.LayerType.Name(v)}={v}" for v in sorted(V1_TYPE_NAMES)),
                where=source, layer=lname)
    bad_modes = _unknown_enum(v1, V1.DESCRIPTOR.fields_by_name["blob_share_mode"].number)
    if bad_modes:
        raise SchemaError(f"unknown blob_share_mode {bad_modes[0]}; known: STRICT=0, "
                          f"PERMISSIVE=1", where=source, layer=lname)
    for b in v1.blobs:
        out.blobs.add().CopyFrom(b)

    def spec(i: int) -> "caffe_pb2.ParamSpec":
        while len(out.param) <= i:
            out.param.add()
        return out.param[i]

    for i, name in enumerate(v1.param):
        spec(i).name = name
    for i, mode in enumerate(v1.blob_share_mode):
        spec(i).share_mode = (caffe_pb2.ParamSpec.STRICT if mode == V1.STRICT
                              else caffe_pb2.ParamSpec.PERMISSIVE)
    for i, lr in enumerate(v1.blobs_lr):
        spec(i).lr_mult = lr
    for i, decay in enumerate(v1.weight_decay):
        spec(i).decay_mult = decay
    out.loss_weight.extend(v1.loss_weight)
    for pname in _V1_COPIED_PARAMS:
        if v1.HasField(pname):
            getattr(out, pname).CopyFrom(getattr(v1, pname))
    if v1.HasField("layer"):
        problems.append(f"{source}: layer '{lname}': has a V0 'layer' field next to V1 "
                        f"fields; the V0 part is ignored")


def _upgrade_v1_net(net: caffe_pb2.NetParameter, problems: List[str],
                    source: str) -> caffe_pb2.NetParameter:
    """UpgradeV1Net: refuses a net holding both 'layer' and 'layers' (as Caffe does)."""
    if len(net.layer):
        raise SchemaError(
            "refusing to upgrade an inconsistent NetParameter: it has both 'layer' and "
            "'layers' fields. The current format uses layer { type: \"Layer\" ... }, the "
            "deprecated one layers { type: LAYER ... }; switch it all to 'layer' by hand",
            where=source, layer=net.layers[0].name or None)
    out = caffe_pb2.NetParameter()
    out.CopyFrom(net)
    del out.layers[:]
    del out.layer[:]
    for i, v1 in enumerate(net.layers):
        _upgrade_v1_layer(v1, out.layer.add(), problems, source, i)
    return out


# ----------------------------------------------------------------------------- input fields

def _upgrade_input(net: caffe_pb2.NetParameter, notes: List[str], source: str) -> None:
    """UpgradeNetInput: input + input_shape/input_dim -> one Input layer "input", first.

    input_shape wins over input_dim when both are given.  Caffe reads past the end of the
    shape list when it is too short (undefined behaviour / crash): we refuse instead.
    """
    n = len(net.input)
    has_shape = len(net.input_shape) > 0
    has_dim = len(net.input_dim) > 0
    if has_shape or has_dim:
        if has_shape and len(net.input_shape) < n:
            raise SchemaError(f"{n} net inputs but only {len(net.input_shape)} input_shape "
                              f"entries (one per input needed)", where=source)
        if not has_shape and len(net.input_dim) < 4 * n:
            raise SchemaError(f"{n} net inputs need {4 * n} input_dim values (4 per input), "
                              f"got {len(net.input_dim)}", where=source)
        if has_shape and len(net.input_shape) > n:
            notes.append(f"{source}: {len(net.input_shape) - n} input_shape entries "
                            f"beyond the {n} inputs are ignored")
        if has_shape and has_dim:
            notes.append(f"{source}: both input_shape and input_dim given; input_dim "
                            f"is ignored")
        if not has_shape and len(net.input_dim) > 4 * n:
            notes.append(f"{source}: {len(net.input_dim) - 4 * n} input_dim values beyond "
                            f"4 per input are ignored")
        layer = caffe_pb2.LayerParameter(name="input", type="Input")
        for i, name in enumerate(net.input):
            layer.top.append(name)
            shape = layer.input_param.shape.add()
            if has_shape:
                shape.CopyFrom(net.input_shape[i])
            else:
                shape.dim.extend(net.input_dim[4 * i:4 * i + 4])
        layer.input_param.SetInParent()
        rest = list(net.layer)
        kept = [caffe_pb2.LayerParameter() for _ in rest]
        for dst, src in zip(kept, rest):
            dst.CopyFrom(src)
        del net.layer[:]
        net.layer.add().CopyFrom(layer)
        for l in kept:
            net.layer.add().CopyFrom(l)
    net.ClearField("input")
    net.ClearField("input_shape")
    net.ClearField("input_dim")


def _upgrade_batch_norm(net: caffe_pb2.NetParameter) -> None:
    """UpgradeNetBatchNorm: the old BatchNorm needed 3 zero-lr param specs; drop them."""
    for l in net.layer:
        if l.type == "BatchNorm" and len(l.param) == 3:
            l.ClearField("param")


# ----------------------------------------------------------------------------- public API

def upgrade_net_with_report(net: caffe_pb2.NetParameter, source: str = "<string>"
                            ) -> Tuple[caffe_pb2.NetParameter, UpgradeReport]:
    """Upgrade a copy of ``net`` as Caffe's UpgradeNetAsNeeded; also say what was done."""
    report = UpgradeReport()
    p = caffe_pb2.NetParameter()
    p.CopyFrom(net)
    if _needs_v0_to_v1(p):
        p = _upgrade_v0_net(p, report.problems, report.notes, source)
        report.applied.append("v0_to_v1")
    if _needs_data_upgrade(p):
        _upgrade_data_transform(p)
        report.applied.append("data_transform")
    if _needs_v1_to_v2(p):
        p = _upgrade_v1_net(p, report.problems, source)
        report.applied.append("v1_to_v2")
    if _needs_input_upgrade(p):
        _upgrade_input(p, report.notes, source)
        report.applied.append("input")
    if _needs_batch_norm_upgrade(p):
        _upgrade_batch_norm(p)
        report.applied.append("batch_norm")
    return p, report


def upgrade_net(net: caffe_pb2.NetParameter, source: str = "<string>", *,
                strict: bool = False) -> caffe_pb2.NetParameter:
    """A new NetParameter in the current format (prototxt or caffemodel alike).

    Raises SchemaError where Caffe aborts; with ``strict`` also where Caffe drops
    information (``UpgradeReport.problems`` and ``.notes``).
    """
    out, report = upgrade_net_with_report(net, source)
    lost = report.problems + report.notes
    if strict and lost:
        raise SchemaError("upgrade would lose information: " + "; ".join(lost), where=source)
    return out


def needs_upgrade(net: caffe_pb2.NetParameter) -> List[str]:
    """The upgrade steps Caffe would apply to ``net`` (empty: already current)."""
    return upgrade_net_with_report(net)[1].applied


def solver_needs_upgrade(solver: caffe_pb2.SolverParameter) -> bool:
    """True when the solver uses the deprecated ``solver_type`` enum."""
    return solver.HasField("solver_type")


def upgrade_solver(solver: caffe_pb2.SolverParameter,
                   source: str = "<string>") -> caffe_pb2.SolverParameter:
    """A new SolverParameter with ``solver_type`` (enum) turned into ``type`` (string).

    Like Caffe, refuses a solver giving both fields, even when they agree.  An inline
    ``net_param``/``train_net_param``/``test_net_param`` is not upgraded (Caffe does not either).
    """
    out = caffe_pb2.SolverParameter()
    out.CopyFrom(solver)
    if not out.HasField("solver_type"):
        return out
    if out.HasField("type"):
        raise SchemaError(
            f"failed to upgrade solver: the old solver_type field (enum, here "
            f"{caffe_pb2.SolverParameter.SolverType.Name(out.solver_type)}) and the new type "
            f"field (string, here \"{out.type}\") cannot both be given; keep only type",
            where=source)
    out.type = SOLVER_TYPE_NAMES[out.solver_type]
    out.ClearField("solver_type")
    return out
