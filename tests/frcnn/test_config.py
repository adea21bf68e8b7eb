"""py-faster-rcnn's config object: keys, defaults, YAML/--set merging, param_str parsing."""
from __future__ import annotations

import os

import numpy as np
import pytest

from caffe_compat.errors import CaffeCompatError, SchemaError
from caffe_compat.frcnn import config
from caffe_compat.frcnn.config import (CONTEXT_KEY, AttrDict, ConfigError, build_cfg, cfg,
                                       cfg_from_file, cfg_from_list, command_cfg, default_cfg,
                                       get_output_dir, override_list, parse_param_str, reset_cfg,
                                       temporary_cfg)

# py-faster-rcnn's lib/fast_rcnn/config.py, key by key (written out here, not imported), plus
# caffe-compat's own TRAIN.PREFETCH_WORKERS (minibatch worker processes)
TRAIN_DEFAULTS = {
    "SCALES": (600,), "MAX_SIZE": 1000, "IMS_PER_BATCH": 2, "BATCH_SIZE": 128,
    "FG_FRACTION": 0.25, "FG_THRESH": 0.5, "BG_THRESH_HI": 0.5, "BG_THRESH_LO": 0.1,
    "USE_FLIPPED": True, "BBOX_REG": True, "BBOX_THRESH": 0.5, "SNAPSHOT_ITERS": 10000,
    "SNAPSHOT_INFIX": "", "USE_PREFETCH": False, "PREFETCH_WORKERS": -1, "BBOX_NORMALIZE_TARGETS": True,
    "BBOX_INSIDE_WEIGHTS": (1.0, 1.0, 1.0, 1.0), "BBOX_NORMALIZE_TARGETS_PRECOMPUTED": False,
    "BBOX_NORMALIZE_MEANS": (0.0, 0.0, 0.0, 0.0), "BBOX_NORMALIZE_STDS": (0.1, 0.1, 0.2, 0.2),
    "PROPOSAL_METHOD": "selective_search", "ASPECT_GROUPING": True, "HAS_RPN": False,
    "RPN_POSITIVE_OVERLAP": 0.7, "RPN_NEGATIVE_OVERLAP": 0.3, "RPN_CLOBBER_POSITIVES": False,
    "RPN_FG_FRACTION": 0.5, "RPN_BATCHSIZE": 256, "RPN_NMS_THRESH": 0.7,
    "RPN_PRE_NMS_TOP_N": 12000, "RPN_POST_NMS_TOP_N": 2000, "RPN_MIN_SIZE": 16,
    "RPN_BBOX_INSIDE_WEIGHTS": (1.0, 1.0, 1.0, 1.0), "RPN_POSITIVE_WEIGHT": -1.0,
}
TEST_DEFAULTS = {
    "SCALES": (600,), "MAX_SIZE": 1000, "NMS": 0.3, "SVM": False, "BBOX_REG": True,
    "HAS_RPN": False, "PROPOSAL_METHOD": "selective_search", "RPN_NMS_THRESH": 0.7,
    "RPN_PRE_NMS_TOP_N": 6000, "RPN_POST_NMS_TOP_N": 300, "RPN_MIN_SIZE": 16,
}
TOP_KEYS = {"TRAIN", "TEST", "DEDUP_BOXES", "PIXEL_MEANS", "RNG_SEED", "EPS", "ROOT_DIR",
            "DATA_DIR", "MODELS_DIR", "MATLAB", "EXP_DIR", "USE_GPU_NMS", "GPU_ID"}


@pytest.fixture(autouse=True)
def _isolate():
    with temporary_cfg():
        yield


def test_every_key_and_default():
    c = default_cfg()
    assert set(c) == TOP_KEYS
    assert dict(c.TRAIN) == TRAIN_DEFAULTS
    assert dict(c.TEST) == TEST_DEFAULTS
    for section, expected in (("TRAIN", TRAIN_DEFAULTS), ("TEST", TEST_DEFAULTS)):
        for k, v in expected.items():      # exact types matter: merges check them
            assert type(c[section][k]) is type(v), (section, k)
    assert c.DEDUP_BOXES == 1.0 / 16.0
    assert isinstance(c.PIXEL_MEANS, np.ndarray) and c.PIXEL_MEANS.shape == (1, 1, 3)
    np.testing.assert_array_equal(c.PIXEL_MEANS.ravel(), [102.9801, 115.9465, 122.7717])
    assert c.PIXEL_MEANS.dtype == np.float64
    assert (c.RNG_SEED, c.EPS, c.MATLAB, c.EXP_DIR, c.USE_GPU_NMS, c.GPU_ID) == \
        (3, 1e-14, "matlab", "default", True, 0)
    assert c.DATA_DIR == os.path.join(c.ROOT_DIR, "data")
    assert c.MODELS_DIR == os.path.join(c.ROOT_DIR, "models", "pascal_voc")
    assert os.path.isabs(c.ROOT_DIR)


