"""The Caffe schema module (``caffe_pb2``), generated from ``protos/caffe.proto``."""
from caffe_compat.protos import caffe_pb2

__all__ = ["caffe_pb2"]
