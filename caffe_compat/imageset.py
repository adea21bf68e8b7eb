"""Caffe's ``convert_imageset`` and ``compute_image_mean``: image lists to an LMDB of Datums, and its mean.

``convert_imageset`` reads ``path label`` lines (the label is the last token, so paths may
hold spaces), reads each image with OpenCV as Caffe's ``ReadImageToCVMat`` does (BGR, or grey
with ``gray``; resized with bilinear interpolation when both sizes are given) and stores a
``Datum`` under the key ``"%08d_%s" % (index, path)``: ``channels/height/width`` and the
pixels as CHW uint8 bytes, or with ``encoded`` the image file itself (re-encoded when it was
resized or its extension is not the requested type), serialized field for field as Caffe's.
Differences, all deliberate: an existing database is refused before anything is read (Caffe
fails on its ``mkdir``); the database is built in a temporary folder and renamed into place
at the end, so a failed run leaves nothing; ``shuffle`` uses a seeded permutation (Caffe's
RNG was unseeded, so its order was never reproducible); a bad label or a line without one
is an error (Caffe's ``atoi`` made it 0); with ``gray`` and ``encoded`` a colour file is
re-encoded grey (Caffe stored it as it was, colour); blank lines of the list are skipped and
take no index (Caffe read each as an unreadable image "" and skipped it after using up its
index, so a list with blank lines in the middle gets other key numbers there).

``compute_image_mean`` averages every Datum of an LMDB (encoded ones decoded as stored,
``IMREAD_UNCHANGED``) with Caffe's float32 arithmetic (the same records give a bit-identical mean
file), and writes it as a BlobProto with the legacy ``num/channels/height/width`` fields.
"""
from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass, field
from typing import Callable, Iterator, List, Optional, Tuple

import numpy as np

from caffe_compat.errors import DataError, SchemaError
from caffe_compat.protos import caffe_pb2

__all__ = ["ImageEntry", "read_image_list", "read_image", "image_to_datum", "convert_imageset",
           "ConvertResult", "datum_to_array", "compute_image_mean", "MeanResult",
           "encode_mean_blob", "DEFAULT_SEED", "COMMIT_EVERY", "LmdbWriter", "new_db_folder",
           "check_new_db", "refuse_backend"]

#: ``--shuffle`` seed when none is given (Caffe's shuffle was unseeded)
DEFAULT_SEED = 0
#: records per LMDB transaction, as Caffe
COMMIT_EVERY = 1000
#: initial LMDB map size; doubled whenever a transaction does not fit (newer Caffe does the same)
INITIAL_MAP_SIZE = 1 << 30

Log = Callable[[str], None]


def _quiet(_: str) -> None:
    pass


def refuse_backend(backend: str, use: str = "--backend lmdb") -> None:
    """Accept ``lmdb`` only; ``use`` is what the error tells the user to write instead."""
    if backend.lower() == "leveldb":
        raise SchemaError("the leveldb backend is not supported: caffe-compat reads and writes "
                          f"LMDB only (use {use}; the Data layer reads LMDB too)")
    if backend.lower() != "lmdb":
        raise SchemaError(f"unknown backend '{backend}'", expected="lmdb (or leveldb, unsupported)")


# ----------------------------------------------------------------------------- list file

@dataclass
class ImageEntry:
    path: str    # as listed (relative to the root folder)
    label: int
    line: int    # 1-based line number in the list file


_LINE = re.compile(r"^(.*?)\s+(\S+)$")


def read_image_list(listfile: str) -> List[ImageEntry]:
    """The ``path label`` lines of ``listfile`` (blank lines skipped; bad labels refused)."""
    try:
        with open(listfile, "r", encoding="utf-8", errors="surrogateescape", newline=None) as f:
            lines = f.read().split("\n")
    except OSError as e:
        raise DataError(f"cannot read the image list: {e.strerror or e}", where=listfile) from None
    entries: List[ImageEntry] = []
    for i, raw in enumerate(lines, 1):
        line = raw.rstrip()
        if not line.strip():
            continue
        m = _LINE.match(line)
        if not m or not m.group(1):
            raise DataError(f"expected 'PATH LABEL' (label after the last space), got {line!r}",
                            where=f"{listfile}:{i}")
        path, label = m.group(1), m.group(2)
        if not re.fullmatch(r"[+-]?\d+", label):
            raise DataError(f"bad label {label!r} for '{path}': labels are integers",
                            where=f"{listfile}:{i}")
        value = int(label)
        if not -2 ** 31 <= value < 2 ** 31:
            raise DataError(f"label {value} is out of the int32 range of Datum.label",
                            where=f"{listfile}:{i}")
        entries.append(ImageEntry(path, value, i))
    return entries


