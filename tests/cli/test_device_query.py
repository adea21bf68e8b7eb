"""``caffe-compat device-query`` (Caffe's ``caffe device_query``)."""
from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner

from caffe_compat.cli.main import main


def test_without_cuda_one_line_and_exit_2():
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    r = CliRunner().invoke(main, ["device-query"])
    assert r.exit_code == 2
    assert r.output.strip().splitlines()[-1] == \
        "error: no CUDA device is available (caffe-compat runs on the CPU here)"


@pytest.mark.gpu
def test_reports_the_card():
    r = CliRunner().invoke(main, ["device-query", "--gpu", "0"])
    assert r.exit_code == 0, r.output
    assert torch.cuda.get_device_name(0) in r.output and "Total global memory" in r.output
    r = CliRunner().invoke(main, ["device-query", "--gpu", str(torch.cuda.device_count())])
    assert r.exit_code == 2 and "does not exist" in r.output
