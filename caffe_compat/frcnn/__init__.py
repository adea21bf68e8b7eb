"""py-faster-rcnn's training and test-time pipelines on caffe_compat.

* :mod:`caffe_compat.frcnn.train` -- ``tools/train_net.py`` / ``lib/fast_rcnn/train.py``:
  :func:`~caffe_compat.frcnn.train.train_net` (end-to-end and Fast R-CNN training from a
  roidb, py-faster-rcnn's snapshots with un-normalized ``bbox_pred``, exact resume,
  SIGINT/SIGTERM snapshots) and :func:`~caffe_compat.frcnn.train.train_plain`
  (``caffe train`` for nets with their own data layers);
* :mod:`caffe_compat.frcnn.alt_opt` -- ``tools/train_faster_rcnn_alt_opt.py`` (4-stage
  alternating optimization) and ``rpn_generate``;
* :mod:`caffe_compat.frcnn.progress` -- Caffe-style log lines, progress bar with ETA,
  loss-curve PNG;
* :mod:`caffe_compat.frcnn.test` -- ``lib/fast_rcnn/test.py``: ``im_detect``, ``test_net``;
  :mod:`caffe_compat.frcnn.vis` -- drawing detections.

Submodules are imported on use (``from caffe_compat.frcnn.train import train_net``).
"""
