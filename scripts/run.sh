#!/usr/bin/env bash
# Sets up the machine, builds flowmap and runs the agent (as root) on the
# example server configuration: every non-loopback interface, the local
# store in /var/lib/flowmap/flowmap.db and the live map on
# http://127.0.0.1:9464/ . Extra arguments go to `flowmap run`
# (e.g. --output flows to also print each interval's flows).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cargo build --release --locked
exec ./target/release/flowmap run --config examples/server.yaml "$@"
