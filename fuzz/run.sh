#!/usr/bin/env bash
# Builds every fuzz target once, then runs each for SECONDS (default 60) from
# the committed seed corpus, printing libFuzzer's execution count per target.
# Fails if any target crashes, hangs (an input taking over 10 s) or leaks.
#
#   fuzz/run.sh [SECONDS]
#   FUZZ_RUNS=10000000 fuzz/run.sh 3600   # stop each target at 10M executions
#   FUZZ_TARGETS="csr jwt" fuzz/run.sh 60  # only these targets
#
# Needs the nightly toolchain and cargo-fuzz (`cargo install cargo-fuzz
# --version 0.13.2 --locked`). New inputs libFuzzer finds go to a scratch
# corpus (FUZZ_WORK, default a temporary directory), never into fuzz/corpus;
# a crashing input is kept in fuzz/artifacts/<target>/.
set -euo pipefail
cd "$(dirname "$0")"
seconds="${1:-60}"
all_targets=(csr jwt policy_yaml sds workload_api entries trust_bundle proxy_detect cgroup)
read -r -a targets <<<"${FUZZ_TARGETS:-${all_targets[*]}}"
for t in "${targets[@]}"; do
  [[ " ${all_targets[*]} " == *" $t "* ]] || { echo "unknown fuzz target: $t" >&2; exit 2; }
done

cargo +nightly fuzz build
triple="$(rustc +nightly -vV | sed -n 's/^host: //p')"
bin_dir="${CARGO_TARGET_DIR:-$(pwd)/target}/$triple/release"

work="${FUZZ_WORK:-$(mktemp -d)}"
# 0 (the default) or unset: no cap; libFuzzer's -runs=-1 means run until the time is up.
runs="${FUZZ_RUNS:-0}"
[ "$runs" -gt 0 ] || runs=-1
failed=()
printf '%-14s %14s %8s  %s\n' target executions exec/s result
for t in "${targets[@]}"; do
  mkdir -p "$work/$t" "artifacts/$t"
  log="$work/$t.log"
  status=ok
  # -max_len above the default 4096 so whole policy files and ClientHellos fit.
  if ! "$bin_dir/$t" -max_total_time="$seconds" -runs="$runs" -timeout=10 -max_len=16384 \
      -print_final_stats=1 -artifact_prefix="artifacts/$t/" \
      "$work/$t" "corpus/$t" >"$log" 2>&1; then
    status=CRASH
    failed+=("$t")
  fi
  execs="$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n1)"
  rate="$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -n1)"
  printf '%-14s %14s %8s  %s\n' "$t" "${execs:-?}" "${rate:-?}" "$status"
  if [ "$status" != ok ]; then
    grep -E 'ERROR|panicked|SUMMARY|Test unit written' "$log" | head -n 20 || true
  fi
done
if [ ${#failed[@]} -gt 0 ]; then
  echo "fuzz targets failed: ${failed[*]} (logs in $work, inputs in fuzz/artifacts/)" >&2
  exit 1
fi
