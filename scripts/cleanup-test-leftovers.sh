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
exit 0
