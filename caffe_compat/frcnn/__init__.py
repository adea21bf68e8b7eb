"""py-faster-rcnn training and test-time pipelines on caffe_compat."""
