#!/usr/bin/env bash
# Builds the flowmap container image from the release binary, without
# pulling a base image: the image holds the binary, exactly the libraries
# `ldd` lists (and the dynamic loader), Debian's CA certificates, and
# nothing else (no shell, no package manager).
#
#   bash scripts/image.sh            # -> target/image/flowmap-<version>.oci.tar
#   IMAGE_DIR=/some/dir bash scripts/image.sh
#
# The archive's image is named localhost/flowmap:<version>, the chart's
# default image. Its labels carry the version and git commit that
# `flowmap --version` prints. buildah works on private vfs storage in a
# temporary directory, removed on exit: nothing is left in the machine's
# container storage.
set -euo pipefail
cd "$(dirname "$0")/.."

for tool in buildah ldd; do
  command -v "$tool" >/dev/null || { echo "image: $tool not found: run scripts/setup.sh" >&2; exit 1; }
done
certs=/etc/ssl/certs/ca-certificates.crt
[ -f "$certs" ] || { echo "image: $certs missing: run scripts/setup.sh (ca-certificates)" >&2; exit 1; }

# The release binary; cargo does nothing when it is up to date.
cargo build --release --locked >&2
bin="${CARGO_TARGET_DIR:-target}/release/flowmap"

# "flowmap 0.1.0 (commit 0123456789ab)"
read -r _ version _ commit < <("$bin" --version)
commit=${commit%)}
[ -n "$version" ] && [ -n "$commit" ] || { echo "image: cannot read the version of $bin" >&2; exit 1; }

# Where the source lives: FLOWMAP_SOURCE, else the git remote, else the
# project's home.
source=${FLOWMAP_SOURCE:-$(git remote get-url origin 2>/dev/null || echo https://github.com/coordimap/flowmap)}

out_dir=${IMAGE_DIR:-target/image}
mkdir -p "$out_dir"
archive="$out_dir/flowmap-$version.oci.tar"
name="localhost/flowmap:$version"

work=$(mktemp -d /var/tmp/flowmap-image.XXXXXX)
b=(buildah --root "$work/root" --runroot "$work/run" --storage-driver vfs)
ctr=""
cleanup() {
  [ -n "$ctr" ] && "${b[@]}" rm "$ctr" >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT

# The files of the image: path in the image = path on this host.
files=("$bin:/usr/local/bin/flowmap" "$certs:$certs")
while read -r lib; do
  files+=("$lib:$lib")
done < <(env -u LD_LIBRARY_PATH ldd "$bin" | awk '
  $2 == "=>" && $3 ~ /^\// { print $3; next }
  $1 ~ /^\// { print $1 }
  $2 == "=>" && $3 == "not" { print "MISSING " $1 > "/dev/stderr"; exit 1 }')

ctr=$("${b[@]}" from --quiet scratch)
root=$("${b[@]}" mount "$ctr")
for f in "${files[@]}"; do
  src=${f%%:*} dst=${f#*:}
  mode=0755
  [ "$src" = "$certs" ] && mode=0644
  # Symlinks on the host (the loader, lib*.so.N) become the files they name.
  install -D -m "$mode" "$(readlink -f "$src")" "$root$dst"
done
"${b[@]}" umount "$ctr" >/dev/null

"${b[@]}" config \
  --created-by "scripts/image.sh" \
  --entrypoint '["/usr/local/bin/flowmap"]' \
  --cmd run \
  --env SSL_CERT_FILE="$certs" \
  --label org.opencontainers.image.title=flowmap \
  --label org.opencontainers.image.description="eBPF network-flow agent for Coordimap's flows data source" \
  --label org.opencontainers.image.version="$version" \
  --label org.opencontainers.image.revision="$commit" \
  --label org.opencontainers.image.source="$source" \
  --label org.opencontainers.image.licenses=Apache-2.0 \
  "$ctr"

rm -f "$archive"
# The commit's time as the image's: the same commit builds the same image.
stamp=$(git log -1 --format=%ct 2>/dev/null || date +%s)
"${b[@]}" commit --quiet --format oci --timestamp "$stamp" "$ctr" "oci-archive:$archive:$name" >/dev/null
echo "image: $archive ($name, $(du -h "$archive" | cut -f1))" >&2
echo "$archive"