def test_attribute_and_item_access_agree():
    c = default_cfg()
    assert c.TRAIN.RPN_NMS_THRESH == c["TRAIN"]["RPN_NMS_THRESH"] == 0.7
    c.TRAIN.RPN_NMS_THRESH = 0.5
    assert c["TRAIN"]["RPN_NMS_THRESH"] == 0.5
    c["TEST"]["NMS"] = 0.4
    assert c.TEST.NMS == 0.4
    c.NEW = {"A": 1}
    assert isinstance(c.NEW, AttrDict) and c.NEW.A == 1
    with pytest.raises(AttributeError):
        c.NO_SUCH_KEY


def test_default_cfg_is_independent_of_the_global():
    a = default_cfg()
    a.TRAIN.SCALES = (800,)
    a.PIXEL_MEANS[0, 0, 0] = 0.0
    assert cfg.TRAIN.SCALES == (600,)
    assert cfg.PIXEL_MEANS[0, 0, 0] == 102.9801
    assert default_cfg().PIXEL_MEANS[0, 0, 0] == 102.9801


def test_temporary_cfg_restores_in_place():
    train = cfg.TRAIN                       # a module holding a section keeps seeing the truth
    with temporary_cfg({"TRAIN.RPN_BATCHSIZE": 64, "EXP_DIR": "x"}) as c:
        assert c is cfg
        assert train.RPN_BATCHSIZE == 64 and cfg.EXP_DIR == "x"
        cfg.TRAIN.HAS_RPN = True
    assert cfg.TRAIN is train
    assert train.RPN_BATCHSIZE == 256 and cfg.EXP_DIR == "default" and not train.HAS_RPN
    with pytest.raises(ConfigError, match="TRAIN.RPN_BATCHSIZE"):
        with temporary_cfg({"TRAIN.RPN_BATCHSIZE": 64.0}):
            pass
    assert cfg.TRAIN.RPN_BATCHSIZE == 256


def test_reset_cfg_keeps_identity():
    train = cfg.TRAIN
    cfg.TRAIN.BATCH_SIZE = 7
    cfg.EXP_DIR = "changed"
    reset_cfg()
    assert cfg.TRAIN is train and train.BATCH_SIZE == 128 and cfg.EXP_DIR == "default"
    assert config.cfg is cfg


def test_corpus_yaml_files_merge(corpus):
    d = corpus / "py-faster-rcnn" / "experiments" / "cfgs"
    cfg_from_file(str(d / "faster_rcnn_end2end.yml"))
    assert cfg.EXP_DIR == "faster_rcnn_end2end"
    assert cfg.TRAIN.HAS_RPN is True and cfg.TRAIN.IMS_PER_BATCH == 1
    assert cfg.TRAIN.BBOX_NORMALIZE_TARGETS_PRECOMPUTED is True
    assert cfg.TRAIN.PROPOSAL_METHOD == "gt" and cfg.TRAIN.BG_THRESH_LO == 0.0
    assert cfg.TEST.HAS_RPN is True
    assert cfg.TRAIN.BATCH_SIZE == 128          # untouched keys keep their defaults
    reset_cfg()
    cfg_from_file(str(d / "faster_rcnn_alt_opt.yml"))
    assert cfg.EXP_DIR == "faster_rcnn_alt_opt" and cfg.TRAIN.HAS_RPN is False


def _yml(tmp_path, text):
    p = tmp_path / "c.yml"
    p.write_text(text)
    return str(p)


def test_yaml_into_a_fresh_copy(tmp_path):
    c = default_cfg()
    cfg_from_file(_yml(tmp_path, "TRAIN:\n  SCALES: !!python/tuple [480, 576]\n"), into=c)
    assert c.TRAIN.SCALES == (480, 576) and cfg.TRAIN.SCALES == (600,)


