#!/usr/bin/env bash
# Build a real Kubernetes control plane (kube-apiserver, kube-controller-manager, kube-scheduler,
# kubectl), a node's kubelet and kube-proxy, CoreDNS, etcd and helm from the Go module proxy,
# for the Kubernetes test tier. No Docker needed.
#
# Binaries are cached outside the repository, keyed by version:
#   ${KUBETASK_E2E_CACHE:-$HOME/.cache/kubetask-e2e}/k8s-<v>_etcd-<v>_helm-<v>_coredns-<v>/bin
# A second run with the same versions does nothing. Prints the bin directory on its last line.
set -euo pipefail

K8S_VERSION="${K8S_VERSION:-v1.34.4}"
ETCD_VERSION="${ETCD_VERSION:-v3.6.16}"
HELM_VERSION="${HELM_VERSION:-v3.19.5}"
COREDNS_VERSION="${COREDNS_VERSION:-v1.14.7}"
CACHE="${KUBETASK_E2E_CACHE:-$HOME/.cache/kubetask-e2e}"
OUT="$CACHE/k8s-${K8S_VERSION}_etcd-${ETCD_VERSION}_helm-${HELM_VERSION}_coredns-${COREDNS_VERSION}"
BIN="$OUT/bin"
export GOTOOLCHAIN=local GOFLAGS=-mod=mod

kube_cmds=(kube-apiserver kube-controller-manager kube-scheduler kubectl kubelet kube-proxy)
want=("${kube_cmds[@]}" etcd helm coredns)
missing=()
for b in "${want[@]}"; do [ -x "$BIN/$b" ] || missing+=("$b"); done
if [ ${#missing[@]} -eq 0 ]; then echo "$BIN"; exit 0; fi
mkdir -p "$BIN" "$OUT/src"
echo "building ${missing[*]} into $BIN" >&2

minor="${K8S_VERSION#v1.}"; minor="${minor%%.*}"
staging_version="v0.${K8S_VERSION#v1.}"

build_kubernetes() {
  local mod="$OUT/src/kubernetes"
  mkdir -p "$mod"
  local gomod
  gomod=$(go mod download -json "k8s.io/kubernetes@${K8S_VERSION}" | python3 -c 'import json,sys; print(json.load(sys.stdin)["GoMod"])')
  {
    echo "module kubetask.io/e2e/kubernetes"
    echo
    echo "go 1.24"
    echo
    echo "require k8s.io/kubernetes ${K8S_VERSION}"
    echo
    # k8s.io/kubernetes replaces its staging modules with ./staging/...; pin each to its release.
    grep -E '^\s*k8s.io/[a-z0-9-]+ => ./staging/' "$gomod" | awk -v v="$staging_version" '{print "replace " $1 " => " $1 " " v}'
  } > "$mod/go.mod"
  cat > "$mod/tools.go" <<'EOF'
//go:build tools

package tools

import (
	_ "k8s.io/kubernetes/cmd/kube-apiserver"
	_ "k8s.io/kubernetes/cmd/kube-controller-manager"
	_ "k8s.io/kubernetes/cmd/kube-scheduler"
	_ "k8s.io/kubernetes/cmd/kubectl"
	_ "k8s.io/kubernetes/cmd/kubelet"
	_ "k8s.io/kubernetes/cmd/kube-proxy"
)
EOF
  (cd "$mod" && go mod tidy -e >/dev/null 2>&1 || true; go mod download)
  local pkgs=(k8s.io/component-base/version k8s.io/client-go/pkg/version)
  local ld="-s -w"
  for p in "${pkgs[@]}"; do
    ld+=" -X $p.gitVersion=${K8S_VERSION} -X $p.gitMajor=1 -X $p.gitMinor=${minor} -X $p.gitTreeState=clean"
  done
  for cmd in "${kube_cmds[@]}"; do
    [ -x "$BIN/$cmd" ] && continue
    (cd "$mod" && go build -tags selinux,notest -trimpath -ldflags "$ld" -o "$BIN/$cmd" "k8s.io/kubernetes/cmd/$cmd")
    echo "built $cmd" >&2
  done
}

build_etcd() {
  local mod="$OUT/src/etcd"
  mkdir -p "$mod"
  cat > "$mod/go.mod" <<EOF
module kubetask.io/e2e/etcd

go 1.24

require go.etcd.io/etcd/server/v3 ${ETCD_VERSION}
EOF
  cat > "$mod/tools.go" <<'EOF'
//go:build tools

package tools

import _ "go.etcd.io/etcd/server/v3"
EOF
  (cd "$mod" && go mod tidy -e >/dev/null 2>&1 || true; go build -trimpath -ldflags "-s -w" -o "$BIN/etcd" go.etcd.io/etcd/server/v3)
  echo "built etcd" >&2
}

build_coredns() {
  GOBIN="$BIN" go install -trimpath -ldflags "-s -w" "github.com/coredns/coredns@${COREDNS_VERSION}"
  echo "built coredns" >&2
}

build_helm() {
  GOBIN="$BIN" go install -trimpath -ldflags "-s -w" "helm.sh/helm/v3/cmd/helm@${HELM_VERSION}"
  echo "built helm" >&2
}

for b in "${missing[@]}"; do
  case "$b" in
    kube*) if [ -z "${built_kubernetes:-}" ]; then build_kubernetes; built_kubernetes=1; fi ;;
    etcd) build_etcd ;;
    helm) build_helm ;;
    coredns) build_coredns ;;
  esac
done
echo "$BIN"
