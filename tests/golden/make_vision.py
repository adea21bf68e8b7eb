"""Record golden files for the vision layers from real Caffe (TEST phase).

    cd /work/main && ../shared/tools/caffe-oracle/py tests/golden/make_vision.py [case ...]

Each case runs in its own subprocess (a failed Caffe CHECK aborts the process).  What the
oracle cannot give (round_mode FLOOR, STOCHASTIC pooling, which Caffe implements on GPU
only, the 0/0 AVE window) is tested against numpy references in tests/layers/test_layers_vision.py.
"""
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "vision")


def net(layer, shapes, tops=("y",)):
    """A net feeding ``shapes`` (name -> shape) through Input layers into one layer."""
    text = 'name: "g" force_backward: true\n'
    for name, shape in shapes.items():
        dims = " ".join("dim: %d" % d for d in shape)
        text += ('layer { name: "%s" type: "Input" top: "%s" input_param { shape { %s } } }\n'
                 % (name, name, dims))
    bottoms = " ".join('bottom: "%s"' % n for n in shapes)
    top_text = " ".join('top: "%s"' % t for t in tops)
    return text + 'layer { name: "l" %s %s %s }\n' % (bottoms, top_text, layer)


def ints(seed, shape, hi=3):
    """Small integers as floats: many ties for MAX pooling."""
    return np.random.RandomState(seed).randint(0, hi, size=shape).astype(np.float32)


def conv(text):
    return 'type: "Convolution" convolution_param { %s }' % text


def deconv(text):
    return 'type: "Deconvolution" convolution_param { %s }' % text


def pool(text):
    return 'type: "Pooling" pooling_param { %s }' % text


def lrn(text):
    return 'type: "LRN" lrn_param { %s }' % text


