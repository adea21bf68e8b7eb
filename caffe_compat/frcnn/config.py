"""py-faster-rcnn's configuration object ``cfg`` and its YAML/command-line overrides.

py-faster-rcnn's tools change a process-global config before building nets (``--cfg
file.yml``, ``--set KEY VALUE``), and its Python layers (anchor targets, proposals,
proposal targets, the RoI data layer) read it.  Models trained with it only reproduce
when every key and default is the same, so this module carries all of them, with the
original's merge rules:

* a YAML file may only name existing keys, and each value must have *exactly* the type
  of the default (``0`` for a float key is an error, so is a list for a tuple key; write
  ``!!python/tuple [600]``); numpy-array defaults (``PIXEL_MEANS``) convert instead;
* ``cfg_from_list`` parses each value as a Python literal (strings that are not literals
  stay strings) and again demands the default's exact type.

``cfg`` is one object that is only ever mutated in place, so every module holding
``from caffe_compat.frcnn.config import cfg`` sees changes.  Tests and tools that must not
leak changes use :func:`temporary_cfg` (restores on exit) or :func:`default_cfg` (a fresh,
independent copy); the commands use :func:`command_cfg` (``--cfg`` and ``--set``, restored
when the command ends).

Unlike the originals, the layers read the config once, when the net is built
(:func:`build_cfg`): from ``Net(..., context={CONTEXT_KEY: c})`` when the caller gives one,
else from the global ``cfg`` as it is then (legacy scripts call ``cfg_from_file`` before
``caffe.Net``).  Two nets built with different configs keep theirs, and changing ``cfg``
after a net is built does not change it.

This module also parses the ``param_str`` of those Python layers (:func:`parse_param_str`):
a YAML mapping read with a *safe* loader that knows only the ``!!python/tuple`` tag.
"""
from __future__ import annotations

import ast
import contextlib
import copy
import os
import os.path as osp
from typing import Any, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence

import numpy as np

from caffe_compat import limits
from caffe_compat.errors import SchemaError, name_list, shorten

__all__ = [
    "AttrDict", "ConfigError", "cfg", "default_cfg", "reset_cfg", "temporary_cfg",
    "cfg_from_file", "cfg_from_list", "merge_cfg", "get_output_dir", "parse_param_str",
    "yaml_load", "CONTEXT_KEY", "build_cfg", "override_list", "command_cfg",
]


class ConfigError(SchemaError):
    """A config override that names an unknown key or gives a value of the wrong type."""


