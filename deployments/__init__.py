"""Deployment helpers: the work pools (desctune-local, process; desctune-docker and desctune-kubernetes for the
images of docker/) and the deployments of prefect.yaml."""
