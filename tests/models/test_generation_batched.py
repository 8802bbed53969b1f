"""Left-padded batches of different-length prompts, the preallocated KV buffer, the GPT-2 export.

References: each prompt run alone (unpadded) through a full forward of the model, and Hugging
Face's ``GPT2LMHeadModel`` (its forward and its ``generate`` with left padding) on the same weights.
Models run in float64 with sharpened weights so argmax ties cannot flip a token between paths.
"""
from __future__ import annotations

import pytest
import torch
from transformers import GPT2LMHeadModel

from bmray.models.config import ModelConfig, MoEConfig
from bmray.models.families.gpt import GPT
from bmray.models.families.hf_gpt2 import export_gpt2
from bmray.models.families.t5 import T5
from bmray.models.generation import GenerationConfig, generate, pad_prompts, preallocate
from bmray.models.layers.attention import KVBuffer

torch.set_num_threads(1)

V, PAD, EOS = 32, 0, 2
PROMPTS = [[9, 10, 11, 12, 13, 14], [20, 21], [30, 31, 7, 8]]


def make_gpt(seed: int = 0, scale: float = 0.5, **kw) -> GPT:
    torch.manual_seed(seed)
    cfg = dict(family="gpt", vocab_size=V, d_model=32, n_heads=4, n_layers=2, d_ff=64,
               max_seq_len=64, dropout=0.0, pad_id=PAD, eos_id=EOS)
    model = GPT(ModelConfig(**{**cfg, **kw})).double().eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * scale)
    return model


def new_tokens(out: torch.Tensor, width: int) -> list[list[int]]:
    return out[:, width:].tolist()


# ---------------------------------------------------------------------------------------------
# The model under left padding: logits at every step equal the unpadded single-row forward
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("buffer", [False, True])
@torch.no_grad()
def test_left_padded_cached_decoding_gives_each_row_its_unpadded_logits(buffer):
    model = make_gpt()
    ids, mask = pad_prompts(PROMPTS, PAD)
    g = torch.Generator().manual_seed(1)
    cont = torch.randint(3, V, (len(PROMPTS), 5), generator=g)
    out = model(ids, attention_mask=mask, use_cache=True)
    past = preallocate(out.past_key_values, 5) if buffer else out.past_key_values
    if buffer:
        assert all(isinstance(layer, KVBuffer) for layer in past)
    steps = [out.logits[:, -1]]
    for t in range(4):
        mask = torch.cat([mask, torch.ones(len(PROMPTS), 1, dtype=mask.dtype)], dim=1)
        out = model(cont[:, t:t + 1], past_key_values=past, use_cache=True, attention_mask=mask)
        past = out.past_key_values
        steps.append(out.logits[:, -1])
    for b, prompt in enumerate(PROMPTS):
        alone = model(torch.cat([torch.tensor([prompt]), cont[b:b + 1, :4]], dim=1)).logits[0]
        for t, logits in enumerate(steps):
            torch.testing.assert_close(logits[b], alone[len(prompt) - 1 + t], rtol=1e-9, atol=1e-9)


# ---------------------------------------------------------------------------------------------
# generate: every row of a padded batch is what its prompt gives alone
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("use_cache", [True, False])
@pytest.mark.parametrize("strategy", ["greedy", "sample", "beam"])
def test_each_row_of_a_padded_batch_generates_what_its_prompt_generates_alone(strategy, use_cache):
    model = make_gpt()
    kw = dict(strategy=strategy, max_new_tokens=6, eos_id=EOS, pad_id=PAD, use_cache=use_cache,
              num_beams=3 if strategy == "beam" else 1, seed=5, top_k=8, top_p=0.95,
              temperature=1.5)
    if strategy != "sample":
        kw.update(top_k=0, top_p=1.0, temperature=1.0)
    ids, mask = pad_prompts(PROMPTS, PAD)
    out = generate(model, ids, GenerationConfig(**kw), attention_mask=mask)
    assert torch.equal(out, generate(model, PROMPTS, GenerationConfig(**kw)))   # lists padded here
    T = ids.size(1)
    for b, prompt in enumerate(PROMPTS):
        # sampling: row b draws from a generator seeded seed + b
        alone_cfg = GenerationConfig(**{**kw, "seed": kw["seed"] + b})
        alone = generate(model, torch.tensor([prompt]), alone_cfg)[0, len(prompt):].tolist()
        row = out[b, T:].tolist()
        assert row[:len(alone)] == alone and all(t == PAD for t in row[len(alone):])


