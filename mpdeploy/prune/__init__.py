"""The prune stage: model + calibration data -> `pruned/` artifact."""
