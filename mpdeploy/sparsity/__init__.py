"""Sparsity: N:M patterns, prunable layers, MP spectra, budgets, saliency, OBS, restore, ToMe, permute."""
