#!/usr/bin/env bash
# End-to-end on a kind cluster, for machines WITH a Docker engine. Not run in our CI (it has no
# Docker engine; the e2e/ pytest tier runs a real kube-apiserver instead, without a kubelet).
#
# Builds the kubetask image, loads it into kind, `helm install`s the chart, applies a function
# and a task, and waits for `kubectl get tasks` to show it Succeeded.
set -euo pipefail
cd "$(dirname "$0")/.."
CLUSTER="${CLUSTER:-kubetask-e2e}"
IMAGE="kubetask:e2e"

docker build -f operator/Dockerfile -t "$IMAGE" .
kind get clusters | grep -qx "$CLUSTER" || kind create cluster --name "$CLUSTER"
kind load docker-image "$IMAGE" --name "$CLUSTER"
helm upgrade --install kubetask charts/kubetask --namespace kubetask --create-namespace \
  --set image.repository=kubetask --set image.tag=e2e --set image.pullPolicy=Never \
  --set nats.persistence.enabled=false --wait --timeout 5m
kubectl -n kubetask rollout status deployment/kubetask-operator --timeout=3m
kubectl create namespace team-a --dry-run=client -o yaml | kubectl apply -f -
kubectl -n team-a apply -f - <<'YAML'
apiVersion: kubetask.io/v1alpha1
kind: TaskFunction
metadata: {name: double}
spec:
  command: ["python3", "-c", "import json,sys; print(json.dumps(json.load(sys.stdin) * 2))"]
---
apiVersion: kubetask.io/v1alpha1
kind: Task
metadata: {name: double-21}
spec: {function: double, payload: 21}
YAML
kubectl -n team-a wait task/double-21 --for=jsonpath='{.status.phase}'=Succeeded --timeout=3m
kubectl -n team-a get tasks
test "$(kubectl -n team-a get task double-21 -o jsonpath='{.status.result}')" = "42"
echo "kind end-to-end passed"
