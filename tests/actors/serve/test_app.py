"""The Serve app over HTTP on the session's Ray: one app (plus a small slow one for overload).

References: search equals the index's own ``search`` in-process and bm25s's scores (a peer);
embeddings equal ``MeanPoolEncoder.encode`` of the MiniLM in this process; generation equals
``models.generation.generate`` in this process on the same checkpoint; status codes and
headers are HTTP's (RFC 9110 Retry-After, RFC 6750 WWW-Authenticate), events are SSE's.
"""
from __future__ import annotations

import asyncio
import json
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import bm25s
import numpy as np
import pytest
import requests
import torch
import yaml
from ray import serve
from ray.serve import RunTarget

from bmray.actors.serve.app import app_from_config
from bmray.actors.serve.generate import locate_generator
from bmray.actors.train.gpt_checkpoint import load_gpt
from bmray.actors.serve.config import serve_config_from_dict
from bmray.jobs.serve import start_app
from bmray.models.retrieval.artifact import load_index, save_index
from bmray.models.retrieval.bm25 import BM25Index
from bmray.models.retrieval.collections import load_medline
from bmray.models.generation import GenerationConfig, generate
from bmray.models.retrieval.encoder import load_minilm_encoder
from tests.conftest import tiny_gpt_experiment

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parents[3]
KEY_ENV = "BMRAY_TEST_SERVE_KEY"
KEY = "test-key-0123456789abcdef"
SLOW_S = 1.0
POEM = ("Shall I compare thee to a summer’s day?\nThou art more lovely and more temperate:\n"
        "Rough winds do shake the darling buds of May,\nAnd summer’s lease hath all too short a "
        "date;\n\n")


@serve.deployment(name="search")
class SlowSearch:
    """A stand-in search deployment that takes ``SLOW_S`` per request (for the overload test)."""

    def __init__(self, indexes, num_cpus, max_batch_size, batch_wait_timeout_s):
        self.names = sorted(indexes)

    async def search(self, index, queries, k):
        await asyncio.sleep(SLOW_S)
        return [[] for _ in queries]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def small(section: dict) -> dict:
    """The config file's deployment section on a fraction of a CPU, one replica."""
    out = {k: v for k, v in section.items() if k != "autoscaling"}
    return {**out, "num_cpus": 0.25, "replicas": 1}


@pytest.fixture(scope="module")
def served(ray_session, tmp_path_factory):
    """The app from configs/serve_app.yaml's args (index → a Medline BM25 built here; generate →
    a tiny GPT pre-trained here)."""
    _, experiment = tiny_gpt_experiment(tmp_path_factory.mktemp("gpt"), POEM * 30,
                                        max_seq_len=1100)
    medline = load_medline()
    index = BM25Index.build(list(medline.documents), list(medline.documents.values()))
    directory = save_index(index, tmp_path_factory.mktemp("idx") / "medline")
    args = yaml.safe_load((REPO / "configs/serve_app.yaml").read_text())["applications"][0]["args"]
    args = {**args, "indexes": {"medline": str(directory)}, "api_key_env": KEY_ENV,
            "port": free_port(), "ingress": small(args["ingress"]),
            "search": small(args["search"]), "embed": small(args["embed"]),
            "generate": {**small(args["generate"]), "enabled": True, "experiment": experiment}}
    mp = pytest.MonkeyPatch()
    mp.setenv(KEY_ENV, KEY)
    slow = serve_config_from_dict({
        **args, "embed": {"enabled": False}, "generate": {"enabled": False},
        "search": {"num_cpus": 0.1, "max_ongoing_requests": 1, "max_queued_requests": 1,
                   "retry_after_s": 2}})
    url = start_app(serve_config_from_dict(args), also=[RunTarget(
        app_from_config(slow, search_cls=SlowSearch), name="slow", route_prefix="/slow")])
    model, tok = load_gpt(*locate_generator(experiment))
    yield {"url": url, "index": load_index(directory), "medline": medline, "gpt": (model, tok)}
    mp.undo()
    serve.shutdown()


def post(served, path, body, key=KEY, **kw):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return requests.post(served["url"] + path, json=body, headers=headers, timeout=60, **kw)


