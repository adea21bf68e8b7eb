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
    raise AttributeError(name)


__all__ = ["Net", "CaffeCompatError", "__version__"]
