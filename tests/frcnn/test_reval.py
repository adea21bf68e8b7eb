"""``caffe-compat reval`` (py-faster-rcnn's tools/reval.py): evaluate saved detections again.

A real tiny ``test`` run (the RPN net and synthetic VOC data of test_frcnn_test.py) writes
its output folder; ``reval`` on that folder must print the very same APs.  The ``--nms``
path is checked on hand-made detections where NMS decides the score: every ground-truth
box found twice, the duplicate ranked before other images' true boxes (mAP < 1 as
saved, exactly 1 once NMS drops the duplicates).
"""
from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import struct

import numpy as np
import pytest
from click.testing import CliRunner

from caffe_compat.cli.main import main
from caffe_compat.errors import DataError
from caffe_compat.frcnn.config import cfg, temporary_cfg
from caffe_compat.frcnn.datasets.pascal_voc import pascal_voc
from caffe_compat.frcnn.reval import read_detections, reval
from caffe_compat.frcnn.test import apply_nms, load_detections, save_detections
import test_frcnn_test as frcnn_tests

# pytest fixtures shared with the test_net tests: the tiny RPN net's files, the synthetic
# VOC set (8 images, 4 of them test), and the global cfg restored after each test
rpn_files = frcnn_tests.rpn_files
voc_dir = frcnn_tests.voc_dir
_isolate_cfg = frcnn_tests._isolate_cfg

SIZES = ["TEST.SCALES", "(96,)", "TEST.MAX_SIZE", "128"]


def run_cli(args):
    return CliRunner().invoke(main, [str(a) for a in args])


def ap_lines(text):
    return [ln for ln in text.splitlines() if ln.startswith(("AP for ", "Mean AP = "))]


@pytest.fixture(scope="module")
def tested(rpn_files, voc_dir, tmp_path_factory):
    """A real `caffe-compat test` run: (its output folder, its stdout, its voc_eval.json).

    Every detection kept (no threshold, no cap, loose NMS 0.7), so that even the untrained
    net finds some objects: the APs compared are not all 0.
    """
    out = tmp_path_factory.mktemp("tested") / "out"
    r = run_cli(["test", "--def", rpn_files / "test.prototxt", "--net", rpn_files / "tiny.caffemodel",
                 "--imdb", "voc_2007_test", "--output", out, "--thresh", "0.0", "--num_dets", "0",
                 "--set", "DATA_DIR", voc_dir, "TEST.NMS", "0.7", *SIZES])
    assert r.exit_code == 0, r.output
    evaluation = json.loads((out / "voc_eval.json").read_text())
    assert evaluation["mAP"] > 0 and sum(a is not None and a > 0 for a in evaluation["ap"].values()) >= 2
    return out, r.stdout, evaluation


def imdb_of(voc_dir):
    with temporary_cfg({"DATA_DIR": str(voc_dir)}):
        return pascal_voc("test", "2007")


def copy_dir(src, dst):
    shutil.copytree(src, dst)
    return dst


# ----------------------------------------------------------------------------- after a real test
def test_reval_prints_the_aps_test_printed(tested, voc_dir, tmp_path):
    out, test_stdout, test_eval = tested
    folder = copy_dir(out, tmp_path / "out")
    r = run_cli(["reval", folder, "--imdb", "voc_2007_test", "--set", "DATA_DIR", voc_dir])
    assert r.exit_code == 0, r.output
    assert ap_lines(r.stdout) == ap_lines(test_stdout)
    assert len(ap_lines(r.stdout)) == 21 and re.search(r"^Mean AP = \d\.\d{4}$", r.stdout, re.M)
    assert "detections.npz" in r.stdout and f"Results in {folder}" in r.stdout
    assert json.loads((folder / "voc_eval.json").read_text()) == test_eval
    # the function: the same numbers as test's evaluation, nothing else changed
    with temporary_cfg({"DATA_DIR": str(voc_dir)}):
        res = reval(str(folder), pascal_voc("test", "2007"))
    assert res["mAP"] == pytest.approx(test_eval["mAP"], abs=1e-12)
    assert {c: (None if np.isnan(a) else a) for c, a in res["ap"].items()} == test_eval["ap"]
    assert res["det_file"] == str(folder / "detections.npz") and res["num_images"] == 4
    # trailing KEY VALUE words after one --set, as `test` takes them
    r = run_cli(["reval", folder, "--set", "DATA_DIR", voc_dir, "TEST.NMS", "0.3"])
    assert r.exit_code == 0, r.output
    assert ap_lines(r.stdout) == ap_lines(test_stdout)
    assert cfg.DATA_DIR != str(voc_dir)                       # the CLI restored cfg


