"""The classic Caffe workflow, end to end through the command line, on models/lenet_bars:

    convert-imageset (train and test LMDBs) -> compute-image-mean -> train (solver with
    test_interval, snapshot) -> test (Caffe's averaged outputs) -> time

on a small generated set of 28x28 grey bars (three orientations).  The trained net must
classify the held-out images (accuracy >= 0.9 after 200 iterations; ~1.0 measured).
"""
from __future__ import annotations

import re
import shutil

import cv2
import numpy as np
from click.testing import CliRunner

from caffe_compat.cli.main import main
from conftest import ROOT

MODEL = ROOT / "models" / "lenet_bars"


def bars_image(cls: int, rng: np.random.RandomState) -> np.ndarray:
    """28x28 uint8: class 0 a horizontal bar, 1 a vertical bar, 2 a diagonal, plus noise."""
    im = (rng.rand(28, 28) * 60).astype(np.uint8)
    t = int(rng.randint(2, 4))
    p = int(rng.randint(6, 22))
    if cls == 0:
        cv2.line(im, (3, p), (24, p), 230, t)
    elif cls == 1:
        cv2.line(im, (p, 3), (p, 24), 230, t)
    else:
        o = int(rng.randint(-5, 6))
        cv2.line(im, (3 + o, 3), (24 + o, 24), 230, t)
    return im


def write_set(folder, name: str, n: int, seed: int) -> None:
    rng = np.random.RandomState(seed)
    lines = []
    (folder / "images").mkdir(exist_ok=True)
    for i in range(n):
        cls = i % 3
        rel = f"images/{name}_{i:04d}.png"
        assert cv2.imwrite(str(folder / rel), bars_image(cls, rng))
        lines.append(f"{rel} {cls}")
    (folder / f"{name}.txt").write_text("\n".join(lines) + "\n")


def run(*args: str) -> str:
    r = CliRunner().invoke(main, list(args))
    assert r.exit_code == 0, r.output
    return r.output


def test_convert_mean_train_test_time(tmp_path, monkeypatch):
    for f in ("train_val.prototxt", "solver.prototxt"):
        shutil.copy(MODEL / f, tmp_path / f)
    monkeypatch.chdir(tmp_path)  # Caffe resolves the solver's and data layers' paths from here
    write_set(tmp_path, "train", 300, seed=0)
    write_set(tmp_path, "test", 60, seed=1)
    run("convert-imageset", "./", "train.txt", "train_lmdb", "--gray", "--shuffle")
    run("convert-imageset", "./", "test.txt", "test_lmdb", "--gray")
    out = run("compute-image-mean", "train_lmdb", "mean.binaryproto")
    assert "mean_value channel [0]" in out
    run("train", "--solver", "solver.prototxt", "--no-progress")
    weights = tmp_path / "lenet_bars_iter_200.caffemodel"
    assert weights.is_file() and (tmp_path / "lenet_bars_iter_200.solverstate").is_file()
    out = run("test", "--model", "train_val.prototxt", "--weights", str(weights), "--iterations", "2")
    acc = float(re.findall(r"accuracy = ([0-9.]+)", out)[-1])
    assert acc >= 0.9, out
    out = run("time", "--model", "train_val.prototxt", "-n", "2", "--no-per-layer")
    assert "Average Forward-Backward" in out
