"""The dispatcher: consumes function queues, claims tasks, runs attempts on an executor and
applies the per-task policies (one module each, behind `policy.Policy`)."""
