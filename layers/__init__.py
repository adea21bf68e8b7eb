"""Caffe layer implementations, one module per family; importing registers them all."""
from caffe_compat.layers import registry  # noqa: F401
from caffe_compat.layers.base import Layer, BuildContext, TRAIN, TEST  # noqa: F401
from caffe_compat.layers import (  # noqa: F401  (each module registers its layers)
    neuron,
    vision,
    common,
    loss,
    data,
    fast_rcnn,
    python,
    ssd,
    yolo,
    ctpn,
    multibox_loss,
    detection_evaluate,
    annotated_data,
    segmentation,
    dense_image_data,
    psroi_pooling,
    roi_align,
)
