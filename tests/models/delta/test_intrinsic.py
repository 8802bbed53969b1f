"""Intrinsic prompt tuning: the subspace (PCA of task prompts), the prompt mean + U z, only d_I
trainable parameters, save/load, mixed batches, detach, bad input."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from bmray.models.config import ModelConfig
from bmray.models.delta.intrinsic import IntrinsicPrompt, IntrinsicPromptConfig, IntrinsicSubspace
from bmray.models.families.registry import build_model
from bmray.models.typed_config import ConfigError

torch.set_num_threads(1)
V, P, D = 48, 4, 32
TOL = dict(rtol=1e-5, atol=1e-5)


def tiny() -> nn.Module:
    torch.manual_seed(0)
    cfg = ModelConfig(family="gpt", vocab_size=V, d_model=D, n_heads=4, n_layers=2, d_ff=64,
                      max_seq_len=64, dropout=0.0)
    return build_model(cfg).eval()


def prompts(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(P, D, generator=g) for _ in range(n)]


def ids(b=3, t=5):
    return torch.randint(7, 40, (b, t), generator=torch.Generator().manual_seed(0))


def test_subspace_is_the_pca_of_the_prompts():
    ps = prompts()
    sub = IntrinsicSubspace.fit(ps, dim=3)
    x = torch.stack([p.reshape(-1) for p in ps])
    torch.testing.assert_close(sub.mean, x.mean(0).view(P, D), **TOL)
    torch.testing.assert_close(sub.basis.T @ sub.basis, torch.eye(3), **TOL)   # orthonormal
    # its directions are the top eigenvectors of the covariance (up to sign)
    evals, evecs = torch.linalg.eigh(((x - x.mean(0)).T @ (x - x.mean(0))).double())
    top = evecs[:, -3:].flip(1).float()
    torch.testing.assert_close((top.T @ sub.basis).abs(), torch.eye(3), rtol=1e-4, atol=1e-4)


def test_a_prompt_in_the_span_is_reconstructed_exactly():
    ps = prompts(5)
    sub = IntrinsicSubspace.fit(ps, dim=4)                 # n - 1: the whole centred span
    mean = torch.stack(ps).mean(0)
    inside = mean + 0.3 * (ps[0] - mean) - 1.2 * (ps[3] - mean)
    torch.testing.assert_close(sub.reconstruct(sub.project(inside)), inside, **TOL)
    for p in ps:
        torch.testing.assert_close(sub.reconstruct(sub.project(p)), p, **TOL)
    # out of the span is not
    off = inside + torch.randn(P, D, generator=torch.Generator().manual_seed(9))
    assert not torch.allclose(sub.reconstruct(sub.project(off)), off, atol=1e-2)


def test_prompt_is_mean_plus_u_z_and_only_z_trains():
    sub = IntrinsicSubspace.fit(prompts(), dim=5)
    model = tiny()
    bare = model(ids()).logits
    delta = IntrinsicPrompt(IntrinsicPromptConfig(length=P, dim=5), sub).attach(model)
    assert delta.num_trainable() == 5
    site = delta.sites["embed:tok"]
    with torch.no_grad():
        site.z.copy_(torch.randn(5, generator=torch.Generator().manual_seed(1)))
    want = sub.mean + (sub.basis @ site.z.detach()).view(P, D)
    torch.testing.assert_close(site.vectors(), want, **TOL)
    # the model sees [mean + U z; E x] (positions 0..P+T-1), the prompt positions cut out
    x = ids()
    got = model(x, labels=x)
    h = torch.cat([want.expand(3, -1, -1), model.embed.tok(x)], 1) + model.embed.pos(
        torch.arange(P + 5))
    for block in model.blocks:
        h = block(h)[0]
    torch.testing.assert_close(got.logits, model.lm_head(model.ln_f(h))[:, P:], **TOL)
    got.loss.backward()
    assert site.z.grad is not None and site.z.grad.abs().sum() > 0
    assert list(delta.state_dict()) == ["sites.embed:tok.z"]     # U and the mean stay out
    delta.rows = torch.tensor([1])                                # a mixed batch
    mixed = model(x).logits
    torch.testing.assert_close(mixed[1], got.logits[1], **TOL)
    torch.testing.assert_close(mixed[[0, 2]], bare[[0, 2]], **TOL)
    delta.detach()
    assert torch.equal(model(ids()).logits, bare)


def test_save_load_and_build_from_the_file(tmp_path):
    sub = IntrinsicSubspace.fit(prompts(), dim=2)
    sub.save(tmp_path / "sub.safetensors")
    back = IntrinsicSubspace.load(tmp_path / "sub.safetensors")
    assert torch.equal(back.mean, sub.mean) and torch.equal(back.basis, sub.basis)
    cfg = IntrinsicPromptConfig(length=P, dim=2, subspace=str(tmp_path / "sub.safetensors"))
    delta = IntrinsicPrompt(cfg).attach(tiny())
    assert torch.equal(delta.sites["embed:tok"].vectors(), sub.mean)      # z = 0: the mean
    save_file({"x": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not an intrinsic subspace file"):
        IntrinsicSubspace.load(tmp_path / "other.safetensors")


def test_bad_input_is_a_clear_error():
    with pytest.raises(ConfigError, match=r"intrinsic_prompt\.dim: 6 > 6 prompts - 1"):
        IntrinsicSubspace.fit(prompts(6), dim=6)
    with pytest.raises(ConfigError, match=r"intrinsic_prompt\.dim"):
        IntrinsicSubspace.fit(prompts(), dim=0)
    with pytest.raises(ValueError, match="one shape"):
        IntrinsicSubspace.fit([torch.zeros(P, D), torch.zeros(P + 1, D)], dim=1)
    with pytest.raises(ValueError, match="at least 2"):
        IntrinsicSubspace.fit([torch.zeros(P, D)], dim=1)
    with pytest.raises(ConfigError, match=r"intrinsic_prompt\.length"):
        IntrinsicPromptConfig(length=0)
    with pytest.raises(ConfigError, match=r"intrinsic_prompt\.subspace"):
        IntrinsicPrompt(IntrinsicPromptConfig(length=P, dim=2))
    sub = IntrinsicSubspace.fit(prompts(), dim=2)
    with pytest.raises(ConfigError, match="the subspace has dim=2"):
        IntrinsicPrompt(IntrinsicPromptConfig(length=P, dim=3), sub)
    wide = IntrinsicSubspace.fit([torch.randn(P, 16) for _ in range(3)], dim=2)
    with pytest.raises(ConfigError, match="16 wide, embed.tok embeds 32"):
        IntrinsicPrompt(IntrinsicPromptConfig(length=P, dim=2), wide).attach(tiny())
    with pytest.raises(ConfigError, match="has no token embedding"):
        IntrinsicPrompt(IntrinsicPromptConfig(length=P, dim=2), sub).attach(nn.Linear(2, 2))