@pytest.mark.parametrize("text, key", [
    ("TRAIN:\n  NO_SUCH: 1\n", "TRAIN.NO_SUCH"),
    ("BOGUS: 1\n", "BOGUS"),
    ("TRAIN:\n  BG_THRESH_LO: 0\n", "TRAIN.BG_THRESH_LO"),      # int for a float key
    ("TRAIN:\n  SCALES: [600]\n", "TRAIN.SCALES"),              # list for a tuple key
    ("TRAIN:\n  HAS_RPN: 1\n", "TRAIN.HAS_RPN"),                # int for a bool key
    ("TRAIN: 3\n", "TRAIN"),                                    # scalar for a section
    ("EXP_DIR: {A: 1}\n", "EXP_DIR"),                           # section for a scalar
])
def test_yaml_errors_name_the_key(tmp_path, text, key):
    path = _yml(tmp_path, text)
    before = default_cfg()
    with pytest.raises(ConfigError) as ei:
        cfg_from_file(path)
    assert f"'{key}'" in str(ei.value) and path in str(ei.value)
    assert isinstance(ei.value, CaffeCompatError)
    if key in ("TRAIN.SCALES",):
        assert "!!python/tuple" in str(ei.value)
    assert cfg.TRAIN.SCALES == before.TRAIN.SCALES


def test_yaml_array_keys_convert(tmp_path):
    cfg_from_file(_yml(tmp_path, "PIXEL_MEANS: [[[1, 2, 3]]]\n"))
    assert isinstance(cfg.PIXEL_MEANS, np.ndarray) and cfg.PIXEL_MEANS.dtype == np.float64
    np.testing.assert_array_equal(cfg.PIXEL_MEANS, [[[1.0, 2.0, 3.0]]])


def test_yaml_is_safe(tmp_path):
    with pytest.raises(SchemaError, match="invalid YAML"):
        cfg_from_file(_yml(tmp_path, "EXP_DIR: !!python/object/apply:os.getcwd []\n"))
    with pytest.raises(ConfigError, match="cannot read"):
        cfg_from_file(str(tmp_path / "missing.yml"))
    cfg_from_file(_yml(tmp_path, ""))          # an empty file changes nothing
    assert cfg.EXP_DIR == "default"


def test_cfg_from_list_parses_literals():
    cfg_from_list(["TRAIN.SCALES", "(800, 900)", "TRAIN.RPN_NMS_THRESH", "0.6",
                   "TRAIN.HAS_RPN", "True", "TRAIN.PROPOSAL_METHOD", "gt",
                   "EXP_DIR", "my_exp", "TRAIN.SNAPSHOT_INFIX", "'123'", "GPU_ID", "1"])
    assert cfg.TRAIN.SCALES == (800, 900) and cfg.TRAIN.RPN_NMS_THRESH == 0.6
    assert cfg.TRAIN.HAS_RPN is True and cfg.TRAIN.PROPOSAL_METHOD == "gt"
    assert cfg.EXP_DIR == "my_exp" and cfg.TRAIN.SNAPSHOT_INFIX == "123" and cfg.GPU_ID == 1


@pytest.mark.parametrize("items, match", [
    (["TRAIN.RPN_BATCHSIZE", "0.5"], "TRAIN.RPN_BATCHSIZE"),
    (["TRAIN.RPN_NMS_THRESH", "1"], "TRAIN.RPN_NMS_THRESH"),
    (["EXP_DIR", "123"], "EXP_DIR"),                  # a literal int is not a string
    (["TRAIN.NOPE", "1"], "TRAIN.NOPE"),
    (["NOPE.SUB", "1"], "NOPE.SUB"),
    (["EXP_DIR.SUB", "1"], "EXP_DIR.SUB"),
    (["TRAIN", "1"], "section"),
    (["TRAIN.SCALES"], "pairs"),
])
def test_cfg_from_list_errors(items, match):
    with pytest.raises(ConfigError, match=match.replace(".", r"\.")):
        cfg_from_list(items)


def test_get_output_dir(tmp_path):
    class Named:
        def __init__(self, name):
            self.name = name
    c = default_cfg()
    c.ROOT_DIR = str(tmp_path)
    out = get_output_dir(Named("voc_2007_trainval"), Named("ZF"), config=c)
    assert out == str(tmp_path / "output" / "default" / "voc_2007_trainval" / "ZF")
    assert os.path.isdir(out)


