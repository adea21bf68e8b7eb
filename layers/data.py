"""Data layers: tops made from nothing (no bottoms) -- fed inputs, fillers, or files.

Every layer here knows its top shapes at build time (``infer_top_shapes([])``) from its
parameters and, where they matter, the first record of its source; a top whose shape
cannot be known (source absent or unreadable) is ``None`` as a whole.  A missing source is
not an error until ``forward``, which then raises ``DataError`` naming the layer and path,
so a train/val prototxt still builds for inspection.  Relative source paths are opened
relative to the current directory, as Caffe opens them.

Readers run on the CPU with numpy/OpenCV; the tops are moved to the layer's device and
floating dtype (tracked by a non-persistent buffer, so ``net.to(...)`` carries them).
Random choices (shuffles, crops, mirrors, window sampling) use torch generators seeded from
the build context: equal in law to Caffe's, not the same stream.
"""
from __future__ import annotations

import math
import os
import re
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor

from caffe_compat.distributed import batch_slot
from caffe_compat.errors import DataError, SchemaError, ShapeError
from caffe_compat.fillers import fill
from caffe_compat.layers.base import BuildContext, Layer, Shape
from caffe_compat.layers.registry import register
from caffe_compat.protos import caffe_pb2
from caffe_compat.transform import DataTransformer, hwc_to_chw

OptShape = Optional[Shape]


def _child_generator(ctx: BuildContext) -> torch.Generator:
    """A generator of this layer's own, seeded from the net's (or from entropy)."""
    g = torch.Generator()
    if ctx.generator is not None:
        g.manual_seed(int(torch.randint(0, 2 ** 62, (1,), generator=ctx.generator)))
    else:
        g.seed()
    return g


def _blob_shape(layer: Layer, bs) -> Shape:
    dims = tuple(int(d) for d in bs.dim)
    if any(d < 0 for d in dims):
        raise layer.error(ShapeError, f"negative dimension in shape {dims}")
    return dims


class _DataBase(Layer):
    """No bottoms; top shapes fixed at build; outputs follow the module's device/dtype."""

    exact_bottoms = 0

    def __init__(self, param, bottom_shapes: Sequence[Shape], ctx: BuildContext):
        super().__init__(param, bottom_shapes, ctx)
        # tracks .to(device/dtype) without entering state_dict or caffe_blobs()
        self.register_buffer("_anchor", torch.zeros(0), persistent=False)
        self._shapes: List[OptShape] = [None] * len(self.top_names)

    def infer_top_shapes(self, bottom_shapes=(), bottom_dtypes=None) -> List[OptShape]:
        return list(self._shapes)

    def _tensor(self, arr) -> Tensor:
        """A numpy array / tensor as a top on this layer's device and dtype."""
        t = torch.as_tensor(np.asarray(arr)) if not isinstance(arr, Tensor) else arr
        dtype = self._anchor.dtype if self._anchor.is_floating_point() else torch.float32
        return t.to(device=self._anchor.device, dtype=dtype)

    def _missing(self, what: str) -> DataError:
        return self.error(DataError, what)


# ============================================================================ Input
@register("Input")
class Input(_DataBase):
    """Tops the user feeds; ``input_param { shape }`` once for all tops or once per top."""

    min_tops = 1
    accepts_feed = True

    def __init__(self, param, bottom_shapes, ctx):
        super().__init__(param, bottom_shapes, ctx)
        shapes = list(param.input_param.shape)
        n = len(self.top_names)
        if len(shapes) not in (0, 1, n):
            raise self.error(SchemaError, f"must specify 'shape' once, once per top blob, or not at "
                             f"all: {n} tops vs. {len(shapes)} shapes")
        if shapes:
            self._shapes = [_blob_shape(self, shapes[0 if len(shapes) == 1 else i]) for i in range(n)]

    def forward(self) -> Tuple[Tensor, ...]:
        """Zeros of the declared shapes (the net substitutes the fed tensors)."""
        outs = []
        for name, s in zip(self.top_names, self._shapes):
            if s is None:
                raise self.error(DataError, f"input '{name}' has no declared shape and was not fed")
            outs.append(self._tensor(torch.zeros(s)))
        return tuple(outs)


