"""``caffe-compat detect``: py-faster-rcnn's ``tools/demo.py`` on images of one's own.

Options and progress lines only; the work (detection, drawing, ``detections.json``) is
:mod:`caffe_compat.frcnn.detect`, whose docstring describes the output.
"""
from __future__ import annotations

import os
from typing import Any, Dict, List

import click

from caffe_compat.cli.main import friendly, main, writes
from caffe_compat.cli.options import (batch_option, cfg_options, check_file, config_scope, gpu_option,
                                      precision_option, python_layers_option, speed_options)

@main.command("detect")
@click.argument("images", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("--model", "--def", "model", required=True, type=click.Path(dir_okay=False),
              help="Faster R-CNN TEST net with an RPN (inputs data, im_info).")
@click.option("--weights", "--net", "weights", required=True, type=click.Path(dir_okay=False),
              help="Trained weights (.caffemodel, .pt or .safetensors).")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Folder for the drawn images and detections.json.")
@cfg_options(trailing=False)
@click.option("--thresh", type=float, default=0.8, show_default=True, help="Keep detections scoring >= this.")
@click.option("--nms", "nms_thresh", type=float, default=0.3, show_default=True, help="Per-class NMS IoU.")
@click.option("--classes", "classes_spec", default=None,
              help="VOC (default), comma-separated class names, or a file with one per line "
                   "(background first or implied).")
@gpu_option()
@batch_option()
@precision_option()
@speed_options
@python_layers_option()
@writes("out_dir")
@friendly
def detect_command(images, model, weights, out_dir, cfg_file, set_pairs, thresh, nms_thresh, classes_spec,
                   gpu, batch, precision, cuda_graphs, compile_backend, allow_python_layers):
    """Detect objects in IMAGES and write them, boxes drawn, to --out."""
    from caffe_compat.device import resolve_device
    from caffe_compat.errors import DataError, GraphError
    from caffe_compat.frcnn.detect import detect_images, parse_classes, write_detections_json
    from caffe_compat.net import Net

    check_file(model, "net definition", "--model")
    check_file(weights, "weights file", "--weights")
    for p in images:                       # fail before the (slow) net build
        if not os.path.isfile(p):
            raise DataError("image file not found", where=p)
    classes = parse_classes(classes_spec)
    with config_scope(cfg_file, set_pairs, (), gpu) as cfg:
        cfg.TEST.HAS_RPN = True            # the demo's proposals come from the net's RPN
        device = resolve_device(gpu)
        from caffe_compat.precision import check_precision
        check_precision(precision, device)
        net = Net(model, phase="test", device=device, allow_python_layers=allow_python_layers or None)
        for note in net.load_weights(weights):
            click.echo(f"note: {note}", err=True)
        if "im_info" not in net.input_names:
            raise GraphError("detect needs a Faster R-CNN net with an RPN (inputs data and im_info); "
                             f"this net's inputs are: {', '.join(net.input_names) or 'none'}")
        sync = (lambda: __import__("torch").cuda.synchronize(device)) if device.type == "cuda" else None
        from caffe_compat.cuda_graph import fast_runner

        runner = fast_runner(net, cuda_graphs=cuda_graphs, compile_backend=compile_backend)
        records: List[Dict[str, Any]] = []
        for path, rec in zip(images, detect_images(runner, images, out_dir, classes, thresh=thresh,
                                                   nms_thresh=nms_thresh, sync=sync,
                                                   batch=batch, precision=precision)):
            records.append(rec)
            found = rec["detections"]
            summary = ", ".join(f"{d['class']} {d['score']:.3f}" for d in found[:5])
            more = f", ... ({len(found)} in all)" if len(found) > 5 else ""
            click.echo(f"{path}: {len(found)} detections in {rec['time_s']:.3f}s for {rec['num_proposals']} "
                       f"proposals{': ' + summary + more if found else ''} -> {rec['output']}")
        json_path = write_detections_json(out_dir, records, model=model, weights=weights, classes=classes,
                                          thresh=thresh, nms_thresh=nms_thresh)
        click.echo(f"wrote {len(records)} images and {json_path}")
