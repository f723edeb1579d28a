"""Deployment in one room: deploy policies (policies), the deployer (deployer), the speed
check of deploy-if-faster (speed), and converging a serving replica on the store's desired
state (converge)."""