def check_hits(got: dict, expected, k):
    assert got["k"] == k and len(got["results"]) == len(expected)
    for row, want in zip(got["results"], expected):
        assert [h["id"] for h in row] == [d for d, _ in want]
        assert np.allclose([h["score"] for h in row], [s for _, s in want], rtol=1e-6)


def test_search_equals_the_index_in_process(served):
    queries = list(served["medline"].queries.values())[:6]
    for k in (1, 10, 100):
        r = post(served, "/v1/search", {"index": "medline", "queries": queries, "k": k})
        assert r.status_code == 200, r.text
        check_hits(r.json(), served["index"].search(queries, k), k)


def test_concurrent_requests_are_batched_correctly(served):
    """Concurrent requests with different k share @serve.batch batches; each gets its own."""
    queries = list(served["medline"].queries.values())[:16]
    calls = [(queries[i:i + 2], 5 + 7 * (i % 3)) for i in range(0, 16, 2)]
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda c: post(served, "/v1/search",
                                               {"index": "medline", "queries": c[0], "k": c[1]}),
                                calls))
    for (qs, k), r in zip(calls, answers):
        assert r.status_code == 200, r.text
        check_hits(r.json(), served["index"].search(qs, k), k)


def test_search_scores_equal_bm25s(served):
    """Independent check: the served top-10 scores are bm25s's (Lucene BM25, same tokens)."""
    index, medline = served["index"], served["medline"]
    queries = list(medline.queries.values())[:4]
    peer = bm25s.BM25(method="lucene", k1=index.config.k1, b=index.config.b)
    peer.index(index.analyzer.tokens_batch(list(medline.documents.values())),
               show_progress=False)
    ids = list(medline.documents)
    got = post(served, "/v1/search", {"index": "medline", "queries": queries, "k": 10}).json()
    for row, toks in zip(got["results"], index.analyzer.tokens_batch(queries)):
        full = peer.get_scores(toks)
        assert np.allclose([h["score"] for h in row], np.sort(full)[::-1][:10], rtol=1e-5)
        assert np.allclose(full[[ids.index(h["id"]) for h in row]],
                           [h["score"] for h in row], rtol=1e-5)


def test_embed_equals_the_encoder(served):
    # the last is over 256 tokens: the served encoder must truncate as the in-process one does
    texts = ["a short text", "Ray Serve batches concurrent requests.", "serving " * 300]
    r = post(served, "/v1/embed", {"texts": texts})
    assert r.status_code == 200, r.text
    body = r.json()
    want = load_minilm_encoder().encode(texts)
    assert body["dim"] == want.shape[1] == 384
    assert np.allclose(np.array(body["embeddings"]), want, atol=1e-5)


