"""Golden data for the "common" layer family, recorded from real Caffe.

    cd /work/main && ../shared/tools/caffe-oracle/py tests/golden/make_common.py [CASE ...]

Writes tests/golden/common/<case>.npz with the protocol of ``oracle.record``.  Extras:

- ``param_after/<layer>/<i>``: the layer's blobs after the forward pass (BatchNorm updates
  its statistics during forward; ``record`` only keeps them from before the step).

Layers that refuse gradients to some bottom (Embed, Filter's selector, BatchReindex's
index, ArgMax) cannot run under ``force_backward`` (Caffe aborts); their nets instead put
``loss_weight`` on the outputs so that Caffe runs backward for the learnable blobs, and
feed data that needs a gradient through a ``Parameter`` layer (its param_diff is the
data's gradient).
"""
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import caffe  # noqa: E402  (the oracle's pycaffe)
import oracle  # noqa: E402

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "common")

_nets = []
_OrigNet = caffe.Net


def _capturing_net(*args, **kwargs):
    net = _OrigNet(*args, **kwargs)
    _nets.append(net)
    return net


def shape_text(shape):
    return "shape { %s }" % " ".join("dim: %d" % d for d in shape)


def net_text(inputs, layers, force_backward=True):
    """A net: Input layers for ``inputs`` [(name, shape)], then the given layer text."""
    s = 'name: "golden"\n'
    if force_backward:
        s += "force_backward: true\n"
    for name, shape in inputs:
        s += 'layer { name: "%s" type: "Input" top: "%s" input_param { %s } }\n' % (
            name, name, shape_text(shape))
    return s + layers


CASES = {}


def case(name, input_shapes, layers, *, force_backward=True, after=False, **kw):
    """Register a case: ``kw`` goes to ``oracle.record`` (inputs, params, phase, ...)."""
    CASES[name] = (net_text(input_shapes, layers, force_backward), after, kw)


def run(name):
    proto, after, kw = CASES[name]
    path = os.path.join(OUT, name + ".npz")
    caffe.Net = _capturing_net
    try:
        out = oracle.record(path, proto, **kw)
    finally:
        caffe.Net = _OrigNet
    if after:
        net = _nets[-1]
        for lname, blobs in net.params.items():
            for i, b in enumerate(blobs):
                out["param_after/%s/%d" % (lname, i)] = b.data.copy()
        np.savez_compressed(path, **out)
    del _nets[:]


R = np.random.RandomState(1234)


def fork(rng):
    """A generator that starts where ``rng`` is now, leaving ``rng`` where it is.  A case added
    between existing ones draws from a fork, so that the data of the cases after it (and so
    their committed golden files) do not shift."""
    f = np.random.RandomState()
    f.set_state(rng.get_state())
    return f


# ------------------------------------------------------------------ InnerProduct
case("ip_basic", [("x", (2, 3, 2, 2))],
     'layer { name: "ip" type: "InnerProduct" bottom: "x" top: "y" '
     'inner_product_param { num_output: 4 } }')
case("ip_axis2_transpose", [("x", (2, 3, 4))],
     'layer { name: "ip" type: "InnerProduct" bottom: "x" top: "y" '
     'inner_product_param { num_output: 5 axis: 2 transpose: true } }')
case("ip_transpose_nobias", [("x", (3, 2, 3))],
     'layer { name: "ip" type: "InnerProduct" bottom: "x" top: "y" '
     'inner_product_param { num_output: 2 transpose: true bias_term: false } }')
case("ip_axis_neg", [("x", (2, 2, 3))],
     'layer { name: "ip" type: "InnerProduct" bottom: "x" top: "y" '
     'inner_product_param { num_output: 3 axis: -1 } }')
case("ip_axis0", [("x", (2, 3))],
     'layer { name: "ip" type: "InnerProduct" bottom: "x" top: "y" '
     'inner_product_param { num_output: 2 axis: 0 } }')

# ------------------------------------------------------------------ BatchNorm
C = 3
SF = 999.98
bn_params = {("bn", 0): R.randn(C) * SF, ("bn", 1): (R.rand(C) + 0.5) * SF, ("bn", 2): np.array([SF])}
BN = 'layer { name: "bn" type: "BatchNorm" bottom: "x" top: "y" %s }'
case("bn_test_sf", [("x", (2, C, 2, 2))], BN % "", params=bn_params)
case("bn_test_sf_zero", [("x", (2, C, 2))], BN % "batch_norm_param { eps: 0.01 }",
     params={("bn", 0): R.randn(C), ("bn", 1): R.rand(C) + 0.5, ("bn", 2): np.array([0.0])})
