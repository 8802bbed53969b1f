"""Ray Tune sweeps over adaptation: the search space (space.py), the trial (trainable.py), the
sweep-wide callbacks (callbacks.py) and the Pareto report (report.py)."""
