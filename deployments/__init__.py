"""Deployment helpers: the desctune-local process work pool and the deployments of prefect.yaml."""
