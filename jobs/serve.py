"""Serve the models over HTTP: ``bmray serve --config configs/serve_local.yaml``.

    bmray serve --config configs/serve_local.yaml [--set port=8080 --set indexes.cisi=runs/x]
    bmray serve --config configs/serve_local.yaml --dry-run     # check only, start nothing

Starts a Ray Serve application (a FastAPI ingress; search over index artifacts, MiniLM
embeddings) on an embedded local Ray, or on the cluster named by ``--address`` / RAY_ADDRESS,
prints its URL and blocks until Ctrl-C (then the app is deleted; an embedded Ray stops). The
config (actors/serve/config.py) is checked whole before Ray starts: unknown keys and bad values
are a ConfigError naming the key (exit 2), as are a missing or corrupt index artifact and an API
key variable that is unset. ``serve run configs/serve_app.yaml`` deploys the same app from a
Ray Serve config file. Relative index paths are relative to the current directory.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from typing import Sequence

from ray import serve
from ray.serve import RunTarget

from bmray.actors.serve.app import app_from_config
from bmray.actors.serve.config import (ServeAppConfig, check_serve_config, resolve_paths,
                                       serve_config_from_dict)
from bmray.cluster import connect, shutdown
from bmray.models.typed_config import ConfigError, apply_overrides, load_yaml

APP_NAME = "bmray"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="bmray serve", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, help="serving YAML (see configs/serve_local.yaml)")
    ap.add_argument("--set", dest="overrides", action="append", default=[],
                    metavar="KEY=VALUE", help="override a config value, e.g. port=8080")
    ap.add_argument("--address", default=None,
                    help="Ray cluster address (default: RAY_ADDRESS, else an embedded local Ray)")
    ap.add_argument("--dry-run", action="store_true",
                    help="validate the config and its artifacts, start nothing")
    return ap.parse_args(argv)


def load_config(path: str, overrides: list[str]) -> ServeAppConfig:
    """The checked config (ConfigError naming the key; index artifacts and API key too)."""
    cfg = resolve_paths(serve_config_from_dict(apply_overrides(load_yaml(path), overrides)))
    check_serve_config(cfg)
    return cfg


def cpus_needed(cfg: ServeAppConfig) -> int:
    """Logical CPUs for an embedded Ray: every deployment at its maximum replicas."""
    sections = [cfg.ingress] + ([cfg.search] if cfg.indexes else []) + (
        [cfg.embed] if cfg.embed.enabled else []) + (
        [cfg.generate] if cfg.generate.enabled else [])
    total = sum(s.num_cpus * (s.autoscaling.max_replicas if s.autoscaling else s.replicas or 1)
                for s in sections)
    return int(total + 0.999)


def url_of(cfg: ServeAppConfig) -> str:
    host = "127.0.0.1" if cfg.host in ("0.0.0.0", "::") else cfg.host
    return f"http://{host}:{cfg.port}"


def start_app(cfg: ServeAppConfig, address: str | None = None, name: str = APP_NAME,
              route_prefix: str = "/", also: Sequence[RunTarget] = ()) -> str:
    """Connect to Ray, start Serve's HTTP proxy on the config's host/port, deploy (with ``also``:
    more applications, deployed in parallel), wait until every replica is up; returns the
    app's URL."""
    connect(address, num_cpus=max(cpus_needed(cfg), os.cpu_count() or 1))
    serve.start(http_options={"host": cfg.host, "port": cfg.port})
    serve.run_many([RunTarget(app_from_config(cfg), name=name, route_prefix=route_prefix),
                    *also])
    return url_of(cfg) + route_prefix.rstrip("/")


def describe(cfg: ServeAppConfig) -> str:
    parts = [f"indexes {sorted(cfg.indexes) or 'none'}",
             f"embed {'on' if cfg.embed.enabled else 'off'}",
             f"generate {'on' if cfg.generate.enabled else 'off'}",
             f"API key {'from $' + cfg.api_key_env if cfg.api_key_env else 'off'}"]
    return ", ".join(parts)


def interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as exc:
        print(f"[bmray] config error: {exc}", file=sys.stderr)
        return 2
    if args.dry_run:
        print(f"[bmray] config ok: {describe(cfg)}; would listen on {url_of(cfg)}", flush=True)
        return 0
    embedded = not (args.address or os.environ.get("RAY_ADDRESS"))
    url = start_app(cfg, args.address)
    signal.signal(signal.SIGTERM, interrupt)   # a supervisor's stop: the same clean-up (after
                                               # ray.init, which installs its own handler)
    print(f"[bmray] serving at {url} ({describe(cfg)}); OpenAPI schema at {url}/openapi.json; "
          f"Ctrl-C to stop", flush=True)
    try:
        while True:
            time.sleep(1.0)
    except KeyboardInterrupt:
        signal.signal(signal.SIGINT, signal.SIG_IGN)   # a second Ctrl-C must not cut clean-up
        print("[bmray] stopping", flush=True)
    finally:
        if embedded:
            serve.shutdown()
            shutdown()
        else:
            serve.delete(APP_NAME)
    return 0


if __name__ == "__main__":
    sys.exit(main())