BAD_SEARCH = [
    ({}, "index"),
    ({"queries": ["q"]}, "index"),
    ({"index": "medline"}, "queries"),
    ({"index": "medline", "queries": "not a list"}, "queries"),
    ({"index": "medline", "queries": []}, "queries"),
    ({"index": "medline", "queries": [""]}, "queries"),
    ({"index": "medline", "queries": [5]}, "queries"),
    ({"index": "medline", "queries": ["x" * 5000]}, "queries"),
    ({"index": "medline", "queries": ["q"] * 65}, "queries"),
    ({"index": "medline", "queries": ["q"], "k": -1}, "k"),
    ({"index": "medline", "queries": ["q"], "k": 0}, "k"),
    ({"index": "medline", "queries": ["q"], "k": 1001}, "k"),
    ({"index": "medline", "queries": ["q"], "k": "5"}, "k"),
    ({"index": "medline", "queries": ["q"], "k": 2.5}, "k"),
    ({"index": "medline", "queries": ["q"], "top_k": 5}, "top_k"),
    ({"index": "../etc", "queries": ["q"]}, "index"),
    ({"index": None, "queries": ["q"]}, "index"),
]
BAD_GENERATE = [
    ({}, "prompt"), ({"prompt": ""}, "prompt"), ({"prompt": "x" * 5000}, "prompt"),
    ({"prompt": 5}, "prompt"), ({"prompt": "x", "max_new_tokens": 0}, "max_new_tokens"),
    ({"prompt": "x", "max_new_tokens": 1025}, "max_new_tokens"),
    ({"prompt": "x", "max_new_tokens": "8"}, "max_new_tokens"),
    ({"prompt": "x", "strategy": "beam"}, "strategy"),
    ({"prompt": "x", "temperature": 0}, "temperature"),
    ({"prompt": "x", "temperature": -1.0}, "temperature"),
    ({"prompt": "x", "top_k": -1}, "top_k"), ({"prompt": "x", "top_p": 0}, "top_p"),
    ({"prompt": "x", "top_p": 1.5}, "top_p"), ({"prompt": "x", "stop": ["a"] * 5}, "stop"),
    ({"prompt": "x", "stop": [""]}, "stop"), ({"prompt": "x", "stop": "\n"}, "stop"),
    ({"prompt": "x", "seed": -1}, "seed"), ({"prompt": "x", "stream": "yes"}, "stream"),
    ({"prompt": "x", "max_tokens": 8}, "max_tokens"),
    # valid JSON, but past the tiny model's context of 1100 tokens: the model's check, 422 too
    ({"prompt": "Shall I " * 500, "max_new_tokens": 1000}, "max_new_tokens"),
    ({"prompt": "Shall I " * 500, "max_new_tokens": 1000, "stream": True}, "max_new_tokens"),
]
BAD_EMBED = [({}, "texts"), ({"texts": []}, "texts"), ({"texts": [None]}, "texts"),
             ({"texts": ["t"] * 65}, "texts"), ({"texts": "one string"}, "texts"),
             ({"texts": ["t"], "model": "other"}, "model")]


@pytest.mark.parametrize("path,body,field", [("/v1/search", b, f) for b, f in BAD_SEARCH] +
                         [("/v1/embed", b, f) for b, f in BAD_EMBED] +
                         [("/v1/generate", b, f) for b, f in BAD_GENERATE])
def test_malformed_json_bodies_are_422_naming_the_field(served, path, body, field):
    r = post(served, path, body)
    assert r.status_code == 422, (body, r.status_code, r.text)
    locs = [e["loc"] for e in r.json()["detail"]]
    assert any(field in loc for loc in locs), (body, locs)


@pytest.mark.parametrize("data,ctype", [(b"not json", "application/json"),
                                        (b"{\"index\": ", "application/json"),
                                        (b"[1, 2]", "application/json"),
                                        (b"", "application/json"),
                                        (b"index=medline", "application/x-www-form-urlencoded"),
                                        (b"hello", "text/plain"),
                                        (b"\xff\xfe", "text/plain"),
                                        (b"\xff\xfe", "application/json"),
                                        (b'{"index": "medline", "queries": ["\xff"]}',
                                         "application/json")])
def test_non_json_bodies_are_422(served, data, ctype):
    for path in ("/v1/search", "/v1/embed"):
        r = requests.post(served["url"] + path, data=data, timeout=60,
                          headers={"Authorization": f"Bearer {KEY}", "Content-Type": ctype})
        assert r.status_code == 422, (path, data, r.status_code, r.text)


def test_a_body_larger_than_any_valid_request_is_413(served):
    body = {"index": "medline", "queries": ["q" * 4096] * 600}
    r = post(served, "/v1/search", body)
    assert r.status_code == 413 and "body over" in r.json()["detail"]


def test_unknown_index_is_404_naming_the_available_ones(served):
    r = post(served, "/v1/search", {"index": "cisi", "queries": ["q"]})
    assert r.status_code == 404
    assert "cisi" in r.json()["detail"] and "medline" in r.json()["detail"]


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong-key-0123456789"},
                                     {"Authorization": KEY},
                                     {"Authorization": f"Basic {KEY}"},
                                     {"Authorization": f"Bearer {KEY}x"}])
def test_missing_or_wrong_key_is_401(served, headers):
    for path, body in (("/v1/search", {"index": "medline", "queries": ["q"]}),
                       ("/v1/embed", {"texts": ["t"]}), ("/v1/search", {"bad": 1}),
                       ("/v1/generate", {"prompt": "x", "stream": True})):
        r = requests.post(served["url"] + path, json=body, headers=headers, timeout=60)
        assert r.status_code == 401, (path, headers, r.status_code)
        assert r.headers["WWW-Authenticate"].startswith("Bearer")
    r = requests.get(served["url"] + "/metrics", headers=headers, timeout=60)
    assert r.status_code == 401


