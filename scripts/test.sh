#!/usr/bin/env bash
# Sets up the machine and runs the whole test suite, privileged tests
# included (they need root; under CI=true they must run, not skip).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/cleanup-test-leftovers.sh
trap 'bash scripts/cleanup-test-leftovers.sh' EXIT
cargo build --locked --all-targets 2>&1 | tail -n 3
# Unit tests, parser (BPF_PROG_TEST_RUN), config, end to end.
cargo test --locked -- --test-threads=2
