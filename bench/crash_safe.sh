# Sourced by bench/gpu_check.sh: pytest that survives a crash.
#
# A crash in an extension (the second device run: a segfault in lora_ext._C at 88% of the CUDA tests) kills
# pytest, and every test after it goes unrun. crash_safe_pytest reruns the rest: tests/conftest.py writes the
# node id of each test as it starts (set-up, call, teardown) to the file $LORA_EXT_CURRENT_TEST names, so after
# a crash that file names the test it was in (parametrized case, class and fixture crashes included), and
# pytest runs again on the tests collected after it (--resume-after), at most 3 times. The crash stays a
# failure. One time cap covers the first run and the reruns. Where a debugger is given (GDB=cuda-gdb on the
# GPU machine) and time allows, the first crashing test alone runs once more under it, for the C++ backtrace.
#
# Needs from the sourcing script: PY, capped (a time cap cut to the budget left), BUDGET and SECONDS. A rerun needs
# at least CRASH_SAFE_MIN_RERUN_S seconds left of the cap (30).
#   crash_safe_pytest LOG CAP PYTEST_ARGS...   -> pytest's exit status, or 1 after a crash the rerun passed

crash_safe_pytest() {
  local log=$1 rc crashed tries=0 crashes=0 current left
  local deadline=$((SECONDS + $(capped "$2")))
  shift 2
  local resume=()
  current=$(mktemp)
  : > "$log"
  while :; do
    : > "$current"
    left=$((deadline - SECONDS))
    LORA_EXT_CURRENT_TEST="$current" timeout $((left > 5 ? left : 5)) "$PY" -m pytest "$@" "${resume[@]}" \
      >> "$log" 2>&1
    rc=$?
    # 124: the time cap; 137: killed (the cap's KILL, or memory); above 128 otherwise: a signal (139 SIGSEGV)
    if [ $rc -le 128 ] || [ $rc -eq 137 ]; then break; fi
    crashed=$(cat "$current")
    if [ -z "$crashed" ]; then
      echo "CRASHED (exit $rc) outside any test (collection or start-up)" | tee -a "$log"; break
    fi
    crashes=$((crashes + 1))
    echo "CRASHED (exit $rc) in $crashed" | tee -a "$log"
    if [ -n "${GDB:-}" ] && [ $((BUDGET - SECONDS)) -ge 200 ] && [ $crashes -eq 1 ]; then
      echo "== $GDB backtrace of $crashed" >> "$log"
      timeout "$(capped 60)" "$GDB" -q -batch -ex run -ex bt --args "$PY" -m pytest -q -p no:cacheprovider "$crashed" \
        >> "$log" 2>&1 || true
    fi
    tries=$((tries + 1))
    if [ $tries -gt 3 ] || [ $((deadline - SECONDS)) -lt "${CRASH_SAFE_MIN_RERUN_S:-30}" ]; then
      echo "not rerun (crash $tries, $((deadline - SECONDS)) s left): the tests after $crashed did not run" \
        | tee -a "$log"
      break
    fi
    echo "== the tests after $crashed" | tee -a "$log"
    resume=(--resume-after "$crashed")
  done
  rm -f "$current"
  [ $crashes -eq 0 ] || [ $rc -ne 0 ] || rc=1
  return $rc
}