case("bn_train", [("x", (2, C, 2, 2))], BN % "", phase="TRAIN", params=bn_params, after=True)
R_SMALL = fork(R)  # added after the cases below were recorded: it must not move R
case("bn_train_small_sf", [("x", (3, C, 2))], BN % "", phase="TRAIN", after=True,
     params={("bn", 0): R_SMALL.randn(C) * 2.5, ("bn", 1): (R_SMALL.rand(C) + 0.5) * 2.5,
             ("bn", 2): np.array([2.5])})
case("bn_train_2d_opts", [("x", (5, C))],
     BN % "batch_norm_param { eps: 0.001 moving_average_fraction: 0.9 }", phase="TRAIN",
     params=bn_params, after=True)
case("bn_train_global", [("x", (2, C, 3))], BN % "batch_norm_param { use_global_stats: true }",
     phase="TRAIN", params=bn_params, after=True)
case("bn_test_local", [("x", (2, C, 2, 2))], BN % "batch_norm_param { use_global_stats: false }",
     phase="TEST", params=bn_params, after=True)
case("bn_train_m1", [("x", (1, C))], BN % "", phase="TRAIN", params=bn_params, after=True)
case("bn_train_inplace", [("x", (3, C, 2))],
     'layer { name: "bn" type: "BatchNorm" bottom: "x" top: "x" }', phase="TRAIN",
     params=bn_params, after=True)

# ------------------------------------------------------------------ Scale / Bias
SC = 'layer { name: "sc" type: "Scale" bottom: "x" %s top: "y" scale_param { %s } }'
case("scale_basic", [("x", (2, 3, 2, 2))], SC % ("", ""))
case("scale_bias", [("x", (2, 3, 2, 2))], SC % ("", "bias_term: true"))
case("scale_axis1_num2", [("x", (2, 3, 2, 2))], SC % ("", "axis: 1 num_axes: 2 bias_term: true"))
case("scale_axis_neg", [("x", (2, 3, 4))], SC % ("", "axis: -1"))
case("scale_num_all", [("x", (2, 3, 2, 2))], SC % ("", "axis: 2 num_axes: -1"))
case("scale_scalar", [("x", (2, 3, 2))], SC % ("", "num_axes: 0 bias_term: true"))
case("scale_axis0", [("x", (2, 3, 2))], SC % ("", "axis: 0 num_axes: 2"))
case("scale_2bottom", [("x", (2, 3, 2, 2)), ("s", (3, 2))], SC % ('bottom: "s"', "bias_term: true"))
case("scale_2bottom_axis0", [("x", (2, 3, 2)), ("s", (2,))], SC % ('bottom: "s"', "axis: 0"))
case("scale_2bottom_neg", [("x", (2, 3, 4)), ("s", (3, 4))], SC % ('bottom: "s"', "axis: -2"))
case("scale_2bottom_scalar", [("x", (2, 3, 2)), ("s", ())], SC % ('bottom: "s"', "bias_term: true"),
     inputs={"s": np.array(1.75)})
case("scale_filler", [("x", (2, 3, 2))],
     SC % ("", "bias_term: true filler { type: 'constant' value: 2 } "
               "bias_filler { type: 'constant' value: -1 }"),
     params={("sc", 0): np.full(3, 2.0), ("sc", 1): np.full(3, -1.0)})
BI = 'layer { name: "bi" type: "Bias" bottom: "x" %s top: "y" bias_param { %s } }'
case("bias_basic", [("x", (2, 3, 2, 2))], BI % ("", ""))
case("bias_axis2_num2", [("x", (2, 3, 2, 2))], BI % ("", "axis: 2 num_axes: 2"))
case("bias_scalar", [("x", (2, 3))], BI % ("", "num_axes: 0"))
case("bias_axis_neg_all", [("x", (2, 3, 2))], BI % ("", "axis: -2 num_axes: -1"))
case("bias_2bottom", [("x", (2, 3, 2, 2)), ("b", (3, 2))], BI % ('bottom: "b"', ""))
case("bias_2bottom_axis0", [("x", (2, 3, 2)), ("b", (2, 3))], BI % ('bottom: "b"', "axis: 0"))

