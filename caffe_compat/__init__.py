"""caffe-compat: run legacy Caffe models on PyTorch, exactly.

``Net`` builds an executable ``torch.nn.Module`` from a prototxt (any format version) and
loads ``.caffemodel``/``.pt``/``.safetensors`` weights.
"""
from caffe_compat.errors import CaffeCompatError  # noqa: F401

__version__ = "0.1.0"


def __getattr__(name):  # lazy: importing the package stays cheap for the CLI
    if name == "Net":
        from caffe_compat.net import Net

        return Net
    if name == "register_layer":  # @caffe_compat.register_layer("MyType") on a Layer subclass
        from caffe_compat.layers.registry import register

        return register
    if name == "Layer":
        from caffe_compat.layers.base import Layer

        return Layer
    raise AttributeError(name)


__all__ = ["Net", "Layer", "register_layer", "CaffeCompatError", "__version__"]
