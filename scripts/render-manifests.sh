#!/usr/bin/env bash
# Renders deploy/kubernetes/flowmap.yaml from the Helm chart with its
# default values, so the plain manifests and the chart never differ.
# tests/manifests.rs checks that the committed file is this output.
set -euo pipefail
cd "$(dirname "$0")/.."
{
  cat <<'HEAD'
# flowmap as a DaemonSet, rendered from deploy/helm/flowmap by
# scripts/render-manifests.sh (do not edit by hand).
# Before applying: put the cluster UID into the ConfigMap
#   kubectl get namespace kube-system -o jsonpath='{.metadata.uid}'
# and the collector's API key into the Secret (or leave the endpoint empty).
apiVersion: v1
kind: Namespace
metadata:
  name: flowmap
HEAD
  helm template flowmap deploy/helm/flowmap --namespace flowmap \
    --set clusterUID=REPLACE-WITH-CLUSTER-UID
} > "${OUT:-deploy/kubernetes/flowmap.yaml}"
