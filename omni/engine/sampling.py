"""Token choice for the thinker and the talker, with transformers' own logits processors.

Using the same processor classes, in the same order, as `generate()` is what makes greedy
streaming equal the reference token for token (the talker's repetition penalty applies even
when greedy).

Two of them rebuild a vocabulary-sized mask with `torch.isin` on every call (152k entries for
the thinker: on a CPU that was a third of a batched step's time); the subclasses below compute
the same values with the mask built once. Processors are called directly rather than through
`LogitsProcessorList.__call__`, which inspects every processor's signature on every call.
"""

from __future__ import annotations

import math

import torch
from transformers import GenerationConfig, LogitsProcessorList
from transformers.generation.logits_process import (
    MinNewTokensLengthLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
    SuppressTokensLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)


class _MinNewTokens(MinNewTokensLengthLogitsProcessor):
    """MinNewTokensLengthLogitsProcessor with its end-token mask built once."""

    _mask: torch.Tensor | None = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.Tensor) -> torch.Tensor:
        if input_ids.shape[-1] - self.prompt_length_to_skip >= self.min_new_tokens:
            return scores
        self._mask = _vocab_mask(self._mask, scores, self.eos_token_id)
        return torch.where(self._mask, -math.inf, scores)


class _Suppress(SuppressTokensLogitsProcessor):
    """SuppressTokensLogitsProcessor with its mask built once."""

    _mask: torch.Tensor | None = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.Tensor) -> torch.Tensor:
        self._mask = _vocab_mask(self._mask, scores, self.suppress_tokens)
        return torch.where(self._mask, -float("inf"), scores)


def _vocab_mask(mask: torch.Tensor | None, scores: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    if mask is None or mask.shape[-1] != scores.shape[-1] or mask.device != scores.device:
        vocab = torch.arange(scores.shape[-1], device=scores.device)
        mask = torch.isin(vocab, ids.to(scores.device))
    return mask


def build_processors(
    *,
    prompt_length: int,
    eos: list[int],
    greedy: bool,
    repetition_penalty: float | None = None,
    min_new_tokens: int = 0,
    suppress: list[int] | None = None,
    temperature: float | None = None,
    top_k: int | None = None,
    top_p: float | None = None,
) -> LogitsProcessorList:
    processors = LogitsProcessorList()
    if repetition_penalty not in (None, 1.0):
        processors.append(RepetitionPenaltyLogitsProcessor(repetition_penalty))
    if min_new_tokens > 0:
        processors.append(_MinNewTokens(prompt_length, min_new_tokens, eos))
    if suppress:
        processors.append(_Suppress(suppress))
    if not greedy:
        if temperature not in (None, 1.0):
            processors.append(TemperatureLogitsWarper(temperature))
        if top_k:
            processors.append(TopKLogitsWarper(top_k=top_k))
        if top_p not in (None, 1.0):
            processors.append(TopPLogitsWarper(top_p=top_p))
    return processors


def thinker_processors(
    config: GenerationConfig, greedy: bool, min_new_tokens: int, eos: list[int], prompt_length: int
) -> LogitsProcessorList:
    """The thinker samples as its checkpoint's generation_config says, unless greedy."""
    sample = bool(config.do_sample) and not greedy
    return build_processors(
        prompt_length=prompt_length,
        eos=eos,
        greedy=not sample,
        repetition_penalty=config.repetition_penalty,
        min_new_tokens=min_new_tokens,
        temperature=config.temperature,
        top_k=config.top_k,
        top_p=config.top_p,
    )


def choose(
    processors: LogitsProcessorList,
    seen: torch.Tensor,
    logits: torch.Tensor,
    greedy: bool,
    generator: torch.Generator | None,
) -> int:
    """One token from (vocab,) logits; `seen` is (1, n) ids so far (prompt + generated)."""
    scores = logits[None].float()
    for processor in processors:
        scores = processor(seen, scores)
    if greedy:
        return int(scores.argmax(-1))
    probs = torch.softmax(scores, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))


def sampling_generator(device: torch.device, seed: int | None) -> torch.Generator:
    """A per-reply generator, so concurrent sessions don't share (and perturb) one stream."""
    generator = torch.Generator(device=device)
    generator.manual_seed(seed if seed is not None else int(torch.seed() % 2**31))
    return generator
