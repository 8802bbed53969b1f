"""Encoder-only pre-training: BERT (masked LM + next-sentence prediction) and ELECTRA.

BERT (Devlin et al. 2019): a bidirectional pre-LN encoder over ``[CLS] A [SEP] B [SEP]`` with
token + position + segment embeddings. Two heads: the masked-LM head (dense -> GELU -> LayerNorm ->
vocabulary projection tied to the token embedding, plus an output bias) and the NSP head (tanh
"pooler" over the [CLS] vector -> 2 classes; label 0 = B follows A, 1 = B is random). The
masking itself (RoBERTa-style dynamic 80/10/10, Liu et al. 2019) lives in
``models.objectives.MaskedLM``; the model just scores what it is given.

ELECTRA (Clark et al. 2020): a small masked-LM *generator* fills the masked positions with samples
from its output distribution, and the *discriminator* (the model we keep) predicts for every token
whether it was replaced. ``loss = L_MLM(generator) + lambda * L_Disc`` with lambda = 50 (eq. 1,
sec. 3.1, ``cfg.electra_disc_weight``). A sampled token equal to the original counts as original.
Sampling is not differentiated through (the paper trains the generator by maximum likelihood, not
adversarially). Generator and discriminator share the token and position embeddings (sec. 3.2);
the generator is narrower (``cfg.electra_generator_scale``), so it reads the shared embeddings
through ``generator.in_proj`` and projects back to the embedding width before its tied output
layer, as the reference implementation does with its ``embedding_size``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bmray.models.layers.blocks import (BLOCK_TP_PLAN, Embeddings, TransformerBlock, init_weights,
                                        moe_for_layer, positions_for)
from bmray.models.config import ModelConfig
from bmray.models.families.gpt import sum_aux
from bmray.models.layers.losses import IGNORE_INDEX, accuracy, cross_entropy, metrics_enabled
from bmray.models.outputs import ModelOutput
from bmray.models.structure import TensorParallelPlan


def run_encoder(blocks: nn.ModuleList, x: Tensor, attention_mask: Tensor | None
                ) -> tuple[Tensor, list[Tensor | None]]:
    """Run bidirectional blocks; returns the last hidden state and each block's MoE aux loss."""
    auxes = []
    for block in blocks:
        x, _, aux = block(x, key_padding_mask=attention_mask)
        auxes.append(aux)
    return x, auxes


class MLMHead(nn.Module):
    """BERT's masked-LM head: ``decoder(LN(GELU(dense(h)))) `` with ``decoder`` tied to the input
    embedding (``d_embed`` wide) and its own output bias."""

    def __init__(self, d_hidden: int, d_embed: int, vocab_size: int):
        super().__init__()
        self.dense = nn.Linear(d_hidden, d_embed)
        self.ln = nn.LayerNorm(d_embed)
        self.decoder = nn.Linear(d_embed, vocab_size)

    def forward(self, h: Tensor) -> Tensor:
        return self.decoder(self.ln(F.gelu(self.dense(h))))


