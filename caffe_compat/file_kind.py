"""What a file given as weights (or a solver state) really holds, by its first bytes.

Only for error messages: the format itself is chosen by name, as Caffe does (any name
ending in ``.h5`` is HDF5), and a refusal adds the hint so that a prototxt named ``.pt``
(py-faster-rcnn's habit) or HDF5 weights named ``.caffemodel`` are easy to spot.
"""
from __future__ import annotations

from caffe_compat.io import _text_hint

#: the first eight bytes of every HDF5 file
HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"

__all__ = ["HDF5_SIGNATURE", "hdf5_hint", "file_kind_hint"]


def hdf5_hint(head) -> str:
    """'; it looks like an HDF5 file ...' for HDF5 content under another name."""
    if bytes(head[:8]) == HDF5_SIGNATURE:
        return ("; it looks like an HDF5 file: Caffe's HDF5 weights must be named *.h5 "
                "(e.g. model.caffemodel.h5)")
    return ""


def file_kind_hint(path: str) -> str:
    """'; it looks like ...' for a weights file that is something else ('' when unknown)."""
    try:
        with open(path, "rb") as f:
            head = f.read(4096)
    except OSError:
        return ""
    if head.startswith(b"PK\x03\x04"):
        return ""
    hint = _text_hint(head)
    if hint:
        return ("; it looks like a text prototxt (py-faster-rcnn names net definitions .pt), "
                "not a weights file")
    if head[:1] in (b"\x0a", b"\xa2"):
        return "; it looks like a binary caffemodel: name it .caffemodel"
    return hdf5_hint(head)
