"""Runners: where a job's trainer runs (a local process group, or a Kubernetes Job)."""
