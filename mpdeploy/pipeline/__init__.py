"""Pipeline: the only code that knows the order of the chain (build, sweep)."""
