"""Core: errors, atomic writes, artifacts and their kinds, names, progress, the stage runner (no torch)."""
