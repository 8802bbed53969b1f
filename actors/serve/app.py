"""Assemble the Serve application from a ``ServeAppConfig``; the Serve config file's builder.

``build_app(args)`` is the ``import_path`` of configs/serve_app.yaml (``serve run`` /
``serve deploy``): ``args`` is the same mapping as ``bmray serve``'s YAML, checked the same way
(ConfigError naming the key) before anything is deployed. The API key is read here, from the
environment variable the config names, and bound into the ingress (it never appears in a config
file or in the deployment's options).
"""
from __future__ import annotations

from typing import Any

from ray.serve import Application

from bmray.actors.serve.config import (ServeAppConfig, api_key, check_serve_config,
                                       resolve_paths, serve_config_from_dict)
from bmray.actors.serve.deployments import EmbedDeployment, SearchDeployment
from bmray.actors.serve.generate import GenerateDeployment, locate_generator
from bmray.actors.serve.ingress import Ingress


def app_from_config(cfg: ServeAppConfig, search_cls: Any = SearchDeployment,
                    embed_cls: Any = EmbedDeployment) -> Application:
    """The bound application (ingress → search, embed, generate); ``*_cls`` swap a deployment
    (tests)."""
    check_serve_config(cfg)
    search = None
    if cfg.indexes:
        s = cfg.search
        search = search_cls.options(**s.options()).bind(
            dict(cfg.indexes), s.num_cpus, s.max_batch_size, s.batch_wait_timeout_s)
    embed = None
    if cfg.embed.enabled:
        e = cfg.embed
        embed = embed_cls.options(**e.options()).bind(e.num_cpus, e.max_batch_size,
                                                       e.batch_wait_timeout_s)
    generate = None
    if cfg.generate.enabled:
        g = cfg.generate
        checkpoint, tokenizer = locate_generator(g.experiment or "", g.checkpoint)
        generate = GenerateDeployment.options(**g.options()).bind(
            checkpoint, tokenizer, g.num_cpus, g.max_batch_size, g.batch_wait_timeout_s)
    return Ingress.options(**cfg.ingress.options()).bind(search, embed, sorted(cfg.indexes),
                                                         api_key(cfg), generate)


def build_app(args: dict[str, Any]) -> Application:
    """Ray Serve app builder: ``args`` as in configs/serve_local.yaml (host/port unused here:
    the Serve config file's ``http_options`` set them). Relative index paths are taken from the
    directory the builder runs in."""
    return app_from_config(resolve_paths(serve_config_from_dict(args, "args")))
