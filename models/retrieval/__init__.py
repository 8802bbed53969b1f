"""Retrieval: BM25, dense encoders, faiss indexes, cross-encoders, fusion, metrics (plain PyTorch + numpy)."""
