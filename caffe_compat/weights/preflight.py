"""Checks of what a ``.pt`` or ``.safetensors`` file *declares*, made before its data is read.

A file's metadata can promise far more than the file holds: a zip entry compressed a
thousandfold, a safetensors header listing a million tensors, a pickled tensor that is a
view of 10^10 elements on a one-element storage (``torch.zeros(1).expand(10**10)`` saved).
Each is refused here, from the metadata, with the limits of :mod:`caffe_compat.limits`
(each tensor's elements, the file's tensor count and elements together), so reading the
rest costs memory proportional to the file.
"""
from __future__ import annotations

import json
import os
import struct
import zipfile
from typing import Any, Dict, Mapping, Optional, Tuple, Type

from caffe_compat import limits
from caffe_compat.errors import CaffeCompatError, LimitError, ParseError, WeightsError, shorten

__all__ = ["check_pt_archive", "check_tensors", "read_safetensors_header", "check_safetensors_header"]

#: the end-of-central-directory record of a zip file (and its zip64 locator)
_EOCD = b"PK\x05\x06"
_EOCD64_LOCATOR = b"PK\x06\x07"
#: zip entries of a torch.save archive besides one per storage (data.pkl, version, byteorder...)
_PT_OVERHEAD_ENTRIES = 16
#: the largest safetensors header the safetensors library itself reads (its MAX_HEADER_SIZE)
MAX_SAFETENSORS_HEADER = 100_000_000


def _zip_entry_count(f, size: int) -> Optional[int]:
    """The entry count a zip file's end record declares (zip64 included), read from its last
    bytes without parsing the central directory; None when there is no readable record."""
    tail_len = min(size, 22 + 0xFFFF)
    f.seek(size - tail_len)
    tail = f.read(tail_len)
    at = tail.rfind(_EOCD)
    if at < 0 or at + 22 > len(tail):
        return None
    (count,) = struct.unpack("<H", tail[at + 10:at + 12])
    if count != 0xFFFF:
        return count
    loc = at - 20  # zip64: the locator sits just before the end record
    if loc < 0 or tail[loc:loc + 4] != _EOCD64_LOCATOR:
        return None
    (rec_offset,) = struct.unpack("<Q", tail[loc + 8:loc + 16])
    if rec_offset + 40 > size:
        return None
    f.seek(rec_offset)
    rec = f.read(40)
    if rec[:4] != b"PK\x06\x06":
        return None
    return struct.unpack("<Q", rec[32:40])[0]