class AttrDict(dict):
    """A dict whose keys are also attributes (py-faster-rcnn used ``easydict``).

    Nested mappings assigned to it become ``AttrDict`` too, so ``cfg.TRAIN.SCALES`` and
    ``cfg['TRAIN']['SCALES']`` always name the same value.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__()
        for k, v in dict(*args, **kwargs).items():
            self[k] = v

    def __setitem__(self, key: str, value: Any) -> None:
        if isinstance(value, Mapping) and not isinstance(value, AttrDict):
            value = AttrDict(value)
        super().__setitem__(key, value)

    def __getattr__(self, key: str) -> Any:
        try:
            return self[key]
        except KeyError:
            raise AttributeError(key) from None

    def __setattr__(self, key: str, value: Any) -> None:
        self[key] = value

    def __delattr__(self, key: str) -> None:
        try:
            del self[key]
        except KeyError:
            raise AttributeError(key) from None

    def __deepcopy__(self, memo: Dict[int, Any]) -> "AttrDict":
        out = AttrDict()
        for k, v in self.items():
            out[k] = copy.deepcopy(v, memo)
        return out

    def __reduce__(self):  # pickling keeps the class (dict's default would too, but be explicit)
        return (AttrDict, (dict(self),))


# The project root plays the part of py-faster-rcnn's checkout root (lib/fast_rcnn/../..).
_ROOT_DIR = osp.abspath(osp.join(osp.dirname(__file__), "..", ".."))


def _defaults() -> AttrDict:
    """Every key and default of py-faster-rcnn's ``lib/fast_rcnn/config.py``."""
    C = AttrDict()

    T = AttrDict()
    T.SCALES = (600,)                       # shortest-side sizes (one drawn per image)
    T.MAX_SIZE = 1000                       # cap on the longest side
    T.IMS_PER_BATCH = 2
    T.BATCH_SIZE = 128                      # RoIs per minibatch
    T.FG_FRACTION = 0.25
    T.FG_THRESH = 0.5                       # fg if max IoU >= this
    T.BG_THRESH_HI = 0.5                    # bg if max IoU in [LO, HI)
    T.BG_THRESH_LO = 0.1
    T.USE_FLIPPED = True
    T.BBOX_REG = True
    T.BBOX_THRESH = 0.5
    T.SNAPSHOT_ITERS = 10000
    T.SNAPSHOT_INFIX = ""
    T.USE_PREFETCH = False
    #: worker processes building minibatches ahead (caffe_compat.frcnn.prefetch): -1 picks
    #: (on CUDA up to 4; on the CPU none unless USE_PREFETCH), 0 never
    T.PREFETCH_WORKERS = -1
    T.BBOX_NORMALIZE_TARGETS = True
    T.BBOX_INSIDE_WEIGHTS = (1.0, 1.0, 1.0, 1.0)
    T.BBOX_NORMALIZE_TARGETS_PRECOMPUTED = False
    T.BBOX_NORMALIZE_MEANS = (0.0, 0.0, 0.0, 0.0)
    T.BBOX_NORMALIZE_STDS = (0.1, 0.1, 0.2, 0.2)
    T.PROPOSAL_METHOD = "selective_search"
    T.ASPECT_GROUPING = True
    T.HAS_RPN = False
    T.RPN_POSITIVE_OVERLAP = 0.7
    T.RPN_NEGATIVE_OVERLAP = 0.3
    T.RPN_CLOBBER_POSITIVES = False
    T.RPN_FG_FRACTION = 0.5
    T.RPN_BATCHSIZE = 256
    T.RPN_NMS_THRESH = 0.7
    T.RPN_PRE_NMS_TOP_N = 12000
    T.RPN_POST_NMS_TOP_N = 2000
    T.RPN_MIN_SIZE = 16
    T.RPN_BBOX_INSIDE_WEIGHTS = (1.0, 1.0, 1.0, 1.0)
    T.RPN_POSITIVE_WEIGHT = -1.0            # < 0: uniform 1/num_examples
    C.TRAIN = T

    E = AttrDict()
    E.SCALES = (600,)
    E.MAX_SIZE = 1000
    E.NMS = 0.3
    E.SVM = False
    E.BBOX_REG = True
    E.HAS_RPN = False
    E.PROPOSAL_METHOD = "selective_search"
    E.RPN_NMS_THRESH = 0.7
    E.RPN_PRE_NMS_TOP_N = 6000
    E.RPN_POST_NMS_TOP_N = 300
    E.RPN_MIN_SIZE = 16
    C.TEST = E

    C.DEDUP_BOXES = 1.0 / 16.0
    C.PIXEL_MEANS = np.array([[[102.9801, 115.9465, 122.7717]]])  # BGR, shape (1, 1, 3)
    C.RNG_SEED = 3
    C.EPS = 1e-14
    C.ROOT_DIR = _ROOT_DIR
    C.DATA_DIR = osp.abspath(osp.join(_ROOT_DIR, "data"))
    C.MODELS_DIR = osp.abspath(osp.join(_ROOT_DIR, "models", "pascal_voc"))
    C.MATLAB = "matlab"
    C.EXP_DIR = "default"
    C.USE_GPU_NMS = True
    C.GPU_ID = 0
    return C


#: The process-global config (py-faster-rcnn's ``fast_rcnn.config.cfg``); mutate in place only.
cfg: AttrDict = _defaults()


