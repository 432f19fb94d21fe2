"""`mpdeploy sweep`: many ordinary chains (prune -> distill -> export -> engine -> audit) run as Ray Tune
trials, and the `sweep/` artifact that names the fastest one within an accuracy budget.

    space.py     the search space (--grid), the objective (--objective) and each trial's stage configs
    store.py     where trials meet: one folder per step, keyed by its config and its upstream step
    trial.py     one trial: the screen (pruned accuracy) or the whole chain, as a row (runs on a Ray worker)
    cluster.py   Ray: start or attach, probe the artifact store on every node, resources per step
    tune_run.py  Ray Tune: grid or Optuna search, resources, retries, one log line per finished trial
    choice.py    the dense baseline, the Pareto front, the choice and why every other trial lost
    report.py    sweep.json, sweep.md, frontier.png and the manifest; reading a verified sweep back
    pipeline.py  run_sweep: the phases (screen, promote, full chains) and the artifact

The pipeline layer: it calls the stages; no stage imports it.
"""