def test_reval_nms_on_test_output(tested, voc_dir, tmp_path):
    """test ran NMS at 0.7: again at 0.7 changes nothing; at 0.3 it is apply_nms at 0.3."""
    out, test_stdout, test_eval = tested
    folder = copy_dir(out, tmp_path / "out")
    r = run_cli(["reval", folder, "--nms", "--set", "DATA_DIR", voc_dir, "TEST.NMS", "0.7"])
    assert r.exit_code == 0, r.output
    assert "Applying NMS (0.7)" in r.stdout
    assert ap_lines(r.stdout) == ap_lines(test_stdout)

    r = run_cli(["reval", folder, "--nms", "--set", "DATA_DIR", voc_dir])      # TEST.NMS 0.3
    assert r.exit_code == 0, r.output
    assert "Applying NMS (0.3)" in r.stdout
    dets = load_detections(str(out / "detections.npz"))
    tighter = apply_nms(dets, 0.3)
    assert sum(len(d) for row in tighter for d in row) < sum(len(d) for row in dets for d in row)
    with temporary_cfg({"DATA_DIR": str(voc_dir)}):
        ref = pascal_voc("test", "2007").evaluate_detections(tighter, str(tmp_path / "ref"))
    assert re.search(rf"^Mean AP = {ref['mAP']:.4f}$", r.stdout, re.M)
    for c, a in ref["ap"].items():
        if not np.isnan(a):
            assert f"AP for {c} = {a:.4f}" in r.stdout
    assert ref["mAP"] != test_eval["mAP"]


def _py2_array(a):
    """A float32 array as Python 2's cPickle (protocol 2) wrote it: data as a py2 str."""
    a = np.ascontiguousarray(a, dtype="<f4")
    raw = a.tobytes()
    shape = b"".join(b"J" + struct.pack("<i", s) for s in a.shape) + b"\x86"
    dtype = b"cnumpy\ndtype\nU\x02f4K\x00K\x01\x87R(K\x03U\x01<NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb"
    return (b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85U\x01b\x87R"
            b"(K\x01" + shape + dtype + b"\x89T" + struct.pack("<I", len(raw)) + raw + b"tb")


def py2_pickle(all_boxes):
    """py-faster-rcnn's detections.pkl, byte for byte as Python 2 wrote it (no memo)."""
    def lst(items):
        return b"](" + b"".join(items) + b"e"
    return b"\x80\x02" + lst([lst([_py2_array(d) if len(d) else b"]" for d in row])
                              for row in all_boxes]) + b"."


