"""Open-domain QA figures on the synthetic world: top-k passage recall and end-to-end EM/F1.

Work: every page of ``World(n_entities)`` is a passage; the questions are the world's eval-split
QA pairs (every one answerable from some page). A retriever returns the ``--top-k`` pages per
question, the reader artifact (``bmray qa``, e.g. configs/qa_world_minilm.yaml) reads each with
its dev-tuned null threshold, and ``OpenDomainQA`` pools the answers (``sum`` of softmax
weights per normalised answer, and ``max``, both reported). Also reported: the same reader on
each question's gold page (the reader alone, no retrieval) — the ceiling the pipeline loses to.

Retrievers (each a ``Retriever``, all run by default): ``bm25`` (models/retrieval/bm25.py,
Lucene's variant), ``dense`` (the MiniLM's mean-pooled unit vectors in an exact faiss index),
``hybrid`` (their reciprocal rank fusion).

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
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.common import environment, parse_args, result_path, write_json  # noqa: E402
from bmray.actors.train.qa import load_reader, qa_config_from_dict, run_qa  # noqa: E402
from bmray.models.qa.open_domain import OpenDomainQA, evaluate_open_domain  # noqa: E402
from bmray.models.qa.reader import read  # noqa: E402
from bmray.models.qa.squad_metrics import squad_evaluate  # noqa: E402
from bmray.models.retrieval.bm25 import BM25Index  # noqa: E402
from bmray.models.retrieval.dense_index import DenseIndex  # noqa: E402
from bmray.models.retrieval.encoder import load_minilm_encoder  # noqa: E402
from bmray.models.retrieval.fusion import HybridRetriever  # noqa: E402
from bmray.models.typed_config import load_yaml  # noqa: E402
from bmray.models.world import World, WorldConfig  # noqa: E402


def bm25(passages: dict[str, str]) -> BM25Index:
    return BM25Index.build(list(passages), list(passages.values()))


def dense(passages: dict[str, str]) -> DenseIndex:
    """The offline MiniLM's unit vectors in an exact (Flat) faiss index."""
    encoder = load_minilm_encoder()
    ids = list(passages)
    return DenseIndex.build(ids, encoder.encode([passages[i] for i in ids]), encoder=encoder)


def hybrid(passages: dict[str, str]) -> HybridRetriever:
    """Reciprocal rank fusion (k = 60) of the two above, each to depth 100."""
    return HybridRetriever([bm25(passages), dense(passages)], k_rrf=60, depth=100)


RETRIEVERS = {"bm25": bm25, "dense": dense, "hybrid": hybrid}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reader", default=None, help="a `bmray qa` artifact (out_dir/reader)")
    ap.add_argument("--n-entities", type=int, default=200)
    ap.add_argument("--top-k", type=int, default=10)
    ap.add_argument("--ks", type=int, nargs="+", default=[1, 5, 10])
    ap.add_argument("--limit", type=int, default=None, help="at most this many questions")
    ap.add_argument("--retrievers", choices=sorted(RETRIEVERS), nargs="+",
                    default=list(RETRIEVERS))
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

    figures, index_s = {}, {}
    for name in args.retrievers:
        t0 = time.perf_counter()
        retriever = RETRIEVERS[name](passages)
        index_s[name] = round(time.perf_counter() - t0, 1)
        for aggregate in ("sum", "max"):
            t0 = time.perf_counter()
            od = OpenDomainQA(retriever, reader, passages, args.top_k, aggregate)
            figures[f"{name} {aggregate}"] = {
                **evaluate_open_domain(od, questions, golds, args.ks),
                "seconds": round(time.perf_counter() - t0, 1)}
    gold_preds = reader(questions, [q["context"] for q in qa])
    gold = squad_evaluate({q["id"]: p.answer for q, p in zip(qa, gold_preds)},
                          {q["id"]: g for q, g in zip(qa, golds)})
    record = {"config": {k: v for k, v in vars(args).items() if k != "out"},
              "environment": environment(), "reader_manifest_metrics": manifest["metrics"].get("eval"),
              "passages": len(passages), "questions": len(questions),
              "retrievers": args.retrievers, "index_seconds": index_s,
              "open_domain": figures, "reader_on_gold_page": gold}
    first = next(iter(figures.values()))
    rows = [f"{'retriever, aggregate':22}" + "".join(f"{k:>11}" for k in first if k != "seconds")]
    for name, f in figures.items():
        rows.append(f"{name:22}" + "".join(f"{v:11.1f}" for k, v in f.items() if k != "seconds"))
    rows.append(f"reader on the gold page: EM {gold['exact']:.1f} F1 {gold['f1']:.1f}")
    print("\n".join(rows))
    write_json(args.out, record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
