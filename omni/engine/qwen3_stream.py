"""Qwen3-Omni streamed stage by stage: text tokens, then each 80 ms codec frame, then audio.

`Qwen3OmniMoeForConditionalGeneration.generate()` runs the thinker to the end of the reply,
then the talker to the end of the speech, then Code2Wav over all of it. This module runs the
same three stages interleaved on one loaded model, so audio starts after the reply's first
frames instead of at its end:

- thinker: its own forward with a KV cache, one token per step; the prompt's input
  embeddings and `accept_hidden_layer` states come out of the prefill, each new token's
  embedding is the thinker's input embedding of it (what generate() reads back from
  `hidden_states[0]` of the step that feeds it);
- talker + code predictor: the talker's prompt is built by the model's own
  `_get_talker_user_parts` / `_get_talker_assistant_parts` (generate()'s helpers), which need
  only the first reply token; talker step k then adds the projected embedding of reply token
  k+1 (`trailing_text_hidden` in generate()), `tts_eos` in place of the reply's last token
  (generate() never feeds that one, eos or not) and `tts_pad` after it. The code predictor
  fills codebooks 1..15 of each frame with its own forward and lm heads, and the next talker
  input is the sum of the frame's 16 code embeddings, as in the talker's
  `prepare_inputs_for_generation`. A frame whose first code is the codec eos ends the speech;
  so does the talker's token cap, whose last first code gets no residuals (as in generate());
- Code2Wav: a `Code2WavStream` of the reply, decoded as a batch of one
  (omni/engine/qwen3_code2wav.py).

Token choice uses transformers' logits processors in generate()'s order (omni/engine/sampling.py),
so greedy streaming equals generate() token for token and code for code. Batch size 1.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from transformers import LogitsProcessorList, Qwen3OmniMoeForConditionalGeneration

from omni.engine.qwen3_code2wav import AudioChunk, Code2WavBatch
from omni.engine.sampling import build_processors, choose, sampling_generator

# generate()'s defaults: the code predictor samples with top_k 50 / top_p 0.8 when sampling
CODE_PREDICTOR_TOP_K = 50
CODE_PREDICTOR_TOP_P = 0.8
# how a row of a batch chooses its next code: its processors, greedy or not, its generator
Chooser = tuple[LogitsProcessorList, bool, torch.Generator | None]


def code0_processors(
    talker_config, greedy: bool, min_new_tokens: int = 0, **sampling: float
) -> LogitsProcessorList:
    """generate()'s talker processors for codebook 0: the codec eos ends the speech, the
    codec's other top-1024 special ids are suppressed; `sampling`: repetition_penalty,
    temperature, top_k, top_p."""
    vocab = talker_config.text_config.vocab_size
    eos = talker_config.codec_eos_token_id
    return build_processors(
        prompt_length=0,
        eos=[eos],
        greedy=greedy,
        min_new_tokens=min_new_tokens,
        suppress=[i for i in range(vocab - 1024, vocab) if i != eos],
        **sampling,
    )


def residual_processors(talker: torch.nn.Module, greedy: bool) -> LogitsProcessorList:
    """The code predictor's, for codebooks 1..15 (generate()'s fixed top-k / top-p)."""
    return build_processors(
        prompt_length=0,
        eos=[],
        greedy=greedy,
        temperature=talker.code_predictor.generation_config.temperature,
        top_k=CODE_PREDICTOR_TOP_K,
        top_p=CODE_PREDICTOR_TOP_P,
    )


def residual_codes(
    talker: torch.nn.Module, hidden: torch.Tensor, code0: torch.Tensor, choosers: list[Chooser]
) -> torch.Tensor:
    """(B, 16) codes of B frames: each frame's code 0 (B,) and the talker's last hidden state
    (B, H) it came from, then codebooks 1..15 from the code predictor over the batch (a fresh
    cache per frame), row b choosing by `choosers[b]`."""
    predictor = talker.code_predictor
    embeds = torch.stack((hidden, talker.get_input_embeddings()(code0)), dim=1)
    out = predictor(inputs_embeds=embeds, use_cache=True)
    codes = [code0]
    seen = code0.new_zeros((len(choosers), 0))  # each row's residual codes so far
    groups = talker.config.num_code_groups
    for step in range(1, groups):
        chosen = torch.tensor(
            [
                choose(processors, seen[b : b + 1], row, greedy, generator)
                for b, ((processors, greedy, generator), row) in enumerate(
                    zip(choosers, out.logits[:, -1])
                )
            ],
            device=code0.device,
        )
        codes.append(chosen)
        if step < groups - 1:
            seen = torch.cat((seen, chosen[:, None]), dim=1)
            out = predictor(
                input_ids=chosen[:, None], cache=out.cache, use_cache=True, generation_steps=step
            )
    return torch.stack(codes, dim=1)


def frame_embeddings(talker: torch.nn.Module, codes: torch.Tensor) -> torch.Tensor:
    """(B, H): the sum of each frame's 16 code embeddings (the talker's next input)."""
    residual = talker.code_predictor.get_input_embeddings()
    parts = [talker.get_input_embeddings()(codes[:, :1])]
    parts += [residual[i](codes[:, i + 1 : i + 2]) for i in range(codes.shape[1] - 1)]
    return torch.cat(parts, dim=1).sum(1)


@dataclass
class StreamOptions:
    """Decoding settings. greedy=True makes all three token choices greedy (as the comparison
    with generate() runs it); when sampling, the talker_* defaults are generate()'s."""

    speaker: str = "Ethan"
    greedy: bool = True
    max_text_tokens: int = 1024
    text_eos: tuple[int, ...] = (151645,)
    text_temperature: float = 1.0
    text_top_k: int = 50
    text_top_p: float = 1.0
    max_codec_frames: int = 4096
    talker_temperature: float = 0.9
    talker_top_k: int = 50
    talker_top_p: float = 1.0
    talker_repetition_penalty: float = 1.05
    # Code2Wav: decode the first frame, then every `chunk_frames` new frames, with
    # `left_context_frames` of states before them through its convolutions (None:
    # the least that is exact: equal to the whole-reply decode; fewer are not)
    chunk_frames: int = 4
    left_context_frames: int | None = None
    seed: int | None = None

    def __post_init__(self) -> None:
        for name in ("max_text_tokens", "max_codec_frames", "chunk_frames"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")


@dataclass
class TextToken:
    index: int  # 0 = the reply's first token
    token_id: int
    logits: torch.Tensor  # (vocab,) float32, before any processor
    embedding: torch.Tensor  # (1, 1, hidden): the thinker's input embedding of the token
    final: bool  # eos, or the text cap reached


@dataclass
class CodecFrame:
    index: int
    codes: torch.Tensor  # (16,) long: codebook 0 from the talker, 1..15 from the code predictor


@dataclass
class _Prompt:
    embeds: torch.Tensor  # (1, T, hidden): the thinker's layer-0 states of the prompt
    accept_hidden: torch.Tensor  # (1, T, hidden): its `accept_hidden_layer` states


@dataclass
class _Reply:
    """The reply's text so far, pulled from the thinker as the talker needs it (both lists are
    bounded by max_text_tokens; the outbox is drained before every frame)."""

    tokens: Iterator[TextToken]
    text: list[TextToken] = field(default_factory=list)
    outbox: deque[TextToken] = field(default_factory=deque)

    def at(self, index: int) -> TextToken | None:
        """Token `index` of the reply, or None if the reply ended before it."""
        while len(self.text) <= index and not (self.text and self.text[-1].final):
            token = next(self.tokens)
            self.text.append(token)
            self.outbox.append(token)
        return self.text[index] if index < len(self.text) else None

    def drain(self) -> Iterator[TextToken]:
        while self.outbox:
            yield self.outbox.popleft()


class Qwen3OmniStreamer:
    """Streams one reply of a loaded Qwen3-Omni: TextToken, CodecFrame and AudioChunk events."""

    def __init__(
        self, model: Qwen3OmniMoeForConditionalGeneration, options: StreamOptions | None = None
    ) -> None:
        if not model.has_talker:
            raise ValueError("the model was loaded without its talker (enable_audio_output=False)")
        self.model = model
        self.options = options or StreamOptions()
        talker_config = model.config.talker_config
        self.speaker_id = talker_config.speaker_id.get(self.options.speaker.lower())
        if self.speaker_id is None:
            known = ", ".join(sorted(talker_config.speaker_id))
            raise ValueError(f"unknown speaker {self.options.speaker!r}; known: {known}")
        self.device = model.thinker.device
        self.generator = (
            None if self.options.greedy else sampling_generator(self.device, self.options.seed)
        )
        self.code2wav = Code2WavBatch(
            model.code2wav, self.options.left_context_frames, self.options.chunk_frames
        )

    # -- the whole reply --------------------------------------------------------------------
    @torch.no_grad()
    def stream(
        self, input_ids: torch.Tensor, **media
    ) -> Iterator[TextToken | CodecFrame | AudioChunk]:
        """input_ids: (1, T) ending with `<|im_start|>assistant\\n`; media: the thinker's
        multimodal inputs as generate() takes them (input_features, feature_attention_mask,
        pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw, ...)."""
        tokens = self.thinker_tokens(input_ids, **media)
        prompt = next(tokens)
        reply = _Reply(tokens)
        decoder = self.code2wav.stream()
        for frame in self.talker_frames(input_ids, prompt, reply.at, media):
            yield from reply.drain()
            yield frame
            decoder.add(frame.codes.tolist())
            yield from self.code2wav.ready_chunks(decoder)
        decoder.finish()
        yield from self.code2wav.ready_chunks(decoder)
        yield from reply.drain()
        if not (reply.text and reply.text[-1].final):
            yield from tokens

    # -- thinker ------------------------------------------------------------------------------
    def thinker_tokens(self, input_ids: torch.Tensor, **media) -> Iterator[_Prompt | TextToken]:
        """The prompt's states first, then each reply token as soon as it is chosen."""
        if input_ids.dim() != 2 or input_ids.shape[0] != 1:
            raise ValueError(
                f"input_ids must be one sequence of shape (1, T), got {tuple(input_ids.shape)}"
            )
        options = self.options
        thinker = self.model.thinker
        layer = self.model.config.talker_config.accept_hidden_layer
        input_ids = input_ids.to(self.device)
        out = thinker(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            use_cache=True,
            output_hidden_states=True,
            **media,
        )
        yield _Prompt(out.hidden_states[0], out.hidden_states[layer])
        processors = build_processors(
            prompt_length=input_ids.shape[1],
            eos=list(options.text_eos),
            greedy=options.greedy,
            temperature=options.text_temperature,
            top_k=options.text_top_k,
            top_p=options.text_top_p,
        )
        seen = input_ids
        embed = thinker.get_input_embeddings()
        for index in range(options.max_text_tokens):
            logits = out.logits[0, -1].float()
            token_id = choose(processors, seen, logits, options.greedy, self.generator)
            token = torch.tensor([[token_id]], device=self.device)
            final = token_id in options.text_eos or index == options.max_text_tokens - 1
            yield TextToken(index, token_id, logits, embed(token), final)
            if final:
                return
            seen = torch.cat((seen, token), dim=1)
            out = thinker(input_ids=token, cache=out.cache, use_cache=True)

    # -- talker and code predictor ------------------------------------------------------------
    def talker_frames(
        self,
        input_ids: torch.Tensor,
        prompt: _Prompt,
        text_at: Callable[[int], TextToken | None],
        media: dict,
    ) -> Iterator[CodecFrame]:
        """Each frame's 16 codes; reads reply token k+1 before talker step k."""
        first = text_at(0)
        if first is None or first.final:
            return  # generate() cannot voice a one-token reply either: it never feeds that token
        model, options = self.model, self.options
        talker = model.talker
        talker_config = model.config.talker_config
        tts = self._tts_embeds()
        _, tts_eos, tts_pad = tts
        embeds, ids = self._talker_prompt(input_ids.to(self.device), prompt, first, tts)
        # the talker gets the thinker's vision grids and audio lengths for its 3-D positions
        talker_media = {
            k: media[k]
            for k in ("image_grid_thw", "video_grid_thw", "video_second_per_grid")
            if k in media
        }
        if (feature_mask := media.get("feature_attention_mask")) is not None:
            talker_media["audio_feature_lengths"] = feature_mask.sum(dim=1)
        out = talker(
            inputs_embeds=embeds,
            talker_input_ids=ids,
            attention_mask=torch.ones_like(ids),
            use_cache=True,
            output_hidden_states=True,
            **talker_media,
        )
        eos = talker_config.codec_eos_token_id
        processors = code0_processors(
            talker_config,
            options.greedy,
            repetition_penalty=options.talker_repetition_penalty,
            temperature=options.talker_temperature,
            top_k=options.talker_top_k,
            top_p=options.talker_top_p,
        )
        residuals: list[Chooser] = [
            (residual_processors(talker, options.greedy), options.greedy, self.generator)
        ]
        seen = torch.zeros((1, 0), dtype=torch.long, device=self.device)  # first codes so far
        for index in range(options.max_codec_frames):
            code0 = choose(processors, seen, out.logits[0, -1], options.greedy, self.generator)
            if code0 == eos or index == options.max_codec_frames - 1:
                return
            code0 = torch.tensor([[code0]], device=self.device)
            seen = torch.cat((seen, code0), dim=1)
            past_hidden = out.hidden_states[0][-1][:, -1]
            codes = residual_codes(talker, past_hidden, code0[:, 0], residuals)
            yield CodecFrame(index, codes[0])
            next_embed = frame_embeddings(talker, codes)[:, None]
            token = text_at(index + 1)
            if token is None:
                next_embed = next_embed + tts_pad
            elif token.final:
                next_embed = next_embed + tts_eos
            else:
                next_embed = next_embed + talker.text_projection(token.embedding)
            out = talker(
                inputs_embeds=next_embed,
                cache=out.cache,
                use_cache=True,
                output_hidden_states=True,
                generation_step=index,  # only echoed back by the forward; the text is added here
            )

    def _talker_prompt(
        self,
        input_ids: torch.Tensor,
        prompt: _Prompt,
        first: TextToken,
        tts: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The talker's prompt as generate() builds it: the user turns' tokens (text projected,
        media from the accept layer), then the assistant header with the codec's think/speaker/
        bos tokens and the reply's first token."""
        config = self.model.config
        thinker_config = config.thinker_config
        length = input_ids.shape[1]
        header = (input_ids[0, :-1] == config.im_start_token_id) & (
            input_ids[0, 1:] == config.assistant_token_id
        )
        starts = torch.nonzero(header).flatten()
        if starts.numel() == 0 or int(starts[-1]) != length - 3:
            raise ValueError(
                "input_ids must end with the assistant header <|im_start|>assistant\\n"
            )
        media_tokens = (
            thinker_config.audio_token_id,
            thinker_config.image_token_id,
            thinker_config.video_token_id,
        )
        media_mask = torch.isin(input_ids, torch.tensor(media_tokens, device=input_ids.device))
        user_part = self.model._get_talker_user_parts(
            0, length, media_mask, prompt.accept_hidden, prompt.embeds
        )
        # a token belongs to the turn whose <|im_start|> is the last one before it
        positions = torch.arange(length, device=input_ids.device)
        turn_starts = torch.where(input_ids[0] == config.im_start_token_id, positions, -1)
        turn_of = torch.cummax(turn_starts, dim=0).values.clamp_min(0)
        user = input_ids[0, (turn_of + 1).clamp_max(length - 1)] == config.user_token_id
        tts_bos, tts_eos, tts_pad = tts
        assistant_embeds, assistant_ids, _ = self.model._get_talker_assistant_parts(
            length - 3,
            length + 1,
            self.speaker_id,
            torch.cat((prompt.embeds, first.embedding), dim=1),
            tts_pad,
            tts_bos,
            tts_eos,
        )
        embeds = torch.cat((user_part[:, user], assistant_embeds), dim=1)
        ids = torch.cat((input_ids[:, user], assistant_ids), dim=1)
        return embeds, ids

    def _tts_embeds(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(1, 1, hidden) each: tts_bos, tts_eos, tts_pad through the talker's text projection."""
        config = self.model.config
        ids = torch.tensor(
            [[config.tts_bos_token_id, config.tts_eos_token_id, config.tts_pad_token_id]],
            device=self.device,
        )
        projected = self.model.talker.text_projection(
            self.model.thinker.get_input_embeddings()(ids)
        )
        return projected.chunk(3, dim=1)