# ------------------------------------------------------------------ Eltwise
EL = 'layer { name: "el" type: "Eltwise" bottom: "a" bottom: "b" %s top: "y" eltwise_param { %s } }'
S3 = (2, 3, 2)
case("eltwise_sum", [("a", S3), ("b", S3)], EL % ("", ""))
case("eltwise_sum_coeff", [("a", S3), ("b", S3), ("c", S3)],
     EL % ('bottom: "c"', "operation: SUM coeff: 1 coeff: -2.5 coeff: 0.5"))
case("eltwise_sum_coeff_neg", [("a", S3), ("b", S3)], EL % ("", "coeff: -1 coeff: -0.25"))
case("eltwise_prod", [("a", S3), ("b", S3), ("c", S3)], EL % ('bottom: "c"', "operation: PROD"))
case("eltwise_prod2", [("a", S3), ("b", S3)], EL % ("", "operation: PROD"))
ties = {k: R.randint(-1, 2, size=S3).astype(np.float64) for k in "abcd"}
case("eltwise_max_ties2", [("a", S3), ("b", S3)], EL % ("", "operation: MAX"),
     inputs={"a": ties["a"], "b": ties["b"]})
case("eltwise_max_ties4", [("a", S3), ("b", S3), ("c", S3), ("d", S3)],
     EL % ('bottom: "c" bottom: "d"', "operation: MAX"), inputs=ties)
case("eltwise_max", [("a", S3), ("b", S3), ("c", S3)], EL % ('bottom: "c"', "operation: MAX"))

# ------------------------------------------------------------------ Concat / Slice / Split
CO = 'layer { name: "co" type: "Concat" %s top: "y" concat_param { %s } }'
case("concat_axis1", [("a", (2, 1, 2)), ("b", (2, 3, 2)), ("c", (2, 2, 2))],
     CO % ('bottom: "a" bottom: "b" bottom: "c"', ""))
case("concat_axis0", [("a", (1, 3)), ("b", (2, 3))], CO % ('bottom: "a" bottom: "b"', "axis: 0"))
case("concat_axis_neg", [("a", (2, 2, 1)), ("b", (2, 2, 3))],
     CO % ('bottom: "a" bottom: "b"', "axis: -1"))
case("concat_dim_legacy", [("a", (2, 2, 1, 2)), ("b", (2, 2, 2, 2))],
     CO % ('bottom: "a" bottom: "b"', "concat_dim: 2"))
case("concat_single", [("a", (2, 3))], CO % ('bottom: "a"', ""))
SL = 'layer { name: "sl" type: "Slice" bottom: "x" %s slice_param { %s } }'
case("slice_axis1_points", [("x", (2, 5, 2))], SL % ('top: "t0" top: "t1" top: "t2"',
                                                      "slice_point: 1 slice_point: 3"))
case("slice_axis0_equal", [("x", (4, 3))], SL % ('top: "t0" top: "t1"', "axis: 0"))
case("slice_axis_neg", [("x", (2, 2, 5))], SL % ('top: "t0" top: "t1"', "axis: -1 slice_point: 2"))
case("slice_dim_legacy", [("x", (2, 2, 6))], SL % ('top: "t0" top: "t1" top: "t2"', "slice_dim: 2"))
case("slice_one_top", [("x", (2, 3))], SL % ('top: "t0"', ""))
case("split_three", [("x", (2, 3))],
     'layer { name: "sp" type: "Split" bottom: "x" top: "t0" top: "t1" top: "t2" }')

# ------------------------------------------------------------------ Flatten / Reshape
FL = 'layer { name: "fl" type: "Flatten" bottom: "x" top: "y" flatten_param { %s } }'
case("flatten_default", [("x", (2, 3, 2, 2))], FL % "")
case("flatten_axis_end", [("x", (2, 3, 2, 2))], FL % "axis: 1 end_axis: 2")
case("flatten_neg", [("x", (2, 3, 2, 2))], FL % "axis: -3 end_axis: -2")
case("flatten_axis0", [("x", (2, 3, 2))], FL % "axis: 0")
RS = 'layer { name: "rs" type: "Reshape" bottom: "x" top: "y" reshape_param { %s } }'
case("reshape_0_neg1", [("x", (2, 3, 2, 2))], RS % "shape { dim: 0 dim: -1 }")
case("reshape_mixed", [("x", (2, 3, 2, 2))], RS % "shape { dim: 0 dim: 2 dim: -1 dim: 1 }")
case("reshape_axis_numaxes", [("x", (2, 3, 2, 2))], RS % "axis: 1 num_axes: 2 shape { dim: -1 }")
case("reshape_axis_neg_insert", [("x", (2, 3))], RS % "axis: -1 num_axes: 0 shape { dim: 1 }")
case("reshape_axis0_insert", [("x", (2, 3))], RS % "axis: 0 num_axes: 0 shape { dim: 1 dim: 1 }")
case("reshape_axis1_copy", [("x", (2, 3, 4))], RS % "axis: 1 shape { dim: 0 dim: 2 dim: 2 }")