def default_cfg() -> AttrDict:
    """A fresh config holding py-faster-rcnn's defaults, independent of the global ``cfg``."""
    return _defaults()


def reset_cfg() -> None:
    """Restore the global ``cfg`` to the defaults, in place (references to it and to its
    sections such as ``cfg.TRAIN`` stay valid)."""
    _restore(cfg, _defaults())


@contextlib.contextmanager
def temporary_cfg(overrides: Optional[Mapping[str, Any]] = None) -> Iterator[AttrDict]:
    """Change the global ``cfg`` inside a ``with`` block and restore it afterwards.

    ``overrides`` maps dotted keys to values (``{"TRAIN.RPN_BATCHSIZE": 64}``) and is type
    checked like :func:`cfg_from_list`, but takes Python values instead of strings.
    Nested ``AttrDict`` objects are restored too, so a caller holding ``cfg.TRAIN`` sees
    its old values again on exit.
    """
    saved = copy.deepcopy(cfg)
    try:
        if overrides:
            for key, value in overrides.items():
                _set_dotted(cfg, key, value)
        yield cfg
    finally:
        _restore(cfg, saved)


def _restore(dst: AttrDict, src: AttrDict) -> None:
    """Copy ``src`` into ``dst`` recursively, keeping ``dst``'s nested dict objects."""
    for k in list(dst.keys()):
        if k not in src:
            dict.__delitem__(dst, k)
    for k, v in src.items():
        cur = dict.get(dst, k)
        if isinstance(v, AttrDict) and isinstance(cur, AttrDict):
            _restore(cur, v)
        else:
            dst[k] = v


def _type_name(v: Any) -> str:
    return type(v).__name__


def merge_cfg(a: Mapping[str, Any], b: AttrDict, _prefix: str = "") -> None:
    """Merge mapping ``a`` into config ``b`` with py-faster-rcnn's rules (``_merge_a_into_b``).

    Every key of ``a`` must exist in ``b``; each value must have exactly the type of the
    value it replaces, except that numpy-array keys convert the new value with the old
    dtype; nested mappings merge recursively.
    """
    for k, v in a.items():
        path = shorten(f"{_prefix}{k}", 120)  # (keys come from the file: quoted cut short)
        if k not in b:
            raise ConfigError(f"'{path}' is not a valid config key; valid keys here: "
                              f"{', '.join(sorted(map(str, b)))}")
        old = b[k]
        if isinstance(old, AttrDict):
            if not isinstance(v, Mapping):
                raise ConfigError(f"type mismatch for config key '{path}': expected a mapping, "
                                  f"got {_type_name(v)}")
            merge_cfg(v, old, path + ".")
            continue
        if type(old) is not type(v):
            if isinstance(old, np.ndarray):
                try:
                    v = np.array(v, dtype=old.dtype)
                except (TypeError, ValueError) as e:
                    raise ConfigError(f"config key '{path}': cannot convert {shorten(repr(v), 80)} to an array "
                                      f"of {old.dtype}: {shorten(e, 120)}") from None
            else:
                hint = ""
                if isinstance(old, tuple) and isinstance(v, list):
                    hint = " (write a tuple in YAML as !!python/tuple [...])"
                elif isinstance(old, float) and isinstance(v, int) and not isinstance(v, bool):
                    hint = f" (write {v}.0)"
                raise ConfigError(f"type mismatch ({_type_name(old)} vs. {_type_name(v)}) for "
                                  f"config key '{path}'{hint}")
        b[k] = v


def cfg_from_file(filename: str, into: Optional[AttrDict] = None) -> None:
    """Merge a YAML config file into ``into`` (default: the global ``cfg``)."""
    target = cfg if into is None else into
    try:
        with open(filename, "r") as f:  # at most one byte over the limit: the loader refuses it
            data = yaml_load(f.read(limits.get("max_yaml_bytes") + 1), where=str(filename))
    except OSError as e:
        raise ConfigError(f"cannot read config file: {e}", where=str(filename)) from None
    if data is None:
        return
    if not isinstance(data, Mapping):
        raise ConfigError(f"a config file must hold a YAML mapping, got {_type_name(data)}",
                          where=str(filename))
    try:
        merge_cfg(data, target)
    except ConfigError as e:
        raise ConfigError(e.message, where=str(filename)) from None


