"""Image databases by name (py-faster-rcnn's ``datasets.factory``).

Names: ``voc_<2007|2012>_<train|val|trainval|test>``, ``coco_2014_<train|val|minival|
valminusminival>`` and ``coco_2015_<test|test-dev>``.  Every data set is looked up under
``cfg.DATA_DIR`` when it is *built* (not when it is registered), so ``--set DATA_DIR``
given after import still applies.
"""
from __future__ import annotations

from typing import Callable, Dict, List

from caffe_compat.errors import DataError
from caffe_compat.frcnn.datasets.imdb import imdb

__all__ = ["get_imdb", "list_imdbs", "register_imdb"]

_SETS: Dict[str, Callable[[], imdb]] = {}


def _voc(split: str, year: str) -> Callable[[], imdb]:
    def make() -> imdb:
        from caffe_compat.frcnn.datasets.pascal_voc import pascal_voc

        return pascal_voc(split, year)
    return make


def _coco(split: str, year: str) -> Callable[[], imdb]:
    def make() -> imdb:
        from caffe_compat.frcnn.datasets.coco import coco

        return coco(split, year)
    return make


for _year in ("2007", "2012"):
    for _split in ("train", "val", "trainval", "test"):
        _SETS[f"voc_{_year}_{_split}"] = _voc(_split, _year)
for _split in ("train", "val", "minival", "valminusminival"):
    _SETS[f"coco_2014_{_split}"] = _coco(_split, "2014")
for _split in ("test", "test-dev"):
    _SETS[f"coco_2015_{_split}"] = _coco(_split, "2015")


def register_imdb(name: str, factory: Callable[[], imdb]) -> None:
    """Make ``get_imdb(name)`` call ``factory()`` (for data sets of one's own)."""
    _SETS[name] = factory


def get_imdb(name: str) -> imdb:
    """The imdb called ``name``; an unknown name raises ``DataError`` listing the valid ones."""
    if name not in _SETS:
        raise DataError(f"unknown data set '{name}'; valid names: {', '.join(list_imdbs())}")
    return _SETS[name]()


def list_imdbs() -> List[str]:
    """All registered names, sorted."""
    return sorted(_SETS)