# ------------------------------------------------------------------ Crop / Tile
CR = 'layer { name: "cr" type: "Crop" bottom: "x" bottom: "r" top: "y" crop_param { %s } }'
case("crop_default", [("x", (2, 2, 5, 5)), ("r", (1, 1, 3, 2))], CR % "offset: 1")
case("crop_no_offset", [("x", (2, 2, 4, 4)), ("r", (1, 1, 3, 3))], CR % "")
case("crop_per_axis", [("x", (2, 4, 5, 5)), ("r", (1, 2, 3, 2))],
     CR % "axis: 1 offset: 1 offset: 0 offset: 2")
case("crop_axis0", [("x", (3, 4, 3)), ("r", (2, 2, 2))], CR % "axis: 0 offset: 1")
case("crop_axis_neg", [("x", (2, 2, 4, 5)), ("r", (1, 1, 1, 3))], CR % "axis: -1 offset: 2")
TI = 'layer { name: "ti" type: "Tile" bottom: "x" top: "y" tile_param { %s } }'
case("tile_axis1", [("x", (2, 3, 2))], TI % "tiles: 3")
case("tile_axis_neg", [("x", (2, 2, 3))], TI % "axis: -1 tiles: 2")
case("tile_axis0", [("x", (2, 3))], TI % "axis: 0 tiles: 2")

# ------------------------------------------------------------------ Reduction
RD = 'layer { name: "rd" type: "Reduction" bottom: "x" top: "r" reduction_param { %s } }'
# A 0-axis top cannot take a recorded diff: reshape it to (1,) before it leaves the net.
TO1 = ('layer { name: "rs" type: "Reshape" bottom: "r" top: "y" '
       'reshape_param { shape { dim: 1 } } }')
xz = R.randn(2, 3, 2)
xz[0, 1, :] = 0.0
case("reduction_sum_axis0", [("x", (2, 3, 2))], RD % "" + TO1)
case("reduction_asum", [("x", (2, 3, 2))], RD % "operation: ASUM axis: 1", inputs={"x": xz})
case("reduction_sumsq_coeff", [("x", (2, 3, 2))], RD % "operation: SUMSQ axis: 2 coeff: -0.5")
case("reduction_mean_coeff", [("x", (2, 3, 2))], RD % "operation: MEAN axis: 1 coeff: 2")
case("reduction_mean_neg", [("x", (2, 3, 5))], RD % "operation: MEAN axis: -1")
case("reduction_asum_axis0", [("x", (2, 3))], RD % "operation: ASUM coeff: 3" + TO1)

# ------------------------------------------------------------------ MVN
MV = 'layer { name: "mv" type: "MVN" bottom: "x" top: "y" mvn_param { %s } }'
case("mvn_default", [("x", (2, 3, 2, 3))], MV % "")
case("mvn_across", [("x", (2, 3, 2, 2))], MV % "across_channels: true")
case("mvn_mean_only", [("x", (2, 3, 2, 2))], MV % "normalize_variance: false")
case("mvn_mean_only_across", [("x", (2, 3, 2, 2))],
     MV % "normalize_variance: false across_channels: true")
case("mvn_big_eps", [("x", (2, 2, 3, 2))], MV % "eps: 0.5")
case("mvn_big_eps_across", [("x", (2, 2, 2, 2))], MV % "eps: 0.25 across_channels: true")
case("mvn_2d", [("x", (3, 4))], MV % "across_channels: true")
case("mvn_3d", [("x", (2, 3, 4))], MV % "eps: 0.1")