def test_padded_greedy_and_beam_equal_hugging_face_generate_with_left_padding():
    model = make_gpt(scale=0.3)
    hf = export_gpt2(model)
    ids, mask = pad_prompts(PROMPTS, PAD)
    ours = generate(model, ids, GenerationConfig(max_new_tokens=8, pad_id=PAD), attention_mask=mask)
    theirs = hf.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False,
                         pad_token_id=PAD, eos_token_id=None)
    assert torch.equal(ours, theirs)
    c = GenerationConfig(strategy="beam", num_beams=3, max_new_tokens=5, pad_id=PAD,
                         length_penalty=1.0)
    ours = generate(model, ids, c, attention_mask=mask)
    theirs = hf.generate(ids, attention_mask=mask, max_new_tokens=5, num_beams=3, do_sample=False,
                         pad_token_id=PAD, eos_token_id=None, length_penalty=1.0)
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("bad, match", [
    (torch.tensor([[1, 1, 0], [1, 1, 1]]), "LEFT padded"),
    (torch.tensor([[0, 0, 0], [1, 1, 1]]), "without any real token"),
    (torch.tensor([[1, 1], [1, 1]]), "shape"),
    (torch.tensor([[2, 1, 1], [1, 1, 1]]), "0 .padding. and 1"),
])
def test_bad_decoder_masks_are_refused_before_any_compute(bad, match):
    model = make_gpt()
    with pytest.raises(ValueError, match=match):
        generate(model, torch.tensor([[5, 6, 7], [5, 6, 7]]), GenerationConfig(max_new_tokens=2),
                 attention_mask=bad)
    with pytest.raises(ValueError, match="lists are padded here"):
        generate(model, [[5, 6]], GenerationConfig(max_new_tokens=2), attention_mask=bad)
    with pytest.raises(ValueError, match="at least one token"):
        generate(model, [[5, 6], []], GenerationConfig(max_new_tokens=2))


def test_pad_prompts_left_pads_and_right_pads_encoder_inputs():
    ids, mask = pad_prompts([[5], [6, 7, 8]], pad_id=0)
    assert ids.tolist() == [[0, 0, 5], [6, 7, 8]]
    assert mask.tolist() == [[0, 0, 1], [1, 1, 1]]
    ids, mask = pad_prompts([[5], [6, 7, 8]], pad_id=0, side="right")
    assert ids.tolist() == [[5, 0, 0], [6, 7, 8]] and mask.tolist() == [[1, 0, 0], [1, 1, 1]]


def test_t5_sources_as_lists_are_right_padded_and_match_each_alone():
    torch.manual_seed(0)
    t5 = T5(ModelConfig(family="t5", vocab_size=V, d_model=32, n_heads=4, n_layers=1, d_ff=64,
                        max_seq_len=64, dropout=0.0, pad_id=PAD, eos_id=EOS)).double().eval()
    with torch.no_grad():
        for p in t5.parameters():
            if p.dim() >= 2:
                p.mul_(25)                   # peaked distributions: positions change the tokens
    c = GenerationConfig(max_new_tokens=4, pad_id=PAD)
    out = generate(t5, PROMPTS, c)
    for b, prompt in enumerate(PROMPTS):
        alone = generate(t5, torch.tensor([prompt]), c)[0].tolist()
        assert out[b].tolist()[:len(alone)] == alone


def test_kv_buffer_reads_like_the_tuple_and_refuses_overflow():
    k, v = torch.randn(2, 3, 4, 5), torch.randn(2, 3, 4, 5)
    buf = KVBuffer(k, v, capacity=6)
    k2, v2 = torch.randn(2, 3, 2, 5), torch.randn(2, 3, 2, 5)
    got_k, got_v = buf.append(k2, v2)
    assert torch.equal(got_k, torch.cat([k, k2], 2)) and torch.equal(buf[1], torch.cat([v, v2], 2))
    picked = buf.index_select(torch.tensor([1, 1]))
    assert torch.equal(picked[0], torch.cat([k, k2], 2)[[1, 1]])
    with pytest.raises(ValueError, match="full"):
        buf.append(k2[:, :, :1], v2[:, :, :1])


# ---------------------------------------------------------------------------------------------
# export_gpt2: same logits as Hugging Face's GPT-2 on the same weights
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kw", [{}, {"tie_embeddings": False}, {"pos_encoding": "sinusoidal"}])
@torch.no_grad()
def test_export_gpt2_gives_equal_logits(kw):
    model = make_gpt(scale=0.1, **kw)
    for p in model.parameters():            # non-trivial biases and LayerNorm parameters too
        if p.dim() == 1:
            p.add_(torch.randn_like(p) * 0.1)
    hf = export_gpt2(model)
    assert isinstance(hf, GPT2LMHeadModel) and hf.config.activation_function == "gelu"
    x = torch.randint(0, V, (2, 11))
    torch.testing.assert_close(hf(x).logits, model(x).logits, rtol=1e-10, atol=1e-10)


def test_export_gpt2_refuses_what_gpt2_cannot_hold():
    with pytest.raises(ValueError, match="mixture-of-experts"):
        export_gpt2(make_gpt(moe=MoEConfig(num_experts=2, every=1)))
    with pytest.raises(TypeError, match="bmray GPT"):
        export_gpt2(torch.nn.Linear(2, 2))
