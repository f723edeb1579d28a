"""Fine-tuning jobs: intake of run specs, the job store, the scheduler and the control plane."""
