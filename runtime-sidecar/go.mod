module kubetask.io/runtime-sidecar

go 1.24
