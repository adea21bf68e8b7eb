"""``caffe.pycaffe``: where BVLC's Python API defines ``Net`` and the solver classes."""
from caffe_compat.pycaffe._net import Net
from caffe_compat.pycaffe._solver import (AdaDeltaSolver, AdaGradSolver, AdamSolver, NesterovSolver,
                                          RMSPropSolver, SGDSolver)

__all__ = ["Net", "SGDSolver", "NesterovSolver", "AdaGradSolver", "RMSPropSolver", "AdaDeltaSolver",
           "AdamSolver"]
