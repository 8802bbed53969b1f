"""Pipeline parallelism: schedules, bubble and partitioner (schedule.py), a model's stage
(stage.py) and the engine that runs it (engine.py); docs/pipeline_parallel.md."""
