#!/usr/bin/env bash
# one short device check of this session's fix (not kept): build _C for sm_90 and run the launcher refusals
set -u
OUT=${OUT:-./gpu_out}; mkdir -p "$OUT"
for w in pytest; do python3 -m pip install -q --no-index --find-links .wheels "$w" > "$OUT/pip.log" 2>&1; done
python3 -c "import setuptools, sys; sys.exit(int(setuptools.__version__.split('.')[0]) < 77)" 2>/dev/null \
  || python3 -m pip install -q --no-index --find-links .wheels "setuptools>=77" >> "$OUT/pip.log" 2>&1
SECONDS=0
timeout 230 env MAX_JOBS=16 TORCH_CUDA_ARCH_LIST=9.0 LORA_EXT_CUDA=1 LORA_EXT_SIM=0 \
  python3 -m pip install --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1; echo "build rc=$? in ${SECONDS}s"
nm -C lora_ext/_C*.so | grep -E "_M_insert<long>|__ostream_insert" | head -5 > "$OUT/nm.txt" 2>&1; cat "$OUT/nm.txt"
g++ --version | head -1; which g++ gcc
timeout 90 python3 -m pytest -q -p no:cacheprovider -o addopts="" tests/test_merge.py::test_cuda_merge_rejects_bad_input_before_writing tests/test_launcher_refusals.py 2>&1 | tail -25 | tee "$OUT/tests.log"
