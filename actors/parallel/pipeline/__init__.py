"""Pipeline parallelism: schedules (GPipe, 1F1B), stages and the engine (Huang et al., 2019;
Narayanan et al., 2021)."""
