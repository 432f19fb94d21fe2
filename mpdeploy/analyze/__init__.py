"""The analyze stage: Marchenko-Pastur fit of every prunable layer -> `spectra/` artifact."""
