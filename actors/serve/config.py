"""The serving application's config: one typed mapping for ``bmray serve`` and ``serve run``.

Why typed: a misspelt ``max_queued_requests`` silently falling back to "unbounded" is how a
service grows latency without limit. ``from_dict`` refuses unknown keys naming the key path, and
``check_serve_config`` checks what the file points at (index artifacts, the API key's env var)
before Ray or Serve start. The same mapping is the ``args`` of the Serve config file's app
builder (``bmray.actors.serve.app:build_app``), so both entry points read one schema.
Ray Serve's knobs per deployment: ``max_ongoing_requests`` (in flight per replica),
``max_queued_requests`` (waiting per caller; beyond it Serve answers 503 with ``Retry-After``)
and ``autoscaling_config`` (replicas between min and max, aiming at ``target_ongoing_requests``
per replica).
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from bmray.actors.serve.generate import locate_generator
from bmray.models.retrieval.artifact import index_manifest
from bmray.models.retrieval.manifest import IndexArtifactError
from bmray.models.typed_config import ConfigError, check_int, check_positive, from_dict

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
INDEX_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


@dataclass(frozen=True)
class AutoscalingSection:
    """Ray Serve ``autoscaling_config``: replicas follow the ongoing requests per replica."""

    min_replicas: int = 1
    max_replicas: int = 2
    target_ongoing_requests: float = 2.0

    def __post_init__(self) -> None:
        check_int("autoscaling.min_replicas", self.min_replicas, minimum=0)
        check_int("autoscaling.max_replicas", self.max_replicas, minimum=max(1, self.min_replicas))
        check_positive("autoscaling.target_ongoing_requests", self.target_ongoing_requests)


@dataclass(frozen=True)
class DeploymentSection:
    """One deployment's replicas, CPUs and bounded queue (``replicas`` or ``autoscaling``)."""

    num_cpus: float = 1.0
    replicas: int | None = None
    autoscaling: AutoscalingSection | None = None
    max_ongoing_requests: int = 8
    max_queued_requests: int = 64
    retry_after_s: float = 1.0

    def __post_init__(self) -> None:
        check_positive("num_cpus", self.num_cpus)
        if self.replicas is not None:
            check_int("replicas", self.replicas, minimum=1)
            if self.autoscaling is not None:
                raise ConfigError("replicas: set either replicas or autoscaling, not both")
        check_int("max_ongoing_requests", self.max_ongoing_requests, minimum=1)
        check_int("max_queued_requests", self.max_queued_requests, minimum=1)
        check_positive("retry_after_s", self.retry_after_s, allow_zero=True)

    def options(self) -> dict[str, Any]:
        """The ``Deployment.options(...)`` these settings mean."""
        opts: dict[str, Any] = {
            "ray_actor_options": {"num_cpus": self.num_cpus},
            "max_ongoing_requests": self.max_ongoing_requests,
            "max_queued_requests": self.max_queued_requests,
            "backpressure_config": {"status_code": 503, "retry_after_s": self.retry_after_s},
        }
        if self.autoscaling is not None:
            a = self.autoscaling
            opts["autoscaling_config"] = {"min_replicas": a.min_replicas,
                                          "max_replicas": a.max_replicas,
                                          "target_ongoing_requests": a.target_ongoing_requests}
        else:
            opts["num_replicas"] = self.replicas or 1
        return opts


@dataclass(frozen=True)
class BatchedSection(DeploymentSection):
    """A model deployment: ``@serve.batch`` gathers up to ``max_batch_size`` requests, waiting
    at most ``batch_wait_timeout_s`` for the batch to fill."""

    max_batch_size: int = 16
    batch_wait_timeout_s: float = 0.005

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("max_batch_size", self.max_batch_size, minimum=1)
        check_positive("batch_wait_timeout_s", self.batch_wait_timeout_s, allow_zero=True)


@dataclass(frozen=True)
class EmbedSection(BatchedSection):
    enabled: bool = True


@dataclass(frozen=True)
class GenerateSection(BatchedSection):
    """Text generation from a GPT checkpoint: ``experiment`` is its pre-training YAML (the
    tokenizer and ``checkpoint.dir``, as ``bmray generate --config``); ``checkpoint`` another
    checkpoint directory or root. Off by default: no checkpoint ships with the repository."""

    enabled: bool = False
    experiment: str | None = None
    checkpoint: str | None = None
    max_batch_size: int = 8

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.enabled, bool):
            raise ConfigError(f"enabled: expected true or false, got {self.enabled!r}")
        if self.enabled and not self.experiment:
            raise ConfigError("experiment: generation is enabled but names no pre-training "
                              "experiment (e.g. configs/poetry.yaml after bmray pretrain)")