def test_reval_reads_the_originals_pickle_safely(tested, voc_dir, tmp_path):
    out, test_stdout, _ = tested
    all_boxes = load_detections(str(out / "detections.npz"))
    # py-faster-rcnn's layout: [] for empty entries (background), float32 n x 5 arrays
    as_pfr = [[(d if len(d) else []) for d in row] for row in all_boxes]
    as_pfr[0] = [[] for _ in as_pfr[0]]
    folder = tmp_path / "pkl"
    folder.mkdir()
    (folder / "detections.pkl").write_bytes(pickle.dumps(as_pfr, protocol=2))
    r = run_cli(["reval", folder, "--set", "DATA_DIR", voc_dir])
    assert r.exit_code == 0, r.output
    assert "detections.pkl" in r.stdout
    assert ap_lines(r.stdout) == ap_lines(test_stdout)
    loaded, meta = read_detections(str(folder / "detections.pkl"))
    assert meta == {} and loaded[0][0].shape == (0, 5)
    for c in range(21):
        for i in range(4):
            np.testing.assert_array_equal(loaded[c][i], all_boxes[c][i])
    # a Python 2 pickle, as py-faster-rcnn's test_net.py dumped it
    (folder / "detections.pkl").write_bytes(py2_pickle(as_pfr))
    r = run_cli(["reval", folder, "--set", "DATA_DIR", voc_dir])
    assert r.exit_code == 0, r.output
    assert ap_lines(r.stdout) == ap_lines(test_stdout)
    # the .npz wins where both are there
    shutil.copy(out / "detections.npz", folder / "detections.npz")
    r = run_cli(["reval", folder, "--set", "DATA_DIR", voc_dir])
    assert r.exit_code == 0 and "detections.npz" in r.stdout

    class Evil:
        def __reduce__(self):
            return (os.getcwd, ())          # harmless if it ever ran; it must not even load

    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "detections.pkl").write_bytes(pickle.dumps([[Evil()]], protocol=2))
    r = run_cli(["reval", bad, "--set", "DATA_DIR", voc_dir])
    assert r.exit_code == 2 and "refusing to load" in r.stderr and "getcwd" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    (bad / "detections.pkl").write_bytes(pickle.dumps({"not": "a list"}, protocol=2))
    r = run_cli(["reval", bad, "--set", "DATA_DIR", voc_dir])
    assert r.exit_code == 2 and "list of lists" in r.stderr
    (bad / "detections.pkl").write_bytes(pickle.dumps([[np.zeros((2, 4), np.float32)]], protocol=2))
    r = run_cli(["reval", bad, "--set", "DATA_DIR", voc_dir])
    assert r.exit_code == 2 and "n x 5" in r.stderr


# ----------------------------------------------------------------------------- --nms
def duplicated_ground_truth(imdb):
    """Every ground-truth box detected twice: the box itself, then a 1-pixel shift (IoU ~0.9)
    just below it; images rank one after the other, so each duplicate (a false positive)
    outranks the next image's true boxes."""
    K, n = imdb.num_classes, imdb.num_images
    all_boxes = [[np.zeros((0, 5), np.float32) for _ in range(n)] for _ in range(K)]
    for i, e in enumerate(imdb.gt_roidb()):
        top = 1.0 - 0.1 * i
        for c in range(1, K):
            boxes = e["boxes"][e["gt_classes"] == c].astype(np.float32)
            if len(boxes):
                scores = (top - 0.01 * np.arange(len(boxes), dtype=np.float32))[:, None]
                true = np.hstack([boxes, scores])
                dup = np.hstack([boxes + 1, scores - 0.005])
                all_boxes[c][i] = np.vstack([true, dup])
    return all_boxes


