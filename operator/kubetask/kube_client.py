"""The official Kubernetes client, configured once: in a pod from its service account, elsewhere
from the kubeconfig. Its calls block, so callers run them in a worker thread."""

from __future__ import annotations

import threading

import urllib3
from kubernetes import config

_lock = threading.Lock()
_loaded = False


def load() -> None:
    global _loaded
    with _lock:
        if _loaded:
            return
        # A kubeconfig that asks to skip TLS verification gets it; no warning per request.
        urllib3.disable_warnings(urllib3.exceptions.InsecureRequestWarning)
        try:
            config.load_incluster_config()  # type: ignore[no-untyped-call]
        except config.ConfigException:
            config.load_kube_config()  # type: ignore[no-untyped-call]
        _loaded = True
