# Sourced by bench/gpu_check.sh: pytest that survives a crash.
#
# A crash in an extension (the second device run: a segfault in lora_ext._C at 88% of the CUDA tests) kills
# pytest, and every test after it goes unrun. crash_safe_pytest reruns the rest: it finds the crashing test in
# the dump Python's faulthandler writes (pytest enables it; the current thread is dumped last, innermost frame
# first, so the log's last "File .../tests/test_*.py, line N in test_*" frame is the test) and runs pytest again
# on the tests collected after it (--resume-after, tests/conftest.py), at most 3 times. The crash stays a
# failure. Where a debugger is given (GDB=cuda-gdb on the GPU machine) and time allows, the crashing test alone
# runs once more under it, for the C++ backtrace.
#
# Needs from the sourcing script: PY, capped (a time cap cut to the budget left), BUDGET and SECONDS.
#   crash_safe_pytest LOG CAP PYTEST_ARGS...   -> pytest's exit status, or 1 after a crash the rerun passed

# The node id (tests/file.py::test_name, a prefix of every parametrized case) of the test a faulthandler dump
# in the log was in; fails when there is none (a crash outside a test).
crashed_test() {
  grep -oE 'File "[^"]*/tests/test_[A-Za-z0-9_]+\.py", line [0-9]+ in test_[A-Za-z0-9_]+' "$1" | tail -1 \
    | sed -E 's#^File "[^"]*/(tests/test_[A-Za-z0-9_]+\.py)", line [0-9]+ in (test_[A-Za-z0-9_]+)$#\1::\2#' | grep .
}

crash_safe_pytest() {
  local log=$1 cap=$2 rc crashed tries=0 crashes=0
  shift 2
  local resume=()
  : > "$log"
  while :; do
    timeout "$(capped "$cap")" "$PY" -m pytest "$@" "${resume[@]}" >> "$log" 2>&1
    rc=$?
    # 124: the time cap; 137: killed (the cap's KILL, or memory); above 128 otherwise: a signal (139 SIGSEGV)
    if [ $rc -le 128 ] || [ $rc -eq 137 ]; then break; fi
    if ! crashed=$(crashed_test "$log"); then
      echo "CRASHED (exit $rc) outside any test" | tee -a "$log"; break
    fi
    crashes=$((crashes + 1))
    echo "CRASHED (exit $rc) in $crashed" | tee -a "$log"
    if [ -n "${GDB:-}" ] && [ $((BUDGET - SECONDS)) -ge 200 ] && [ $crashes -eq 1 ]; then
      echo "== $GDB backtrace of $crashed" >> "$log"
      timeout "$(capped 60)" "$GDB" -q -batch -ex run -ex bt --args "$PY" -m pytest -q -p no:cacheprovider "$crashed" \
        >> "$log" 2>&1 || true
    fi
    tries=$((tries + 1))
    if [ $tries -gt 3 ] || [ $((BUDGET - SECONDS)) -lt 30 ]; then
      echo "not rerun (crash $tries, $((BUDGET - SECONDS)) s left): the tests after $crashed did not run" | tee -a "$log"
      break
    fi
    echo "== the tests after $crashed" | tee -a "$log"
    resume=(--resume-after "$crashed")
  done
  [ $crashes -eq 0 ] || [ $rc -ne 0 ] || rc=1
  return $rc
}