def _set_dotted(target: AttrDict, key: str, value: Any) -> None:
    parts = key.split(".")
    d: Any = target
    for i, sub in enumerate(parts):
        if not isinstance(d, AttrDict) or sub not in d:
            raise ConfigError(f"'{key}' is not a valid config key ('{'.'.join(parts[:i + 1])}' "
                              "does not exist)")
        if i < len(parts) - 1:
            d = d[sub]
    last = parts[-1]
    old = d[last]
    if isinstance(old, AttrDict):
        raise ConfigError(f"config key '{key}' is a section; set one of its keys "
                          f"({', '.join(sorted(old))})")
    if type(value) is not type(old):
        raise ConfigError(f"type {_type_name(value)} does not match original type "
                          f"{_type_name(old)} for config key '{shorten(key, 120)}' (value {shorten(repr(value), 80)})")
    d[last] = value


def cfg_from_list(cfg_list: Sequence[Any], into: Optional[AttrDict] = None) -> None:
    """Apply ``--set`` style overrides ``[KEY, VALUE, KEY, VALUE, ...]``.

    Each VALUE string is parsed as a Python literal (``"0.5"``, ``"(800,)"``, ``"True"``);
    one that is not a literal stays the string itself (``"gt"``).  The parsed value must
    have exactly the type of the default, as in py-faster-rcnn.
    """
    target = cfg if into is None else into
    items = list(cfg_list)
    if len(items) % 2:
        raise ConfigError(f"config overrides come in KEY VALUE pairs; got {len(items)} items "
                          f"(last: {items[-1]!r})")
    for k, v in zip(items[0::2], items[1::2]):
        try:
            value = ast.literal_eval(v)
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            value = v   # a bare string such as 'gt'
        _set_dotted(target, str(k), value)


# ---------------------------------------------------------------------------- nets and commands
#: The key of ``BuildContext.extra`` (``Net(..., context={CONTEXT_KEY: c})``) holding the
#: config the py-faster-rcnn layers of that net read when they are built.
CONTEXT_KEY = "frcnn_cfg"


def build_cfg(ctx: Any) -> AttrDict:
    """The config a layer being built reads its keys from (once, in its constructor).

    The net's ``context={CONTEXT_KEY: c}`` when given (an ``AttrDict`` such as ``cfg`` or
    :func:`default_cfg`'s, or a partial mapping merged onto the defaults with
    :func:`merge_cfg`'s rules); else the global ``cfg`` as it is at build time.
    """
    given = getattr(ctx, "extra", {}).get(CONTEXT_KEY) if ctx is not None else None
    if given is None:
        return cfg
    if isinstance(given, AttrDict):
        return given
    if not isinstance(given, Mapping):
        raise ConfigError(f"context['{CONTEXT_KEY}'] must be a config (AttrDict) or a mapping of "
                          f"overrides, got {_type_name(given)}")
    merged = _defaults()
    merge_cfg(given, merged)
    return merged


def override_list(set_pairs: Sequence[Sequence[str]] = (), extra: Sequence[str] = ()) -> List[str]:
    """``--set KEY VALUE`` pairs plus the trailing ``KEY VALUE`` words after them, as the
    flat list :func:`cfg_from_list` takes (py-faster-rcnn's ``--set`` took the rest of
    the command line)."""
    items = [str(v) for pair in set_pairs for v in pair]
    extra = [str(a) for a in extra]
    if extra:
        if not set_pairs:
            raise ConfigError(f"unexpected argument(s): {' '.join(extra)} (config overrides go "
                              "after --set: --set KEY VALUE [KEY VALUE ...])")
        bad = [a for a in extra if a.startswith("--")]
        if bad:
            raise ConfigError(f"unexpected option {bad[0]} after the --set words; put options "
                              "before --set or repeat --set for each KEY VALUE")
        items += extra
    return items