# ============================================================================ DummyData
@register("DummyData")
class DummyData(_DataBase):
    """Tops filled by ``data_filler`` (constant 0 by default); random fillers refill every
    forward, as Caffe refills every non-constant filler."""

    min_tops = 1

    def __init__(self, param, bottom_shapes, ctx):
        super().__init__(param, bottom_shapes, ctx)
        p = param.dummy_data_param
        n = len(self.top_names)
        nf = len(p.data_filler)
        if nf not in (0, 1, n):
            raise self.error(SchemaError, f"number of data fillers must be 0, 1 or equal to the number "
                             f"of tops: {n}; you specified {nf} data fillers")
        legacy = any(len(getattr(p, f)) for f in ("num", "channels", "height", "width"))
        if legacy:
            if len(p.shape):
                raise self.error(SchemaError, "both shape and legacy fields (num/channels/height/width) "
                                 "were specified")
            for f in ("num", "channels", "height", "width"):
                if len(getattr(p, f)) not in (1, n):
                    raise self.error(SchemaError, f"must specify '{f}' once, or once per top blob ({n}); "
                                     f"specified {len(getattr(p, f))}")

            def pick(f: str, i: int) -> int:
                vals = getattr(p, f)
                return int(vals[0 if len(vals) == 1 else i])

            self._shapes = [tuple(pick(f, i) for f in ("num", "channels", "height", "width")) for i in range(n)]
        else:
            if len(p.shape) not in (1, n):
                raise self.error(SchemaError, f"must specify 'shape' once, or once per top blob ({n}); "
                                 f"specified {len(p.shape)}")
            self._shapes = [_blob_shape(self, p.shape[0 if len(p.shape) == 1 else i]) for i in range(n)]
        if nf == 0:
            default = caffe_pb2.FillerParameter(type="constant", value=0.0)
            self._fillers = [default] * n
        else:
            self._fillers = [p.data_filler[0 if nf == 1 else i] for i in range(n)]
        self._generator = _child_generator(ctx)
        for i, sh in enumerate(self._shapes):  # declared shapes: charged to the net before filling
            self.declare(sh, what=f"top {i}", key=("top", i))
        # constant tops are filled once (Caffe does not refill them); check fillers now
        self._constant: Dict[int, Tensor] = {}
        for i, (s, f) in enumerate(zip(self._shapes, self._fillers)):
            t = fill(s, f, generator=self._generator, layer=self.name)
            if f.type == "constant":
                self._constant[i] = t

    def forward(self) -> Tuple[Tensor, ...]:
        outs = []
        for i, (s, f) in enumerate(zip(self._shapes, self._fillers)):
            t = self._constant.get(i)
            if t is None:
                t = fill(s, f, generator=self._generator, layer=self.name)
            outs.append(self._tensor(t))
        return tuple(outs)


# ============================================================================ MemoryData
@register("MemoryData")
class MemoryData(_DataBase):
    """Arrays the user feeds (pycaffe's ``set_input_arrays``): tops ``data`` (N, C, H, W)
    and ``label`` (N,).  Fed arrays are used as they are (Caffe's ``Reset`` does not apply
    ``transform_param`` either); unfed tops read as zeros."""

    exact_tops = 2
    accepts_feed = True

    def __init__(self, param, bottom_shapes, ctx):
        super().__init__(param, bottom_shapes, ctx)
        p = param.memory_data_param
        b, c, h, w = int(p.batch_size), int(p.channels), int(p.height), int(p.width)
        if b * c * h * w <= 0:
            raise self.error(SchemaError, "batch_size, channels, height, and width must be specified "
                             f"and positive in memory_data_param (got {b}, {c}, {h}, {w})")
        self._shapes = [(b, c, h, w), (b,)]

    def forward(self) -> Tuple[Tensor, ...]:
        return tuple(self._tensor(torch.zeros(s)) for s in self._shapes)


# ============================================================================ shared helpers
def _atoi(s: str) -> int:
    """C's ``atoi``: the leading integer of ``s`` (after blanks), 0 if there is none."""
    m = re.match(r"\s*([+-]?\d+)", s)
    return int(m.group(1)) if m else 0


