"""No way to lose a file (issue 12, item 3).

* every command that writes refuses an output that is the same file as one of its inputs
  (the same path, a symlink, a hard link): one line, exit 2, the input unchanged;
* the temp file (or database folder) of an interrupted write is removed by the next write to
  that target, never a live writer's;
* a full disk (here: a file size limit, a simulated ENOSPC) is one error naming the file and
  the bytes attempted, exit 1, with the earlier file unchanged and no temp file left.
"""
from __future__ import annotations

import errno
import os
import pathlib
import socket
import subprocess
import sys
import textwrap

import cv2
import numpy as np
import pytest
from click.testing import CliRunner

from caffe_compat.atomic import KILL_BEFORE_RENAME_ENV, atomic_path, atomic_write, remove_stale_temps
from caffe_compat.cli.main import main
from caffe_compat.errors import SameFileError, WriteError
from caffe_compat.net import Net
from conftest import ROOT

sys.path.insert(0, str(ROOT / "tests" / "core"))
from test_errors import _FC_ORIG, _FC_SVD, SMALL  # noqa: E402

TRAIN = SMALL + ('layer { name: "label" type: "Input" top: "label" input_param { shape { dim: 2 } } }\n'
                 'layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "label" top: "loss" }\n')


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def _one_line_exit_2(r, *needles: str, logs: bool = False) -> str:
    """The command exited 2 with one error line (after its log lines, when ``logs``)."""
    assert r.exit_code == 2, r.output
    lines = r.stderr.strip().splitlines()
    if logs:
        lines = [ln for ln in lines if not ln.startswith(("I", "W"))]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def files(tmp_path):
    """A net, its weights (and a hard link and a symlink to them), an SVD pair, a solver."""
    net = tmp_path / "net.prototxt"
    net.write_text(SMALL)
    w = tmp_path / "w.caffemodel"
    Net(SMALL, seed=1).save_weights(str(w))
    os.link(w, tmp_path / "hard.caffemodel")
    os.symlink(w.name, tmp_path / "link.caffemodel")
    (tmp_path / "fc.prototxt").write_text(_FC_ORIG)
    (tmp_path / "fc_svd.prototxt").write_text(_FC_SVD.replace("num_output: 9", "num_output: 2"))
    Net(_FC_ORIG, seed=1).save_weights(str(tmp_path / "fc.caffemodel"))
    (tmp_path / "solver.prototxt").write_text('net: "n.prototxt"\nsolver_type: SGD\nbase_lr: 0.1\n')
    return tmp_path


# (command line with {d} for the folder, the file that must stay unchanged, words of the error)
SAME_FILE = [
    ("convert {d}/w.caffemodel -o {d}/w.caffemodel --model {d}/net.prototxt", "w.caffemodel",
     ["refusing to write --output", "the input SRC"]),
    ("convert {d}/w.caffemodel -o {d}/hard.caffemodel", "w.caffemodel", ["(a hard link to it)"]),
    ("convert {d}/w.caffemodel -o {d}/link.caffemodel", "w.caffemodel", ["(through a symlink)"]),
    ("convert {d}/w.caffemodel -o {d}/net.prototxt --model {d}/net.prototxt", "net.prototxt",
     ["the input --model"]),
    ("upgrade-net-text {d}/net.prototxt {d}/net.prototxt", "net.prototxt", ["refusing to write OUT"]),
    ("upgrade-net-binary {d}/w.caffemodel {d}/hard.caffemodel", "w.caffemodel", ["the input IN"]),
    ("upgrade-solver-text {d}/solver.prototxt {d}/solver.prototxt", "solver.prototxt", ["the input IN"]),
    ("draw {d}/net.prototxt {d}/net.prototxt", "net.prototxt", ["the input NET"]),
    ("compress --def {d}/fc.prototxt --def-svd {d}/fc_svd.prototxt --net {d}/fc.caffemodel "
     "--out {d}/fc.caffemodel", "fc.caffemodel", ["refusing to write --out", "the input --net"]),
    ("compress --def {d}/fc.prototxt --def-svd {d}/fc_svd.prototxt --net {d}/fc.caffemodel "
     "--out {d}/fc_svd.prototxt", "fc_svd.prototxt", ["the input --def-svd"]),
]


