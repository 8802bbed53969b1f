"""Open-domain QA figures on the synthetic world: top-k passage recall and end-to-end EM/F1.

Work: every page of ``World(n_entities)`` is a passage; the questions are the world's eval-split
QA pairs (every one answerable from some page). A retriever returns the ``--top-k`` pages per
question, the reader artifact (``bmray qa``, e.g. configs/qa_world_minilm.yaml) reads each with
its dev-tuned null threshold, and ``OpenDomainQA`` pools the answers (``sum`` of softmax
weights per normalised answer, and ``max``, both reported). Also reported: the same reader on
each question's gold page (the reader alone, no retrieval) — the ceiling the pipeline loses to.

Retriever: ``dense-exact``: the MiniLM mean-pooled embeddings (models/retrieval/encoder.py)
searched exhaustively by inner product — the stand-in until BM25 / the faiss index / hybrid
fusion are wired in (any ``Retriever`` drops into ``RETRIEVERS``).

    .venv/bin/python bench/open_domain_qa.py --reader runs/qa_world_minilm/reader    # full
    .venv/bin/python bench/open_domain_qa.py --quick --out /tmp/open_domain_qa.json
(--quick trains configs/qa_tiny.yaml's tiny reader first and uses 30 entities.)
"""
from __future__ import annotations

import argparse
import functools
import os
import sys
import tempfile
import time
from typing import Sequence

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.common import environment, parse_args, result_path, write_json  # noqa: E402
from bmray.actors.train.qa import load_reader, qa_config_from_dict, run_qa  # noqa: E402
from bmray.models.qa.open_domain import OpenDomainQA, evaluate_open_domain  # noqa: E402
from bmray.models.qa.reader import read  # noqa: E402
from bmray.models.qa.squad_metrics import squad_evaluate  # noqa: E402
from bmray.models.retrieval.encoder import MeanPoolEncoder, load_minilm_encoder  # noqa: E402
from bmray.models.retrieval.types import Hits  # noqa: E402
from bmray.models.typed_config import load_yaml  # noqa: E402
from bmray.models.world import World, WorldConfig  # noqa: E402


class ExactDense:
    """Exhaustive inner-product search over unit vectors (a stand-in ``Retriever``)."""

    def __init__(self, encoder: MeanPoolEncoder, passages: dict[str, str]):
        self.encoder, self.ids = encoder, list(passages)
        self.vectors = encoder.encode([passages[i] for i in self.ids])

    def search(self, queries: Sequence[str], k: int) -> list[Hits]:
        scores = self.encoder.encode(list(queries)) @ self.vectors.T
        top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        return [[(self.ids[j], float(s[j])) for j in row] for row, s in zip(top, scores)]


RETRIEVERS = {"dense-exact": lambda passages: ExactDense(load_minilm_encoder(), passages)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reader", default=None, help="a `bmray qa` artifact (out_dir/reader)")
    ap.add_argument("--n-entities", type=int, default=200)
    ap.add_argument("--top-k", type=int, default=10)
    ap.add_argument("--ks", type=int, nargs="+", default=[1, 5, 10])
    ap.add_argument("--limit", type=int, default=None, help="at most this many questions")
    ap.add_argument("--retriever", choices=sorted(RETRIEVERS), default="dense-exact")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=result_path(__file__, "open_domain_qa.json"))
    args = parse_args(ap, {"n_entities": 30, "top_k": 3, "ks": [1, 3], "limit": 8})
    torch.set_num_threads(args.threads)
    reader_dir = args.reader
    if reader_dir is None:
        if not args.quick:
            ap.error("--reader is required (train one with `bmray qa --config "
                     "configs/qa_world_minilm.yaml`)")
        tmp = tempfile.mkdtemp()
        raw = load_yaml("configs/qa_tiny.yaml")
        run_qa(qa_config_from_dict(raw), out_dir=tmp)
        reader_dir = os.path.join(tmp, "reader")
    model, tok, manifest = load_reader(reader_dir)
    r = manifest["reader"]
    reader = functools.partial(read, model, tok, max_length=r["max_length"],
                               doc_stride=r["doc_stride"], max_answer_tokens=r["max_answer_tokens"],
                               threshold=manifest["threshold"], batch_size=r["eval_batch_size"])
    world = World(WorldConfig(n_entities=args.n_entities))
    passages = {d["id"]: d["text"] for d in world.iter_documents()}
    qa = [q for q in world.iter_qa() if q["split"] == "eval"][:args.limit]
    questions, golds = [q["question"] for q in qa], [[q["answer"]] for q in qa]

    t0 = time.perf_counter()
    retriever = RETRIEVERS[args.retriever](passages)
    index_s = time.perf_counter() - t0
    figures = {}
    for aggregate in ("sum", "max"):
        t0 = time.perf_counter()
        od = OpenDomainQA(retriever, reader, passages, args.top_k, aggregate)
        figures[aggregate] = {**evaluate_open_domain(od, questions, golds, args.ks),
                              "seconds": round(time.perf_counter() - t0, 1)}
    gold_preds = reader(questions, [q["context"] for q in qa])
    gold = squad_evaluate({q["id"]: p.answer for q, p in zip(qa, gold_preds)},
                          {q["id"]: g for q, g in zip(qa, golds)})
    record = {"config": {k: v for k, v in vars(args).items() if k != "out"},
              "environment": environment(), "reader_manifest_metrics": manifest["metrics"].get("eval"),
              "passages": len(passages), "questions": len(questions),
              "retriever": args.retriever, "index_seconds": round(index_s, 1),
              "open_domain": figures, "reader_on_gold_page": gold}
    rows = [f"{'':14}" + "".join(f"{k:>11}" for k in figures["sum"] if k != "seconds")]
    for name, f in figures.items():
        rows.append(f"{'aggregate ' + name:14}" + "".join(f"{v:11.1f}" for k, v in f.items()
                                                         if k != "seconds"))
    rows.append(f"reader on the gold page: EM {gold['exact']:.1f} F1 {gold['f1']:.1f}")
    print("\n".join(rows))
    write_json(args.out, record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
