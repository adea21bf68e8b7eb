"""Build Faster R-CNN minibatches in worker processes, ahead of the solver.

Loading and resizing a VOC image (``cv2.imread`` + ``cv2.resize`` to 600 x 1000) takes
10-20 ms of one core; a GPU steps VGG16 end2end in less.  py-faster-rcnn had a
``BlobFetcher`` process (``TRAIN.USE_PREFETCH``); here a pool of worker processes builds the
next minibatches while the current one trains.

Exactness: a worker builds minibatch ``slot`` of the loader's seeded stream, a pure function
of the roidb entries and ``(seed, slot)`` (:func:`caffe_compat.frcnn.roidb.build_minibatch`),
so the minibatches come out exactly as without workers, in the same order.  That needs a
*sharded* loader (every minibatch seeded by its slot: what distributed runs use; a single
process is world 1).  The position a snapshot records is the consumer's -- the state of the
loader before the first minibatch not yet handed to the net -- so resuming is exact too.

Configuration (py-faster-rcnn's ``cfg``): ``TRAIN.USE_PREFETCH`` (the original's switch) and
``TRAIN.PREFETCH_WORKERS`` (ours: -1 picks -- 4 workers at most, half the cores, on CUDA; none
on the CPU unless ``USE_PREFETCH``, where the workers would take cores from the net; 0 never).
"""
from __future__ import annotations

import collections
import logging
import multiprocessing
import os
import weakref
from concurrent.futures import Future, ProcessPoolExecutor
from typing import Any, Deque, Dict, Optional, Tuple

import numpy as np

from caffe_compat.frcnn.roidb import MinibatchLoader, _c, build_minibatch

__all__ = ["PrefetchLoader", "prefetch_workers"]

log = logging.getLogger(__name__)


def prefetch_workers(config: Any, device: Any) -> int:
    """How many worker processes build minibatches (see the module docstring)."""
    import torch

    t = _c(config).TRAIN
    n = int(getattr(t, "PREFETCH_WORKERS", -1))
    if n >= 0:
        return n
    cores = os.cpu_count() or 1
    if torch.device(device).type == "cuda":
        return max(1, min(4, cores // 2))
    return max(1, min(2, cores // 2)) if bool(getattr(t, "USE_PREFETCH", False)) else 0


def _shutdown(pool: ProcessPoolExecutor) -> None:
    pool.shutdown(wait=False, cancel_futures=True)


class PrefetchLoader:
    """``next()`` returns what ``next(loader)`` would, built ``depth`` minibatches ahead by
    ``workers`` processes.  Quacks like the :class:`MinibatchLoader` it wraps for the
    training pipeline (``seed``, ``shard``, ``last_slot``, ``state_dict``...)."""

    def __init__(self, loader: MinibatchLoader, workers: int = 2, depth: Optional[int] = None) -> None:
        if getattr(loader, "shard", None) is None:
            raise ValueError("PrefetchLoader needs a sharded loader (minibatches seeded per slot)")
        self.loader = loader
        self.workers = max(1, int(workers))
        self.depth = max(1, int(depth if depth is not None else 2 * self.workers))
        # spawn: a fork of a process running torch (threads, CUDA) is not safe
        self._pool = ProcessPoolExecutor(max_workers=self.workers,
                                         mp_context=multiprocessing.get_context("spawn"))
        weakref.finalize(self, _shutdown, self._pool)
        self._queue: Deque[Tuple[Dict[str, Any], int, "Future[Dict[str, np.ndarray]]"]] = collections.deque()
        self.last_slot: Optional[int] = None

    # the wrapped loader's identity, for the hooks that read it
    @property
    def seed(self) -> int:
        return self.loader.seed

    @property
    def shard(self) -> Any:
        return self.loader.shard

    @property
    def num_classes(self) -> int:
        return self.loader.num_classes

    @property
    def top_names(self) -> Any:
        return self.loader.top_names

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> "PrefetchLoader":
        return self

    def _fill(self) -> None:
        ld = self.loader
        config = _c(ld._config)
        while len(self._queue) < self.depth:
            state = ld.state_dict()
            inds, slot = ld.next_recipe()
            entries = [ld._roidb[i] for i in inds]
            fut = self._pool.submit(build_minibatch, entries, ld.num_classes, ld.seed, slot, config, ld.has_rpn)
            self._queue.append((state, slot, fut))

    def __next__(self) -> Dict[str, np.ndarray]:
        self._fill()
        _, slot, fut = self._queue.popleft()
        blobs = fut.result()
        self.last_slot = slot
        self._fill()  # keep the workers busy while the net trains on this one
        return blobs

    def state_dict(self) -> Dict[str, Any]:
        """The consumer's position: the loader before the first minibatch not yet returned."""
        return dict(self._queue[0][0]) if self._queue else self.loader.state_dict()

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        for _, _, fut in self._queue:
            fut.cancel()
        self._queue.clear()
        self.loader.load_state_dict(state)

    def close(self) -> None:
        """Stop the workers (also done when the loader is garbage-collected)."""
        for _, _, fut in self._queue:
            fut.cancel()
        self._queue.clear()
        _shutdown(self._pool)
