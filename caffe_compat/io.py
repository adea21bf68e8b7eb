"""Reading and writing Caffe's file formats: text prototxt, binary caffemodel, binaryproto.

Everything read here is upgraded to the current schema (``caffe_compat.upgrade``) exactly as
Caffe's ``ReadNetParamsFromTextFileOrDie`` / ``ReadProtoFromBinaryFile`` + ``upgrade_proto``
would, so the rest of the project only ever sees V2 ``layer {}`` definitions.
"""
from __future__ import annotations

import contextvars
import difflib
import os
import re
import stat
from typing import Optional, Union

import numpy as np
from google.protobuf import text_format

from caffe_compat import limits
from caffe_compat.errors import ParseError, WeightsError
from caffe_compat.protos import caffe_pb2

PathOrText = Union[str, "os.PathLike[str]"]


#: suffixes of the files a definition, weights or data path names; a string ending in one is
#: a path, never prototxt text (unless it holds a quoted string or a newline)
FILE_SUFFIXES = (".prototxt", ".pt", ".pbtxt", ".txt", ".proto", ".solver", ".caffemodel", ".binaryproto",
                 ".solverstate", ".h5", ".hdf5", ".safetensors", ".pth", ".pkl", ".npz", ".npy", ".gz",
                 ".json", ".yml", ".yaml", ".cfg", ".model", ".bin")
#: the start of a prototxt: a field name and ``:``, ``{`` or ``<`` (``name:`` but not a URL's
#: ``http://`` or a Windows drive's ``C:\``)
_TEXT_START = re.compile(r"\s*(#|[A-Za-z_]\w*\s*(\{|<|:(?![/\\])))")


def _looks_like_text(s: str) -> bool:
    """Whether a string that is not an existing file is prototxt text rather than a path.

    Text: it holds a newline; or it starts like a prototxt (a field name then ``:``/``{``, or
    a ``#`` comment) and does not end in a file suffix (:data:`FILE_SUFFIXES`) unless it holds a
    quoted string.  So ``'name: "n" layer { ... }'`` on one line is text, while a missing
    ``models/a:b.prototxt``, ``x{1}.prototxt`` or ``models/a:b`` is a path and gets "No such
    file or directory", never a prototxt syntax error.
    """
    if "\n" in s:
        return True
    if s.rstrip().lower().endswith(FILE_SUFFIXES) and '"' not in s:
        return False
    return _TEXT_START.match(s) is not None


_ENUM_NAME = re.compile(r'Enum type "([\w.]+)" has no value (named (\S+?)|with number (-?\d+))\.?$')
_NO_FIELD = re.compile(r'Message type "([\w.]+)" has no field named "(\w+)"\.?$')
_DUP_FIELD = re.compile(r'Message type "([\w.]+)" should not have multiple "(\w+)" fields\.?$')


def _enum_hint(full_name: str, bad: str) -> str:
    """', allowed: A, B, C' (+ a near match) for enum ``full_name`` of the schema."""
    try:
        enum = caffe_pb2.DESCRIPTOR.pool.FindEnumTypeByName(full_name)
    except KeyError:
        return ""
    names = [v.name for v in enum.values]
    hint = f"; allowed: {', '.join(names)}"
    near = difflib.get_close_matches(bad.upper(), names, n=1, cutoff=0.5)
    if near:
        hint += f" (did you mean {near[0]}?)"
    return hint


def _field_hint(full_name: str, bad: str) -> str:
    try:
        msg = caffe_pb2.DESCRIPTOR.pool.FindMessageTypeByName(full_name)
    except KeyError:
        return ""
    names = [f.name for f in msg.fields]
    near = difflib.get_close_matches(bad, names, n=3, cutoff=0.6)
    return f" (did you mean {', '.join(near)}?)" if near else ""


