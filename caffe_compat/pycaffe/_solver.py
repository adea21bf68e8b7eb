"""pycaffe's solvers: ``caffe.SGDSolver(path)`` ... ``caffe.get_solver(path)``.

Each wraps :class:`caffe_compat.solver.Solver` (Caffe's update rules, learning-rate
policies, snapshots) and exposes its nets as pycaffe :class:`~caffe_compat.pycaffe.Net`
views, so the usual pycaffe training loop works unchanged::

    solver.net.blobs['data'].data[...] = x      # an Input layer keeps what is written
    solver.net.blobs['label'].data[...] = y
    solver.step(1)
    print(solver.net.blobs['loss'].data)

A training iteration is the core net's layer-by-layer ``forward(start=, end=)`` and
``backward(start=, end=)`` (Caffe's ForwardBackward): input blobs are read as the script
left them, every blob's data and diff afterwards are Caffe's, and parameter diffs
accumulate over ``iter_size`` passes.
After the update each parameter's diff holds the update that was applied, as in Caffe
(its ApplyUpdate computes the update in place in the diff).  Test passes run in the core
on the test nets (whose trained layers share the train net's weights from the first test
on, as Caffe's), fed from the test views' input blobs; their results are copied back into
the views.

Class and file: ``caffe.SGDSolver(path)`` is an SGD solver whatever the file's ``type``
says (as in Caffe, where the class decides); ``caffe.get_solver(path)`` follows the file.
Nets of a solver may contain Python layers (the script is user code already).
"""
from __future__ import annotations

import contextlib
import os
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import torch
from torch import Tensor

from caffe_compat.pycaffe import _mode
from caffe_compat.pycaffe._blobs import upload_dirty
from caffe_compat.pycaffe._net import Net, _check_file
from caffe_compat.solver import Solver as _CoreBase

__all__ = ["Solver", "SGDSolver", "NesterovSolver", "AdaGradSolver", "RMSPropSolver",
           "AdaDeltaSolver", "AdamSolver", "get_solver"]


@contextlib.contextmanager
def _python_layers_allowed() -> Iterator[None]:
    from caffe_compat.layers.python import ENV_ALLOW

    old = os.environ.get(ENV_ALLOW)
    os.environ[ENV_ALLOW] = "1"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(ENV_ALLOW, None)
        else:
            os.environ[ENV_ALLOW] = old


class _CoreSolver(_CoreBase):
    """The core solver with pycaffe's iteration: the view runs ForwardBackward, callbacks
    run where Caffe's do, and the applied update is left in each parameter's diff."""

    def __init__(self, param, owner: "Solver", **kw):
        self._owner = owner
        self._updates: Dict[int, Tensor] = {}
        super().__init__(param, **kw)

    def _forward_backward(self, iteration: int, pass_index: int) -> Optional[Tensor]:
        owner = self._owner
        if pass_index == 0:
            for on_start, _ in owner._callbacks:
                on_start()
        view = owner.net
        n = len(view.layers)
        if n == 0:
            return None
        view._forward(0, n - 1)
        view._backward(n - 1, 0)
        loss = self.net.loss
        return None if loss is None else loss.detach()

    def apply_update(self, display: bool = False) -> float:
        for _, on_gradients_ready in self._owner._callbacks:
            on_gradients_ready()
        self._updates = {}
        rate = super().apply_update(display=display)
        with torch.no_grad():
            for i, info in enumerate(self.net.learnable_params()):
                u = self._updates.get(i)
                if u is None:
                    continue
                p = info.param
                if p.grad is None or p.grad.shape != p.shape:
                    p.grad = u.to(p.dtype).clone()
                else:
                    p.grad.copy_(u)
        self._updates = {}
        return rate

    def _compute_update(self, i: int, n: int, w: Tensor, g: Tensor, local_rate: float) -> Tensor:
        upd = super()._compute_update(i, n, w, g, local_rate)
        self._updates[i] = upd.detach().clone()
        return upd