def _read_image(path: str, new_height: int, new_width: int, is_color: bool) -> Optional[np.ndarray]:
    """Caffe's ``ReadImageToCVMat``: imread (colour or grey), resized when both sizes given."""
    import cv2

    img = cv2.imread(path, cv2.IMREAD_COLOR if is_color else cv2.IMREAD_GRAYSCALE)
    if img is None:
        return None
    if new_height > 0 and new_width > 0:
        img = cv2.resize(img, (new_width, new_height))
    return img


class _Sharded:
    """A data layer's share of a distributed run's minibatches (:mod:`caffe_compat.distributed`).

    After ``shard(rank, world, iter_size)`` the layer reads only its own minibatches of the
    one stream every rank walks in the same order: at iteration ``k`` rank ``r`` takes
    minibatches ``k*world*iter_size + r*iter_size ...`` (``iter_size`` of them) and skips
    the others' (:meth:`_skip_batch`, no decoding) -- the minibatches one process with
    ``iter_size*world`` reads at that iteration.  Unsharded: every minibatch.
    """

    _shard: Optional[Tuple[int, int, int]] = None
    _own = 0

    def shard(self, rank: int, world: int, iter_size: int) -> None:
        self._shard = (int(rank), int(world), int(iter_size))
        self._own = 0

    def _skip_batch(self) -> None:
        raise NotImplementedError

    def _skip_to_own(self) -> None:
        if self._shard is None:
            return
        j = self._own
        self._own += 1
        here = batch_slot(j, *self._shard)
        before = -1 if j == 0 else batch_slot(j - 1, *self._shard)
        for _ in range(here - before - 1):
            self._skip_batch()


class _BatchedSource(_DataBase, _Sharded):
    """Data/ImageData: a transformer, a batch size, a cursor over items."""

    def _start_list(self, lines: list) -> None:
        """Take a list file's items: shuffle if asked, then Caffe's random skip (rand_skip)."""
        self.lines = lines
        if self.shuffle:
            self._shuffle()
        self.pos = 0
        if self.rand_skip:
            self.pos = int(torch.randint(0, self.rand_skip, (1,), generator=self._generator))
            if self.pos >= len(lines):
                raise self.error(DataError, f"not enough images ({len(lines)}) to skip {self.pos}")
        self._problem = None

    def _shuffle(self) -> None:
        perm = torch.randperm(len(self.lines), generator=self._generator).tolist()
        self.lines = [self.lines[i] for i in perm]

    def _stack(self, images: List[np.ndarray], labels: List[float]) -> Tuple[Tensor, ...]:
        first = self.transformer.infer_shape(images[0].shape)
        data = np.stack([self.transformer.transform(im, first) for im in images])
        outs = [self._tensor(data)]
        if len(self.top_names) > 1:
            outs.append(self._tensor(np.asarray(labels, dtype=np.float32)))
        return tuple(outs)


# ============================================================================ Data (LMDB)
_LMDB_ENVS: Dict[str, object] = {}


def _lmdb_env(path: str):
    """One read-only environment per database and process (LMDB refuses to open one twice,
    and a train and a test net, or two Data layers, often read the same database)."""
    import lmdb

    key = os.path.realpath(path)
    env = _LMDB_ENVS.get(key)
    if env is None:
        env = lmdb.open(path, readonly=True, lock=False, readahead=False,
                        subdir=os.path.isdir(path), max_readers=126)
        _LMDB_ENVS[key] = env
    return env


