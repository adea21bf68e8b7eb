"""``python -m caffe_compat.pycaffe [--shadow | --no-shadow] SCRIPT.py [ARGS...]``: run a legacy
pycaffe script with ``import caffe`` resolved to caffe-compat (see :mod:`.runner`)."""
import sys

from caffe_compat.pycaffe.runner import main

sys.exit(main())
