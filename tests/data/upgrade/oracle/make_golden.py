"""Make the golden files of tests/core/test_upgrade.py with real Caffe's upgrade_proto.

Run from the repository root with the project's venv (not in CI; needs the oracle build):

    .venv/bin/python tests/data/upgrade/oracle/make_golden.py

It compiles upgrade_driver.cpp against the oracle's _caffe.so (which holds all of Caffe,
upgrade_proto.cpp included) and runs every fixture through Caffe's UpgradeNetAsNeeded /
UpgradeSolverAsNeeded, each in its own process (a failed CHECK aborts):

- nets/*.prototxt          -> golden/nets/*.prototxt (Caffe's upgraded text) + expected.json
- errors/*.prototxt        -> expected.json: how Caffe fails (abort message / crash / ok)
- solvers/*.prototxt       -> golden/solvers/*.prototxt; solver_errors/* -> expected.json
- binaries/*.pb            -> V0/V1 caffemodels (named .pb: *.caffemodel is git-ignored),
                              written here from nets/ fixtures plus made-up blobs, then
                              golden/binaries/*.pb (Caffe's upgraded binary)
- ../shared/corpus         -> corpus_digests.json: per-layer hashes of Caffe's upgrade of
                              every corpus net (and solver), so no corpus text is copied.
"""
from __future__ import annotations

import hashlib
import json
import os
import pathlib
import re
import subprocess
import sys
import tempfile

import numpy as np
from google.protobuf import text_format

HERE = pathlib.Path(__file__).resolve().parent
DATA = HERE.parent
ROOT = DATA.parents[2]
ORACLE = pathlib.Path(os.environ.get("ORACLE_DIR", pathlib.Path.home() / ".cache/caffe-oracle"))
CORPUS = pathlib.Path(os.environ.get("CAFFE_COMPAT_CORPUS", ROOT.parent / "shared" / "corpus"))

sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "tests" / "core")]  # conftest, test_upgrade
for _name, _empty in (("expected.json", {k: {} for k in ("nets", "errors", "solvers",
                                                          "solver_errors", "binaries")}),
                      ("corpus_digests.json", {})):
    if not (DATA / _name).exists():  # first run: test_upgrade reads these at import
        (DATA / _name).write_text(json.dumps(_empty))
from caffe_compat.protos import caffe_pb2  # noqa: E402
from test_upgrade import net_digest, solver_digest, strip_fork_params  # noqa: E402


def build_driver(tmp: pathlib.Path) -> pathlib.Path:
    exe = tmp / "upgrade_driver"
    lib = ORACLE / "build" / "lib"
    cmd = ["g++", "-O1", "-std=c++14", "-DCPU_ONLY", f"-I{ORACLE}/build/include",
           f"-I{ORACLE}/src/include", str(HERE / "upgrade_driver.cpp"), "-o", str(exe),
           str(lib / "_caffe.so"), f"-Wl,-rpath,{lib}", "-lglog", "-lgflags", "-lprotobuf",
           "-lpython3.11", "-lboost_python311"]
    subprocess.run(cmd, check=True)
    return exe


def run(exe: pathlib.Path, mode: str, src: pathlib.Path, out: pathlib.Path) -> dict:
    """Run the driver; describe the outcome (applied steps, success, or how it died)."""
    if out.exists():
        out.unlink()
    p = subprocess.run([str(exe), mode, str(src), str(out)], capture_output=True, text=True,
                       env={**os.environ, "GLOG_minloglevel": "0"})
    res: dict = {"rc": p.returncode}
    m = re.search(r"^applied:(.*)$", p.stdout, re.M)
    if m:
        res["applied"] = m.group(1).split()
    m = re.search(r"^success: (\d)$", p.stdout, re.M)
    if m:
        res["success"] = m.group(1) == "1"
    lines = [l for l in p.stderr.splitlines() if re.match(r"^[EF]\d{4,8} ", l)]

    def strip(line: str) -> str:  # drop glog's "F1127 20:44:28.815061 11199 file.cpp:680] "
        return re.sub(r"^[EF]\d+ [\d:.]+ +\d+ \S+\] ", "", line)

    if p.returncode < 0 or p.returncode >= 128:
        res["outcome"] = "crash" if p.returncode in (-11, 139) else "abort"
    elif p.returncode == 65:
        res["outcome"] = "parse_failed"
    else:
        res["outcome"] = "ok"
    fatal = [strip(l) for l in lines if l[0] == "F"]
    if fatal:
        res["message"] = fatal[0]
    logged = [strip(l) for l in lines if l[0] == "E"]
    if logged:
        res["errors_logged"] = logged
    return res


