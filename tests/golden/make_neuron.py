"""Record golden files for the neuron layers from real Caffe (TEST phase).

    cd /work/main && ../shared/tools/caffe-oracle/py tests/golden/make_neuron.py [case ...]

Each case runs in its own subprocess (a failed Caffe CHECK aborts the process).  Clip and
Swish are BVLC-master layers the oracle lacks; they are tested against numpy references in
tests/layers/test_layers_neuron.py, as is Dropout at TRAIN (statistics).
"""
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "neuron")

SHAPE = (2, 3, 4, 5)


def net(layer, shape=SHAPE, bottom="x", top="y"):
    dims = " ".join("dim: %d" % d for d in shape)
    return ('name: "g" force_backward: true\n'
            'layer { name: "x" type: "Input" top: "x" input_param { shape { %s } } }\n'
            'layer { name: "l" bottom: "%s" top: "%s" %s }\n' % (dims, bottom, top, layer))


def randn_with_zeros(seed, shape=SHAPE):
    """Normals with a few exact zeros (the kink of ReLU-like layers)."""
    rng = np.random.RandomState(seed)
    x = rng.randn(*shape).astype(np.float32)
    flat = x.reshape(-1)
    flat[::7] = 0.0
    return x


def positive(seed, shape=SHAPE, lo=0.1):
    rng = np.random.RandomState(seed)
    return (np.abs(rng.randn(*shape)) + lo).astype(np.float32)


# name -> (layer text, inputs or None, extra record kwargs)
CASES = {
    "relu": ('type: "ReLU"', {"x": randn_with_zeros(1)}, {}),
    "relu_leaky": ('type: "ReLU" relu_param { negative_slope: 0.1 }', {"x": randn_with_zeros(2)}, {}),
    "relu_inplace": ('type: "ReLU" relu_param { negative_slope: -0.3 }', {"x": randn_with_zeros(3)},
                     {"inplace": True}),
    "relu_inplace_pos": ('type: "ReLU" relu_param { negative_slope: 0.2 }',
                         {"x": randn_with_zeros(21)}, {"inplace": True}),
    "bnll_inplace": ('type: "BNLL"', {"x": randn_with_zeros(23) * 3}, {"inplace": True}),
    "log_inplace": ('type: "Log" log_param { base: 2 shift: 3 }', {"x": positive(24)},
                    {"inplace": True}),
    "power_inplace_sq": ('type: "Power" power_param { power: 2 scale: 0.5 shift: -1 }', None,
                         {"inplace": True}),
    "power_inplace_sqrt": ('type: "Power" power_param { power: 0.5 scale: 2 shift: 1 }',
                           {"x": positive(25)}, {"inplace": True}),
    "power_inplace_affine": ('type: "Power" power_param { power: 1 scale: 3 shift: 2 }', None,
                             {"inplace": True}),
    "power_inplace_cube": ('type: "Power" power_param { power: 3 scale: 0.5 }', None,
                           {"inplace": True}),
    "elu_inplace_neg_alpha": ('type: "ELU" elu_param { alpha: -0.5 }', {"x": randn_with_zeros(26)},
                              {"inplace": True}),
    "sigmoid_inplace": ('type: "Sigmoid"', {"x": randn_with_zeros(27)}, {"inplace": True}),
    "prelu_inplace": ('type: "PReLU"', {"x": randn_with_zeros(28)}, {"inplace": True}),
    "prelu": ('type: "PReLU"', {"x": randn_with_zeros(4)}, {}),
    "prelu_shared": ('type: "PReLU" prelu_param { channel_shared: true }',
                     {"x": randn_with_zeros(5)}, {}),
    "prelu_2d": ('type: "PReLU"', {"x": randn_with_zeros(6, (4, 3))}, {"shape": (4, 3)}),
    "elu": ('type: "ELU"', {"x": randn_with_zeros(7)}, {}),
    "elu_alpha": ('type: "ELU" elu_param { alpha: 0.5 }', {"x": randn_with_zeros(8) * 3}, {}),
    "sigmoid": ('type: "Sigmoid"', {"x": randn_with_zeros(9) * 4}, {}),
    "tanh": ('type: "TanH"', {"x": randn_with_zeros(10) * 2}, {}),
    "absval": ('type: "AbsVal"', {"x": randn_with_zeros(11)}, {}),
    "bnll": ('type: "BNLL"', {"x": (randn_with_zeros(12) * 30).astype(np.float32)}, {}),
    "power_default": ('type: "Power"', None, {}),
    "power_sq_shift": ('type: "Power" power_param { power: 2 scale: 0.5 shift: -1 }', None, {}),
    "power_sqrt": ('type: "Power" power_param { power: 0.5 }', {"x": positive(13)}, {}),
    "power_sqrt_scale_shift": ('type: "Power" power_param { power: 0.5 scale: 2 shift: 0.3 }',
                               {"x": positive(14)}, {}),
    "power_cube": ('type: "Power" power_param { power: 3 scale: -1.5 }', None, {}),
    "power_inv": ('type: "Power" power_param { power: -1 scale: 1 shift: 4 }', None, {}),
    "power_affine": ('type: "Power" power_param { power: 1 scale: 3 shift: 2 }', None, {}),
    "power_zero": ('type: "Power" power_param { power: 0 scale: 3 shift: 2 }', None, {}),
    "power_scale0": ('type: "Power" power_param { power: 2 scale: 0 shift: 3 }', None, {}),
    "exp": ('type: "Exp"', None, {}),
    "exp_base_scale_shift": ('type: "Exp" exp_param { base: 2 scale: 0.5 shift: 1 }', None, {}),
    "exp_e_shift": ('type: "Exp" exp_param { scale: -1 shift: 0.5 }', None, {}),
    "log": ('type: "Log"', {"x": positive(15)}, {}),
    "log_base10": ('type: "Log" log_param { base: 10 scale: 2 shift: 0.5 }', {"x": positive(17)}, {}),
    "log_e_scale": ('type: "Log" log_param { scale: 3 }', {"x": positive(18)}, {}),
    "threshold": ('type: "Threshold" threshold_param { threshold: 0.25 }',
                  {"x": np.where(randn_with_zeros(19) > 1, np.float32(0.25),
                                 randn_with_zeros(19))}, {"skip_backward": True}),
    "threshold_default": ('type: "Threshold"', {"x": randn_with_zeros(20)}, {"skip_backward": True}),
    "dropout_test": ('type: "Dropout" dropout_param { dropout_ratio: 0.3 }', None, {}),
}


def run_case(name):
    sys.path.insert(0, HERE)
    from oracle import record

    layer, inputs, extra = CASES[name]
    extra = dict(extra)
    shape = extra.pop("shape", SHAPE)
    top = "x" if extra.pop("inplace", False) else "y"
    record(os.path.join(OUT, name + ".npz"), net(layer, shape, top=top), seed=100 + len(name),
           phase="TEST", inputs=inputs, **extra)


def main(argv):
    from oracle import run_cases

    return run_cases(argv, CASES, run_case, __file__)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
