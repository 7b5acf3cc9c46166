#!/usr/bin/env bash
# Sets up the machine, builds flowmap and runs the agent (as root) on the
# example server configuration, printing each interval's flows as JSON lines.
# Extra arguments go to `flowmap run` (e.g. --duration 1m).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cargo build --release --locked
exec ./target/release/flowmap run --config examples/server.yaml --output flows "$@"