def make_binaries() -> list:
    """V0 and V1 caffemodels with small made-up blobs (legacy 4-D dims and shape dims)."""
    out = []
    bdir = DATA / "binaries"
    bdir.mkdir(exist_ok=True)
    rng = np.random.default_rng(0)

    def blob(shape, legacy):
        b = caffe_pb2.BlobProto()
        if legacy:
            b.num, b.channels, b.height, b.width = ((1,) * (4 - len(shape)) + tuple(shape))
        else:
            b.shape.dim.extend(shape)
        b.data.extend(rng.standard_normal(int(np.prod(shape))).astype(np.float32).tolist())
        return b

    for name, legacy, shapes in (
            ("v0_net", True, {"conv1": [(4, 3, 3, 3), (4,)], "conv1b": [(2, 3, 1, 1), (2,)],
                              "conv2": [(4, 2, 3, 3)], "conv3": [(4, 4, 1, 1), (4,)],
                              "fc": [(5, 8), (5,)]}),
            ("v1_deploy", False, {"conv": [(2, 3, 3, 3), (2,)]})):
        net = text_format.Parse((DATA / "nets" / f"{name}.prototxt").read_text(),
                                caffe_pb2.NetParameter())
        for conn in net.layers:
            lname = conn.layer.name if conn.HasField("layer") else conn.name
            target = conn.layer.blobs if conn.HasField("layer") else conn.blobs
            for s in shapes.get(lname, []):
                target.add().CopyFrom(blob(s, legacy))
        path = bdir / f"{name}_weights.pb"
        path.write_bytes(net.SerializeToString(deterministic=True))
        out.append(path)
    return out


def corpus_files() -> list:
    files = []
    for p in sorted(CORPUS.rglob("*")):
        if p.suffix in (".prototxt", ".pt") and p.is_file():
            files.append(p)
    return files


def parse_as(text: str, cls):
    try:
        return text_format.Parse(text, cls())
    except text_format.ParseError:
        return None


def main() -> None:
    expected: dict = {"nets": {}, "errors": {}, "solvers": {}, "solver_errors": {},
                      "binaries": {}}
    gold = DATA / "golden"
    for sub in ("nets", "solvers", "binaries"):
        (gold / sub).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as t:
        tmp = pathlib.Path(t)
        exe = build_driver(tmp)
        for f in sorted((DATA / "nets").glob("*.prototxt")):
            res = run(exe, "net-text", f, gold / "nets" / f.name)
            assert res["outcome"] == "ok", (f, res)
            expected["nets"][f.stem] = res
        for f in sorted((DATA / "errors").glob("*.prototxt")):
            res = run(exe, "net-text", f, tmp / "out")
            expected["errors"][f.stem] = res
        for f in sorted((DATA / "solvers").glob("*.prototxt")):
            res = run(exe, "solver-text", f, gold / "solvers" / f.name)
            assert res["outcome"] == "ok", (f, res)
            expected["solvers"][f.stem] = res
        for f in sorted((DATA / "solver_errors").glob("*.prototxt")):
            expected["solver_errors"][f.stem] = run(exe, "solver-text", f, tmp / "out")
        for f in make_binaries():
            res = run(exe, "net-binary", f, gold / "binaries" / f.name)
            assert res["outcome"] == "ok", (f, res)
            expected["binaries"][f.stem] = res
        (DATA / "expected.json").write_text(json.dumps(expected, indent=1, sort_keys=True)
                                            + "\n")

        digests: dict = {}
        if CORPUS.is_dir():
            for f in corpus_files():
                rel = str(f.relative_to(CORPUS))
                text = f.read_text(errors="replace")
                entry: dict = {"sha256": hashlib.sha256(f.read_bytes()).hexdigest()}
                if parse_as(text, caffe_pb2.NetParameter) is not None:
                    res = run(exe, "net-text", f, tmp / "out")
                    if res["outcome"] == "parse_failed":
                        # the oracle's schema lacks the Fast R-CNN fork's layer params:
                        # upgrade the net without them (the test strips them likewise)
                        (tmp / "stripped.prototxt").write_text(strip_fork_params(text))
                        res = run(exe, "net-text", tmp / "stripped.prototxt", tmp / "out")
                        entry["stripped"] = True
                    entry.update(kind="net", oracle=res)
                    if res["outcome"] == "ok":
                        up = parse_as((tmp / "out").read_text(), caffe_pb2.NetParameter)
                        entry["digest"] = net_digest(up)
                elif (solver := parse_as(text, caffe_pb2.SolverParameter)) is not None:
                    res = run(exe, "solver-text", f, tmp / "out")
                    entry.update(kind="solver", oracle=res)
                    if res["outcome"] == "ok":
                        up = parse_as((tmp / "out").read_text(), caffe_pb2.SolverParameter)
                        entry["digest"] = solver_digest(up)
                    if solver.HasField("net_param"):
                        res = run(exe, "solver-netparam", f, tmp / "out")
                        entry["net_param_oracle"] = res
                        if res["outcome"] == "ok":
                            up = parse_as((tmp / "out").read_text(), caffe_pb2.NetParameter)
                            entry["net_param_digest"] = net_digest(up)
                else:
                    continue
                digests[rel] = entry
        # one line per corpus file keeps the committed file small and diffable
        lines = [f" {json.dumps(k)}: {json.dumps(v, sort_keys=True, separators=(',', ':'))}"
                 for k, v in sorted(digests.items())]
        (DATA / "corpus_digests.json").write_text("{\n" + ",\n".join(lines) + "\n}\n")
    print("wrote", DATA / "expected.json", "and", DATA / "corpus_digests.json")


if __name__ == "__main__":
    main()
