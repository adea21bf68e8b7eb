"""``caffe._caffe``: the names BVLC's compiled module exports, for scripts that import it."""
from caffe_compat.pycaffe import __version__, layer_type_list
from caffe_compat.pycaffe._mode import set_device, set_mode_cpu, set_mode_gpu, set_random_seed
from caffe_compat.pycaffe._net import Net
from caffe_compat.pycaffe._solver import (AdaDeltaSolver, AdaGradSolver, AdamSolver, NesterovSolver,
                                          RMSPropSolver, SGDSolver, Solver, get_solver)
from caffe_compat.pycaffe.layer import Blob, BlobVec, Layer

__all__ = ["Net", "Blob", "BlobVec", "Layer", "Solver", "SGDSolver", "NesterovSolver", "AdaGradSolver",
           "RMSPropSolver", "AdaDeltaSolver", "AdamSolver", "get_solver", "set_mode_cpu",
           "set_mode_gpu", "set_device", "set_random_seed", "layer_type_list", "__version__"]