class Solver:
    """pycaffe's Solver: ``net``, ``test_nets``, ``iter``, ``step``, ``solve``, ``snapshot``,
    ``restore``, ``add_callback``, ``apply_update``, ``share_weights``, ``param``."""

    _type: Optional[str] = None   # set by the typed subclasses (SGDSolver, ...)

    def __init__(self, filename):
        path = _check_file(filename)
        param = _CoreBase._read_param(path)
        if self._type is not None:
            param.type = self._type
        self._callbacks: List[Tuple[Callable[[], None], Callable[[], None]]] = []
        self._net: Optional[Net] = None
        self._test_nets: List[Net] = []
        with _python_layers_allowed():
            core = _CoreSolver(param, self, feed=self._train_feed, test_feed=self._test_feed,
                               device=_mode.device())
        self._core = core
        self._net = Net.from_core(core.net)
        self._test_nets = [Net.from_core(n) for n in core.test_nets]
        core.add_callback(self._after_test, on="test")

    # ------------------------------------------------------------------ feeding the core
    def _train_feed(self, iteration: int) -> Dict[str, Tensor]:
        return self.net._sync_to_core() if self._net is not None else {}

    def _test_feed(self, net_id: int, i: int) -> Dict[str, Tensor]:
        return self._test_nets[net_id]._sync_to_core() if net_id < len(self._test_nets) else {}

    def _after_test(self, core, result) -> None:
        if result.net_id < len(self._test_nets):
            self._test_nets[result.net_id]._pull()

    # ------------------------------------------------------------------ pycaffe's API
    @property
    def net(self) -> Net:
        return self._net  # type: ignore[return-value]

    @property
    def test_nets(self) -> List[Net]:
        return self._test_nets

    @property
    def iter(self) -> int:
        return int(self._core.iter)

    @property
    def param(self):
        """The solver definition (a ``caffe_pb2.SolverParameter``)."""
        return self._core.param

    @property
    def type(self) -> str:
        return self._core.type

    @property
    def core(self):
        """The :class:`caffe_compat.solver.Solver` underneath."""
        return self._core

    def step(self, iters: int) -> None:
        """Run ``iters`` training iterations."""
        upload_dirty()
        self._core.step(int(iters))

    def solve(self, resume_file: Optional[str] = None) -> None:
        """Train to ``max_iter`` (restoring ``resume_file`` first when given)."""
        upload_dirty()
        self._core.solve(os.fspath(resume_file) if resume_file else None)
        self.net._pull()

    def snapshot(self) -> None:
        """Write ``<prefix>_iter_<N>.caffemodel`` and ``.solverstate``."""
        upload_dirty()
        self._core.snapshot()

    def restore(self, state_file) -> None:
        """Continue from a ``.solverstate`` (this project's or Caffe's)."""
        self._core.restore(os.fspath(state_file))

    def add_callback(self, on_start: Callable[[], None], on_gradients_ready: Callable[[], None]) -> None:
        """Call ``on_start()`` before each iteration's forward and ``on_gradients_ready()``
        before each update, as Caffe's solver callbacks."""
        self._callbacks.append((on_start, on_gradients_ready))

    def apply_update(self) -> None:
        """Update the weights from the current parameter diffs (no iteration increment)."""
        upload_dirty()
        self._core.apply_update()

    def share_weights(self, net: Net) -> None:
        """Make ``net`` use this solver's trained weights (layers matched by name)."""
        net.share_with(self.net)

    def __repr__(self) -> str:
        return f"<caffe {self.type}Solver iter={self.iter}>"


def _typed(name: str, type_: str) -> type:
    cls = type(name, (Solver,), {"_type": type_, "__doc__": f"pycaffe's {name}: a {type_} solver."})
    cls.__module__ = __name__
    return cls


SGDSolver = _typed("SGDSolver", "SGD")
NesterovSolver = _typed("NesterovSolver", "Nesterov")
AdaGradSolver = _typed("AdaGradSolver", "AdaGrad")
RMSPropSolver = _typed("RMSPropSolver", "RMSProp")
AdaDeltaSolver = _typed("AdaDeltaSolver", "AdaDelta")
AdamSolver = _typed("AdamSolver", "Adam")

_BY_TYPE = {c._type: c for c in (SGDSolver, NesterovSolver, AdaGradSolver, RMSPropSolver,
                                 AdaDeltaSolver, AdamSolver)}


def get_solver(filename) -> Solver:
    """The solver of the type the file names (``type``, or legacy ``solver_type``)."""
    path = _check_file(filename)
    t = _CoreBase._read_param(path).type or "SGD"
    cls = _BY_TYPE.get(t, Solver)
    return cls(path)