X = "x"
# name -> (layer text, {input: shape}, options)
#   options: inputs (arrays), tops, skip_backward, scale (input multiplier)
CASES = {
    # ---------------------------------------------------------------- convolution
    "conv_basic": (conv("num_output: 4 kernel_size: 3 pad: 1"), {X: (2, 3, 6, 7)}, {}),
    "conv_group_dilate_rect": (conv("num_output: 6 kernel_h: 3 kernel_w: 2 stride_h: 2 "
                                    "stride_w: 1 pad_h: 1 pad_w: 0 dilation: 2 group: 2"),
                               {X: (2, 4, 9, 8)}, {}),
    "conv_nobias_bigpad": (conv("num_output: 3 kernel_size: 3 stride: 2 pad: 2 bias_term: false"),
                           {X: (2, 3, 7, 7)}, {}),
    "conv_per_axis": (conv("num_output: 3 kernel_size: 3 kernel_size: 2 stride: 1 stride: 2 "
                           "pad: 0 pad: 1 dilation: 1 dilation: 3"), {X: (1, 2, 7, 9)}, {}),
    "conv_depthwise": (conv("num_output: 6 kernel_size: 3 group: 3 stride: 2"),
                       {X: (2, 3, 6, 6)}, {}),
    "conv_1d": (conv("num_output: 4 kernel_size: 3 stride: 2 pad: 1"), {X: (2, 3, 10)}, {}),
    "conv_3d": (conv("num_output: 3 kernel_size: 3 kernel_size: 2 kernel_size: 3 pad: 1 "
                     "stride: 1 stride: 2 stride: 1"), {X: (1, 2, 4, 5, 6)}, {}),
    "conv_axis2": (conv("num_output: 2 kernel_size: 3 axis: 2"), {X: (2, 3, 4, 5, 6)}, {}),
    "conv_small_input": (conv("num_output: 2 kernel_size: 3 stride: 2"), {X: (1, 2, 2, 5)}, {}),
    "conv_two_bottoms": (conv("num_output: 3 kernel_size: 1"), {X: (2, 3, 4, 4), "x2": (2, 3, 4, 4)},
                         {"tops": ("y", "y2")}),
    "conv_0d": (conv("num_output: 3"), {X: (4, 6)}, {}),
    # ---------------------------------------------------------------- deconvolution
    "deconv_stride_pad_group": (deconv("num_output: 6 kernel_size: 4 stride: 2 pad: 1 group: 2"),
                                {X: (2, 4, 3, 5)}, {}),
    "deconv_rect_dilate": (deconv("num_output: 2 kernel_h: 3 kernel_w: 2 stride_h: 1 stride_w: 3 "
                                  "pad_h: 2 pad_w: 0 dilation: 2"), {X: (1, 3, 4, 4)}, {}),
    "deconv_3d_nobias": (deconv("num_output: 2 kernel_size: 2 stride: 2 bias_term: false"),
                         {X: (1, 2, 3, 3, 2)}, {}),
    "deconv_bigpad": (deconv("num_output: 2 kernel_size: 3 pad: 2"), {X: (1, 2, 5, 5)}, {}),
    "deconv_1d": (deconv("num_output: 2 kernel_size: 3 stride: 3"), {X: (2, 2, 4)}, {}),
    # ---------------------------------------------------------------- pooling
    "pool_max_ceil": (pool("pool: MAX kernel_size: 3 stride: 2"), {X: (2, 3, 7, 8)}, {}),
    "pool_ave_ceil": (pool("pool: AVE kernel_size: 3 stride: 2"), {X: (2, 3, 7, 8)}, {}),
    "pool_max_pad_drop": (pool("pool: MAX kernel_size: 2 stride: 2 pad: 1"), {X: (2, 2, 5, 5)}, {}),
    "pool_ave_pad_drop": (pool("pool: AVE kernel_size: 2 stride: 2 pad: 1"), {X: (2, 2, 5, 5)}, {}),
    "pool_max_k3s2p1": (pool("pool: MAX kernel_size: 3 stride: 2 pad: 1"), {X: (2, 2, 6, 7)}, {}),
    "pool_ave_k3s2p1": (pool("pool: AVE kernel_size: 3 stride: 2 pad: 1"), {X: (2, 2, 6, 7)}, {}),
    "pool_max_bigpad": (pool("pool: MAX kernel_size: 3 stride: 2 pad: 2"), {X: (2, 2, 6, 7)}, {}),
    "pool_ave_bigpad": (pool("pool: AVE kernel_size: 3 stride: 2 pad: 2"), {X: (2, 2, 6, 7)}, {}),
    "pool_ave_bigpad_k4": (pool("pool: AVE kernel_size: 4 stride: 3 pad: 3"), {X: (1, 2, 7, 6)}, {}),
    "pool_max_bigpad_k4": (pool("pool: MAX kernel_size: 4 stride: 1 pad: 3"), {X: (1, 2, 4, 5)}, {}),
    "pool_max_stride_gt_kernel": (pool("pool: MAX kernel_size: 2 stride: 3"), {X: (2, 2, 7, 11)}, {}),
    "pool_ave_stride_gt_kernel": (pool("pool: AVE kernel_size: 2 stride: 3"), {X: (2, 2, 7, 11)}, {}),
    "pool_max_empty_window": (pool("pool: MAX kernel_size: 2 stride: 5"), {X: (1, 2, 8, 8)},
                              {"skip_backward": True}),
    "pool_ave_empty_window": (pool("pool: AVE kernel_size: 2 stride: 5"), {X: (1, 2, 8, 8)}, {}),
    "pool_max_rect": (pool("pool: MAX kernel_h: 3 kernel_w: 2 stride_h: 2 stride_w: 3 pad_h: 1 "
                           "pad_w: 1"), {X: (2, 2, 7, 9)}, {}),
    "pool_ave_rect": (pool("pool: AVE kernel_h: 3 kernel_w: 2 stride_h: 2 stride_w: 3 pad_h: 1 "
                           "pad_w: 1"), {X: (2, 2, 7, 9)}, {}),
    "pool_global_max": (pool("pool: MAX global_pooling: true"), {X: (2, 3, 5, 4)},
                        {"inputs": {X: ints(1, (2, 3, 5, 4))}}),
    "pool_global_ave": (pool("pool: AVE global_pooling: true"), {X: (2, 3, 5, 4)}, {}),
    "pool_max_ties": (pool("pool: MAX kernel_size: 3 stride: 2"), {X: (2, 2, 7, 7)},
                      {"inputs": {X: ints(2, (2, 2, 7, 7))}}),
    "pool_max_ties_overlap": (pool("pool: MAX kernel_size: 2 stride: 1"), {X: (1, 2, 5, 6)},
                              {"inputs": {X: ints(3, (1, 2, 5, 6), hi=2)}}),
    "pool_max_ties_mask": (pool("pool: MAX kernel_size: 3 stride: 2 pad: 1"), {X: (2, 2, 6, 6)},
                           {"inputs": {X: ints(4, (2, 2, 6, 6))}, "tops": ("y", "mask")}),
    "pool_max_mask_bigpad": (pool("pool: MAX kernel_size: 3 stride: 2 pad: 2"), {X: (2, 2, 6, 7)},
                             {"inputs": {X: ints(5, (2, 2, 6, 7))}, "tops": ("y", "mask")}),
    "pool_max_small_input": (pool("pool: MAX kernel_size: 3 stride: 2"), {X: (1, 2, 2, 2)}, {}),
    "pool_ave_small_input": (pool("pool: AVE kernel_size: 3 stride: 2"), {X: (1, 2, 2, 2)}, {}),
    # ---------------------------------------------------------------- LRN
    "lrn_across": (lrn("local_size: 5 alpha: 0.5 beta: 0.75 k: 2"), {X: (2, 7, 3, 3)},
                   {"scale": 2.0}),
    "lrn_across_3": (lrn("local_size: 3 alpha: 1.2 beta: 0.6 k: 1.5"), {X: (2, 2, 3, 4)},
                     {"scale": 2.0}),
    "lrn_across_wide": (lrn("local_size: 7 alpha: 2 beta: 0.9 k: 3"), {X: (1, 3, 2, 2)},
                        {"scale": 2.0}),
    "lrn_within": (lrn("local_size: 3 alpha: 0.3 beta: 0.6 k: 5 norm_region: WITHIN_CHANNEL"),
                   {X: (2, 3, 5, 6)}, {"scale": 2.0}),
    "lrn_within_5": (lrn("local_size: 5 alpha: 1.5 beta: 0.75 norm_region: WITHIN_CHANNEL"),
                     {X: (1, 2, 4, 4)}, {"scale": 2.0}),
    "lrn_default": ('type: "LRN"', {X: (1, 6, 2, 3)}, {"scale": 3.0}),
    # ---------------------------------------------------------------- SPP, Im2col
    "spp_max3": ('type: "SPP" spp_param { pyramid_height: 3 pool: MAX }', {X: (2, 2, 7, 9)}, {}),
    "spp_ave2": ('type: "SPP" spp_param { pyramid_height: 2 pool: AVE }', {X: (1, 3, 6, 5)}, {}),
    "spp_height1": ('type: "SPP" spp_param { pyramid_height: 1 }', {X: (1, 2, 5, 5)}, {}),
    "im2col_2d": ('type: "Im2col" convolution_param { kernel_size: 3 stride: 2 pad: 1 }',
                  {X: (2, 2, 5, 6)}, {}),
    "im2col_rect_dilate": ('type: "Im2col" convolution_param { kernel_h: 2 kernel_w: 3 '
                           'dilation: 2 pad_h: 1 pad_w: 0 stride_h: 1 stride_w: 2 }',
                           {X: (1, 2, 7, 6)}, {}),
}


def run_case(name):
    sys.path.insert(0, HERE)
    from oracle import record

    layer, shapes, opts = CASES[name]
    rng = np.random.RandomState(1000 + sum(map(ord, name)))
    inputs = dict(opts.get("inputs", {}))
    for inp, shape in shapes.items():
        if inp not in inputs:
            inputs[inp] = (rng.randn(*shape) * opts.get("scale", 1.0)).astype(np.float32)
    record(os.path.join(OUT, name + ".npz"), net(layer, shapes, opts.get("tops", ("y",))),
           seed=7 + len(name), phase="TEST", inputs=inputs,
           skip_backward=opts.get("skip_backward", False))


def main(argv):
    from oracle import run_cases

    return run_cases(argv, CASES, run_case, __file__)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