# ----------------------------------------------------------------------------- images

def read_image(path: str, height: int, width: int, is_color: bool) -> Optional[np.ndarray]:
    """Caffe's ``ReadImageToCVMat``: an HxW (grey) or HxWx3 (BGR) uint8 array, or None."""
    from caffe_compat.layers.data import _read_image

    if not os.path.isfile(path):  # (OpenCV would also print its own warning)
        return None
    return _read_image(path, height, width, is_color)


def _chw(img: np.ndarray) -> np.ndarray:
    if img.dtype != np.uint8:
        raise DataError(f"image data type must be unsigned byte, got {img.dtype}")
    return img[None] if img.ndim == 2 else np.ascontiguousarray(img.transpose(2, 0, 1))


def _match_ext(filename: str, encoding: str) -> bool:
    """Caffe's ``matchExt``: the file's extension is ``encoding`` (``jpeg`` counts as ``jpg``)."""
    ext = filename[filename.rfind(".") + 1:].lower()
    enc = encoding.lower()
    return ext == enc or (enc == "jpg" and ext == "jpeg")


def _file_is_gray(filename: str) -> bool:
    import cv2

    img = cv2.imread(filename, cv2.IMREAD_UNCHANGED)
    return img is not None and img.ndim == 2


def image_to_datum(filename: str, img: np.ndarray, label: int, *, encoding: str = "",
                   resized: bool = False, is_color: bool = True) -> "caffe_pb2.Datum":
    """Caffe's ``ReadImageToDatum`` after the read: raw CHW bytes, or an encoded image.

    Encoded, the file's own bytes are stored when the image was not resized and the file
    already has the requested type (and, with ``is_color`` off, is itself grey: Caffe stored
    colour files as they were there); otherwise the image is encoded with OpenCV.
    """
    import cv2

    if encoding:
        # Caffe's test is "(channels == 3) == is_color", always true after imread; with
        # --gray it stored colour files as they are, so a gray run also needs a gray file
        if (img.ndim == 3 and img.shape[2] == 3) == is_color and not resized \
                and _match_ext(filename, encoding) and (is_color or _file_is_gray(filename)):
            with open(filename, "rb") as f:
                return caffe_pb2.Datum(data=f.read(), label=label, encoded=True)
        try:
            ok, buf = cv2.imencode("." + encoding, img)
        except cv2.error:
            ok = False
        if not ok:
            raise DataError(f"OpenCV cannot encode images as '.{encoding}'", where=filename)
        return caffe_pb2.Datum(data=buf.tobytes(), label=label, encoded=True)
    chw = _chw(img)
    c, h, w = chw.shape
    return caffe_pb2.Datum(channels=c, height=h, width=w, data=chw.tobytes(), label=label,
                           encoded=False)


# ----------------------------------------------------------------------------- LMDB writing

class LmdbWriter:
    """Puts records in batches of ``COMMIT_EVERY``, doubling the map size when one does not fit."""

    def __init__(self, path: str, map_size: int):
        import lmdb

        self._lmdb = lmdb
        self.env = lmdb.open(path, map_size=map_size, subdir=True, readahead=False, meminit=False)
        self.pending: List[Tuple[bytes, bytes]] = []

    def put(self, key: bytes, value: bytes) -> None:
        self.pending.append((key, value))

    def commit(self) -> None:
        while True:
            try:
                with self.env.begin(write=True) as txn:
                    for k, v in self.pending:
                        txn.put(k, v)
                break
            except self._lmdb.MapFullError:
                self.env.set_mapsize(self.env.info()["map_size"] * 2)
        self.pending.clear()

    def close(self) -> None:
        self.env.close()


def check_new_db(db: str, tool: str = "convert_imageset") -> str:
    """The folder ``db`` will be created in; refuses an existing ``db`` or a missing folder."""
    if os.path.lexists(db):
        raise DataError(f"the database already exists; {tool} creates a new one "
                        "(as Caffe, which fails on its mkdir): remove it or choose another name",
                        where=db)
    parent = os.path.dirname(os.path.abspath(db))
    if not os.path.isdir(parent):
        raise DataError(f"the folder '{parent}' to create the database in does not exist", where=db)
    return parent


def new_db_folder(db: str, tool: str = "convert_imageset") -> str:
    """A temporary folder beside ``db`` (renamed to ``db`` when complete); refuses existing ``db``."""
    check_new_db(db, tool)
    from caffe_compat.atomic import temp_dir_next_to

    return temp_dir_next_to(os.path.abspath(db))  # an interrupted build's folder goes first


