"""Shared fixtures: one embedded local Ray for the whole test session (start-up costs ~4 s)."""
from __future__ import annotations

import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.dirname(os.path.abspath(__file__))


def folders_with_tests() -> list[str]:
    """tests/ and every folder below it that holds test modules (they mirror the packages)."""
    return [root for root, _, files in os.walk(TESTS)
            if "__pycache__" not in root and any(f.endswith(".py") for f in files)]


@pytest.fixture(scope="session")
def ray_session():
    """An embedded local Ray with 8 logical CPUs (more than the 2 cores: workers pin 1 thread)."""
    from bmray.cluster import connect, shutdown

    # Functions defined in test modules are pickled by reference (module `test_x`, imported from
    # its own folder by pytest): Ray's workers must be able to import them, so every folder of
    # tests goes on their path too.
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(folders_with_tests() + ([old] if old else []))
    connect(num_cpus=8, log_to_driver=False)
    yield
    shutdown()


@pytest.fixture(scope="module")
def gangs(ray_session):
    """Worker gangs by size, started on first use and shared by one module's tests (a gang
    start costs seconds; the equivalence tests of every strategy reuse them)."""
    from bmray.cluster.gang import ScalingConfig, WorkerGroup

    started: dict = {}

    def get(n: int) -> WorkerGroup:
        if n not in started:
            started[n] = WorkerGroup(ScalingConfig(num_workers=n)).start()
        return started[n]

    yield get
    for group in started.values():
        group.shutdown()


@pytest.fixture(scope="module")
def gang(gangs):
    """One gang of 4 workers for a module's tests (a run on fewer workers uses a process
    group of the first of them)."""
    return gangs(4)


def tiny_gpt_experiment(root, text: str, *, max_seq_len: int = 64, block_len: int = 33,
                        batch: int = 4, steps: int = 3) -> tuple[dict, str]:
    """A few steps of pre-training a tiny GPT on ``text`` in ``root`` (a checkpoint and a BPE
    tokenizer, for the generation tests); returns the experiment mapping and its YAML path."""
    import yaml

    from bmray.actors.train.builders import run_experiment
    from bmray.actors.train.experiment import experiment_from_dict
    (root / "corpus.txt").write_text(text, encoding="utf-8")
    raw = {"seed": 0,
           "model": {"family": "gpt", "vocab_size": 300, "d_model": 32, "n_heads": 2,
                     "n_layers": 1, "d_ff": 64, "max_seq_len": max_seq_len, "dropout": 0.0},
           "data": {"corpus": {"source": str(root / "corpus.txt"), "format": "text"},
                    "pack_dir": str(root / "pack"), "block_len": block_len,
                    "global_batch_size": batch, "eval_blocks": 0},
           "train": {"max_steps": steps, "lr": 1e-3, "warmup_steps": 1, "log_every": 10,
                     "echo": False, "device": "cpu"},
           "checkpoint": {"dir": str(root / "ckpt"), "every": 0}}
    run_experiment(experiment_from_dict(raw))
    path = root / "exp.yaml"
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    return raw, str(path)