@pytest.mark.parametrize("line,keep,words", SAME_FILE, ids=[s[0].split()[0] + str(i) for i, s in enumerate(SAME_FILE)])
def test_writing_commands_refuse_an_output_that_is_an_input(files, line, keep, words):
    before = (files / keep).read_bytes()
    r = run(*line.format(d=files).split())
    _one_line_exit_2(r, *words)
    assert (files / keep).read_bytes() == before
    assert not [p for p in os.listdir(files) if p.endswith(".tmp")]


def test_image_tools_refuse_their_inputs(tmp_path):
    """convert-imageset into its list file, compute-image-mean onto its database's data file."""
    for i in range(2):
        cv2.imwrite(str(tmp_path / f"{i}.png"), np.full((4, 5, 3), 40 * i, np.uint8))
    listfile = tmp_path / "list.txt"
    listfile.write_text("0.png 0\n1.png 1\n")
    before = listfile.read_bytes()
    _one_line_exit_2(run("convert-imageset", f"{tmp_path}/", listfile, listfile), "the input LISTFILE")
    assert listfile.read_bytes() == before
    db = tmp_path / "db"
    assert run("convert-imageset", f"{tmp_path}/", listfile, db).exit_code == 0
    data = (db / "data.mdb").read_bytes()
    _one_line_exit_2(run("compute-image-mean", db, db / "data.mdb"), "refusing to write the mean file",
                     "the input database file")
    assert (db / "data.mdb").read_bytes() == data
    assert run("compute-image-mean", db, tmp_path / "mean.binaryproto").exit_code == 0


def test_detect_never_draws_over_an_input_image(tmp_path):
    from caffe_compat.frcnn.detect import detect_images

    img = tmp_path / "photo.png"
    cv2.imwrite(str(img), np.zeros((8, 8, 3), np.uint8))
    before = img.read_bytes()
    with pytest.raises(SameFileError, match=r"refusing to write the drawn image: .*the input image"):
        next(detect_images(None, [str(img)], str(tmp_path), ("__background__", "x")))  # before any work
    assert img.read_bytes() == before


def _train_files(d: pathlib.Path, extra: str = "") -> pathlib.Path:
    (d / "train.prototxt").write_text(TRAIN)
    s = d / "solver.prototxt"
    s.write_text(f'net: "{d}/train.prototxt"\nlr_policy: "fixed"\nbase_lr: 0.01\nmax_iter: 40\nsnapshot: 10\n'
                 f'snapshot_prefix: "run"\n{extra}')
    return s


