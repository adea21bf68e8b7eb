"""Weights in and out: ``.caffemodel``, Caffe's HDF5 ``.caffemodel.h5``, ``.safetensors``, ``.pt``.

One module per job:

- :mod:`~caffe_compat.weights.formats`: which format a file name means (one table), and
  ``load_into`` / ``save`` / ``read_state_file`` / ``write_state_file`` through it;
- :mod:`~caffe_compat.weights.caffemodel`: Caffe's binary format, read at the wire level
  (:mod:`caffe_compat.wire`) so that blobs are zero-copy views of a memory map;
- :mod:`~caffe_compat.weights.hdf5`: Caffe's HDF5 layout (``Net::ToHDF5``);
- :mod:`~caffe_compat.weights.state_dict`: PyTorch state dicts (``<layer>.<param>`` keys, see
  README "Weights"), ``.safetensors`` and weights-only ``.pt``, and BatchNorm folding;
- :mod:`~caffe_compat.weights.trained_layers`: Caffe's ``CopyTrainedLayersFrom``, the copy
  policy every Caffe format shares (missing layers are an error unless allowed, NaN/Inf refused).

This package's namespace is the public API; the modules above are where each piece lives.
"""
from caffe_compat.weights.caffemodel import (blob_names_for, caffemodel_state_dict, encode_blob,
                                             load_caffemodel_into, net_layers_for_caffemodel,
                                             read_caffemodel, write_caffemodel)
from caffe_compat.weights.formats import (FORMATS, WeightsFormat, format_of, load_into,
                                          read_state_file, save, write_state_file)
from caffe_compat.weights.hdf5 import load_hdf5_into, save_hdf5
from caffe_compat.weights.state_dict import (StateDict, fold_batchnorm, load_state_into,
                                             net_state_dict, read_pt, read_safetensors, save_pt,
                                             save_safetensors)
from caffe_compat.weights.trained_layers import (ENV_ALLOW_NONFINITE, CaffeBlob, CaffeLayerWeights,
                                                 check_finite_array, load_layers_into)

__all__ = ["FORMATS", "WeightsFormat", "format_of", "load_into", "save", "read_state_file",
           "write_state_file", "read_caffemodel", "write_caffemodel", "encode_blob",
           "load_caffemodel_into", "net_layers_for_caffemodel", "blob_names_for",
           "caffemodel_state_dict", "load_hdf5_into", "save_hdf5", "StateDict", "fold_batchnorm",
           "load_state_into", "net_state_dict", "read_pt", "read_safetensors", "save_pt",
           "save_safetensors", "ENV_ALLOW_NONFINITE", "CaffeBlob", "CaffeLayerWeights",
           "check_finite_array", "load_layers_into"]
