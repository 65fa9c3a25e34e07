"""Training: the run config, the one loop (``trainer``) and what it sets up, its AdamW and schedule, the optimizer
step inside backward, evaluation, checkpoints, experiment trackers and stop signals. The loop names no method
and no engine: it talks to an ``Adapted`` (methods/) and an ``Engine`` (engines/)."""
