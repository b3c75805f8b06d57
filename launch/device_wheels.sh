#!/usr/bin/env bash
# Wheels for launch/device_check.sh on a GPU machine that has jax, flax, optax, torch and timm but
# no internet (run this where pip works; it fills .whl/, which git ignores):
#   bash launch/device_wheels.sh            ml-collections: all the train/matmul benchmarks need
#   bash launch/device_wheels.sh --input    also grain, array_record and TFDS's readers, for the
#                                           input-pipeline benchmark on a prepared folder
# The wheels are for CPython 3.12 on x86-64 Linux; set PYTHON_VERSION for another Python.
# Packages the machine already has (absl-py, PyYAML, etils, numpy, protobuf, cloudpickle,
# psutil, pyarrow, requests, tqdm, wrapt) are not fetched: two versions of one stop the install.
set -euo pipefail
packages=(ml-collections)
if [ "${1:-}" = "--input" ]; then
  packages+=(grain array-record portpicker tensorflow-datasets dm-tree immutabledict promise
             simple-parsing docstring-parser tensorflow-metadata googleapis-common-protos
             termcolor toml)
fi
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 \
         manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
  platforms+=(--platform "$p")
done
mkdir -p .whl
python3 -m pip download --no-deps --only-binary=:all: --python-version "${PYTHON_VERSION:-3.12}" \
  --implementation cp "${platforms[@]}" -d .whl "${packages[@]}"
ls -l .whl