# ------------------------------------------------------------------ ArgMax (no backward)
AM = 'layer { name: "am" type: "ArgMax" bottom: "x" top: "y" argmax_param { %s } }'
xt = R.randint(-2, 3, size=(3, 2, 3)).astype(np.float64)
case("argmax_default", [("x", (3, 5))], AM % "", skip_backward=True, force_backward=False)
case("argmax_topk_val", [("x", (2, 3, 2, 2))], AM % "top_k: 3 out_max_val: true",
     skip_backward=True, force_backward=False)
case("argmax_ties_topk", [("x", (3, 2, 3))], AM % "top_k: 4 out_max_val: true",
     inputs={"x": xt}, skip_backward=True, force_backward=False)
case("argmax_axis1_topk", [("x", (3, 2, 3))], AM % "axis: 1 top_k: 2", inputs={"x": xt},
     skip_backward=True, force_backward=False)
case("argmax_axis_neg_val", [("x", (3, 2, 3))], AM % "axis: -1 top_k: 3 out_max_val: true",
     inputs={"x": xt}, skip_backward=True, force_backward=False)
case("argmax_axis0_ties", [("x", (3, 2, 3))], AM % "axis: 0", inputs={"x": xt},
     skip_backward=True, force_backward=False)
case("argmax_2d", [("x", (4, 3))], AM % "top_k: 2", inputs={"x": R.randint(0, 2, (4, 3)) * 1.0},
     skip_backward=True, force_backward=False)

# ------------------------------------------------------------------ Softmax
SM = 'layer { name: "sm" type: "Softmax" bottom: "x" top: "y" softmax_param { %s } }'
case("softmax_axis1", [("x", (2, 3, 2, 2))], SM % "")
case("softmax_axis2", [("x", (2, 3, 4))], SM % "axis: 2")
case("softmax_axis_neg", [("x", (2, 2, 3))], SM % "axis: -1")
case("softmax_axis0", [("x", (3, 2))], SM % "axis: 0")

# ------------------------------------------------------------------ Embed (no grad to indices)
EM = ('layer { name: "em" type: "Embed" bottom: "x" top: "y" loss_weight: 1 '
      'embed_param { num_output: 3 input_dim: 5 %s } }')
case("embed_bias", [("x", (2, 3))], EM % "", force_backward=False,
     inputs={"x": np.array([[0, 4, 2], [2, 2, 1]], np.float64)})
case("embed_nobias", [("x", (4,))], EM % "bias_term: false", force_backward=False,
     inputs={"x": np.array([3, 0, 3, 4], np.float64)})

# ------------------------------------------------------------------ Filter / BatchReindex
PAR = 'layer { name: "%s" type: "Parameter" top: "%s" parameter_param { %s } }\n'
FI = (PAR % ("pa", "a", shape_text((4, 2, 3))) + PAR % ("pb", "b", shape_text((4, 3))) +
      'layer { name: "fi" type: "Filter" bottom: "a" bottom: "b" bottom: "s" top: "fa" top: "fb" '
      'loss_weight: 1 loss_weight: 1 }')
case("filter_two", [("s", (4, 1))], FI, force_backward=False,
     inputs={"s": np.array([[1.0], [0.0], [2.5], [-1.0]])})
case("filter_one_kept", [("s", (4, 1, 1))], FI,
     force_backward=False, inputs={"s": np.array([0.0, 0.0, 1.0, 0.0]).reshape(4, 1, 1)})
BR = (PAR % ("pa", "a", shape_text((3, 2, 2))) +
      'layer { name: "br" type: "BatchReindex" bottom: "a" bottom: "i" top: "y" loss_weight: 1 }')
case("batch_reindex", [("i", (5,))], BR, force_backward=False,
     inputs={"i": np.array([2, 0, 2, 1, 2], np.float64)})

# ------------------------------------------------------------------ Silence / Parameter
case("silence_param_scale", [("x", (2, 3, 2))],
     PAR % ("p", "p", shape_text((3,))) +
     'layer { name: "sc" type: "Scale" bottom: "x" bottom: "p" top: "y" }\n'
     'layer { name: "si" type: "Silence" bottom: "x" }')


def main(argv):
    os.makedirs(OUT, exist_ok=True)
    names = argv or list(CASES)
    for n in names:
        run(n)
    total = sum(os.path.getsize(os.path.join(OUT, f)) for f in os.listdir(OUT))
    print("%d cases, %d bytes in %s" % (len(names), total, OUT), file=sys.stderr)


if __name__ == "__main__":
    main(sys.argv[1:])
