"""fast_rcnn layers."""