def test_healthz_and_openapi_are_open(served):
    r = requests.get(served["url"] + "/healthz", timeout=60)
    assert r.status_code == 200
    assert r.json() == {"status": "ok", "indexes": ["medline"], "embed": True, "generate": True}
    schema = requests.get(served["url"] + "/openapi.json", timeout=60).json()
    assert {"/v1/search", "/v1/embed", "/v1/generate", "/healthz"} <= set(schema["paths"])
    k = schema["components"]["schemas"]["SearchRequest"]["properties"]["k"]
    assert (k["minimum"], k["maximum"]) == (1, 1000)
    assert "HTTPBearer" in schema["components"]["securitySchemes"]


def test_metrics_count_requests_per_route(served):
    post(served, "/v1/search", {"index": "medline", "queries": ["cancer"], "k": 3})
    post(served, "/v1/search", {"index": "medline", "queries": [], "k": 3})
    text = requests.get(served["url"] + "/metrics", timeout=60,
                        headers={"Authorization": f"Bearer {KEY}"}).text
    counts = {}
    for line in text.splitlines():
        if line.startswith("bmray_http_requests_total{"):
            labels, value = line.rsplit(" ", 1)
            counts[labels] = float(value)
    ok = 'bmray_http_requests_total{method="POST",route="/v1/search",status="200"}'
    bad = 'bmray_http_requests_total{method="POST",route="/v1/search",status="422"}'
    assert counts[ok] >= 1 and counts[bad] >= 1
    assert 'bmray_http_request_seconds_bucket{le="0.5",method="POST",route="/v1/search"}' in text


def test_overload_answers_503_with_retry_after_and_no_500(served):
    """Slow search (1 s), 1 in flight + 1 queued: of 8 concurrent requests some are 503."""
    def call(_):
        return requests.post(served["url"] + "/slow/v1/search", timeout=60,
                             json={"index": "medline", "queries": ["q"]},
                             headers={"Authorization": f"Bearer {KEY}"})

    start = time.perf_counter()
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(call, range(8)))
    codes = [r.status_code for r in answers]
    assert set(codes) <= {200, 503}, codes
    assert codes.count(200) >= 1 and codes.count(503) >= 1, codes
    for r in answers:
        if r.status_code == 503:
            assert r.headers["Retry-After"] == "2"
    assert time.perf_counter() - start < 8 * SLOW_S     # rejected, not queued without bound


# ---------------------------------------------------------------------------- generation

def reference(served, prompt: str, **params) -> dict:
    """``models.generation.generate`` in this process on the same checkpoint and settings."""
    model, tok = served["gpt"]
    ids = tok.encode(prompt)
    config = GenerationConfig(eos_id=model.config.eos_id, pad_id=model.config.pad_id, **params)
    tokens = generate(model, [ids], config, tokenizer=tok)[0, len(ids):].tolist()
    return {"text": tok.decode(tokens, skip_special_tokens=True), "tokens": tokens}


def events_of(served, body) -> list:
    """The ``data:`` payloads of a streamed answer, in order (``[DONE]`` as a string)."""
    r = post(served, "/v1/generate", {**body, "stream": True}, stream=True)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/event-stream")
    out = []
    for line in r.iter_lines(decode_unicode=True):
        if line:
            assert line.startswith("data: "), line
            data = line[len("data: "):]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


GEN_CASES = [("Shall I", {"max_new_tokens": 24, "strategy": "greedy"}),
             ("Rough winds", {"max_new_tokens": 20, "strategy": "sample", "seed": 7,
                              "temperature": 0.8, "top_k": 50, "top_p": 0.9})]


