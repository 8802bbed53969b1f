"""The one command: ``bmray <job> [options]``.

Each job is a module of this package with a ``main(argv) -> int``; ``bmray <job> --help`` shows
its options, and ``python -m bmray.jobs.<job>`` runs the same entry.
"""
from __future__ import annotations

import importlib
import sys
from typing import Sequence

JOBS = {
    "pretrain": ("bmray.jobs.pretrain", "pre-train a model on a gang of Ray workers"),
    "adapt": ("bmray.jobs.adapt", "fine-tune one delta or prompt on a task, on a gang"),
    "plan": ("bmray.jobs.plan", "choose a parallel layout that fits a model on a cluster"),
    "sweep": ("bmray.jobs.sweep", "Ray Tune sweep of an adaptation, with a Pareto report"),
    "compress": ("bmray.jobs.compress", "compress a trained model with a recipe, one artifact"),
    "generate": ("bmray.jobs.generate", "sample text from a GPT checkpoint, streaming"),
    "qa": ("bmray.jobs.qa", "train an extractive QA reader (null answers), EM/F1, artifact"),
    "rank-train": ("bmray.jobs.rank_train", "train a cross-encoder or dual encoder, one artifact"),
    "quickstart": ("bmray.jobs.quickstart", "the main job on an embedded local Ray, end to end"),
    "index": ("bmray.jobs.index", "build a retrieval index (BM25 on shard actors, or dense faiss)"),
    "evaluate": ("bmray.jobs.evaluate", "score saved indexes on a collection: a metric table"),
    "serve": ("bmray.jobs.serve", "serve search, embeddings and generation over HTTP (Ray Serve)"),
}


def usage() -> str:
    width = max(map(len, JOBS))
    rows = "\n".join(f"  {name:<{width}}  {about}" for name, (_, about) in JOBS.items())
    return ("usage: bmray <job> [options]\n\njobs:\n" + rows +
            "\n\n`bmray <job> --help` for a job's options.")


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(usage())
        return 0
    job, rest = args[0], args[1:]
    if job not in JOBS:
        print(f"bmray: unknown job {job!r}; choose one of {', '.join(JOBS)}\n\n{usage()}",
              file=sys.stderr)
        return 2
    module = importlib.import_module(JOBS[job][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
