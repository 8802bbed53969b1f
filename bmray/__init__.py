"""bmray: big models on Ray, from pre-training to serving.

Installed, the project claims this one namespace. The repository keeps the top-level folders
``models/``, ``actors/``, ``cluster/`` and ``jobs/``; pyproject.toml maps them to ``bmray.models``,
``bmray.actors``, ``bmray.cluster`` and ``bmray.jobs``, so a user's own ``models/`` package never
shadows ours. Layering: models ← actors ← cluster ← jobs (docs/architecture.md).
"""
__version__ = "0.1.0"
