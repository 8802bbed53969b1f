"""Connect the driver to Ray: an embedded local Ray by default, a cluster when an address is given.

Why one function: every job must run unchanged on a laptop (`bmray X`), on a cluster
(`RAY_ADDRESS=ray://... bmray X` or `--address`) and under `ray job submit`, where the
job supervisor exports RAY_ADDRESS for us. Ray's own resolution order is kept: an explicit
address, then RAY_ADDRESS, else a new local Ray sized by `num_cpus` (logical CPUs may exceed the
physical cores: workers pin torch to their own share of threads).
"""
from __future__ import annotations

import logging
import os

import ray

log = logging.getLogger(__name__)


def connect(address: str | None = None, num_cpus: int | None = None,
            log_to_driver: bool = True) -> dict:
    """Initialise Ray once and return a short description of where we run.

    address: ``None`` → RAY_ADDRESS if set, else an embedded local Ray; ``"auto"`` → the cluster
    running on this machine; ``"host:port"`` or ``"ray://host:10001"`` → that cluster.
    num_cpus: logical CPUs of the embedded local Ray (ignored when joining a cluster).
    """
    address = address or os.environ.get("RAY_ADDRESS") or None
    if not ray.is_initialized():
        kwargs: dict = {"log_to_driver": log_to_driver, "configure_logging": False}
        if address is None:
            # "local" starts a new embedded Ray even when a `ray start` head runs on this
            # machine (plain ray.init() would join that one instead).
            kwargs.update(address="local", num_cpus=num_cpus, include_dashboard=False)
            # Workers of the embedded Ray must import the repo's packages even when the job is
            # run from a checkout that was not pip-installed.
            kwargs["runtime_env"] = {"env_vars": {"PYTHONPATH": _repo_pythonpath()}}
        else:
            kwargs["address"] = address
        ray.init(**kwargs)
    ctx = ray.get_runtime_context()
    where = ("embedded local Ray" if address is None
             else f"Ray cluster at {ctx.gcs_address}")
    resources = ray.cluster_resources()
    info = {"where": where, "job_id": ctx.get_job_id(),
            "cpus": resources.get("CPU", 0), "gpus": resources.get("GPU", 0)}
    log.info("connected to %s (%s CPUs, %s GPUs)", where, info["cpus"], info["gpus"])
    return info


def shutdown() -> None:
    """Disconnect (and stop an embedded local Ray)."""
    if ray.is_initialized():
        ray.shutdown()


def _repo_pythonpath() -> str:
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    existing = os.environ.get("PYTHONPATH")
    return repo if not existing else f"{repo}{os.pathsep}{existing}"
