"""Detection data sets for py-faster-rcnn style training and testing.

``get_imdb(name)`` builds PASCAL VOC / COCO image databases (``voc_2007_trainval``,
``coco_2014_train``, ...); ``synthetic_voc.write_dataset`` writes a small VOC-layout data
set of rendered shapes; ``voc_eval`` scores detections with VOC's metric.  The classes
live in submodules named like them, as in py-faster-rcnn
(``caffe_compat.frcnn.datasets.pascal_voc.pascal_voc``).  Submodules load lazily, so importing
the package costs nothing.
"""
from __future__ import annotations

from typing import Any

__all__ = ["get_imdb", "list_imdbs", "register_imdb"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from caffe_compat.frcnn.datasets import factory

        return getattr(factory, name)
    raise AttributeError(name)
