"""The net Caffe actually runs: ``InsertSplits`` and ``Net::Init``'s need-backward analysis.

The core :class:`~caffe_compat.net.Net` lets autograd sum the gradients of a blob read by
several layers.  Caffe instead inserts a ``Split`` layer after such a blob (and after a
loss top that another layer also reads), whose tops are separate blobs with their own
diffs, and decides once, at ``Net::Init``, which layers, bottoms and parameters get diffs.
Layer-by-layer runs (``Net.forward(start=, end=)``, ``Net.backward(start=, end=)``) and
pycaffe's view need both, with Caffe's names (``<blob>_<layer>_<i>_split`` and its tops
``..._split_<k>``), so they are computed here from the built net (src/caffe/util/
insert_splits.cpp and src/caffe/net.cpp of BVLC Caffe).
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

from caffe_compat.errors import GraphError
from caffe_compat.layers import registry

__all__ = ["Step", "insert_splits", "mark_need_backward", "split_layer_name", "split_blob_name"]

# Caffe's AllowForceBackward(bottom_index) overrides: a LossLayer refuses its labels (bottom
# 1), ContrastiveLoss its similarity (bottom 2), RecurrentLayer its continuation markers.
_NO_FORCE_BOTTOM = {"SoftmaxWithLoss": 1, "SigmoidCrossEntropyLoss": 1, "InfogainLoss": 1,
                    "MultinomialLogisticLoss": 1, "HingeLoss": 1, "MultiBoxLoss": 1, "RNN": 1,
                    "LSTM": 1, "ContrastiveLoss": 2}


def allow_force_backward(layer_type: str, bottom_index: int) -> bool:
    """Caffe's ``Layer::AllowForceBackward`` for ``layer_type``'s bottom ``bottom_index``."""
    return _NO_FORCE_BOTTOM.get(layer_type) != bottom_index


def split_layer_name(layer: str, blob: str, index: int) -> str:
    """Caffe's name of the split layer after ``layer``'s top ``index`` named ``blob``."""
    return f"{blob}_{layer}_{index}_split"


def split_blob_name(layer: str, blob: str, index: int, k: int) -> str:
    """Caffe's name of that split layer's ``k``-th top."""
    return f"{blob}_{layer}_{index}_split_{k}"


@dataclass
class Step:
    """One layer of Caffe's net after ``InsertSplits``: a layer of the definition (its
    built ``module``; None when unbuilt) or an inserted split (``entry`` None)."""

    name: str
    type: str
    module: Any
    bottoms: List[str]               # Caffe's blob names (a split's tops where one feeds)
    tops: List[str]
    loss_weights: List[float]
    entry: Optional[int] = None      # index into ``Net.entries``; None for a split
    param: Any = None                # the LayerParameter (None for a split)
    need_backward: bool = False
    bottom_need_backward: List[bool] = field(default_factory=list)
    param_propagate_down: List[bool] = field(default_factory=list)

    @property
    def is_split(self) -> bool:
        return self.entry is None and self.param is None and self.type == "Split"

    def in_place(self, j: int) -> bool:
        """Whether top ``j`` is bottom ``j`` (Caffe's in-place computation)."""
        return j < len(self.bottoms) and j < len(self.tops) and self.bottoms[j] == self.tops[j]


def insert_splits(entries: Sequence[Any], layers: Sequence[Any]) -> Tuple[List[Step], Dict[str, str]]:
    """Caffe's ``InsertSplits`` over the built net.

    ``entries`` are the net's :class:`~caffe_compat.net.LayerEntry` list and ``layers`` the
    LayerParameters they were built from, in the same order.  Returns the steps and, for
    every split top, the blob whose data it shares.  A top written by two layers after the
    renaming (an in-place layer on a blob that other layers read too) is refused, as Caffe
    refuses it.
    """
    if len(entries) != len(layers):
        raise GraphError(f"the net has {len(entries)} built layers but its definition {len(layers)} "
                         "(a pass such as fuse_batchnorm removed layers): Caffe's layer-by-layer "
                         "view is not available for it")
    last_top: Dict[str, Tuple[int, int]] = {}
    source: Dict[Tuple[int, int], Tuple[int, int]] = {}
    count: Dict[Tuple[int, int], int] = defaultdict(int)
    loss_w: Dict[Tuple[int, int], float] = {}
    for i, e in enumerate(entries):
        lp = layers[i]
        for j, b in enumerate(e.bottoms):
            src = last_top[b]
            source[(i, j)] = src
            count[src] += 1
        for j, t in enumerate(e.tops):
            last_top[t] = (i, j)
        for j in range(min(len(lp.loss_weight), len(e.tops))):  # explicit loss_weight only
            key = last_top[e.tops[j]]
            loss_w[key] = float(lp.loss_weight[j])
            if loss_w[key]:
                count[key] += 1
    steps: List[Step] = []
    shares: Dict[str, str] = {}
    split_idx: Dict[Tuple[int, int], int] = defaultdict(int)
    for i, e in enumerate(entries):
        lp = layers[i]
        bottoms = list(e.bottoms)
        for j in range(len(bottoms)):
            src = source[(i, j)]
            if count[src] > 1:
                bottoms[j] = split_blob_name(entries[src[0]].name, e.bottoms[j], src[1], split_idx[src])
                split_idx[src] += 1
        step = Step(e.name, e.type, e.module, bottoms, list(e.tops), list(e.loss_weights),
                    entry=i, param=lp)
        steps.append(step)
        for j, t in enumerate(e.tops):
            n = count[(i, j)]
            if n <= 1:
                continue
            w = loss_w.get((i, j), 0.0)
            tops = [split_blob_name(e.name, t, j, k) for k in range(n)]
            for k in tops:
                shares[k] = t
            loss = [w if k == 0 else 0.0 for k in range(n)]
            steps.append(Step(split_layer_name(e.name, t, j), "Split", None, [t], tops, loss))
            if w:
                # Caffe clears the producer's loss_weight field: a loss layer falls back to
                # its default (1 on top 0), any other layer to none
                cls = type(e.module) if e.module is not None else registry.resolve(lp)
                is_loss = bool(getattr(cls, "is_loss", False))
                step.loss_weights = ([1.0] + [0.0] * (len(e.tops) - 1)) if is_loss else [0.0] * len(e.tops)
                split_idx[(i, j)] += 1
    produced: Dict[str, str] = {}
    for s in steps:
        for j, t in enumerate(s.tops):
            if s.in_place(j):
                continue
            if t in produced:
                raise GraphError(f"Top blob '{t}' produced by multiple sources (Caffe's net after split "
                                 "insertion; an in-place layer on a blob that other layers read too?)",
                                 layer=s.name)
            produced[t] = s.name
    return steps, shares


def mark_need_backward(steps: Sequence[Step], force_backward: bool) -> None:
    """Caffe's ``Net::Init`` bookkeeping: which layers run backward, which bottoms get diffs
    and which parameters (``lr_mult != 0``) do; then only what leads to a loss keeps them
    (``blobs_under_loss``/``blobs_skip_backp``), and ``force_backward`` turns them all on
    where the layer allows it."""
    blob_need: Dict[str, bool] = {}
    for s in steps:
        need = False
        s.bottom_need_backward = []
        lp = s.param
        for j, b in enumerate(s.bottoms):
            nb = blob_need.get(b, False)
            need |= nb
            if lp is not None and len(lp.propagate_down):
                nb = bool(lp.propagate_down[j])
            s.bottom_need_backward.append(nb)
        for j, t in enumerate(s.tops):
            if not s.in_place(j):
                blob_need[t] = False
        n_blobs = len(getattr(s.module, "blob_names", [])) if s.module is not None else 0
        s.param_propagate_down = []
        for k in range(n_blobs):
            spec = lp.param[k] if lp is not None and k < len(lp.param) else None
            s.param_propagate_down.append((spec.lr_mult if spec is not None else 1.0) != 0)
        need |= any(s.param_propagate_down)
        s.need_backward = need
        if need:
            for t in s.tops:
                blob_need[t] = True
    under_loss: set = set()
    skip_backp: set = set()
    for s in reversed(steps):
        contributes = False
        skip = True
        for t, w in zip(s.tops, s.loss_weights):
            if w or t in under_loss:
                contributes = True
            if t not in skip_backp:
                skip = False
            if contributes and not skip:
                break
        if s.need_backward and skip:
            s.need_backward = False
            s.bottom_need_backward = [False] * len(s.bottoms)
        if not contributes:
            s.need_backward = False
        for j, b in enumerate(s.bottoms):
            if contributes:
                under_loss.add(b)
            else:
                s.bottom_need_backward[j] = False
            if not s.bottom_need_backward[j]:
                skip_backp.add(b)
    if force_backward:
        for s in steps:
            s.need_backward = True
            s.bottom_need_backward = [nb or allow_force_backward(s.type, j)
                                      for j, nb in enumerate(s.bottom_need_backward)]
            s.param_propagate_down = [True] * len(s.param_propagate_down)
