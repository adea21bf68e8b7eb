"""Native version of py-faster-rcnn's training data layer (``roi_data_layer.layer.RoIDataLayer``).

The original layer owned a roidb, shuffled it (pairing images of like aspect ratio) and
built each minibatch itself (reading images with OpenCV).  Here image loading belongs to
the training pipeline; the layer keeps the parts a net needs:

* the tops and their **build-time shapes**, chosen by the config exactly as the
  original's setup did (so a net built from py-faster-rcnn's prototxt gets the same
  shapes); ``cfg.TRAIN.HAS_RPN`` picks the RPN form ``data, im_info, gt_boxes`` or the
  Fast R-CNN form ``data, rois, labels[, bbox_targets, bbox_inside_weights,
  bbox_outside_weights]`` (the last three with ``cfg.TRAIN.BBOX_REG``);
* a **feed** for its blobs, in one of three ways (checked in this order at forward):

  1. ``layer.feed({"data": ..., "im_info": ..., "gt_boxes": ...})``: one minibatch,
     consumed by the next forward (a stale batch is never silently reused);
  2. ``layer.set_minibatch_source(fn)``: ``fn()`` returns the next minibatch dict;
  3. ``layer.set_roidb(roidb, get_minibatch)``: the original's shuffling of ``roidb``
     (``ASPECT_GROUPING``, ``IMS_PER_BATCH``); ``get_minibatch(entries, num_classes)``
     turns the chosen roidb entries into the minibatch dict.

  Without any of them forward raises :class:`~caffe_compat.errors.DataError`.

A minibatch dict maps every top name to an array or tensor; numpy arrays become float32
tensors (on ``device`` if given), tensors keep their device and floating dtype.

The config keys the layer uses (``TRAIN.IMS_PER_BATCH``, ``SCALES``, ``MAX_SIZE``,
``HAS_RPN``, ``BBOX_REG``, ``ASPECT_GROUPING``) are read once, when the net is built
(:func:`caffe_compat.frcnn.config.build_cfg`), never at forward.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import Tensor

from caffe_compat.errors import DataError, GraphError, SchemaError, shorten
from caffe_compat.frcnn.config import build_cfg, parse_param_str
from caffe_compat.layers.base import Layer, Shape
from caffe_compat.layers.registry import register_python

__all__ = ["RoIDataLayer"]

Blobs = Mapping[str, Union[Tensor, np.ndarray, Sequence[Any]]]


@register_python("roi_data_layer.layer.RoIDataLayer")
class RoIDataLayer(Layer):
    """py-faster-rcnn's 'input-data' layer: tops fed per minibatch by the training pipeline.

    param_str: ``'num_classes': K``.  Build-time top shapes (Caffe's setup):
    data ``(IMS_PER_BATCH, 3, max(SCALES), MAX_SIZE)``; RPN form: im_info ``(1, 3)``,
    gt_boxes ``(1, 4)``; Fast R-CNN form: rois ``(1, 5)``, labels ``(1,)``, and
    ``(1, 4K)`` for each bbox blob.  After a forward the tops keep the last minibatch's
    shapes (what Caffe's blobs would hold).
    """

    exact_bottoms = 0

    def __init__(self, param, bottom_shapes: Sequence[Shape], ctx) -> None:
        super().__init__(param, bottom_shapes, ctx)
        ps = param.python_param.param_str if param.HasField("python_param") else ""
        p = parse_param_str(ps, self.name, ("num_classes",), required=("num_classes",))
        k = p["num_classes"]
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise self.error(SchemaError, f"param_str 'num_classes' must be a positive integer, "
                                          f"got {shorten(repr(k), 80)}")
        self.num_classes = k
        c = build_cfg(ctx).TRAIN
        #: minibatch drawing from a roidb (``set_roidb``): the config's, read once now
        self.ims_per_batch = int(c.IMS_PER_BATCH)
        self.aspect_grouping = bool(c.ASPECT_GROUPING)
        k4 = 4 * k
        shapes: Dict[str, Shape] = {"data": (int(c.IMS_PER_BATCH), 3, int(max(c.SCALES)),
                                             int(c.MAX_SIZE))}
        if c.HAS_RPN:  # an RPN minibatch is one image (py-faster-rcnn asserts it)
            shapes["data"] = (1,) + shapes["data"][1:]
            shapes["im_info"] = (1, 3)
            shapes["gt_boxes"] = (1, 4)
        else:
            shapes["rois"] = (1, 5)
            shapes["labels"] = (1,)
            if c.BBOX_REG:
                shapes["bbox_targets"] = (1, k4)
                shapes["bbox_inside_weights"] = (1, k4)
                shapes["bbox_outside_weights"] = (1, k4)
        if len(self.top_names) != len(shapes):
            # The definition's tops decide the layout when cfg does not match them (a
            # train prototxt must build unchanged before its yml is loaded; rbgirshick's
            # fast-rcnn used 5 tops with 'bbox_loss_weights').
            inferred = self._layout_from_tops(shapes["data"], k4)
            if inferred is None:
                mode = (f"cfg.TRAIN.HAS_RPN = {c.HAS_RPN}, cfg.TRAIN.BBOX_REG = {c.BBOX_REG}")
                raise self.error(GraphError, f"with {mode} this layer produces {len(shapes)} tops "
                                             f"({', '.join(shapes)}) but the definition names "
                                             f"{len(self.top_names)} ({', '.join(self.top_names)}); "
                                             "load the matching config (e.g. cfg_from_file("
                                             "'faster_rcnn_end2end.yml')) before building the net")
            shapes = inferred
        #: blob name -> top index, in the original's order (the prototxt's top names may differ)
        self.blob_order: List[str] = list(shapes)
        self.setup_shapes: List[Shape] = list(shapes.values())
        self._pending: Optional[List[Tensor]] = None
        self._last_shapes: Optional[List[Shape]] = None
        self._source: Optional[Callable[[], Blobs]] = None
        self._roidb: Optional[Sequence[Mapping[str, Any]]] = None
        self._get_minibatch: Optional[Callable[[List[Mapping[str, Any]], int], Blobs]] = None
        self._roidb_generator: Optional[torch.Generator] = None
        self._perm: List[int] = []
        self._cur = 0

    def _layout_from_tops(self, data_shape: Shape, k4: int) -> Optional[Dict[str, Shape]]:
        """The blob layout the definition's top names imply, or None if they imply none."""
        names = self.top_names
        if len(names) == 3 and "im_info" in names:
            return {"data": (1,) + tuple(data_shape[1:]), "im_info": (1, 3), "gt_boxes": (1, 4)}
        fast = {"data": data_shape, "rois": (1, 5), "labels": (1,)}
        if len(names) == 3:
            return fast
        if len(names) == 5:  # Fast R-CNN (2015): bbox_targets, bbox_loss_weights
            return {**fast, "bbox_targets": (1, k4), "bbox_loss_weights": (1, k4)}
        if len(names) == 6:
            return {**fast, "bbox_targets": (1, k4), "bbox_inside_weights": (1, k4),
                    "bbox_outside_weights": (1, k4)}
        return None

    def extra_repr(self) -> str:
        return f"name={self.name!r}, num_classes={self.num_classes}, blobs={self.blob_order}"

    # ------------------------------------------------------------------ feeding
    def _convert(self, blobs: Blobs, device: Optional[Union[str, torch.device]]) -> List[Tensor]:
        if not isinstance(blobs, Mapping):
            raise self.error(DataError, f"a minibatch must be a dict of blobs "
                                        f"({', '.join(self.blob_order)}), got {type(blobs).__name__}")
        unknown = [k for k in blobs if k not in self.blob_order]
        missing = [k for k in self.blob_order if k not in blobs]
        if unknown or missing:
            raise self.error(DataError, f"a minibatch must hold exactly the blobs "
                                        f"{', '.join(self.blob_order)}"
                                        + (f"; unknown: {', '.join(map(str, unknown))}" if unknown else "")
                                        + (f"; missing: {', '.join(missing)}" if missing else ""))
        out = []
        for name in self.blob_order:
            v = blobs[name]
            if isinstance(v, Tensor):
                t = v.detach()
                if not t.is_floating_point():
                    t = t.to(torch.float32)
                if device is not None:
                    t = t.to(device)
            else:
                t = torch.as_tensor(np.asarray(v, dtype=np.float32), device=device)
            out.append(t)
        return out

    def feed(self, blobs: Blobs, device: Optional[Union[str, torch.device]] = None) -> None:
        """Queue one minibatch (a dict with every top's blob) for the next forward."""
        self._pending = self._convert(blobs, device)

    def set_minibatch_source(self, fn: Optional[Callable[[], Blobs]]) -> None:
        """Call ``fn()`` for a minibatch at every forward without a pending :meth:`feed`."""
        self._source = fn

    def set_roidb(self, roidb: Sequence[Mapping[str, Any]],
                  get_minibatch: Callable[[List[Mapping[str, Any]], int], Blobs],
                  generator: Optional[torch.Generator] = None) -> None:
        """Draw minibatches from ``roidb`` as the original did (see :meth:`next_minibatch_inds`).

        ``get_minibatch(entries, num_classes)`` builds the blobs of the chosen entries
        (images are the pipeline's business); ``generator`` (CPU) seeds the shuffles,
        else torch's global RNG draws.
        """
        if len(roidb) == 0:
            raise self.error(DataError, "set_roidb: the roidb is empty")
        self._roidb = roidb
        self._get_minibatch = get_minibatch
        self._roidb_generator = generator
        self._shuffle_roidb_inds()

    def _randperm(self, n: int) -> List[int]:
        return torch.randperm(n, generator=self._roidb_generator).tolist()

    def _shuffle_roidb_inds(self) -> None:
        """A new epoch order; with ``ASPECT_GROUPING`` consecutive pairs share orientation.

        Landscape (width >= height) and portrait images are permuted separately, laid
        end to end, cut into consecutive pairs, and the pairs shuffled, so a 2-image
        minibatch rarely mixes orientations (less padding).  An odd count leaves a final
        single (the original required an even count).
        """
        assert self._roidb is not None
        n = len(self._roidb)
        if self.aspect_grouping:
            horz = [i for i, r in enumerate(self._roidb) if r["width"] >= r["height"]]
            vert = [i for i, r in enumerate(self._roidb) if r["width"] < r["height"]]
            inds = ([horz[j] for j in self._randperm(len(horz))]
                    + [vert[j] for j in self._randperm(len(vert))])
            pairs = [inds[i:i + 2] for i in range(0, len(inds), 2)]
            self._perm = [i for j in self._randperm(len(pairs)) for i in pairs[j]]
        else:
            self._perm = self._randperm(n)
        self._cur = 0

    def next_minibatch_inds(self) -> List[int]:
        """The roidb indices of the next minibatch (``IMS_PER_BATCH`` of them).

        As the original: reshuffle when ``cur + IMS_PER_BATCH >= len(roidb)`` (so the
        epoch's last slot is skipped), then take the next ``IMS_PER_BATCH`` indices.
        """
        if self._roidb is None:
            raise self.error(DataError, "no roidb: call set_roidb(roidb, get_minibatch) first")
        ims = self.ims_per_batch
        if self._cur + ims >= len(self._roidb):
            self._shuffle_roidb_inds()
        inds = self._perm[self._cur:self._cur + ims]
        self._cur += ims
        return inds

    @torch.compiler.disable  # host work (image loading, numpy): never traced by torch.compile
    def _next_blobs(self) -> List[Tensor]:
        if self._pending is not None:
            blobs, self._pending = self._pending, None
            return blobs
        if self._source is not None:
            return self._convert(self._source(), None)
        if self._roidb is not None:
            assert self._get_minibatch is not None
            entries = [self._roidb[i] for i in self.next_minibatch_inds()]
            return self._convert(self._get_minibatch(entries, self.num_classes), None)
        raise self.error(DataError, "RoIDataLayer has no minibatch: feed one with "
                                    "net.layer(name).feed({" + ", ".join(f"'{b}': ..." for b in self.blob_order)
                                    + "}), or give it a source with set_minibatch_source(fn) "
                                      "or set_roidb(roidb, get_minibatch)")

    # ------------------------------------------------------------------ contract
    def infer_top_shapes(self, bottom_shapes: Sequence[Shape],
                         bottom_dtypes=None) -> List[Shape]:
        """Pending minibatch's shapes, else the last forward's, else Caffe's setup shapes."""
        if self._pending is not None:
            return [tuple(int(d) for d in t.shape) for t in self._pending]
        if self._last_shapes is not None:
            return list(self._last_shapes)
        return list(self.setup_shapes)

    def forward(self) -> Tuple[Tensor, ...]:
        blobs = self._next_blobs()
        self._last_shapes = [tuple(int(d) for d in t.shape) for t in blobs]
        return tuple(blobs)
