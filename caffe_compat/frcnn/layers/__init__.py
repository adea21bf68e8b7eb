"""py-faster-rcnn's Python layers, native: importing this package registers them.

``python_param { module: 'rpn.anchor_target_layer' layer: 'AnchorTargetLayer' }`` and the
other three names resolve here through :mod:`caffe_compat.layers.registry`, which imports
this package the first time a net uses one of them (so nets without them never load
py-faster-rcnn's code).  Caffe-fast-rcnn's C++ layers (ROIPooling, SmoothL1Loss) are a
fork family in :mod:`caffe_compat.layers.fast_rcnn`.
"""
from caffe_compat.frcnn.layers.roi_data import RoIDataLayer  # each module registers its layers
from caffe_compat.frcnn.layers.rpn import AnchorTargetLayer, ProposalLayer, ProposalTargetLayer

__all__ = ["AnchorTargetLayer", "ProposalLayer", "ProposalTargetLayer", "RoIDataLayer"]