# ---------------------------------------------------------------------------- commands and nets
def test_command_cfg_applies_file_set_and_gpu_then_restores(tmp_path):
    """One parse and one restore policy for every command's --cfg/--set/--gpu."""
    yml = tmp_path / "a.yml"
    yml.write_text("EXP_DIR: fromfile\nTRAIN:\n  SCALES: !!python/tuple [400]\n")
    train = cfg.TRAIN
    with command_cfg(str(yml), [("TRAIN.SCALES", "(500,)")], ["EXP_DIR", "fromset"], gpu_id=1) as c:
        assert c is cfg and cfg.TRAIN is train
        assert cfg.TRAIN.SCALES == (500,) and cfg.EXP_DIR == "fromset" and cfg.GPU_ID == 1
    assert cfg.TRAIN.SCALES == (600,) and cfg.EXP_DIR == "default" and cfg.GPU_ID == 0
    with command_cfg(None, (), gpu_id=-1):       # a negative --gpu is the CPU: GPU_ID unchanged
        assert cfg.GPU_ID == 0
    with pytest.raises(ValueError):
        with command_cfg(None, [("EXP_DIR", "x")]):
            raise ValueError("the command failed")
    assert cfg.EXP_DIR == "default"              # restored on errors too


@pytest.mark.parametrize("kw, match", [
    (dict(cfg_file="missing.yml"), "config file not found"),
    (dict(extra=["EXP_DIR", "x"]), "go after --set"),
    (dict(set_pairs=[("EXP_DIR", "x")], extra=["TRAIN.SCALES", "--gpu"]), "unexpected option --gpu"),
    (dict(set_pairs=[("TRAIN.SCALES", "600")]), "TRAIN.SCALES"),
])
def test_command_cfg_errors_change_nothing(kw, match):
    with pytest.raises(ConfigError, match=match):
        with command_cfg(**kw):
            pass
    assert cfg.EXP_DIR == "default" and cfg.TRAIN.SCALES == (600,)


def test_override_list_flattens_set_pairs_and_trailing_words():
    assert override_list([("A", "1"), ("B", "2")], ["C", "3"]) == ["A", "1", "B", "2", "C", "3"]
    assert override_list() == []


def test_build_cfg_context_or_global():
    class Ctx:
        def __init__(self, extra):
            self.extra = extra

    assert build_cfg(Ctx({})) is cfg                      # nothing given: the global, now
    mine = default_cfg()
    assert build_cfg(Ctx({CONTEXT_KEY: mine})) is mine
    partial = build_cfg(Ctx({CONTEXT_KEY: {"TEST": {"RPN_POST_NMS_TOP_N": 7}}}))
    assert partial.TEST.RPN_POST_NMS_TOP_N == 7 and partial.TEST.RPN_PRE_NMS_TOP_N == 6000
    assert cfg.TEST.RPN_POST_NMS_TOP_N == 300
    with pytest.raises(ConfigError, match="RPN_POST_NMS_TOP_N"):
        build_cfg(Ctx({CONTEXT_KEY: {"TEST": {"RPN_POST_NMS_TOP_N": 7.0}}}))
    with pytest.raises(ConfigError, match="must be a config"):
        build_cfg(Ctx({CONTEXT_KEY: 3}))


# ---------------------------------------------------------------------------- param_str
def test_param_str_forms_of_the_corpus():
    keys = ("feat_stride", "scales", "ratios")
    assert parse_param_str("'feat_stride': 16", "rpn-data", keys) == {"feat_stride": 16}
    p = parse_param_str("'feat_stride': 16 \n'scales': !!python/tuple [4, 8, 16, 32]", "p", keys)
    assert p == {"feat_stride": 16, "scales": (4, 8, 16, 32)}
    assert isinstance(p["scales"], tuple)
    assert parse_param_str("", "p", keys) == {}
    assert parse_param_str("   \n", "p", keys) == {}
    assert parse_param_str("{'feat_stride': 8, 'scales': [2, 4]}", "p", keys) == \
        {"feat_stride": 8, "scales": [2, 4]}


def test_param_str_unknown_key_names_layer_and_allowed():
    with pytest.raises(SchemaError) as ei:
        parse_param_str("'feat_strid': 16", "rpn-data", ("feat_stride", "scales"))
    msg = str(ei.value)
    assert "rpn-data" in msg and "'feat_strid'" in msg and "feat_stride, scales" in msg


@pytest.mark.parametrize("text, match", [
    ("16", "mapping"),
    ("[1, 2]", "mapping"),
    ("'a': [1, 2", "invalid YAML"),
    ("'a': !!python/object/apply:os.getcwd []", "invalid YAML"),
    ("'scales': [1]", "must set 'feat_stride'"),
])
def test_param_str_errors(text, match):
    with pytest.raises(SchemaError, match=match) as ei:
        parse_param_str(text, "lay", ("a", "feat_stride", "scales"), required=("feat_stride",))
    assert "lay" in str(ei.value)
