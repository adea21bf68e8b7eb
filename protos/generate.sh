#!/usr/bin/env bash
# Regenerate protos/caffe.proto (from shared/reference fact tables) and protos/caffe_pb2.py.
# protoc comes from a pinned grpcio-tools (1.62.3 = protobuf 4.25 code generator): its output
# uses the _builder API with no runtime-version check, so one generated module imports under
# every protobuf from 4.21 to 7.x (checked with -W error on 4.25.9 and 7.36.2).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
ref=${1:-$here/../../shared/reference}
venv=${GEN_VENV:-/tmp/caffe-compat-protoc}
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
"$venv/bin/python" -m pip install -q "grpcio-tools==1.62.3"
python3 "$here/make_proto.py" "$ref" > "$here/caffe.proto"
cd "$here" && "$venv/bin/python" -m grpc_tools.protoc -I. --python_out=. caffe.proto
echo "wrote $here/caffe.proto and $here/caffe_pb2.py"
