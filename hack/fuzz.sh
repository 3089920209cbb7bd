#!/usr/bin/env bash
# Runs kite's fuzz targets (fuzz/fuzz_targets, cargo-fuzz + libFuzzer with AddressSanitizer),
# each for SECONDS, from its committed seeds (fuzz/seeds/<target>) and the corpus earlier runs
# grew (fuzz/corpus/<target>, not committed). Prints executions and coverage per target; fails
# on the first crash, leak, timeout (a unit taking over 10 s) or out-of-memory, naming the
# input that caused it (fuzz/artifacts/<target>/).
#   hack/fuzz.sh [SECONDS] [TARGET...]     (default 60 s, every target)
#   hack/fuzz.sh --list
# The test command runs every target briefly; longer runs are for people (README: Fuzzing).
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here/fuzz"
command -v cargo >/dev/null || { [ -f "$HOME/.cargo/env" ] && . "$HOME/.cargo/env"; }
command -v cargo >/dev/null || { echo "fuzz: cargo is missing (install Rust with rustup)" >&2; exit 1; }

targets_all=$(sed -n 's/^name = "\([a-z_]*\)"$/\1/p' Cargo.toml | grep -v '^kite-fuzz$')
if [ "${1:-}" = "--list" ]; then echo "$targets_all"; exit 0; fi
secs=${1:-60}
case $secs in
  ''|*[!0-9]*) echo "fuzz: SECONDS must be a number, not '$secs' (hack/fuzz.sh [SECONDS] [TARGET...])" >&2; exit 2 ;;
esac
shift || true
targets=${*:-$targets_all}
for t in $targets; do
  grep -qx "$t" <<<"$targets_all" || { echo "fuzz: no target '$t' (hack/fuzz.sh --list)" >&2; exit 2; }
done

# libFuzzer's instrumentation needs a nightly compiler (cargo-fuzz passes -Z flags).
if ! rustup run nightly rustc --version >/dev/null 2>&1; then
  echo "fuzz: no nightly Rust toolchain (rustup toolchain list): cargo-fuzz needs one" >&2
  exit 1
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "fuzz: installing cargo-fuzz"
  cargo install cargo-fuzz --locked -q
fi

# Release code with debug assertions (overflow checks), AddressSanitizer for the unsafe code
# underneath (YAML, protobuf, compression).
flags=(--debug-assertions --sanitizer address)
echo "fuzz: building $(echo "$targets" | wc -w) targets"
if [ "$targets" = "$targets_all" ]; then
  cargo +nightly fuzz build "${flags[@]}"
else
  for t in $targets; do cargo +nightly fuzz build "${flags[@]}" "$t"; done
fi

report=()
failed=0
for t in $targets; do
  mkdir -p "corpus/$t" "artifacts/$t"
  log=$(mktemp)
  set +e
  cargo +nightly fuzz run "${flags[@]}" "$t" "corpus/$t" "seeds/$t" -- \
    -max_total_time="$secs" -timeout=10 -rss_limit_mb=2048 -max_len=65536 \
    -print_final_stats=1 -artifact_prefix="artifacts/$t/" >"$log" 2>&1
  rc=$?
  # The log of a run that ended early (a crash on a seed) may lack the lines read here.
  execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
  rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -1)
  last=$(grep -E '^#[0-9]+' "$log" | tail -1)
  cov=$(sed -n 's/.* cov: \([0-9]*\).*/\1/p' <<<"$last")
  ft=$(sed -n 's/.* ft: \([0-9]*\).*/\1/p' <<<"$last")
  corp=$(sed -n 's/.* corp: \([0-9]*\).*/\1/p' <<<"$last")
  report+=("$(printf '%-22s %6s %12s %9s %7s %7s %6s' "$t" "$secs" "${execs:-?}" "${rate:-?}" "${cov:-?}" "${ft:-?}" "${corp:-?}")")
  if [ $rc -ne 0 ]; then
    failed=1
    echo "fuzz: $t FAILED (exit $rc); the input is in fuzz/artifacts/$t/:" >&2
    grep -E 'ERROR|panicked|SUMMARY|Test unit written|timeout|out-of-memory' "$log" | head -20 >&2
    ls -t "artifacts/$t" | head -3 >&2
  fi
  set -e
  rm -f "$log"
done

echo
echo "fuzz results (libFuzzer + ASan, $(nproc) cores, one target at a time)"
printf '%-22s %6s %12s %9s %7s %7s %6s\n' target secs executions exec/s cov ft corpus
printf '%s\n' "${report[@]}"
exit $failed