class BertForPretraining(nn.Module):
    """forward(input_ids, attention_mask=None, token_type_ids=None, mlm_labels=None, nsp_labels=None)
    -> ModelOutput(logits = MLM logits [B, T, V], loss = MLM + NSP (+ aux))."""

    block_lists = ("blocks",)
    tp_plan = TensorParallelPlan(BLOCK_TP_PLAN)     # embeddings and heads stay replicated

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.embed = Embeddings(cfg.vocab_size, cfg.d_model, cfg.max_seq_len, cfg.pos_encoding,
                                cfg.dropout, n_token_types=2)
        self.blocks = nn.ModuleList(
            TransformerBlock(cfg.d_model, cfg.n_heads, cfg.d_ff, cfg.dropout, moe=moe_for_layer(cfg.moe, i))
            for i in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.mlm_head = MLMHead(cfg.d_model, cfg.d_model, cfg.vocab_size)
        self.pooler = nn.Linear(cfg.d_model, cfg.d_model)
        self.nsp_head = nn.Linear(cfg.d_model, 2)
        init_weights(self, cfg.n_layers)
        if cfg.tie_embeddings:
            self.mlm_head.decoder.weight = self.embed.tok.weight

    def _encode(self, input_ids, attention_mask, token_type_ids):
        x = self.embed(input_ids, positions_for(input_ids), token_type_ids)
        x, auxes = run_encoder(self.blocks, x, attention_mask)
        return self.ln_f(x), auxes

    def encode(self, input_ids: Tensor, attention_mask: Tensor | None = None,
               token_type_ids: Tensor | None = None) -> Tensor:
        """Final hidden states [B, T, D] (for fine-tuning heads)."""
        return self._encode(input_ids, attention_mask, token_type_ids)[0]

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                token_type_ids: Tensor | None = None, mlm_labels: Tensor | None = None,
                nsp_labels: Tensor | None = None) -> ModelOutput:
        cfg = self.config
        h, auxes = self._encode(input_ids, attention_mask, token_type_ids)
        logits = self.mlm_head(h)
        aux_loss = sum_aux(auxes, cfg.moe.aux_loss_weight) if cfg.moe else None
        losses, metrics = [], {}
        if mlm_labels is not None:
            mlm_loss = cross_entropy(logits, mlm_labels, label_smoothing=cfg.label_smoothing)
            losses.append(mlm_loss)
            metrics["mlm_loss"] = mlm_loss.detach()
            if metrics_enabled():
                metrics["mlm_acc"] = accuracy(logits, mlm_labels)
        if nsp_labels is not None:
            nsp_logits = self.nsp_head(torch.tanh(self.pooler(h[:, 0])))
            nsp_loss = cross_entropy(nsp_logits, nsp_labels)
            losses.append(nsp_loss)
            metrics["nsp_loss"] = nsp_loss.detach()
            if metrics_enabled():
                metrics["nsp_acc"] = accuracy(nsp_logits, nsp_labels)
        loss = None
        if losses:
            loss = torch.stack(losses).sum() + (aux_loss if aux_loss is not None else 0.0)
            if aux_loss is not None:
                metrics["aux_loss"] = aux_loss.detach()
        return ModelOutput(logits=logits, loss=loss, aux_loss=aux_loss, metrics=metrics)


