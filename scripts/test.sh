#!/usr/bin/env bash
# Sets up the machine and runs the whole test suite, privileged tests
# included (they need root; under CI=true they must run, not skip).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/cleanup-test-leftovers.sh
trap 'bash scripts/cleanup-test-leftovers.sh' EXIT
# Formatting is part of the suite: unformatted code fails it.
cargo fmt --check
cargo build --locked --workspace --all-targets 2>&1 | tail -n 3
# Unit tests, parser (BPF_PROG_TEST_RUN), config, end to end.
log=$(mktemp)
set +e
cargo test --locked --workspace --no-fail-fast -- --test-threads=2 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e
passed=$(grep -Eo '^test result: .* ([0-9]+) passed' "$log" | grep -Eo '[0-9]+ passed' | awk '{s+=$1} END {print s+0}')
failed=$(grep -Eo '[0-9]+ failed;' "$log" | awk '{s+=$1} END {print s+0}')
rm -f "$log"
echo "summary: $passed passed, $failed failed"
exit "$status"
