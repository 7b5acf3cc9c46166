#!/usr/bin/env bash
# Removes namespaces and veths that a killed test run may have left
# (tests name theirs fmt*/fmh*, the Kubernetes test fmk*); the tests' own guards remove them otherwise.
for ns in $(ip netns list 2>/dev/null | awk '{print $1}' | grep -E '^(fmt[0-9]+n[0-9]+|fmk[0-9]+[a-z])$' || true); do
  ip netns del "$ns" 2>/dev/null || true
done
for l in $(ls /sys/class/net 2>/dev/null | grep -E '^(fmh[0-9]+n[0-9]+|fmk[0-9]+[a-z]h|fmkb[0-9]+)$' || true); do
  ip link del "$l" 2>/dev/null || true
done
exit 0
