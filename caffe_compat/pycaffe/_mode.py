"""pycaffe's global switches: CPU/GPU mode, device id and random seed.

Caffe keeps one process-wide mode; so does this module.  ``set_mode_gpu()`` asks for
CUDA: nets then run on ``cuda:<device id>`` when torch sees a CUDA device, and on the
CPU with one warning otherwise (Caffe's CPU-only builds fail instead; a legacy script
that calls ``set_mode_gpu()`` unconditionally should still run here).  The mode is read
whenever a net runs, so switching it moves existing nets, as Caffe's global mode does.

``set_random_seed(s)`` seeds torch's global generator and the stream from which each net
built afterwards draws the seed of its own generator (its fillers and Dropout masks), so
a script that seeds once is reproducible run to run.  The numbers cannot be Caffe's: its
generator is a different algorithm.
"""
from __future__ import annotations

import warnings
from typing import Optional

import torch

_state = {"mode": "cpu", "device_id": 0, "warned": False}
_seeds: Optional[torch.Generator] = None


def set_mode_cpu() -> None:
    """Run nets on the CPU (Caffe's default)."""
    _state["mode"] = "cpu"


def set_mode_gpu() -> None:
    """Run nets on CUDA device ``set_device(i)`` (0 by default) when there is one."""
    _state["mode"] = "gpu"


def set_device(device_id: int) -> None:
    """Choose the CUDA device used in GPU mode."""
    device_id = int(device_id)
    if device_id < 0:
        raise ValueError(f"device id must be non-negative, got {device_id}")
    _state["device_id"] = device_id


def set_random_seed(seed: int) -> None:
    """Seed torch and the seeds of nets built from now on."""
    global _seeds
    seed = int(seed)
    torch.manual_seed(seed)
    _seeds = torch.Generator()
    _seeds.manual_seed(seed)


def mode() -> str:
    """``"cpu"`` or ``"gpu"`` (what was asked for, not what is available)."""
    return str(_state["mode"])


def device() -> torch.device:
    """Where nets run now: the CUDA device in GPU mode when CUDA exists, else the CPU."""
    if _state["mode"] != "gpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        if not _state["warned"]:
            warnings.warn("caffe.set_mode_gpu(): no CUDA device is available to torch; "
                          "running on the CPU", RuntimeWarning, stacklevel=3)
            _state["warned"] = True
        return torch.device("cpu")
    idx = int(_state["device_id"])
    n = torch.cuda.device_count()
    if idx >= n:
        raise RuntimeError(f"caffe.set_device({idx}): only {n} CUDA device(s) are visible")
    return torch.device("cuda", idx)


def next_net_seed() -> Optional[int]:
    """The seed for the next net's generator: None (the net's default) until seeded."""
    if _seeds is None:
        return None
    return int(torch.randint(0, 2 ** 31 - 1, (1,), generator=_seeds).item())
