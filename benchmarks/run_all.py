"""``make bench``: every CPU benchmark once, with settings that finish in a few minutes.

GPU figures come from ``benchmarks/gpu_check.sh`` on a machine with a GPU.
"""
from __future__ import annotations

import pathlib
import subprocess
import sys

HERE = pathlib.Path(__file__).resolve().parent
RUNS = [
    ["weights_load.py"],
    ["forward_speed.py", "--iters", "20"],
    ["frcnn_speed.py", "--device", "cpu", "--nets", "ZF", "--train-iters", "3", "--warmup", "1",
     "--test-images", "3"],
    ["compress_svd.py"],
    ["build_200k.py", "--variants", "duplicate"],
]


def main() -> int:
    failed = []
    for args in RUNS:
        print(f"==== {' '.join(args)}", flush=True)
        rc = subprocess.call([sys.executable, str(HERE / args[0])] + args[1:], cwd=str(HERE))
        if rc:
            failed.append(args[0])
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