@dataclass
class ConvertResult:
    total: int                     # entries in the list
    written: int                   # records stored
    skipped: List[ImageEntry] = field(default_factory=list)   # images that could not be read
    order_seed: Optional[int] = None  # the shuffle seed, when shuffled


def convert_imageset(root: str, listfile: str, db: str, *, gray: bool = False, shuffle: bool = False,
                     seed: int = DEFAULT_SEED, backend: str = "lmdb", resize_width: int = 0,
                     resize_height: int = 0, check_size: bool = False, encoded: bool = False,
                     encode_type: str = "", log: Log = _quiet,
                     map_size: int = INITIAL_MAP_SIZE) -> ConvertResult:
    """Caffe's ``convert_imageset ROOTFOLDER/ LISTFILE DB_NAME`` (see the module docstring).

    ``root`` is prefixed to each listed path as text, as Caffe does; a root naming an
    existing folder without a trailing ``/`` gets one.  Unreadable images are skipped with a
    warning (Caffe logs and skips them too).  ``encode_type`` implies ``encoded``.
    """
    refuse_backend(backend)
    check_new_db(db)
    if (resize_width > 0) != (resize_height > 0):
        raise SchemaError("--resize_width and --resize_height go together (Caffe resizes only "
                          "when both are given)")
    if resize_width < 0 or resize_height < 0:
        raise SchemaError("resize sizes must not be negative")
    if root and not root.endswith(("/", os.sep)) and os.path.isdir(root):
        root += "/"
    entries = read_image_list(listfile)
    if not entries:
        raise DataError("the image list has no entries", where=listfile)
    encoded = encoded or bool(encode_type)
    if encode_type:
        import cv2

        if not cv2.haveImageWriter("x." + encode_type):
            raise SchemaError(f"OpenCV cannot encode images as '.{encode_type}' (--encode_type)")
    if encoded and not encode_type:
        bad = [e for e in entries if "." not in e.path]
        if bad:
            raise DataError(f"cannot guess the encoding of '{bad[0].path}' (no extension): "
                            "give --encode_type", where=f"{listfile}:{bad[0].line}")
    if shuffle:
        log("Shuffling data")
        perm = np.random.default_rng(seed).permutation(len(entries))
        entries = [entries[i] for i in perm]
    log(f"A total of {len(entries)} images.")
    result = ConvertResult(total=len(entries), written=0, order_seed=seed if shuffle else None)
    tmp = new_db_folder(db)
    writer = None
    try:
        writer = LmdbWriter(tmp, map_size)
        first_shape: Optional[Tuple[int, ...]] = None
        for line_id, e in enumerate(entries):
            filename = root + e.path
            img = read_image(filename, resize_height, resize_width, not gray)
            if img is None:
                result.skipped.append(e)
                log(f"warning: could not open or find file {filename} ({listfile}:{e.line}); skipped")
                continue
            if check_size:
                shape = _chw(img).shape
                if first_shape is None:
                    first_shape = shape
                elif shape != first_shape:
                    raise DataError(f"--check_size: image is {'x'.join(map(str, shape))} (CxHxW) but "
                                    f"the first one was {'x'.join(map(str, first_shape))}",
                                    where=f"{filename} ({listfile}:{e.line})")
            enc = encode_type or (e.path[e.path.rfind(".") + 1:].lower() if encoded else "")
            datum = image_to_datum(filename, img, e.label, encoding=enc,
                                   resized=resize_height > 0, is_color=not gray)
            key = f"{line_id:08d}_{e.path}".encode("utf-8", "surrogateescape")
            writer.put(key, datum.SerializeToString())
            result.written += 1
            if result.written % COMMIT_EVERY == 0:
                writer.commit()
                log(f"Processed {result.written} files.")
        if writer.pending:
            writer.commit()
            log(f"Processed {result.written} files.")
        if not result.written:
            raise DataError(f"none of the {len(entries)} listed images could be read (first: "
                            f"'{root + result.skipped[0].path}'); no database written", where=listfile)
        writer.close()
        writer = None
        os.rename(tmp, db)
    except BaseException:
        if writer is not None:
            writer.close()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return result


# ----------------------------------------------------------------------------- mean

def datum_to_array(datum: "caffe_pb2.Datum", where: str = "") -> np.ndarray:
    """A Datum as a (C, H, W) array: decoded as stored (``DecodeDatumNative``), uint8 or float32."""
    if datum.encoded:
        import cv2

        img = cv2.imdecode(np.frombuffer(datum.data, dtype=np.uint8), cv2.IMREAD_UNCHANGED)
        if img is None:
            raise DataError("could not decode an encoded Datum", where=where)
        if img.dtype != np.uint8:
            raise DataError(f"encoded image decodes to {img.dtype}; Caffe needs 8-bit images", where=where)
        return _chw(img)
    c, h, w = int(datum.channels), int(datum.height), int(datum.width)
    n = c * h * w
    arr = (np.frombuffer(datum.data, dtype=np.uint8) if len(datum.data)
           else np.asarray(datum.float_data, dtype=np.float32))
    if arr.size != n or n == 0:
        raise DataError(f"Datum declares {c}x{h}x{w} = {n} values but holds {arr.size}", where=where)
    return arr.reshape(c, h, w)


