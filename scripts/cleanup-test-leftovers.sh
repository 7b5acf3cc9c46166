#!/usr/bin/env bash
# Removes namespaces and links that a killed test run may have left; the
# tests' own guards remove them otherwise. flowmap_testkit::net names them
# fm<kind><pid>n<seq>: namespaces fmt*, in the root namespace veth ends fmh*,
# veth pairs fmv* (and fmv*p), bridges fmb* (fmp* live inside the namespaces).
for ns in $(ip netns list 2>/dev/null | awk '{print $1}' | grep -E '^fmt[0-9]+n[0-9]+$' || true); do
  ip netns del "$ns" 2>/dev/null || true
done
for l in $(ls /sys/class/net 2>/dev/null | grep -E '^fm[hvb][0-9]+n[0-9]+p?$' || true); do
  ip link del "$l" 2>/dev/null || true
done
# The image test's podman state (tests/image.rs): its containers outlive a
# killed test, so stop them, then remove the storage and the cgroups.
for dir in "${TMPDIR:-/tmp}"/flowmap-podman-*; do
  [ -d "$dir" ] || continue
  if command -v podman >/dev/null 2>&1; then
    p=(podman --root "$dir/root" --runroot "$dir/run" --tmpdir "$dir/tmp" --storage-driver vfs
       --runtime runc --cgroup-manager cgroupfs --events-backend none)
    "${p[@]}" rm --all --force --time 0 >/dev/null 2>&1 || true
    "${p[@]}" rmi --all --force >/dev/null 2>&1 || true
  fi
  grep -F " $dir/" /proc/self/mountinfo | awk '{print $5}' | sort -r | xargs -r -n1 umount -l 2>/dev/null || true
  rm -rf "$dir"
done
rm -rf "${TMPDIR:-/tmp}"/flowmap-image-cfg-* "${TMPDIR:-/tmp}"/flowmap-image-state-* \
  "${TMPDIR:-/tmp}"/flowmap-oci-* "${TMPDIR:-/tmp}"/flowmap-unit-*
for cg in /sys/fs/cgroup/flowmap-test-* /sys/fs/cgroup/*/flowmap-test-*; do
  [ -d "$cg" ] && find "$cg" -depth -type d -exec rmdir {} \; 2>/dev/null
done
exit 0
