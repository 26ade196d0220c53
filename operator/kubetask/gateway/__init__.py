"""The HTTP edge: authentication, admission, the task API and the audit queries."""