@register("Data")
class Data(_BatchedSource):
    """Batches of ``Datum`` records from an LMDB (``data_param``), through ``transform_param``.

    Records are read in key order and wrap around.  LEVELDB sources are not supported.
    """

    min_tops = 1
    max_tops = 2

    def __init__(self, param, bottom_shapes, ctx):
        super().__init__(param, bottom_shapes, ctx)
        p = param.data_param
        self.source = p.source
        self.batch_size = int(p.batch_size)
        self.backend = p.backend
        self.transformer = DataTransformer(param.transform_param, self.phase,
                                           generator=_child_generator(ctx), layer=self.name)
        self._env = None
        self._next_key: Optional[bytes] = None
        self._problem: Optional[str] = None
        if len(self.top_names) > 1:
            self._shapes[1] = (self.batch_size,)
        first = self._open()
        if first is not None:
            try:
                item = self.transformer.infer_shape(self.transformer.decode_datum(first).shape)
                self._shapes[0] = (self.batch_size,) + tuple(item)
            except DataError as e:
                self._problem = str(e)

    def _open(self):
        """Open the LMDB and return its first Datum (None, with ``_problem`` set, if impossible)."""
        if self.backend == caffe_pb2.DataParameter.LEVELDB:
            self._problem = (f"data source '{self.source}' uses backend LEVELDB, which is not supported; "
                             "convert it to LMDB (e.g. convert_imageset --backend=lmdb), or set "
                             "'backend: LMDB' if it already is one")
            return None
        if not self.source:
            self._problem = "data_param.source is not set"
            return None
        if not os.path.exists(self.source):
            self._problem = f"data source '{self.source}' not found (cwd {os.getcwd()})"
            return None
        try:
            import lmdb  # noqa: F401
        except ImportError:
            self._problem = "reading LMDB sources needs the 'lmdb' package (pip install lmdb)"
            return None
        import lmdb

        try:
            self._env = _lmdb_env(self.source)
            with self._env.begin() as txn:
                cur = txn.cursor()
                if not cur.first():
                    self._problem = f"LMDB '{self.source}' is empty"
                    self._env = None
                    return None
                self._next_key = bytes(cur.key())
                raw = bytes(cur.value())
        except lmdb.Error as e:
            self._problem = f"cannot open LMDB '{self.source}': {e}"
            self._env = None
            return None
        self._problem = None
        return self._parse(raw)

    def _parse(self, raw: bytes):
        datum = caffe_pb2.Datum()
        try:
            datum.ParseFromString(raw)
        except Exception as e:
            raise self.error(DataError, f"corrupt Datum record in '{self.source}': {e}") from None
        return datum

    def _read(self, n: int) -> List:
        """The next ``n`` records in key order, wrapping to the first after the last."""
        out = []
        with self._env.begin() as txn:
            cur = txn.cursor()
            if not cur.set_range(self._next_key):
                cur.first()
            for _ in range(n):
                out.append(self._parse(bytes(cur.value())))
                if not cur.next():
                    cur.first()
            self._next_key = bytes(cur.key())
        return out

    def _skip_batch(self) -> None:
        """Move past one minibatch of records (another rank's), in key order, wrapping."""
        with self._env.begin() as txn:
            cur = txn.cursor()
            if not cur.set_range(self._next_key):
                cur.first()
            for _ in range(self.batch_size):
                if not cur.next():
                    cur.first()
            self._next_key = bytes(cur.key())

    def forward(self) -> Tuple[Tensor, ...]:
        if self._env is None:
            self._open()
            if self._env is None:
                raise self._missing(self._problem or f"cannot read '{self.source}'")
        self._skip_to_own()
        datums = self._read(self.batch_size)
        images = [self.transformer.decode_datum(d) for d in datums]
        return self._stack(images, [float(d.label) for d in datums])


