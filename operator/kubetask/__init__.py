"""kubetask: asynchronous tasks on NATS JetStream, on Kubernetes or embedded on one machine."""

__version__ = "0.1.0"
