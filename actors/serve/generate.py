"""Text generation behind ``POST /v1/generate``: a GPT checkpoint of ours, whole or streamed.

Why this shape: the decoding is ``models.generation`` (``stream`` yields each step's tokens, held
back only while a stop sequence could still cut them) and ``models.text_stream.TextChunker``
(text chunks that never split a UTF-8 character). ``locate_generator`` checks the checkpoint and
tokenizer named by a pre-training experiment, as ``bmray generate`` does, when the config is
checked, so a missing or foreign checkpoint never reaches a replica.
Whole requests are gathered by ``@serve.batch`` and grouped by generation settings: greedy rows
of a group share one left-padded run (each row gets the logits it would get alone); a seeded
sample runs alone, because ``generate`` seeds row b with ``seed + b``. Streams run one per
call: a batched stream would make every client wait for the batch to gather before its first
token, tie its lifetime to the longest row, and a client that disconnects could not stop just
its own row. Each decoding step runs in a worker thread, so the replica's event loop (health
checks, other requests, cancellation) stays responsive. Torch threads = the replica's CPUs.
"""
from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any, AsyncIterator, Iterator

import torch
from ray import serve

from bmray.actors.serve.deployments import torch_threads
from bmray.actors.train.experiment import experiment_from_dict
from bmray.actors.train.gpt_checkpoint import GPTCheckpointError, load_gpt, locate_gpt
from bmray.models.config import ModelConfig
from bmray.models.generation import GenerationConfig, stream
from bmray.models.text_stream import TextChunker
from bmray.models.tokenizer import Tokenizer
from bmray.models.typed_config import ConfigError, load_yaml

Params = dict[str, Any]


