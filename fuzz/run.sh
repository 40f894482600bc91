#!/usr/bin/env bash
# Bounded fuzzing of every cargo-fuzz target in fuzz/ (what each covers: fuzz/README.md).
#
#   bash fuzz/run.sh [SECONDS_PER_TARGET] [TARGET...]     default: 60 s, all targets
#
# For each target: replays fuzz/regressions/TARGET/* (inputs that once found a bug), then
# fuzzes for SECONDS_PER_TARGET starting from the seeds in fuzz/corpus/TARGET plus the
# working corpus of earlier runs (fuzz/work/corpus/TARGET, git-ignored; new inputs go
# there, so the committed seeds stay small). Targets run one after another.
# Exits 1 if any target crashed or broke a property, printing the input's path and the
# command that reproduces it; 0 otherwise. A summary table (executions, coverage, time)
# is printed at the end and kept in fuzz/work/summary.md.
#
# Not part of CI: it takes minutes and its results vary from run to run.
#
# Environment:
#   FUZZ_SANITIZER   address (default) or none. The library forbids unsafe code, so
#                    AddressSanitizer only guards the dependencies; "none" runs about
#                    twice as many inputs per second.
#   CARGO_BUILD_JOBS cargo's own: fewer build jobs when others share the machine.
set -uo pipefail
cd "$(dirname "$0")/.."

seconds=${1:-60}
shift || true
all_targets=(token_response token_response_json token_response_mapped config headers path)
targets=("$@")
[ ${#targets[@]} -eq 0 ] && targets=("${all_targets[@]}")
sanitizer=${FUZZ_SANITIZER:-address}
case "$seconds" in '' | *[!0-9]*) echo "usage: bash fuzz/run.sh [SECONDS_PER_TARGET] [TARGET...]" >&2; exit 2 ;; esac

if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "== installing cargo-fuzz"
  cargo install cargo-fuzz --locked || exit 1
fi

# cargo-fuzz builds with nightly-only rustc flags (-Zsanitizer=..., the sancov passes'
# -Z options). This machine has one stable toolchain and no nightly can be fetched;
# RUSTC_BOOTSTRAP=1 makes stable rustc accept the -Z flags (the sanitizer runtimes ship
# with the stable standard library). On a nightly toolchain the variable changes nothing.
export RUSTC_BOOTSTRAP=1

# -a: debug assertions and overflow checks on, so an arithmetic overflow that a release
# build would silently wrap is reported as a crash.
build_flags=(-a -s "$sanitizer")

echo "== building fuzz targets (sanitizer: $sanitizer)"
cargo fuzz build "${build_flags[@]}" || exit 1

mkdir -p fuzz/work/logs
summary=fuzz/work/summary.md
{
  echo "| target | executions | exec/s | cov | ft | corpus | seconds | result |"
  echo "|---|---|---|---|---|---|---|---|"
} >"$summary"
failed=0

for t in "${targets[@]}"; do
  if [ ! -f "fuzz/fuzz_targets/$t.rs" ]; then
    echo "unknown target $t (known: ${all_targets[*]})" >&2
    exit 2
  fi
  log=fuzz/work/logs/$t.log
  result=ok

  shopt -s nullglob
  regressions=(fuzz/regressions/"$t"/*)
  shopt -u nullglob
  if [ ${#regressions[@]} -gt 0 ]; then
    echo "== $t: replaying ${#regressions[@]} regression input(s)"
    for r in "${regressions[@]}"; do
      if ! cargo fuzz run "${build_flags[@]}" "$t" "$r" -- -runs=1 >"$log.regression" 2>&1; then
        echo "!! $t: regression input still fails: $r"
        grep -m1 -A1 "panicked at" "$log.regression" | sed 's/^/   /'
        echo "   reproduce: RUSTC_BOOTSTRAP=1 cargo fuzz run ${build_flags[*]} $t $r"
        result="regression fails"
        failed=1
      fi
    done
  fi

  echo "== $t: fuzzing for ${seconds}s (log: $log)"
  mkdir -p "fuzz/work/corpus/$t"
  cargo fuzz run "${build_flags[@]}" "$t" "fuzz/work/corpus/$t" "fuzz/corpus/$t" -- \
    -max_total_time="$seconds" -max_len=8192 -timeout=10 -rss_limit_mb=2048 \
    -print_final_stats=1 >"$log" 2>&1
  rc=$?

  execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
  speed=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -1)
  last=$(grep -E '^#[0-9]+.*cov: ' "$log" | tail -1)
  cov=$(sed -n 's/.*cov: \([0-9]*\).*/\1/p' <<<"$last")
  ft=$(sed -n 's/.* ft: \([0-9]*\).*/\1/p' <<<"$last")
  corp=$(sed -n 's/.* corp: \([0-9]*\).*/\1/p' <<<"$last")
  took=$(sed -n 's/^Done [0-9]* runs in \([0-9]*\) second.*/\1/p' "$log" | tail -1)
  if [ $rc -ne 0 ]; then
    artifact=$(sed -n 's/.*Test unit written to \(.*\)$/\1/p' "$log" | tail -1)
    echo "!! $t: FAILED (exit $rc) after ${execs:-?} executions"
    { grep -m1 -A1 "panicked at" "$log"; grep -m1 -E "ERROR: (libFuzzer|AddressSanitizer)" "$log"; } | sed 's/^/   /'
    if [ -n "$artifact" ]; then
      echo "   input: $artifact"
      echo "   reproduce: RUSTC_BOOTSTRAP=1 cargo fuzz run ${build_flags[*]} $t $artifact"
      echo "   minimize:  RUSTC_BOOTSTRAP=1 cargo fuzz tmin ${build_flags[*]} $t $artifact"
    else
      echo "   no input was written; see $log"
    fi
    result="FAILED: ${artifact:-see $log}"
    failed=1
  else
    echo "   ok: ${execs:-?} executions (${speed:-?}/s), cov ${cov:-?}, ft ${ft:-?}, corpus ${corp:-?}, ${took:-?}s"
  fi
  echo "| $t | ${execs:-?} | ${speed:-?} | ${cov:-?} | ${ft:-?} | ${corp:-?} | ${took:-?} | $result |" >>"$summary"
done

echo
echo "== summary (${seconds}s per target, sanitizer $sanitizer)"
cat "$summary"
exit $failed
