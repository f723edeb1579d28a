"""Deployment in one room: deploy policies and the deployer, the speed check of
deploy-if-faster, and converging a serving replica on the store's desired state."""