class ElectraGenerator(nn.Module):
    """The small masked-LM that proposes replacements; reads the shared embeddings."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d_gen, h_gen, ff_gen = cfg.electra_generator_dims()
        self.in_proj = nn.Linear(cfg.d_model, d_gen)
        self.blocks = nn.ModuleList(TransformerBlock(d_gen, h_gen, ff_gen, cfg.dropout)
                                    for _ in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(d_gen)
        self.mlm_head = MLMHead(d_gen, cfg.d_model, cfg.vocab_size)

    def forward(self, embedded: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        x, _ = run_encoder(self.blocks, self.in_proj(embedded), attention_mask)
        return self.mlm_head(self.ln_f(x))


def sample_tokens(logits: Tensor, method: str, generator: torch.Generator | None = None) -> Tensor:
    """Draw one token per row of ``logits`` [N, V] from softmax(logits).

    "gumbel": Gumbel-max, ``argmax(logits - log(-log U))`` with U ~ Uniform(0, 1) (Gumbel 1954;
    Maddison et al. 2014), what ELECTRA's reference code does; "multinomial": ``torch.multinomial``.
    Both are exact samples of the same distribution.
    """
    logits = logits.float()
    if method == "gumbel":
        u = torch.rand(logits.shape, generator=generator, device=logits.device)
        u = u.clamp(torch.finfo(u.dtype).tiny, 1.0 - torch.finfo(u.dtype).eps)
        return (logits - torch.log(-torch.log(u))).argmax(dim=-1)
    if method == "multinomial":
        return torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator).squeeze(-1)
    raise ValueError(f"unknown sampling method {method!r}")


class ElectraForPretraining(nn.Module):
    """forward(input_ids, attention_mask=None, mlm_labels=None, generator=None)
    -> ModelOutput(logits = discriminator logits [B, T], loss = L_MLM + 50 * L_Disc (+ aux)).

    ``input_ids`` is the *masked* input (from ``models.objectives.Electra``); ``mlm_labels`` holds the
    original token at masked positions and -100 elsewhere. ``generator`` is the ``torch.Generator``
    for the replacement sampling (None: the global torch RNG). Without ``mlm_labels`` the
    discriminator scores ``input_ids`` as given (fine-tuning / inference).
    """

    block_lists = ("generator.blocks", "blocks")
    tp_plan = TensorParallelPlan(BLOCK_TP_PLAN)     # embeddings and heads stay replicated

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.embed = Embeddings(cfg.vocab_size, cfg.d_model, cfg.max_seq_len, cfg.pos_encoding, cfg.dropout)
        self.generator = ElectraGenerator(cfg)
        self.blocks = nn.ModuleList(
            TransformerBlock(cfg.d_model, cfg.n_heads, cfg.d_ff, cfg.dropout, moe=moe_for_layer(cfg.moe, i))
            for i in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.disc_dense = nn.Linear(cfg.d_model, cfg.d_model)
        self.disc_out = nn.Linear(cfg.d_model, 1)
        init_weights(self, cfg.n_layers)
        if cfg.tie_embeddings:
            self.generator.mlm_head.decoder.weight = self.embed.tok.weight

    def corrupt(self, input_ids: Tensor, mlm_labels: Tensor, gen_logits: Tensor,
                generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """Replace masked positions with generator samples: (corrupted_ids, disc_labels).

        disc_labels[b, t] = 1.0 where the corrupted token differs from the original, else 0.0.
        """
        masked = mlm_labels != IGNORE_INDEX
        original = torch.where(masked, mlm_labels, input_ids)
        corrupted = original.clone()
        corrupted[masked] = sample_tokens(gen_logits[masked].detach(), self.config.electra_sampling,
                                          generator)
        return corrupted, (corrupted != original).float()

    def discriminate(self, input_ids: Tensor, attention_mask: Tensor | None = None
                     ) -> tuple[Tensor, list[Tensor | None]]:
        """Replaced-token logits [B, T] and the blocks' MoE aux losses."""
        x = self.embed(input_ids, positions_for(input_ids))
        x, auxes = run_encoder(self.blocks, x, attention_mask)
        h = self.ln_f(x)
        return self.disc_out(F.gelu(self.disc_dense(h))).squeeze(-1), auxes

    def encode(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Discriminator hidden states [B, T, D] (the encoder kept for fine-tuning)."""
        x, _ = run_encoder(self.blocks, self.embed(input_ids, positions_for(input_ids)), attention_mask)
        return self.ln_f(x)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                mlm_labels: Tensor | None = None, generator: torch.Generator | None = None) -> ModelOutput:
        cfg = self.config
        if mlm_labels is None:
            logits, auxes = self.discriminate(input_ids, attention_mask)
            aux = sum_aux(auxes, cfg.moe.aux_loss_weight) if cfg.moe else None
            return ModelOutput(logits=logits, aux_loss=aux)
        gen_logits = self.generator(self.embed(input_ids, positions_for(input_ids)), attention_mask)
        mlm_loss = cross_entropy(gen_logits, mlm_labels, label_smoothing=cfg.label_smoothing)
        corrupted, disc_labels = self.corrupt(input_ids, mlm_labels, gen_logits, generator)
        logits, auxes = self.discriminate(corrupted, attention_mask)
        real = (attention_mask.bool() if attention_mask is not None
                else torch.ones_like(disc_labels, dtype=torch.bool))
        disc_loss = F.binary_cross_entropy_with_logits(logits[real].float(), disc_labels[real])
        aux_loss = sum_aux(auxes, cfg.moe.aux_loss_weight) if cfg.moe else None
        loss = mlm_loss + cfg.electra_disc_weight * disc_loss
        if aux_loss is not None:
            loss = loss + aux_loss
        with torch.no_grad():
            metrics = {"mlm_loss": mlm_loss.detach(), "disc_loss": disc_loss.detach()}
            if metrics_enabled():
                metrics.update(
                    mlm_acc=accuracy(gen_logits, mlm_labels),
                    disc_acc=((logits[real] > 0).float() == disc_labels[real]).float().mean(),
                    replaced_frac=disc_labels[real].mean())
            if aux_loss is not None:
                metrics["aux_loss"] = aux_loss.detach()
        return ModelOutput(logits=logits, loss=loss, aux_loss=aux_loss, metrics=metrics)
