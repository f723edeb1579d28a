"""Deployment in one room: deploy policies (``policies``), the deployer (``deployer``) and
the deployment history it keeps (``history``, a table of the control service's database),
a model's desired serving state (``desired``, ``deployment.json``), the speed check of
deploy-if-faster (``speed``), and converging a serving replica on that state (``converge``)."""