# ============================================================================ ImageData
@register("ImageData")
class ImageData(_BatchedSource):
    """Images listed in a text file (``path label`` per line; the label follows the last
    space), read with OpenCV (BGR, or grey with ``is_color: false``), optionally resized to
    ``new_height x new_width``; ``root_folder`` is prefixed as plain text, as Caffe does."""

    exact_tops = 2

    def __init__(self, param, bottom_shapes, ctx):
        super().__init__(param, bottom_shapes, ctx)
        p = param.image_data_param
        self.source = p.source
        self.batch_size = int(p.batch_size)
        self.new_height, self.new_width = int(p.new_height), int(p.new_width)
        self.is_color = bool(p.is_color)
        self.root_folder = p.root_folder
        self.shuffle = bool(p.shuffle)
        self.rand_skip = int(p.rand_skip)
        if not ((self.new_height == 0 and self.new_width == 0) or (self.new_height > 0 and self.new_width > 0)):
            raise self.error(SchemaError, "new_height and new_width must be set together")
        if self.batch_size <= 0:
            raise self.error(SchemaError, "positive batch_size required")
        self.transformer = DataTransformer(param.transform_param, self.phase,
                                           generator=_child_generator(ctx), layer=self.name)
        self._generator = _child_generator(ctx)
        self._shapes = [None, (self.batch_size,)]
        self.lines: Optional[List[Tuple[str, int]]] = None
        self.pos = 0
        self._problem: Optional[str] = None
        if self._open():
            img = self._load(self.pos, raise_errors=False)
            if img is not None:
                try:
                    self._shapes[0] = (self.batch_size,) + self.transformer.infer_shape(img.shape)
                except DataError as e:
                    self._problem = str(e)

    def _open(self) -> bool:
        if not os.path.exists(self.source):
            self._problem = f"image list '{self.source}' not found (cwd {os.getcwd()})"
            return False
        with open(self.source, "r", encoding="utf-8", errors="surrogateescape") as f:
            raw = f.read().splitlines()
        lines = []
        for line in raw:
            if not line.strip():
                continue  # Caffe would keep ("", 0) and fail to load it
            pos = line.rfind(" ")
            lines.append((line[:pos] if pos >= 0 else line, _atoi(line[pos + 1:])))
        if not lines:
            self._problem = f"image list '{self.source}' is empty"
            return False
        self._start_list(lines)
        return True

    def _load(self, i: int, raise_errors: bool = True) -> Optional[np.ndarray]:
        path = self.root_folder + self.lines[i][0]
        img = _read_image(path, self.new_height, self.new_width, self.is_color)
        if img is None:
            self._problem = f"could not load image '{path}' (listed in '{self.source}')"
            if raise_errors:
                raise self._missing(self._problem)
            return None
        return hwc_to_chw(img, layer=self.name)

    def _skip_batch(self) -> None:
        """Move past one minibatch of the list (another rank's), reshuffling at the end as
        a read would."""
        for _ in range(self.batch_size):
            self.pos += 1
            if self.pos >= len(self.lines):
                self.pos = 0
                if self.shuffle:
                    self._shuffle()

    def forward(self) -> Tuple[Tensor, ...]:
        if self.lines is None and not self._open():
            raise self._missing(self._problem)
        self._skip_to_own()
        images, labels = [], []
        for _ in range(self.batch_size):
            images.append(self._load(self.pos))
            labels.append(float(self.lines[self.pos][1]))
            self.pos += 1
            if self.pos >= len(self.lines):
                self.pos = 0
                if self.shuffle:
                    self._shuffle()
        return self._stack(images, labels)


# ============================================================================ HDF5Data
def read_hdf5(path: str, names: Sequence[str]) -> List[np.ndarray]:
    """The datasets ``names`` of one HDF5 file, as float arrays (needs h5py)."""
    try:
        import h5py
    except ImportError:
        raise DataError("reading HDF5 sources needs the 'h5py' package (pip install h5py)") from None
    out = []
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise DataError(f"failed opening HDF5 file '{path}': {e}") from None
    with f:
        for n in names:
            if n not in f:
                raise DataError(f"failed to find HDF5 dataset '{n}' in '{path}'")
            ds = f[n]
            if ds.dtype.kind not in "fiub":
                raise DataError(f"HDF5 dataset '{n}' in '{path}' has unsupported type {ds.dtype}")
            if ds.ndim < 1:
                raise DataError(f"HDF5 dataset '{n}' in '{path}' must have at least 1 axis")
            out.append(np.asarray(ds[()], dtype=np.float64))
    return out