def test_reval_nms_drops_duplicates(voc_dir, tmp_path):
    imdb = imdb_of(voc_dir)
    dets = duplicated_ground_truth(imdb)
    assert any(sum(len(dets[c][i]) > 0 for i in range(4)) >= 2 for c in range(1, 21)), \
        "the data set needs a class found in two images for duplicates to matter"
    folder = tmp_path / "dups"
    save_detections(str(folder / "detections.npz"), dets, imdb.classes, imdb.image_index)

    r = run_cli(["reval", folder, "--set", "DATA_DIR", voc_dir])
    assert r.exit_code == 0, r.output
    mean = float(re.search(r"^Mean AP = (\S+)$", r.stdout, re.M).group(1))
    assert mean < 0.99
    r = run_cli(["reval", folder, "--nms", "--set", "DATA_DIR", voc_dir])
    assert r.exit_code == 0, r.output
    assert re.search(r"^Mean AP = 1\.0000$", r.stdout, re.M)
    # NMS too loose to catch IoU ~0.9: the duplicates stay
    r = run_cli(["reval", folder, "--nms", "--set", "DATA_DIR", voc_dir, "TEST.NMS", "0.95"])
    assert r.exit_code == 0 and float(re.search(r"^Mean AP = (\S+)$", r.stdout, re.M).group(1)) == mean

    # the function: exactly what evaluating apply_nms' output gives, and what was evaluated
    with temporary_cfg({"DATA_DIR": str(voc_dir), "TEST.NMS": 0.3}):
        res = reval(str(folder), pascal_voc("test", "2007"), nms=True)
        ref = pascal_voc("test", "2007").evaluate_detections(apply_nms(dets, 0.3), str(tmp_path / "ref"))
    assert res["mAP"] == pytest.approx(1.0, abs=1e-12) and res["mAP"] == ref["mAP"]
    for c in range(1, 21):
        for i in range(4):
            got = np.asarray(res["all_boxes"][c][i]).reshape(-1, 5)
            want = dets[c][i][: len(dets[c][i]) // 2]
            np.testing.assert_array_equal(got[np.argsort(-got[:, 4])], want)


# ----------------------------------------------------------------------------- errors
def test_reval_errors(tested, voc_dir, tmp_path):
    out = tested[0]
    imdb = imdb_of(voc_dir)
    dets = load_detections(str(out / "detections.npz"))

    def check(folder, *words, extra=()):
        r = run_cli(["reval", folder, "--set", "DATA_DIR", voc_dir, *extra])
        assert r.exit_code == 2, r.output
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr
        for w in words:
            assert w in r.stderr, r.stderr
        return r

    empty = tmp_path / "empty"
    empty.mkdir()
    check(empty, "no detections", "detections.npz", str(empty))
    check(tmp_path / "missing", "output folder not found")

    fewer = tmp_path / "fewer"
    save_detections(str(fewer / "detections.npz"), [row[:3] for row in dets])
    check(fewer, "3 images", "voc_2007_test has 4")

    classes = tmp_path / "classes"
    save_detections(str(classes / "detections.npz"), dets[:4])
    check(classes, "4 classes", "has 21")

    ids = tmp_path / "ids"
    other = list(imdb.image_index)
    other[2] = "999999"
    save_detections(str(ids / "detections.npz"), dets, imdb.classes, other)
    check(ids, "images differ", "'999999'")

    names = tmp_path / "names"
    save_detections(str(names / "detections.npz"), dets, ["__background__"] + ["x"] * 20, imdb.image_index)
    check(names, "classes differ", "'x'")

    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "detections.npz").write_bytes(b"PK not really")
    check(corrupt, "cannot read detections")

    check(out, "MATLAB", extra=["--matlab"])
    check(out, "unknown data set", extra=["--imdb", "voc_2099_test"])
    r = run_cli(["reval", out, "stray"])
    assert r.exit_code == 2 and "stray" in r.stderr

    with pytest.raises(DataError, match="no detections"):
        reval(str(empty), imdb)


def _npz(path, **over):
    arrays = dict(dets=np.zeros((2, 5), np.float32), class_index=np.array([1, 2]),
                  image_index=np.array([0, 1]), num_classes=np.array(3), num_images=np.array(2))
    arrays.update(over)
    np.savez(path, **arrays)
    return str(path)


@pytest.mark.parametrize("what,over,msg", [
    ("negative image", dict(image_index=np.array([0, -1])), "indices outside the recorded 3 classes x 2 images"),
    ("class past the end", dict(class_index=np.array([1, 3])), "indices outside the recorded"),
    ("dets not n x 5", dict(dets=np.zeros((2, 4), np.float32)), r"'dets' must be n x 5 floats"),
    ("index count", dict(image_index=np.array([0])), r"must be 2 integers each"),
])
def test_inconsistent_detection_files_are_refused(tmp_path, what, over, msg):
    with pytest.raises(DataError, match=msg):
        load_detections(_npz(tmp_path / "detections.npz", **over))


def test_damaged_detection_file_is_one_clear_error(tmp_path):
    good = _npz(tmp_path / "good.npz")
    assert [len(r) for r in load_detections(good)] == [2, 2, 2]
    bad = tmp_path / "detections.npz"
    bad.write_bytes(open(good, "rb").read()[:200])   # truncated zip
    with pytest.raises(DataError, match="cannot read detections file"):
        read_detections(str(bad))
