"""The Kubernetes operator (kopf): one module per kind, plus the Deployments it owns.

Every handler is idempotent: it states what should be true and makes it so, so an operator
restart (kopf resumes every object) changes nothing that was already right.
"""
