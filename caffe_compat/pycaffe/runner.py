"""Run a legacy pycaffe script unchanged, with ``import caffe`` resolved to caffe-compat.

``caffe-compat run SCRIPT.py [ARGS]`` and ``python -m caffe_compat.pycaffe SCRIPT.py [ARGS]``
call :func:`run_script`: the script runs in this process as ``__main__`` with
``sys.argv = [SCRIPT.py, ARGS...]`` and its folder first on ``sys.path`` (as ``python
SCRIPT.py`` would), while a meta-path finder maps ``caffe`` and every ``caffe.<sub>``
(``caffe.proto.caffe_pb2``, ``caffe.io``, ``caffe.net_spec``, ``caffe.coord_map``,
``caffe.pycaffe``, ``caffe.classifier``, ``caffe.detector``, ``caffe._caffe``) onto
:mod:`caffe_compat.pycaffe`.  Nothing is changed on disk and the finder is removed
afterwards.

A real Caffe is never replaced silently.  Before running, the Python path is searched for
a ``caffe`` package (without importing it).  If one is found, the run is refused (exit 2)
unless ``--shadow`` (or ``CAFFE_COMPAT_SHADOW=1``) says to shadow it with caffe-compat
for this run; to use the real Caffe, run the script with plain ``python``.  The check is
repeated when the script imports ``caffe`` (legacy scripts often put
``$CAFFE_ROOT/python`` on ``sys.path`` themselves): a real Caffe found then makes that
import fail with the same explanation.  ``--no-shadow`` runs the script with no aliasing.
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import os
import runpy
import sys
from typing import Iterator, List, Optional, Sequence

from caffe_compat.errors import CaffeCompatError

TARGET = "caffe_compat.pycaffe"
ENV_SHADOW = "CAFFE_COMPAT_SHADOW"

__all__ = ["run_script", "shadow_caffe", "real_caffe_location", "RealCaffeFound", "ENV_SHADOW"]


class RealCaffeFound(CaffeCompatError):
    """A real Caffe is importable and shadowing it was not asked for."""


def _is_caffe_name(fullname: str) -> bool:
    return fullname == "caffe" or fullname.startswith("caffe.")


class _AliasLoader(importlib.abc.Loader):
    """Hands out an already imported caffe-compat module under a ``caffe`` name."""

    def __init__(self, module):
        self._module = module
        self._spec = getattr(module, "__spec__", None)

    def create_module(self, spec):
        return self._module

    def exec_module(self, module) -> None:
        # the import system stamped the alias spec on the module; give it back its own
        if self._spec is not None:
            module.__spec__ = self._spec


class _CaffeFinder(importlib.abc.MetaPathFinder):
    """``caffe[.x.y]`` -> ``caffe_compat.pycaffe[.x.y]``.

    With ``guard`` (shadowing decided automatically), ``import caffe`` re-checks the path
    first: a script that puts a real Caffe on ``sys.path`` itself gets an ImportError
    saying so rather than caffe-compat in its place.
    """

    def __init__(self, guard: bool = False):
        self.guard = guard

    def find_spec(self, fullname: str, path=None, target=None):
        if not _is_caffe_name(fullname):
            return None
        if self.guard and fullname == "caffe":
            loc = real_caffe_location()
            if loc is not None:
                raise ImportError(_real_caffe_message(loc) + " (the script put it on sys.path)",
                                  name=fullname)
        real = TARGET + fullname[len("caffe"):]
        try:
            module = importlib.import_module(real)
        except ModuleNotFoundError as e:
            if e.name == real:
                raise ModuleNotFoundError(f"No module named '{fullname}' (caffe-compat's pycaffe "
                                          f"has no '{fullname}')", name=fullname) from None
            raise
        return importlib.util.spec_from_loader(fullname, _AliasLoader(module),
                                               origin=getattr(module, "__file__", None),
                                               is_package=hasattr(module, "__path__"))


def real_caffe_location() -> Optional[str]:
    """Where a real ``caffe`` package would be imported from (searched, not imported)."""
    try:
        spec = importlib.machinery.PathFinder.find_spec("caffe")
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    if spec.origin and spec.origin not in ("namespace", "built-in"):
        return spec.origin
    locs = list(spec.submodule_search_locations or [])
    return locs[0] if locs else "caffe"


def _real_caffe_message(loc: str) -> str:
    return (f"a real Caffe is importable ({loc}); caffe-compat will not replace it silently: pass "
            "--shadow (or set CAFFE_COMPAT_SHADOW=1) to run the script with caffe-compat's pycaffe, "
            "or run it with python to use the real Caffe")


@contextlib.contextmanager
def shadow_caffe(*, guard: bool = False) -> Iterator[None]:
    """``import caffe`` gives caffe-compat's pycaffe inside the block (real Caffe modules
    already imported are set aside and put back afterwards); ``guard``: refuse instead if
    a real Caffe becomes importable (see :class:`_CaffeFinder`)."""
    saved = {k: v for k, v in sys.modules.items() if _is_caffe_name(k)}
    for k in saved:
        del sys.modules[k]
    finder = _CaffeFinder(guard)
    sys.meta_path.insert(0, finder)
    try:
        yield
    finally:
        try:
            sys.meta_path.remove(finder)
        except ValueError:
            pass
        for k in [k for k in sys.modules if _is_caffe_name(k)]:
            del sys.modules[k]
        sys.modules.update(saved)


def _env_shadow() -> Optional[bool]:
    v = os.environ.get(ENV_SHADOW, "").strip().lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off"):
        return False
    return None


def run_script(script: str, args: Sequence[str] = (), *, shadow: Optional[bool] = None) -> None:
    """Run ``script`` as ``__main__`` with ``sys.argv = [script, *args]`` (see the module
    docstring for ``shadow``: None decides from $CAFFE_COMPAT_SHADOW and whether a real
    Caffe is importable)."""
    script = os.fspath(script)
    if not os.path.isfile(script):
        raise CaffeCompatError("script not found", where=script)
    if shadow is None:
        shadow = _env_shadow()
    guard = shadow is None
    if shadow is None:
        loc = real_caffe_location()
        if loc is not None:
            raise RealCaffeFound(_real_caffe_message(loc))
        shadow = True
    old_argv = sys.argv
    old_path: List[str] = list(sys.path)
    sys.argv = [script, *[str(a) for a in args]]
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
    try:
        with (shadow_caffe(guard=guard) if shadow else contextlib.nullcontext()):
            runpy.run_path(script, run_name="__main__")
    finally:
        sys.argv = old_argv
        sys.path[:] = old_path


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m caffe_compat.pycaffe [--shadow|--no-shadow] SCRIPT.py [ARGS...]``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    usage = ("usage: python -m caffe_compat.pycaffe [--shadow | --no-shadow] SCRIPT.py [ARGS...]\n"
             "Run a pycaffe script with 'import caffe' resolved to caffe-compat.")
    shadow: Optional[bool] = None
    while argv and argv[0].startswith("-"):
        opt = argv.pop(0)
        if opt in ("-h", "--help"):
            print(usage)
            return 0
        if opt == "--shadow":
            shadow = True
        elif opt == "--no-shadow":
            shadow = False
        elif opt == "--":
            break
        else:
            print(f"{usage}\nerror: unknown option {opt}", file=sys.stderr)
            return 2
    if not argv:
        print(usage, file=sys.stderr)
        return 2
    try:
        run_script(argv[0], argv[1:], shadow=shadow)
    except CaffeCompatError as e:
        if os.environ.get("CAFFE_COMPAT_DEBUG", "") not in ("", "0"):
            raise
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    return 0