@register("HDF5Data")
class HDF5Data(_DataBase, _Sharded):
    """Rows of the datasets named by the tops, from the HDF5 files listed in ``source``.

    Rows are taken in order (or a shuffled order with ``shuffle``), file after file, wrapping
    around; no ``transform_param`` (Caffe refuses it).
    """

    min_tops = 1

    def __init__(self, param, bottom_shapes, ctx):
        super().__init__(param, bottom_shapes, ctx)
        if param.HasField("transform_param"):
            raise self.error(SchemaError, "HDF5Data does not transform data (remove transform_param)")
        p = param.hdf5_data_param
        self.source = p.source
        self.batch_size = int(p.batch_size)
        self.shuffle = bool(p.shuffle)
        self._generator = _child_generator(ctx)
        self.files: Optional[List[str]] = None
        self._problem: Optional[str] = None
        self._blobs: Optional[List[np.ndarray]] = None
        try:
            self._open()
        except DataError as e:
            self._problem = e.message
        if self._blobs is not None:
            self._shapes = [(self.batch_size,) + tuple(b.shape[1:]) for b in self._blobs]

    def _perm(self, n: int) -> List[int]:
        if self.shuffle:
            return torch.randperm(n, generator=self._generator).tolist()
        return list(range(n))

    def _open(self) -> None:
        if not os.path.exists(self.source):
            raise self._missing(f"HDF5 file list '{self.source}' not found (cwd {os.getcwd()})")
        with open(self.source, "r", encoding="utf-8", errors="surrogateescape") as f:
            files = f.read().split()
        if not files:
            raise self._missing(f"must have at least 1 HDF5 filename listed in '{self.source}'")
        self.files = files
        self.file_perm = self._perm(len(files))
        self.current_file = 0
        self._load(self.files[self.file_perm[0]])
        self.current_row = 0

    def _load(self, path: str) -> None:
        if not os.path.exists(path):
            raise self._missing(f"HDF5 file '{path}' (listed in '{self.source}') not found")
        try:
            blobs = read_hdf5(path, self.top_names)
        except DataError as e:
            raise self._missing(e.message) from None
        n = blobs[0].shape[0]
        for name, b in zip(self.top_names, blobs):
            if b.shape[0] != n:
                raise self._missing(f"dataset '{name}' in '{path}' has {b.shape[0]} rows, "
                                    f"'{self.top_names[0]}' has {n}")
        if self._blobs is not None:
            for name, old, new in zip(self.top_names, self._blobs, blobs):
                if old.shape[1:] != new.shape[1:]:
                    raise self._missing(f"dataset '{name}' in '{path}' has rows of shape {new.shape[1:]}, "
                                        f"earlier files {old.shape[1:]}")
        if n == 0:
            raise self._missing(f"HDF5 file '{path}' has no rows")
        self._blobs = blobs
        self.data_perm = self._perm(n)

    def _next(self) -> None:
        self.current_row += 1
        if self.current_row == self._blobs[0].shape[0]:
            if len(self.files) > 1:
                self.current_file += 1
                if self.current_file == len(self.files):
                    self.current_file = 0
                    if self.shuffle:
                        self.file_perm = self._perm(len(self.files))
                self._load(self.files[self.file_perm[self.current_file]])
            self.current_row = 0
            if self.shuffle:
                self.data_perm = self._perm(self._blobs[0].shape[0])

    def _skip_batch(self) -> None:
        """Move past one minibatch of rows (another rank's)."""
        for _ in range(self.batch_size):
            self._next()

    def forward(self) -> Tuple[Tensor, ...]:
        if self._blobs is None:
            try:
                self._open()
            except DataError as e:
                raise self._missing(e.message) from None
        self._skip_to_own()
        rows: List[List[np.ndarray]] = [[] for _ in self.top_names]
        for _ in range(self.batch_size):
            r = self.data_perm[self.current_row]
            for j, b in enumerate(self._blobs):
                rows[j].append(b[r])
            self._next()
        return tuple(self._tensor(np.stack(r).astype(np.float32)) for r in rows)


# ============================================================================ WindowData
def _c_round(v: float) -> int:
    """C's ``round``: half away from zero."""
    return int(math.copysign(math.floor(abs(v) + 0.5), v))


