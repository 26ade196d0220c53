#!/usr/bin/env bash
# Build kt-runtime, the static binary of the runtime sidecar and its entry, with the local Go
# toolchain and the standard library only (no module downloads). Cached outside the repository,
# keyed by its sources and the Go version:
#   ${KUBETASK_E2E_CACHE:-$HOME/.cache/kubetask-e2e}/runtime/kt-runtime-<key>
# Prints the binary's path on its last line.
set -euo pipefail
cd "$(dirname "$0")"
CACHE="${KUBETASK_E2E_CACHE:-$HOME/.cache/kubetask-e2e}/runtime"
export GOTOOLCHAIN=local CGO_ENABLED=0 GOOS=linux GOARCH=amd64
key=$( (go version; cat go.mod ./*.go) | sha256sum | cut -c1-16)
out="$CACHE/kt-runtime-$key"
if [ ! -x "$out" ]; then
  mkdir -p "$CACHE"
  go build -trimpath -ldflags=-s -o "$out.partial" .
  find "$CACHE" -name 'kt-runtime-*' ! -name "kt-runtime-$key*" -delete
  mv "$out.partial" "$out"
fi
echo "$out"