@contextlib.contextmanager
def command_cfg(cfg_file: Optional[str] = None, set_pairs: Sequence[Sequence[str]] = (),
                extra: Sequence[str] = (), *, gpu_id: Optional[int] = None) -> Iterator[AttrDict]:
    """The config of one command, in force for the ``with`` block: the global ``cfg`` plus
    ``--cfg FILE``, then the ``--set`` overrides (:func:`override_list`), then
    ``GPU_ID = gpu_id`` for a non-negative ``--gpu``.  Everything is parsed and checked
    before the block runs, and the global ``cfg`` is restored when it ends (errors
    included), so nothing a command set leaks into the process.  Every Faster R-CNN
    command (train, train-alt-opt, rpn-generate, test, detect, reval) goes through it.
    """
    items = override_list(set_pairs, extra)
    with temporary_cfg() as c:
        if cfg_file:
            if not osp.isfile(cfg_file):
                raise ConfigError("config file not found", where=str(cfg_file))
            cfg_from_file(cfg_file)
        if items:
            cfg_from_list(items)
        if gpu_id is not None and int(gpu_id) >= 0:
            c.GPU_ID = int(gpu_id)
        yield c


def get_output_dir(imdb: Any, net: Any = None, config: Optional[AttrDict] = None) -> str:
    """``ROOT_DIR/output/EXP_DIR/<imdb.name>[/<net.name>]``, created if missing."""
    c = cfg if config is None else config
    outdir = osp.abspath(osp.join(c.ROOT_DIR, "output", c.EXP_DIR, imdb.name))
    if net is not None:
        outdir = osp.join(outdir, net.name)
    os.makedirs(outdir, exist_ok=True)
    return outdir


# ---------------------------------------------------------------------------- YAML
def yaml_load(text: str, *, where: Optional[str] = None, layer: Optional[str] = None) -> Any:
    """Parse YAML text (a cfg file or a param_str) with the one safe loader
    (:func:`caffe_compat.safe_yaml.load`: safe types plus ``!!python/tuple``; no anchors or
    aliases, bounded nesting and size); py-faster-rcnn called ``yaml.load`` with the full
    (unsafe) loader.  Errors are ``SchemaError`` naming ``where``/``layer``."""
    from caffe_compat.safe_yaml import load

    return load(text, where=where, layer=layer, source=None if layer is None else "param_str")


def parse_param_str(param_str: str, layer_name: str, allowed_keys: Iterable[str],
                    required: Iterable[str] = ()) -> Dict[str, Any]:
    """A py-faster-rcnn ``param_str`` as a dict (``"'feat_stride': 16"`` -> ``{'feat_stride': 16}``).

    Empty text gives ``{}``.  Text that is not a YAML mapping, keys outside
    ``allowed_keys`` and missing ``required`` keys raise ``SchemaError`` naming the layer
    and the allowed keys (a typo would otherwise silently fall back to a default).
    """
    allowed = list(allowed_keys)
    if param_str is None or not str(param_str).strip():
        data: Any = {}
    else:
        data = yaml_load(str(param_str), layer=layer_name)
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise SchemaError(f"param_str must be a YAML mapping such as \"'key': value\", got "
                          f"{_type_name(data)} {shorten(repr(data), 80)}; allowed keys: {', '.join(allowed)}",
                          layer=layer_name)
    unknown = [k for k in data if k not in allowed]
    if unknown:
        raise SchemaError(f"unknown param_str key(s) {name_list(map(repr, unknown), 5)}; "
                          f"allowed keys: {', '.join(allowed)}", layer=layer_name)
    missing = [k for k in required if k not in data]
    if missing:
        raise SchemaError(f"param_str must set {', '.join(repr(k) for k in missing)}; "
                          f"allowed keys: {', '.join(allowed)}", layer=layer_name)
    return dict(data)