@dataclass(frozen=True)
class ServeAppConfig:
    """``host``/``port``: where Serve's HTTP proxy listens (``bmray serve``; a Serve config file
    sets them in its ``http_options``). ``api_key_env`` names the environment variable holding
    the API key (never the key itself); binding anything but localhost without one needs
    ``allow_unauthenticated: true``. ``indexes``: {name: index artifact directory}."""

    host: str = "127.0.0.1"
    port: int = 8000
    api_key_env: str | None = None
    allow_unauthenticated: bool = False
    indexes: dict[str, str] = field(default_factory=dict)
    ingress: DeploymentSection = field(default_factory=lambda: DeploymentSection(
        num_cpus=0.25, max_ongoing_requests=64, max_queued_requests=256))
    search: BatchedSection = field(default_factory=lambda: BatchedSection(num_cpus=1.0))
    embed: EmbedSection = field(default_factory=EmbedSection)
    generate: GenerateSection = field(default_factory=GenerateSection)

    def __post_init__(self) -> None:
        check_int("port", self.port, minimum=0, maximum=65535)
        if self.api_key_env is not None and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*",
                                                             self.api_key_env):
            raise ConfigError(f"api_key_env: {self.api_key_env!r} is not an environment "
                              f"variable name (the key itself never goes in the config)")
        if (self.host not in LOCAL_HOSTS and self.api_key_env is None
                and not self.allow_unauthenticated):
            raise ConfigError(f"api_key_env: host {self.host!r} is not localhost, so an API key "
                              f"is required (or set allow_unauthenticated: true)")
        for name in self.indexes:
            if not INDEX_NAME.fullmatch(name):
                raise ConfigError(f"indexes.{name}: an index name is letters, digits, '_', "
                                  f"'-' or '.' (at most 64)")
        if not self.indexes and not self.embed.enabled and not self.generate.enabled:
            raise ConfigError("indexes: nothing to serve (no indexes, embed.enabled and "
                              "generate.enabled false)")


SECTIONS = {"ingress": DeploymentSection, "search": BatchedSection, "embed": EmbedSection,
            "generate": GenerateSection}


def serve_config_from_dict(raw: Any, path: str = "config") -> ServeAppConfig:
    """Build the config; every ConfigError names the full key path (``config.search.replicas``)."""
    if isinstance(raw, dict):
        raw = dict(raw)
        for section, cls in SECTIONS.items():
            if section in raw and not isinstance(raw[section], cls):
                where = f"{path}.{section}"
                try:
                    raw[section] = from_dict(cls, raw[section], where)
                except ConfigError as exc:
                    if str(exc).startswith(where):
                        raise
                    raise ConfigError(f"{where}.{exc}") from exc
    try:
        return from_dict(ServeAppConfig, raw, path)
    except ConfigError as exc:
        if str(exc).startswith(path):
            raise
        raise ConfigError(f"{path}.{exc}") from exc


def resolve_paths(cfg: ServeAppConfig, base: str | Path | None = None) -> ServeAppConfig:
    """The config with every index directory absolute (relative to ``base``, default cwd)."""
    base = Path(base) if base is not None else Path.cwd()
    indexes = {name: str((base / d).resolve()) for name, d in cfg.indexes.items()}
    g = cfg.generate
    generate = replace(g, **{key: str((base / getattr(g, key)).resolve())
                             for key in ("experiment", "checkpoint") if getattr(g, key)})
    return replace(cfg, indexes=indexes, generate=generate)


def check_serve_config(cfg: ServeAppConfig) -> None:
    """What the config points at: every index artifact intact, the generation checkpoint and
    tokenizer (a GPT's), the API key's variable set."""
    for name, directory in cfg.indexes.items():
        try:
            index_manifest(directory)
        except IndexArtifactError as exc:
            raise ConfigError(f"indexes.{name}: {exc}") from exc
    if cfg.generate.enabled:
        locate_generator(cfg.generate.experiment or "", cfg.generate.checkpoint)
    api_key(cfg)


def api_key(cfg: ServeAppConfig) -> str | None:
    """The API key from the environment variable ``cfg.api_key_env`` (None when not set up)."""
    if cfg.api_key_env is None:
        return None
    key = os.environ.get(cfg.api_key_env, "")
    if len(key) < 16:
        raise ConfigError(f"api_key_env: environment variable {cfg.api_key_env} must hold the "
                          f"API key (at least 16 characters); it is "
                          f"{'unset' if cfg.api_key_env not in os.environ else 'too short'}")
    return key