def test_train_refuses_snapshots_that_would_replace_its_weights(tmp_path):
    """Fine-tuning from an earlier run's run_iter_20.caffemodel into the same output folder:
    refused before training, not overwritten at iteration 20."""
    solver = _train_files(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    weights = out / "run_iter_20.caffemodel"
    Net(SMALL, seed=3).save_weights(str(weights))
    before = weights.read_bytes()
    r = run("train", "--solver", solver, "--weights", weights, "--output", out, "--no-progress")
    _one_line_exit_2(r, "the snapshot of iteration 20 would replace the input weights", logs=True)
    assert weights.read_bytes() == before
    # an input named like a snapshot the run cannot reach (past max_iter) is fine
    late = out / "run_iter_400.caffemodel"
    weights.rename(late)
    from caffe_compat.trainer import TrainSolver

    TrainSolver(str(solver), weights=str(late), output_dir=str(out))


def test_snapshot_write_refuses_a_protected_input(tmp_path):
    """The last guard: any atomic write during a command checks the command's inputs."""
    from caffe_compat.atomic import protect_inputs

    target = tmp_path / "model.caffemodel"
    target.write_bytes(b"input")
    with protect_inputs([("--weights", str(target))]):
        with pytest.raises(SameFileError, match="same file as the input --weights"):
            atomic_write(str(tmp_path / "." / "model.caffemodel"), b"new")
        atomic_write(str(tmp_path / "other.caffemodel"), b"new")  # anything else is written
    atomic_write(str(target), b"new")  # outside a command: a library write is the caller's choice
    assert target.read_bytes() == b"new"


# ---------------------------------------------------------------------- stale temp files
def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def _host() -> str:
    import re

    return re.sub(r"[^A-Za-z0-9-]", "", socket.gethostname())[:32] or "host"


def test_interrupted_write_is_cleaned_by_the_next(tmp_path):
    """A convert killed between its temp file and the rename (SIGKILL: no cleanup can run)
    leaves its temp file; the next write to that target removes it."""
    w = tmp_path / "w.caffemodel"
    Net(SMALL, seed=1).save_weights(str(w))
    out = tmp_path / "w.safetensors"
    env = dict(os.environ, **{KILL_BEFORE_RENAME_ENV: "w.safetensors"})
    p = subprocess.run([sys.executable, "-m", "caffe_compat.cli", "convert", str(w), "-o", str(out)],
                       env=env, capture_output=True, timeout=120)
    assert p.returncode == -9
    left = [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]
    assert len(left) == 1 and left[0].startswith(".w.safetensors.") and not out.exists()
    r = run("convert", w, "-o", out)
    assert r.exit_code == 0, r.output
    assert out.exists() and [n for n in os.listdir(tmp_path) if n.endswith(".tmp")] == []


def test_stale_temps_removed_live_ones_kept(tmp_path):
    target = tmp_path / "m.caffemodel"
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        names = {
            "dead": f".m.caffemodel.{_host()}-{_dead_pid()}.ab12cd.tmp",
            "live": f".m.caffemodel.{_host()}-{live.pid}.ab12cd.tmp",
            "mine": f".m.caffemodel.{_host()}-{os.getpid()}.ab12cd.tmp",
            "other host": f".m.caffemodel.{_host()}x-{_dead_pid()}.ab12cd.tmp",
            "other target": f".n.caffemodel.{_host()}-{_dead_pid()}.ab12cd.tmp",
            "not ours": ".m.caffemodel.user-notes.tmp",
        }
        for n in names.values():
            (tmp_path / n).write_bytes(b"partial")
        dead_dir = tmp_path / f".m.caffemodel.{_host()}-{_dead_pid()}.xy34.tmp"  # a database being built
        dead_dir.mkdir()
        (dead_dir / "data.mdb").write_bytes(b"x")
        atomic_write(str(target), b"complete")
        left = set(os.listdir(tmp_path))
        assert names["dead"] not in left and dead_dir.name not in left
        for k in ("live", "mine", "other host", "other target", "not ours"):
            assert names[k] in left, k
        assert target.read_bytes() == b"complete"
        assert remove_stale_temps(str(target)) == 0
    finally:
        live.kill()
        live.wait()


# ---------------------------------------------------------------------- full disks
def test_file_size_limit_names_the_file_and_the_bytes(tmp_path):
    """A genuine EFBIG (RLIMIT_FSIZE) during `convert`: one line naming the output and the
    bytes attempted, exit 1, the earlier output unchanged, no temp file."""
    big = SMALL.replace("num_output: 3", "num_output: 300")
    (tmp_path / "big.prototxt").write_text(big)
    w = tmp_path / "big.caffemodel"
    Net(big, seed=1).save_weights(str(w))
    out = tmp_path / "out.safetensors"
    out.write_bytes(b"earlier output")
    script = textwrap.dedent(f"""
        import resource, signal, sys
        from caffe_compat.cli.main import main
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (20000, 20000))
        sys.argv = ["caffe-compat", "convert", {str(w)!r}, "-o", {str(out)!r}]
        main()
    """)
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert p.returncode == 1, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1, p.stderr
    assert lines[0].startswith(f"error: {out}: File too large while writing it (")
    assert "bytes attempted); the file's earlier content, if any, is unchanged" in lines[0]
    assert out.read_bytes() == b"earlier output"
    assert [n for n in os.listdir(tmp_path) if n.endswith(".tmp")] == []


def test_full_disk_error_is_one_oserror_naming_the_file(tmp_path, monkeypatch):
    import caffe_compat.atomic as atomic

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(atomic.os, "fsync", full)
    path = tmp_path / "x.bin"
    with pytest.raises(WriteError) as ei:
        atomic_write(str(path), b"\0" * 12345)
    e = ei.value
    assert isinstance(e, OSError) and e.errno == errno.ENOSPC and e.exit_code == 1
    assert str(e) == (f"{path}: No space left on device while writing it (12,345 bytes attempted); the file's "
                      "earlier content, if any, is unchanged: free some space or write elsewhere")
    # a writer that wants a name (h5py) reports what it had written; h5py puts errno in its text
    with pytest.raises(WriteError, match=r"x\.h5: Disk quota exceeded while writing it \(3 bytes written"):
        with atomic_path(str(tmp_path / "x.h5")) as tmp:
            pathlib.Path(tmp).write_bytes(b"abc")
            raise OSError(f"Can't write data (file write failed: errno = {errno.EDQUOT})")
    assert [n for n in os.listdir(tmp_path) if n.endswith(".tmp")] == []
