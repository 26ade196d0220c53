#!/usr/bin/env bash
# Build kube-router from the Go module proxy, for the test node's NetworkPolicy enforcement
# only (its firewall; the node's routes and Services stay the bridge plugin's and kube-proxy's).
# Never shipped: v2.1.0 is the one version the proxy serves here, and it is used against this
# machine's own test pods and nothing else.
#
# Cached outside the repository, keyed by version:
#   ${KUBETASK_E2E_CACHE:-$HOME/.cache/kubetask-e2e}/kube-router-<v>/bin
# A second run with the same version does nothing. Prints the binary's path on its last line.
set -euo pipefail

KUBE_ROUTER_VERSION="${KUBE_ROUTER_VERSION:-v2.1.0}"
CACHE="${KUBETASK_E2E_CACHE:-$HOME/.cache/kubetask-e2e}"
BIN="$CACHE/kube-router-${KUBE_ROUTER_VERSION}/bin"
if [ ! -x "$BIN/kube-router" ]; then
  echo "building kube-router into $BIN" >&2
  mkdir -p "$BIN"
  GOTOOLCHAIN=local GOBIN="$BIN" go install -trimpath -ldflags "-s -w" \
    "github.com/cloudnativelabs/kube-router/v2/cmd/kube-router@${KUBE_ROUTER_VERSION}"
fi
echo "$BIN/kube-router"
