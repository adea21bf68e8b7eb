"""Which weights format a file name means: one table, used by load, save and ``convert``.

Each row names a format's suffixes and how to read it into a net, write a net to it, and
(where the file alone can say which tensor is which) read or write it as a plain state dict
without a net definition.  Adding a format is one row.  As Caffe's
``CopyTrainedLayersFrom``, any name ending in ``.h5`` is HDF5, and a name no row claims is a
binary caffemodel.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Any, Callable, List, Optional, Tuple

from caffe_compat.errors import SchemaError, WeightsError
from caffe_compat.weights.caffemodel import (caffemodel_state_dict, load_caffemodel_into,
                                             net_layers_for_caffemodel, write_caffemodel)
from caffe_compat.weights.hdf5 import load_hdf5_into, save_hdf5
from caffe_compat.weights.state_dict import (StateDict, load_state_into, net_state_dict, read_pt,
                                             read_safetensors, save_pt, save_safetensors)

__all__ = ["WeightsFormat", "FORMATS", "format_of", "load_into", "save", "read_state_file",
           "write_state_file"]


@dataclass(frozen=True)
class WeightsFormat:
    """One weights format: its names and its readers and writers."""

    name: str
    suffixes: Tuple[str, ...]
    what: str                                    # in messages: "a .caffemodel"
    load: Callable[..., List[str]]               # (net, path, *, allow_missing, check_finite) -> notes
    save: Callable[..., None]                    # (net, path, **kw)
    read_state: Optional[Callable[[str], StateDict]] = None         # None: the net is needed
    write_state: Optional[Callable[[StateDict, str], None]] = None  # None: the net is needed
    net_state: Optional[Callable[[Any], StateDict]] = None          # what ``save`` writes
    #: why a state dict cannot be read from the file alone (when ``read_state`` is None)
    read_refusal: str = ""

    def state_reader(self) -> Callable[[str], StateDict]:
        """``read_state``, or a SchemaError saying the net definition is needed."""
        if self.read_state is None:
            raise SchemaError(f"{self.read_refusal}: add --model NET.prototxt")
        return self.read_state

    def state_writer(self) -> Callable[[StateDict, str], None]:
        """``write_state``, or a SchemaError saying the net definition is needed."""
        if self.write_state is None:
            raise SchemaError(f"writing {self.what} needs the net definition: add --model NET.prototxt")
        return self.write_state


def _state_loader(read: Callable[[str], StateDict]) -> Callable[..., List[str]]:
    def load(net, path: str, *, allow_missing: bool = False, check_finite: Optional[bool] = None):
        return load_state_into(net, read(path), allow_missing=allow_missing, where=path,
                               check_finite=check_finite)
    return load


def _state_saver(net_state: Callable[[Any], StateDict],
                 write: Callable[[StateDict, str], None]) -> Callable[..., None]:
    def save_(net, path: str) -> None:
        write(net_state(net), path)
    return save_


def _save_caffemodel(net, path: str) -> None:
    write_caffemodel(path, net.net_name, net_layers_for_caffemodel(net))


_safetensors_state = functools.partial(net_state_dict, dedupe_shared=True)  # no shared storage in safetensors

#: first row whose suffix ends the name wins; no row: :data:`CAFFEMODEL`
FORMATS: Tuple[WeightsFormat, ...] = (
    WeightsFormat("hdf5", (".h5",), "an HDF5 (.h5) weights file", load_hdf5_into, save_hdf5,
                  read_refusal="reading HDF5 (.h5) weights needs the net definition (they hold no "
                               "layer types to name the blobs by)"),
    WeightsFormat("safetensors", (".safetensors",), "a .safetensors file",
                  _state_loader(read_safetensors), _state_saver(_safetensors_state, save_safetensors),
                  read_safetensors, save_safetensors, _safetensors_state),
    WeightsFormat("pt", (".pt", ".pth"), "a .pt file", _state_loader(read_pt),
                  _state_saver(net_state_dict, save_pt), read_pt, save_pt, net_state_dict),
    WeightsFormat("caffemodel", (".caffemodel",), "a .caffemodel", load_caffemodel_into,
                  _save_caffemodel, caffemodel_state_dict),
)
CAFFEMODEL = FORMATS[-1]


def format_of(path: str) -> WeightsFormat:
    """The format a weights file name means (a name no row claims: a binary caffemodel)."""
    path = os.fspath(path)
    return next((f for f in FORMATS if path.endswith(f.suffixes)), CAFFEMODEL)


def load_into(net, path: str, *, allow_missing: bool = False,
              check_finite: Optional[bool] = None) -> List[str]:
    """Load .caffemodel/.pt/.safetensors/.h5 weights into ``net`` (format by name); returns
    notes (e.g. ignored layers).

    ``check_finite`` (default: on, unless ``$CAFFE_COMPAT_ALLOW_NONFINITE_WEIGHTS=1``)
    refuses NaN/Inf values, naming the layer and blob.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise WeightsError("weights file not found", where=path)
    return format_of(path).load(net, path, allow_missing=allow_missing, check_finite=check_finite)


def save(net, path: str, **kw) -> None:
    """Write ``net``'s weights as .caffemodel, .pt, .safetensors or Caffe's HDF5 layout
    (``.h5``, e.g. ``model.caffemodel.h5``; ``write_diff=True`` adds the gradients), by name."""
    path = os.fspath(path)
    format_of(path).save(net, path, **kw)


def read_state_file(path: str) -> StateDict:
    """A weights file as a ``<layer>.<param>`` state dict, without a net (format by name);
    HDF5 weights need the net (a SchemaError says so)."""
    path = os.fspath(path)
    return format_of(path).state_reader()(path)


def write_state_file(sd: StateDict, path: str) -> None:
    """Write a state dict as .pt or .safetensors (by name); Caffe's formats need the net."""
    path = os.fspath(path)
    format_of(path).state_writer()(sd, path)
