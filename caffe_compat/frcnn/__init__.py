"""py-faster-rcnn (rbgirshick/py-faster-rcnn) on caffe_compat: its one home.

Its ``lib/`` and ``tools/``, module by module:

* :mod:`~caffe_compat.frcnn.config` -- ``lib/fast_rcnn/config.py``: ``cfg``, ``cfg_from_file``,
  ``cfg_from_list``, and :func:`~caffe_compat.frcnn.config.command_cfg` (one command's
  ``--cfg``/``--set``, restored after it);
* :mod:`~caffe_compat.frcnn.layers` -- its Python layers, native (``rpn/*``,
  ``roi_data_layer/layer.py``); they read ``cfg`` once, when a net is built;
* :mod:`~caffe_compat.frcnn.boxes` -- ``generate_anchors``, ``bbox_transform``,
  ``clip_boxes`` (IoU and NMS, generic, are :mod:`caffe_compat.boxes`);
* :mod:`~caffe_compat.frcnn.datasets` -- ``lib/datasets``: imdb, PASCAL VOC, COCO, the VOC
  metric, and a synthetic VOC;
* :mod:`~caffe_compat.frcnn.roidb` -- ``lib/roi_data_layer``: roidb preparation, minibatches;
* :mod:`~caffe_compat.frcnn.train` -- ``tools/train_net.py`` / ``lib/fast_rcnn/train.py``
  on the generic trainer (:mod:`caffe_compat.trainer`): snapshots with un-normalized
  ``bbox_pred``, exact resume;
* :mod:`~caffe_compat.frcnn.alt_opt` -- ``tools/train_faster_rcnn_alt_opt.py`` and
  ``rpn_generate``;
* :mod:`~caffe_compat.frcnn.test` -- ``lib/fast_rcnn/test.py``: ``im_detect``, ``test_net``;
  :mod:`~caffe_compat.frcnn.vis` (drawing), :mod:`~caffe_compat.frcnn.reval`
  (``tools/reval.py``), :mod:`~caffe_compat.frcnn.compress` (``tools/compress_net.py``);
* :mod:`~caffe_compat.frcnn.demo` -- ``make demo``: train and test end to end.

Caffe-fast-rcnn's C++ layers (ROIPooling, SmoothL1Loss) are a fork family of
:mod:`caffe_compat.layers` (R-FCN and others use them too).  Nothing outside this package
imports it unless a net names one of its Python layers; submodules are imported on use.
"""
