#!/usr/bin/env bash
# The parts of a Kubernetes node that Debian packages: containerd, runc, the CNI plugins, the
# iptables and conntrack kube-proxy drives, the ipset kube-router's firewall drives, and
# mmdebstrap, which builds the images' root filesystems without Docker. Installs only what is
# missing; needs root (as CI runs).
set -euo pipefail

want=(containerd runc containernetworking-plugins iptables conntrack ipset mmdebstrap)
missing=()
for p in "${want[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0
echo "installing ${missing[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq >/dev/null
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
# The package starts a containerd of its own on the default socket; the test node runs its own.
if command -v systemctl >/dev/null && systemctl is-active -q containerd 2>/dev/null; then
  systemctl disable --now containerd >/dev/null 2>&1 || true
fi
