#!/usr/bin/env bash
# Fills .wheels/ with the test dependencies that the GPU machine lacks (it has no network), for
# Python 3.12 on x86_64; carry .wheels with the device run.
set -euo pipefail
cd "$(dirname "$0")/.."
PIP=${PIP:-.venv/bin/pip}
"$PIP" download -q --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 \
  --platform manylinux_2_17_x86_64 --platform any -d .wheels \
  loralib==0.1.2 pytest pluggy iniconfig packaging pygments hypothesis sortedcontainers attrs "setuptools>=77"
ls .wheels