def _lmdb_records(db: str) -> Iterator[Tuple[bytes, bytes]]:
    """(key, value) of an LMDB in key order, opened read-only."""
    import lmdb

    if not os.path.exists(db):
        raise DataError("database not found", where=db)
    try:
        env = lmdb.open(db, readonly=True, lock=False, readahead=False, subdir=os.path.isdir(db))
    except lmdb.Error as e:
        raise DataError(f"cannot open as an LMDB database: {e}", where=db) from None
    try:
        with env.begin() as txn:
            for k, v in txn.cursor():
                yield bytes(k), bytes(v)
    finally:
        env.close()


@dataclass
class MeanResult:
    mean: np.ndarray               # (C, H, W) float32
    count: int
    channel_means: List[float]     # as Caffe logs them


def encode_mean_blob(mean: np.ndarray) -> bytes:
    """A (C, H, W) mean as a serialized BlobProto: num=1, channels, height, width, packed data
    (what Caffe's ``compute_image_mean`` writes, field for field)."""
    c, h, w = (int(d) for d in mean.shape)
    head = caffe_pb2.BlobProto(num=1, channels=c, height=h, width=w).SerializeToString()
    data = np.ascontiguousarray(mean, dtype="<f4").tobytes()
    if not data:
        return head
    n, size = len(data), bytearray()
    while True:  # the length of the packed `data` field (5, length-delimited: key 0x2a), a varint
        size.append((n & 0x7F) | (0x80 if n >> 7 else 0))
        n >>= 7
        if not n:
            break
    return head + b"\x2a" + bytes(size) + data


def compute_image_mean(db: str, out: Optional[str] = None, *, backend: str = "lmdb",
                       log: Log = _quiet) -> MeanResult:
    """Caffe's ``compute_image_mean DB [OUT]``: the mean image of every Datum, float32 as Caffe.

    Every record must have the first one's shape (Caffe only compares sizes; a differently
    shaped image is refused here).  ``out``, when given, gets the BlobProto, atomically.
    """
    refuse_backend(backend)
    if out is not None:  # before the (long) pass over the database
        from caffe_compat.atomic import refuse_overwriting_inputs

        refuse_overwriting_inputs(out, [("database", db), ("database file", os.path.join(db, "data.mdb")),
                                        ("database lock file", os.path.join(db, "lock.mdb"))], "the mean file")
    acc: Optional[np.ndarray] = None
    shape: Tuple[int, ...] = ()
    count = 0
    for key, value in _lmdb_records(db):
        where = f"{db}: entry '{key.decode('utf-8', 'replace')}'"
        datum = caffe_pb2.Datum()
        try:
            datum.ParseFromString(value)
        except Exception as e:  # protobuf's DecodeError and friends
            raise DataError(f"corrupt Datum record: {e}", where=where) from None
        arr = datum_to_array(datum, where)
        if acc is None:
            if datum.encoded:
                log("Decoding Datum")
            shape = arr.shape
            acc = np.zeros(arr.size, np.float32)
            log("Starting iteration")
        elif arr.shape != shape:
            raise DataError(f"image is {'x'.join(map(str, arr.shape))} (CxHxW) but the first one is "
                            f"{'x'.join(map(str, shape))}: a mean needs images of one size (convert "
                            "with --resize_height/--resize_width)", where=where)
        acc += arr.reshape(-1).astype(np.float32, copy=False)  # Caffe's float running sum
        count += 1
        if count % 10000 == 0:
            log(f"Processed {count} files.")
    if acc is None:
        raise DataError("the database is empty", where=db)
    if count % 10000:
        log(f"Processed {count} files.")
    mean = (acc / np.float32(count)).astype(np.float32).reshape(shape)
    if out:
        from caffe_compat.atomic import atomic_write

        log(f"Write to {out}")
        atomic_write(os.fspath(out), encode_mean_blob(mean))
    c = shape[0]
    dim = shape[1] * shape[2]
    means = []
    for ch in range(c):
        total = np.cumsum(mean[ch].reshape(-1), dtype=np.float32)[-1]  # Caffe's sequential float sum
        means.append(float(np.float32(total) / np.float32(dim)))
    return MeanResult(mean, count, means)