def check_pt_archive(path: str) -> None:
    """Refuse a zip-format ``.pt`` whose metadata promises more than the file holds: more
    entries than ``max_blobs`` allows, a compressed entry (``torch.save`` stores entries
    uncompressed; ``torch.load`` would inflate one to whatever size it declares), or entries
    larger together than the file.  Legacy (pre-zip) files are left to ``torch.load``."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        if f.read(4) != b"PK\x03\x04":
            return
        count = _zip_entry_count(f, size)
    limit = limits.get("max_blobs") + _PT_OVERHEAD_ENTRIES
    if count is not None and count > limit:
        raise LimitError(f"the .pt archive declares {count} entries; a state dict within the limits "
                         f"needs at most {limit} ({limits.how_to_raise('max_blobs')})", where=path)
    try:
        with zipfile.ZipFile(path) as z:
            infos = z.infolist()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, NotImplementedError) as e:
        raise ParseError(f"not a readable .pt file (a damaged zip archive: {shorten(e, 200)})",
                         where=path) from None
    total = 0
    for info in infos:
        if info.compress_type != zipfile.ZIP_STORED:
            raise WeightsError(f"zip entry '{shorten(info.filename, 80)}' is compressed (method "
                               f"{info.compress_type}); torch.save stores entries uncompressed, and a "
                               f"compressed one could expand to any size it declares "
                               f"({info.file_size} bytes here)", where=path)
        total += info.file_size
    if total > size:
        raise WeightsError(f"the .pt archive's entries declare {total} bytes together, more than the "
                           f"file's {size}", where=path)


def check_tensors(sd: Mapping[str, Any], path: str, *, error: Type[CaffeCompatError] = WeightsError,
                  per_param: int = 1) -> None:
    """Refuse, before any tensor's data is used, a state dict whose tensors declare more than
    they hold or than the limits allow: a non-strided (sparse) or meta tensor, a view with more
    elements than its storage (expanded, stride 0), a tensor over ``max_blob_elements``, more
    tensors than ``max_blobs`` or more elements together than ``max_total_elements``."""
    import torch

    budget = limits.FileBudget(path, per_param=per_param)
    for key, v in sd.items():
        name = shorten(key, 80)
        if not isinstance(v, torch.Tensor):
            continue
        if v.layout != torch.strided or v.is_meta:
            raise error(f"tensor '{name}' is a {'meta' if v.is_meta else str(v.layout)} tensor; a weights file "
                        "holds dense tensors with their data", where=path)
        budget.blob(tuple(v.shape), what=f"tensor '{name}'", error=error)
        if v.numel() > 1 or v.stride():
            item = v.element_size()
            held = max(0, v.untyped_storage().nbytes() - v.storage_offset() * item) // max(item, 1)
            if v.numel() > held:
                raise error(f"tensor '{name}' has {v.numel()} elements but its storage holds {held} "
                            f"(an expanded or overlapping view, strides {shorten(v.stride(), 80)}): a "
                            "weights file stores every value", where=path)


_ST_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
                "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


def read_safetensors_header(path: str, *,
                            error: Type[CaffeCompatError] = ParseError) -> Tuple[Dict[str, Any], int]:
    """(JSON header, bytes of tensor data after it) of a safetensors file; the header's length
    is checked against the file before it is read."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise error("not a readable safetensors file: shorter than its 8-byte header length",
                        where=path)
        (n,) = struct.unpack("<Q", head)
        if n > size - 8 or n > MAX_SAFETENSORS_HEADER:
            raise error(f"not a readable safetensors file: its header length {n} exceeds the file "
                        f"({size} bytes) or {MAX_SAFETENSORS_HEADER}", where=path)
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError and JSONDecodeError included
        raise error(f"not a readable safetensors file: its header is not JSON ({shorten(e, 120)})",
                    where=path) from None
    if not isinstance(header, dict):
        raise error("not a readable safetensors file: its header is not a JSON object", where=path)
    return header, size - 8 - n


def check_safetensors_header(header: Mapping[str, Any], path: str, data_bytes: int, *,
                             error: Type[CaffeCompatError] = WeightsError, per_param: int = 1) -> None:
    """Refuse a safetensors header declaring absurd shapes, offsets or counts (each entry's
    shape, the file's tensor count and elements together against the limits; offsets within
    the ``data_bytes`` after the header and consistent with shape and dtype), before the
    safetensors library allocates anything for it."""
    budget = limits.FileBudget(path, per_param=per_param)
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        name = shorten(key, 80)
        if not isinstance(entry, dict):
            raise error(f"safetensors entry '{name}' is not an object", where=path)
        shape, dtype, offsets = entry.get("shape"), entry.get("dtype"), entry.get("data_offsets")
        if not (isinstance(shape, list) and all(isinstance(d, int) and not isinstance(d, bool) for d in shape)):
            raise error(f"safetensors entry '{name}' has no list of integer dimensions as its shape "
                        f"(got {shorten(shape, 80)})", where=path)
        budget.blob(tuple(shape), what=f"tensor '{name}'", error=error)
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)
                and 0 <= offsets[0] <= offsets[1] <= data_bytes):
            raise error(f"safetensors entry '{name}' has data offsets {shorten(offsets, 80)} outside the "
                        f"file's {data_bytes} data bytes", where=path)
        item = _ST_ITEMSIZE.get(dtype) if isinstance(dtype, str) else None
        if item is not None and offsets[1] - offsets[0] != limits.element_count(shape) * item:
            raise error(f"safetensors entry '{name}' declares shape {shorten(tuple(shape), 80)} of {dtype} "
                        f"but {offsets[1] - offsets[0]} data bytes", where=path)