@register("WindowData")
class WindowData(_DataBase):
    """R-CNN fine-tuning windows: ``batch_size`` windows warped to ``crop_size``, a fraction
    ``fg_fraction`` from foreground windows (overlap >= fg_threshold), the rest from
    background (overlap < bg_threshold, label 0), from the window file::

        # image_index
        img_path
        channels
        height
        width
        num_windows
        class_index overlap x1 y1 x2 y2   (num_windows lines)

    ``crop_size``, ``mirror``, ``mean_file``/``mean_value`` come from ``transform_param``,
    ``scale`` from ``window_data_param`` (as in Caffe).
    """

    exact_tops = 2

    def __init__(self, param, bottom_shapes, ctx):
        super().__init__(param, bottom_shapes, ctx)
        p = param.window_data_param
        t = param.transform_param
        self.source = p.source
        self.batch_size = int(p.batch_size)
        self.scale = float(p.scale)
        self.fg_threshold, self.bg_threshold = float(p.fg_threshold), float(p.bg_threshold)
        self.fg_fraction = float(p.fg_fraction)
        self.context_pad = int(p.context_pad)
        self.crop_mode = p.crop_mode
        self.root_folder = p.root_folder
        self.crop_size = int(t.crop_size)
        self.mirror = bool(t.mirror)
        if self.crop_size <= 0:
            raise self.error(SchemaError, "WindowData needs transform_param.crop_size > 0")
        if self.crop_mode not in ("warp", "square"):
            raise self.error(SchemaError, f"unknown crop_mode '{self.crop_mode}'; allowed: warp, square")
        # mean handling shared with the transformer (mean_file xor mean_value)
        self.transformer = DataTransformer(t, self.phase, generator=_child_generator(ctx), layer=self.name)
        self._generator = _child_generator(ctx)
        self._shapes = [None, (self.batch_size,)]
        self.images: Optional[List[Tuple[str, Tuple[int, int, int]]]] = None
        self._problem: Optional[str] = None
        try:
            self._open()
        except DataError as e:
            self._problem = e.message

    def _open(self) -> None:
        if not os.path.exists(self.source):
            raise self._missing(f"window file '{self.source}' not found (cwd {os.getcwd()})")
        with open(self.source, "r", encoding="utf-8", errors="surrogateescape") as f:
            tok = f.read().split()
        images: List[Tuple[str, Tuple[int, int, int]]] = []
        fg: List[Tuple[int, int, float, int, int, int, int]] = []
        bg: List[Tuple[int, int, float, int, int, int, int]] = []
        i = 0
        channels = 0
        try:
            if len(tok) < 2:
                raise ValueError("window file is empty")
            while i + 1 < len(tok):
                if tok[i] != "#":
                    raise ValueError(f"expected '#' at token {i}, got {tok[i]!r}")
                index = int(tok[i + 1])
                path = self.root_folder + tok[i + 2]
                c, h, w = int(tok[i + 3]), int(tok[i + 4]), int(tok[i + 5])
                channels = c
                images.append((path, (c, h, w)))
                nwin = int(tok[i + 6])
                i += 7
                for _ in range(nwin):
                    label, overlap = int(tok[i]), float(tok[i + 1])
                    x1, y1, x2, y2 = (int(v) for v in tok[i + 2:i + 6])
                    i += 6
                    if overlap >= self.fg_threshold:
                        if label <= 0:
                            raise ValueError(f"foreground window with label {label} (must be > 0)")
                        fg.append((index, label, overlap, x1, y1, x2, y2))
                    elif overlap < self.bg_threshold:
                        bg.append((index, 0, 0.0, x1, y1, x2, y2))
        except (ValueError, IndexError) as e:
            raise self._missing(f"malformed window file '{self.source}': {e}") from None
        self.images, self.fg, self.bg = images, fg, bg
        self._shapes[0] = (self.batch_size, channels, self.crop_size, self.crop_size)
        self._problem = None

    def _rand(self) -> int:
        return int(torch.randint(0, 2 ** 31, (1,), generator=self._generator))

    def _warp(self, img: np.ndarray, win, do_mirror: bool) -> Tuple[np.ndarray, int, int]:
        """The window cut from ``img`` and warped (Caffe's load_batch geometry, float math)."""
        import cv2

        f32 = np.float32
        crop = self.crop_size
        x1, y1, x2, y2 = win[3:]
        out_w = out_h = crop
        pad_w = pad_h = 0
        if self.context_pad > 0 or self.crop_mode == "square":
            context_scale = f32(crop) / f32(crop - 2 * self.context_pad)
            half_h, half_w = f32(y2 - y1 + 1) / f32(2.0), f32(x2 - x1 + 1) / f32(2.0)
            cx, cy = f32(x1) + half_w, f32(y1) + half_h
            if self.crop_mode == "square":
                half_h = half_w = max(half_h, half_w)
            x1 = _c_round(float(cx - half_w * context_scale))
            x2 = _c_round(float(cx + half_w * context_scale))
            y1 = _c_round(float(cy - half_h * context_scale))
            y2 = _c_round(float(cy + half_h * context_scale))
            unclipped_h, unclipped_w = y2 - y1 + 1, x2 - x1 + 1
            pad_x1, pad_y1 = max(0, -x1), max(0, -y1)
            pad_x2, pad_y2 = max(0, x2 - img.shape[1] + 1), max(0, y2 - img.shape[0] + 1)
            x1, x2, y1, y2 = x1 + pad_x1, x2 - pad_x2, y1 + pad_y1, y2 - pad_y2
            clipped_h, clipped_w = y2 - y1 + 1, x2 - x1 + 1
            sx, sy = f32(crop) / f32(unclipped_w), f32(crop) / f32(unclipped_h)
            out_w = _c_round(float(f32(clipped_w) * sx))
            out_h = _c_round(float(f32(clipped_h) * sy))
            pad_x1 = _c_round(float(f32(pad_x1) * sx))
            pad_x2 = _c_round(float(f32(pad_x2) * sx))
            pad_y1 = _c_round(float(f32(pad_y1) * sy))
            pad_h = pad_y1
            pad_w = pad_x2 if do_mirror else pad_x1
            out_h = min(out_h, crop - pad_h)
            out_w = min(out_w, crop - pad_w)
        if not (0 <= x1 <= x2 < img.shape[1] and 0 <= y1 <= y2 < img.shape[0]):
            raise self.error(DataError, f"window {tuple(win[3:])} lies outside its {img.shape[1]}x"
                             f"{img.shape[0]} image")
        patch = cv2.resize(img[y1:y2 + 1, x1:x2 + 1], (max(out_w, 1), max(out_h, 1)),
                           interpolation=cv2.INTER_LINEAR)
        if do_mirror:
            patch = patch[:, ::-1]
        return hwc_to_chw(np.ascontiguousarray(patch), layer=self.name), pad_h, pad_w

    def forward(self) -> Tuple[Tensor, ...]:
        import cv2

        if self.images is None:
            try:
                self._open()
            except DataError as e:
                raise self._missing(e.message) from None
        if not self.fg or not self.bg:
            raise self._missing(f"window file '{self.source}' needs both foreground and background windows "
                                f"({len(self.fg)} fg, {len(self.bg)} bg)")
        crop = self.crop_size
        channels = self._shapes[0][1]
        data = np.zeros((self.batch_size, channels, crop, crop), np.float32)
        labels = np.zeros(self.batch_size, np.float32)
        mean = self.transformer.mean_array()
        mean_off = (mean.shape[2] - crop) // 2 if mean is not None else 0
        mv = None
        if mean is None and self.transformer.mean_values:
            vals = self.transformer.mean_values
            if len(vals) not in (1, channels):
                raise self.error(DataError, f"specify either 1 mean_value or as many as channels ({channels})")
            mv = np.asarray(vals * (channels if len(vals) == 1 else 1), np.float32)[:, None, None]
        num_fg = int(np.float32(self.batch_size) * np.float32(self.fg_fraction))
        item = 0
        for is_fg, count in ((0, self.batch_size - num_fg), (1, num_fg)):
            pool = self.fg if is_fg else self.bg
            for _ in range(count):
                win = pool[self._rand() % len(pool)]
                do_mirror = self.mirror and self._rand() % 2 == 1
                if not 0 <= win[0] < len(self.images):
                    raise self.error(DataError, f"window refers to image index {win[0]}, but the window file "
                                     f"lists {len(self.images)} images")
                path = self.images[win[0]][0]
                img = cv2.imread(path, cv2.IMREAD_COLOR)
                if img is None:
                    raise self._missing(f"could not open or find image '{path}' (listed in '{self.source}')")
                patch, pad_h, pad_w = self._warp(img, win, do_mirror)
                c, ph, pw = patch.shape
                if c != channels:
                    raise self.error(DataError, f"image '{path}' has {c} channels, the window file says {channels}")
                x = patch.astype(np.float32)
                if mean is not None:
                    x = x - mean[:, mean_off + pad_h:mean_off + pad_h + ph, mean_off + pad_w:mean_off + pad_w + pw]
                elif mv is not None:
                    x = x - mv
                data[item, :, pad_h:pad_h + ph, pad_w:pad_w + pw] = x * np.float32(self.scale)
                labels[item] = win[1]
                item += 1
        return self._tensor(data), self._tensor(labels)