@pytest.mark.parametrize("prompt,params", GEN_CASES)
def test_generate_whole_and_streamed_equal_generate_in_process(served, prompt, params):
    want = reference(served, prompt, **params)
    r = post(served, "/v1/generate", {"prompt": prompt, **params})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["tokens"] == want["tokens"] and body["text"] == want["text"]
    assert body["finish_reason"] == "length" and len(body["tokens"]) == params["max_new_tokens"]
    events = events_of(served, {"prompt": prompt, **params})
    texts = [e["text"] for e in events if isinstance(e, dict) and "text" in e]
    assert len(texts) >= 2 and all(texts)                 # it streams, chunk by chunk
    # equal to the whole text: a character split over two chunks would be two U+FFFD there
    assert "".join(texts) == want["text"]
    assert events[-2] == {"finish_reason": "length", "tokens": params["max_new_tokens"]}
    assert events[-1] == "[DONE]"


def test_concurrent_generations_are_batched_exactly(served):
    """Different prompt lengths and settings in one @serve.batch: each equals its own run."""
    calls = [("Shall I compare", {"max_new_tokens": 16, "strategy": "greedy"}),
             ("O", {"max_new_tokens": 16, "strategy": "greedy"}),
             ("Thou art more lovely and", {"max_new_tokens": 16, "strategy": "greedy"}),
             ("Rough", {"max_new_tokens": 9, "strategy": "greedy"}),
             ("And", {"max_new_tokens": 12, "strategy": "sample", "seed": 3}),
             ("And", {"max_new_tokens": 12, "strategy": "sample", "seed": 3}),
             ("And", {"max_new_tokens": 12, "strategy": "sample", "seed": 4})]
    with ThreadPoolExecutor(len(calls)) as pool:
        answers = list(pool.map(lambda c: post(served, "/v1/generate",
                                               {"prompt": c[0], **c[1]}), calls))
    for (prompt, params), r in zip(calls, answers):
        assert r.status_code == 200, r.text
        assert r.json()["tokens"] == reference(served, prompt, **params)["tokens"], prompt


def test_stop_strings_end_the_text_whole_and_streamed(served):
    full = reference(served, "Shall I", max_new_tokens=40)["text"]
    stop = next(full[i:i + 2] for i in range(4, len(full) - 2) if full[i:i + 2].strip())
    want = reference(served, "Shall I", max_new_tokens=40, stop=[stop, "never-seen"])
    body = {"prompt": "Shall I", "max_new_tokens": 40, "stop": [stop, "never-seen"]}
    got = post(served, "/v1/generate", body).json()
    assert got["text"] == want["text"] and got["tokens"] == want["tokens"]
    assert got["finish_reason"] == "stop" and stop not in got["text"]
    assert full.startswith(got["text"]) and len(got["text"]) <= full.index(stop)
    events = events_of(served, body)
    assert "".join(e["text"] for e in events if isinstance(e, dict) and "text" in e) == \
        want["text"]
    assert events[-2]["finish_reason"] == "stop"


def test_a_client_that_disconnects_stops_its_stream(served):
    handle = serve.get_deployment_handle("generate", app_name="bmray")
    before = handle.stats.remote().result()
    r = post(served, "/v1/generate", {"prompt": "O", "max_new_tokens": 1000, "stream": True},
             stream=True)
    assert r.status_code == 200
    next(r.iter_lines())
    r.close()                                             # the client goes away
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        after = handle.stats.remote().result()
        if after["streams_cancelled"] > before["streams_cancelled"]:
            break
        time.sleep(0.1)
    assert after["streams_cancelled"] == before["streams_cancelled"] + 1, after
    assert after["streams_finished"] == before["streams_finished"]
    assert after["tokens"] - before["tokens"] < 1000


def test_generate_is_404_where_not_served(served):
    r = post(served, "/slow/v1/generate", {"prompt": "x"})
    assert r.status_code == 404 and "generate.enabled" in r.json()["detail"]


def test_generate_requests_are_counted_per_route(served):
    post(served, "/v1/generate", {"prompt": "O", "max_new_tokens": 2})
    text = requests.get(served["url"] + "/metrics", timeout=60,
                        headers={"Authorization": f"Bearer {KEY}"}).text
    assert 'bmray_http_requests_total{method="POST",route="/v1/generate",status="200"}' in text
    assert 'bmray_http_requests_total{method="POST",route="/v1/generate",status="422"}' in text