class GenerationInputError(ValueError):
    """A request the model cannot take (e.g. longer than its context); ``field`` names the key."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(field, message)        # both args: it pickles across processes
        self.field, self.message = field, message

    def __str__(self) -> str:
        return f"{self.field}: {self.message}"


def locate_generator(experiment: str, checkpoint: str | None = None) -> tuple[str, str]:
    """(checkpoint directory, tokenizer directory), absolute, of a pre-training experiment YAML;
    ConfigError naming ``generate.experiment`` / ``generate.checkpoint`` when either is missing,
    another family's, or the tokenizer is another model's. Relative paths inside the experiment
    are taken from the current directory, as ``bmray generate`` takes them."""
    if not Path(experiment).is_file():
        raise ConfigError(f"generate.experiment: no pre-training experiment file at "
                          f"{experiment!r}")
    try:
        exp = experiment_from_dict(load_yaml(experiment))
    except ConfigError as exc:
        raise ConfigError(f"generate.experiment: {experiment}: {exc}") from exc
    try:
        return locate_gpt(exp, checkpoint)
    except GPTCheckpointError as exc:
        key = "generate.checkpoint" if checkpoint and exc.part == "checkpoint" else \
            "generate.experiment"
        raise ConfigError(f"{key}: {exc}") from exc


def finish_reason(tokens: list[int], config: GenerationConfig) -> str:
    """OpenAI's: ``length`` when ``max_new_tokens`` ran out, else ``stop`` (eos or a stop string,
    which is cut, so the row is shorter)."""
    ended = config.eos_id is not None and bool(tokens) and tokens[-1] == config.eos_id
    return "length" if len(tokens) >= config.max_new_tokens and not ended else "stop"


def group_key(index: int, params: Params) -> tuple:
    """Requests with equal keys share one batched run: equal settings, and never a seeded sample
    (its draws depend on its row)."""
    if params.get("strategy") == "sample" and params.get("seed") is not None:
        return ("alone", index)
    return tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in params.items()))


class Generator:
    """The model, its tokenizer and the request checks, outside Serve (unit-testable)."""

    def __init__(self, model: torch.nn.Module, tokenizer: Tokenizer) -> None:
        self.model, self.tok = model, tokenizer
        self.mc: ModelConfig = model.config

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)

    def prepare(self, prompt: str, params: Params) -> tuple[list[int], GenerationConfig]:
        """Prompt ids and the generation config; GenerationInputError naming the field."""
        try:
            config = GenerationConfig(eos_id=self.mc.eos_id, pad_id=self.mc.pad_id, **params)
        except ConfigError as exc:
            field = str(exc).split(":", 1)[0].removeprefix("generation.").split("[")[0]
            raise GenerationInputError(field, str(exc)) from exc
        ids = self.tok.encode(prompt)
        if not ids:
            raise GenerationInputError("prompt", "the prompt has no tokens")
        if len(ids) + config.max_new_tokens > self.mc.max_seq_len:
            raise GenerationInputError(
                "max_new_tokens", f"the prompt's {len(ids)} tokens + max_new_tokens "
                f"{config.max_new_tokens} exceed the model's context of {self.mc.max_seq_len}")
        return ids, config

    def steps(self, ids: list[list[int]], config: GenerationConfig) -> Iterator[list[list[int]]]:
        return stream(self.model, ids, config, tokenizer=self.tok)

    def run(self, calls: list[tuple[list[int], GenerationConfig]]) -> list[dict[str, Any]]:
        """Whole answers of calls sharing one config, in one left-padded batch."""
        config = calls[0][1]
        rows: list[list[int]] = [[] for _ in calls]
        for step in self.steps([ids for ids, _ in calls], config):
            for row, new in zip(rows, step):
                row.extend(new)
        return [{"text": self.decode(row), "tokens": row,
                 "finish_reason": finish_reason(row, config)} for row in rows]


@serve.deployment(name="generate")
class GenerateDeployment:
    """A GPT checkpoint + tokenizer (from ``locate_generator``), loaded once per replica."""

    def __init__(self, checkpoint: str, tokenizer: str, num_cpus: float = 1.0,
                 max_batch_size: int = 8, batch_wait_timeout_s: float = 0.005) -> None:
        torch_threads(num_cpus)
        self.gen = Generator(*load_gpt(checkpoint, tokenizer))
        self.counts = {"streams_finished": 0, "streams_cancelled": 0, "tokens": 0}
        self.generate_batch.set_max_batch_size(max_batch_size)
        self.generate_batch.set_batch_wait_timeout_s(batch_wait_timeout_s)

    def stats(self) -> dict[str, int]:
        """Streams finished / cancelled (a client went away) and tokens generated here."""
        return dict(self.counts)

    def run_groups(self, calls: list[tuple[list[int], GenerationConfig, Params]]
                   ) -> list[dict[str, Any]]:
        groups: dict[tuple, list[int]] = {}
        for i, (_, _, params) in enumerate(calls):
            groups.setdefault(group_key(i, params), []).append(i)
        out: list[dict[str, Any]] = [{} for _ in calls]
        for members in groups.values():
            answers = self.gen.run([(calls[i][0], calls[i][1]) for i in members])
            for i, answer in zip(members, answers):
                out[i] = answer
                self.counts["tokens"] += len(answer["tokens"])
        return out

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.005)
    async def generate_batch(self, calls: list[tuple[list[int], GenerationConfig, Params]]
                             ) -> list[dict[str, Any]]:
        return await asyncio.to_thread(self.run_groups, calls)

    async def generate(self, prompt: str, params: Params) -> dict[str, Any]:
        """``{text, tokens, finish_reason}``; GenerationInputError before any compute."""
        ids, config = self.gen.prepare(prompt, params)
        return await self.generate_batch((ids, config, dict(params)))

    async def stream(self, prompt: str, params: Params) -> AsyncIterator[dict[str, Any]]:
        """``{"text": chunk}`` items as tokens are produced, then ``{"finish_reason", "tokens"}``
        (the count). Cancelled (client gone): generation stops at the step in progress."""
        ids, config = self.gen.prepare(prompt, params)
        steps = self.gen.steps([ids], config)
        chunker = TextChunker(self.gen.decode)
        tokens: list[int] = []
        finished = False
        try:
            while (step := await asyncio.to_thread(next, steps, None)) is not None:
                tokens.extend(step[0])
                self.counts["tokens"] += len(step[0])
                if text := chunker.push(0, step[0]):
                    yield {"text": text}
            if tail := chunker.flush(0):
                yield {"text": tail}
            finished = True
            self.counts["streams_finished"] += 1
            yield {"finish_reason": finish_reason(tokens, config), "tokens": len(tokens)}
        finally:
            if not finished:
                self.counts["streams_cancelled"] += 1
            try:
                steps.close()
            except ValueError:      # a step still runs in its thread: it is never resumed
                pass