def _explain(msg: str) -> str:
    """protobuf's parse message, with allowed enum values / near field names appended."""
    m = _ENUM_NAME.search(msg)
    if m:
        return msg.rstrip(".") + _enum_hint(m.group(1), m.group(3) or m.group(4))
    m = _NO_FIELD.search(msg)
    if m:
        return msg.rstrip(".") + _field_hint(m.group(1), m.group(2))
    m = _DUP_FIELD.search(msg)
    if m:
        return (f'field "{m.group(2)}" of {m.group(1)} is given more than once '
                "(it is not repeated; Caffe refuses this too)")
    return msg


def _check_text_size(n: int, where: str) -> None:
    from caffe_compat.limits import check_file_size

    check_file_size(n, what="text definition", where=where)


def _window(line: str, col: int, width: int = 80) -> str:
    """``line`` stripped, or ~``width`` characters of it around column ``col`` (1-based)."""
    if len(line.strip()) <= width:
        return line.strip()
    start = max(0, min(col - 1 - width // 2, len(line) - width))
    part = line[start:start + width].strip()
    return ("..." if start > 0 else "") + part + ("..." if start + width < len(line) else "")


def parse_text(text: str, message, filename: str = "<string>", *, strict: bool = True):
    """Parse prototxt ``text`` into ``message`` as Caffe does (``TextFormat::Parse``).

    Errors name file:line:col and the offending line; a bad enum name lists the allowed
    values, an unknown field name its near matches.  With ``strict`` a singular field given
    twice is an error, as in Caffe (protobuf's ``Merge`` silently keeps the last one).
    Memory stays proportional to the text (:mod:`caffe_compat.text_parse`: no per-character
    regex state, no list of lines, lists and nesting bounded), and a message quotes at most
    a window of the text.
    """
    from caffe_compat.errors import shorten
    from caffe_compat.text_parse import line_at, parse

    _check_text_size(len(text), filename)
    try:
        parse(text, message, filename, strict=strict)
    except text_format.ParseError as e:
        line, col = e.GetLine(), e.GetColumn()
        msg = str(e)
        # protobuf prefixes "line:col : " and often "'<the line>': "; keep only the reason
        if line is not None and msg.startswith(f"{line}:"):
            msg = msg.split(" : ", 1)[-1]
        full = line_at(text, line) if line is not None else ""
        snippet = ""
        if full:
            quoted = f"'{full}': "
            if msg.startswith(quoted):
                msg = msg[len(quoted):]
            snippet = _window(full, col or 1)
        msg = shorten(msg, 200)  # a reason may quote a token (a 60 MB string or number)
        if col and full and msg.startswith(("Value out of range", "Couldn't parse", "Invalid value")):
            m = re.search(r"(\w+)\s*:\s*$", full[max(col - 1 - 200, 0):max(col - 1, 0)])
            if m:
                msg += f" for field '{m.group(1)}'"
        src = f" (in: {snippet!r})" if snippet else ""
        where = f"{filename}:{line}:{col}" if line is not None else filename
        raise ParseError(_explain(msg) + src, where=where) from None
    except UnicodeDecodeError as e:
        raise ParseError(f"not UTF-8 text: {e}", where=filename) from None
    except (ValueError, TypeError, OverflowError, RecursionError) as e:
        # protobuf's text parser raising something other than ParseError (never seen on
        # Caffe's schema, but the text is untrusted)
        raise ParseError(f"unparsable text ({type(e).__name__}: {shorten(e, 200)})", where=filename) from None
    return message


def _binary_hint(raw: bytes) -> str:
    """Why ``raw`` is probably not a text prototxt (a caffemodel, a tarball, ...)."""
    if raw[:2] == b"\x1f\x8b":
        return "it is gzip-compressed; decompress it first"
    if raw[:4] == b"PK\x03\x04":
        return "it is a zip archive (a torch .pt file?); this needs a text prototxt"
    if raw[:2] == b"\x80\x02" or raw[:1] == b"\x80":
        return "it is a Python pickle, not a text prototxt"
    head = raw[:4096]
    if any(b < 9 or 13 < b < 32 for b in head):  # control bytes: varint lengths, tags, floats
        return "it looks like a binary protobuf (a .caffemodel or .binaryproto?), not a text prototxt"
    return "save it as UTF-8 (or is it a binary file?)"


def _stat_file(path: PathOrText, what: str):
    """(path, os.stat result) of a file to read; unreadable paths and directories refused."""
    try:
        path = os.fspath(path)
        st = os.stat(path)
    except (OSError, ValueError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise ParseError(f"cannot read {what}: {reason}", where=str(path)) from None
    if stat.S_ISDIR(st.st_mode):
        raise ParseError(f"is a directory, expected a {what} file", where=path)
    return path, st


def read_text_file(path: PathOrText, *, what: str = "prototxt") -> str:
    """The text of a definition file, refusing directories, huge, empty and binary files."""
    path, st = _stat_file(path, what)
    if stat.S_ISREG(st.st_mode):
        _check_text_size(st.st_size, path)
    try:
        with open(path, "rb") as f:
            raw = f.read(limits.max_text_bytes() + 1)
    except OSError as e:
        raise ParseError(f"cannot read {what}: {e.strerror or e}", where=path) from None
    _check_text_size(len(raw), path)  # fifos and special files have no size in stat
    if not raw.strip():
        raise ParseError(f"empty file, expected a {what}", where=path)
    if raw.startswith(b"\xef\xbb\xbf"):  # a UTF-8 byte-order mark (editors on Windows)
        raw = raw[3:]
    nul = raw.find(b"\x00")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        col = e.start - (raw.rfind(b"\n", 0, e.start) + 1) + 1
        raise ParseError(f"not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start}); "
                         f"{_binary_hint(raw)}", where=f"{path}:{line}:{col}") from None
    if nul >= 0:
        line = raw.count(b"\n", 0, nul) + 1
        raise ParseError(f"NUL byte in text at offset {nul}; {_binary_hint(raw)}",
                         where=f"{path}:{line}") from None
    return text


def _text_and_name(source: PathOrText, what: str):
    """(text, name) of a definition given as a path or as its text: an existing path is read;
    otherwise :func:`_looks_like_text` decides, so a missing path is "No such file"."""
    if isinstance(source, (bytes, bytearray)):
        raise ParseError(f"expected a {what} path or text, got bytes (a binary file's content?)")
    src = os.fspath(source)
    if "\x00" in src:
        raise ParseError(f"NUL byte in the {what} path or text; a binary file's content?")
    if os.path.exists(src) or not _looks_like_text(src):
        return read_text_file(src, what=what), src
    return src, "<string>"


#: the fork schema of the innermost ``proto_schema.use_schema`` block (set there; read here,
#: when a definition is parsed)
_SCHEMA: "contextvars.ContextVar[Optional[object]]" = contextvars.ContextVar("caffe_compat_schema",
                                                                           default=None)


def active_schema():
    """The fork schema (``proto_schema.Schema``) of the innermost ``use_schema`` block, or None."""
    return _SCHEMA.get()


def read_net_text(source: PathOrText, *, upgrade: bool = True, schema=None) -> "caffe_pb2.NetParameter":
    """A NetParameter from a prototxt path (or prototxt text), upgraded to the current format.

    ``schema``: a loaded fork schema (``proto_schema.load_schema``) whose extra fields the text
    may use; default: the one of an enclosing ``proto_schema.use_schema`` block.  The fork's own
    fields travel as unknown fields of the union message (a binary round trip through the
    merged schema's numbers) and come back when a layer's parameters are read with
    ``schema.LayerParameter`` (see ``Net``)."""
    text, name = _text_and_name(source, "net prototxt")
    schema = schema if schema is not None else active_schema()
    try:
        if schema is not None:
            msg = parse_text(text, schema.NetParameter(), name)
            net = caffe_pb2.NetParameter.FromString(msg.SerializeToString())
        else:
            net = parse_text(text, caffe_pb2.NetParameter(), name)
    except ParseError as e:
        _raise_with_unknowns(e, text, name, schema)
        raise
    if upgrade:
        from caffe_compat.upgrade import upgrade_net

        net = upgrade_net(net, source=name)
    return net


def _raise_with_unknowns(e: ParseError, text: str, name: str, schema) -> None:
    """On an unknown field, list every unknown field and layer type of the file at once."""
    if "has no field named" not in str(e):
        return
    from caffe_compat.unknowns import scan

    root = schema.NetParameter.DESCRIPTOR if schema is not None else None
    found = scan(text, root)
    if len(found.fields) > 1 or found.types:  # one misspelling keeps protobuf's located hint
        raise ParseError(found.message(), where=e.where) from None


def read_solver_text(source: PathOrText, *, upgrade: bool = True) -> "caffe_pb2.SolverParameter":
    """A SolverParameter from a path (or text), with the solver-type enum upgraded."""
    text, name = _text_and_name(source, "solver prototxt")
    # Caffe refuses a repeated singular field in solvers too
    solver = parse_text(text, caffe_pb2.SolverParameter(), name, strict=True)
    if upgrade:
        from caffe_compat.upgrade import upgrade_solver

        solver = upgrade_solver(solver, source=name)
    return solver


def _text_hint(data: bytes) -> str:
    """' (it looks like a text prototxt ...)' when binary ``data`` is printable text."""
    head = bytes(data[:4096])
    try:
        s = head.decode("utf-8")
    except UnicodeDecodeError:
        return ""
    if s and all(c.isprintable() or c in "\t\r\n" for c in s):
        return "; it looks like a text prototxt, not a binary protobuf (swapped arguments?)"
    return ""


def parse_binary(data: bytes, message, filename: str = "<bytes>"):
    """Parse binary protobuf bytes into ``message`` with a clear error when corrupt."""
    if not len(data):
        raise ParseError(f"empty file, expected a binary {message.DESCRIPTOR.name}", where=filename)
    try:
        message.ParseFromString(data)
    except Exception as e:  # DecodeError, RuntimeError, ValueError, RecursionError...
        raise ParseError(f"corrupt or truncated {message.DESCRIPTOR.name} ({len(data)} bytes): "
                         f"{e}{_text_hint(data)}", where=filename) from None
    return message


def read_binary_file(path: PathOrText, *, what: str = "binary protobuf") -> bytes:
    """The bytes of a binary file, refusing directories and empty files clearly."""
    path, st = _stat_file(path, what)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise ParseError(f"cannot read {what}: {e.strerror or e}", where=path) from None
    if not data:
        raise ParseError(f"empty file, expected a {what}", where=path)
    return data


def read_binaryproto(path: PathOrText) -> np.ndarray:
    """A ``.binaryproto`` mean file (a BlobProto) as a float32 array in the blob's shape."""
    path = os.fspath(path)
    data = read_binary_file(path, what="binaryproto (BlobProto)")
    blob = parse_binary(data, caffe_pb2.BlobProto(), path)
    return blob_to_array(blob, where=path)


def blob_shape(blob: "caffe_pb2.BlobProto") -> tuple:
    """A BlobProto's shape, by Caffe's rule (``Blob::FromProto`` and ``Blob::ShapeEquals``
    alike): when any of the legacy num/channels/height/width is present, the shape is the 4-D
    (num, channels, height, width), unset ones 0, and ``shape`` is ignored even if present;
    otherwise ``shape.dim``.  (Caffe reads a blob with neither as a scalar; this also takes
    a bare list of values as 1-D.)"""
    if any(blob.HasField(f) for f in ("num", "channels", "height", "width")):
        return (blob.num, blob.channels, blob.height, blob.width)
    if blob.HasField("shape"):
        return tuple(int(d) for d in blob.shape.dim)
    n = len(blob.data) or len(blob.double_data)
    return (n,) if n else (0,)


def blob_to_array(blob: "caffe_pb2.BlobProto", *, where: Optional[str] = None,
                  dtype=np.float32, layer: Optional[str] = None,
                  index: Optional[int] = None) -> np.ndarray:
    """A BlobProto's data as an array in its shape (double_data when that is what it holds).

    The declared shape is checked (no negative dimension, under the element limit, and
    matching the number of values) before any array is made.
    """
    from caffe_compat.limits import check_shape

    shape = blob_shape(blob)
    count = check_shape(shape, what="blob", where=where, layer=layer, blob=index, error=WeightsError)
    n = len(blob.double_data) or len(blob.data)
    if n != count:
        raise WeightsError(f"blob declares shape {shape} but holds {n} values", where=where,
                           layer=layer, blob=index, expected=f"{count} values", got=n)
    if len(blob.double_data):
        arr = np.asarray(blob.double_data, dtype=np.float64)
    else:
        arr = np.asarray(blob.data, dtype=np.float32)
    return arr.reshape(shape).astype(dtype, copy=False)


def array_to_blob(arr, blob: Optional["caffe_pb2.BlobProto"] = None,
                  *, legacy_dims: bool = False) -> "caffe_pb2.BlobProto":
    """An array as a BlobProto (``shape`` field, or legacy 4-D dims when asked)."""
    shape = np.shape(arr)  # before ascontiguousarray, which makes a 0-D array 1-D
    a = np.ascontiguousarray(np.asarray(arr, dtype=np.float32))
    b = blob if blob is not None else caffe_pb2.BlobProto()
    b.Clear()
    if legacy_dims:
        dims = (1,) * (4 - len(shape)) + tuple(shape) if len(shape) <= 4 else tuple(shape)
        b.num, b.channels, b.height, b.width = (int(d) for d in dims[-4:])
    else:
        b.shape.SetInParent()  # a 0-D blob still says `shape {}`, as Caffe writes it
        b.shape.dim.extend(int(d) for d in shape)
    b.data.extend(a.ravel().tolist())
    return b


def write_text(message, path: PathOrText) -> None:
    from caffe_compat.atomic import atomic_write

    atomic_write(os.fspath(path), text_format.MessageToString(message).encode("utf-8"))


def locate_layer(source: PathOrText, layer: str) -> Optional[str]:
    """``path:line`` of layer ``layer``'s ``name:`` in a prototxt (for error messages).

    The parsed NetParameter keeps no positions; this finds the first ``name: "<layer>"``
    inside a ``layer {`` / ``layers {`` block by a light scan.  None when not found.
    """
    try:
        text, name = _text_and_name(source, "net prototxt")
    except Exception:  # a location helper must never raise
        return None
    pat = re.compile(r'\bname\s*:\s*(["\'])' + re.escape(layer) + r'\1')
    depth = 0
    in_layer_at = -1
    for m in re.finditer(r'"(?:[^"\\\n]|\\.)*"|\'(?:[^\'\\\n]|\\.)*\'|#[^\n]*|\b(layers?)\s*[{<]|[{<]|[}>]', text):
        tok = m.group(0)
        if m.group(1):
            if depth == 0:
                in_layer_at = m.end()
            depth += 1
        elif tok in ("{", "<"):
            depth += 1
        elif tok in ("}", ">"):
            depth = max(0, depth - 1)
            if depth == 0 and in_layer_at >= 0:
                block = text[in_layer_at:m.start()]
                hit = _first_top_level(block, pat)
                if hit is not None:
                    line = text.count("\n", 0, in_layer_at + hit) + 1
                    return f"{name}:{line}"
                in_layer_at = -1
    return None


def _first_top_level(block: str, pat) -> Optional[int]:
    """Offset of ``pat`` at nesting depth 0 of a layer block (not inside *_param {...})."""
    depth = 0
    pos = 0
    for m in re.finditer(r'"(?:[^"\\\n]|\\.)*"|\'(?:[^\'\\\n]|\\.)*\'|#[^\n]*|[{<]|[}>]', block):
        if depth == 0:
            hit = pat.search(block, pos, m.start() + (len(m.group(0)) if m.group(0)[0] in "\"'" else 0))
            if hit:
                return hit.start()
        tok = m.group(0)
        if tok in ("{", "<"):
            depth += 1
        elif tok in ("}", ">"):
            depth -= 1
        pos = m.end()
    if depth == 0:
        hit = pat.search(block, pos)
        if hit:
            return hit.start()
    return None
