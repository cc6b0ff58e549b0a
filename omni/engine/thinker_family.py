"""What the thinker does differently per model family, in one place.

The conversation (thinker.py) is the same for Qwen2.5-Omni and Qwen3-Omni: the chat template,
streamed prefill, replies, truncation, the context budget. What differs:

- the system prompt: Qwen2.5-Omni speaks only with its speech prompt first; Qwen3-Omni needs
  none (no instructions: no system turn, as its chat template renders it);
- how user speech is cut for the audio encoder: Qwen2.5-Omni's attends within 2-second
  windows, so 2-second chunks prefilled while the caller talks equal one encode of the turn;
  Qwen3-Omni's attends within `n_window_infer` mel frames (8 s in its released config), so its
  chunks are that long to stay exact (the turn's last chunk is prefilled after it ends: up to
  8 s of audio there instead of 2);
- how many audio tokens a chunk makes (the encoders downsample differently);
- what a context row carries for the talker (protocol.ContextRows): Qwen2.5-Omni's talker
  reads the token's embedding (zeroed for audio/image/video placeholders) plus the last hidden
  state; Qwen3-Omni's reads the embedding of a text token and the `accept_hidden_layer` state
  of a multimodal one (generate()'s `_get_talker_user_parts`);
- images: Qwen3-Omni also adds its vision encoder's deepstack features into the first LLM
  layers at the image's positions (the batched step passes them to its text model, as
  generate() does); `deepstack` says whether a family has them;
- a video with its audio (camera frames while the caller talks): Qwen2.5-Omni puts each
  2-second chunk's grid steps before that chunk's audio, its paired <|vision_bos|><|audio_bos|>
  (and eos) on one position, 25 positions a second; Qwen3-Omni puts each grid step right
  before the audio token at its start time, the paired tokens on two positions, 13 a second
  (`video_interleave`, `positions_per_second`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from transformers.models.qwen2_5_omni.processing_qwen2_5_omni import (
    _get_feat_extract_output_lengths as qwen2_5_audio_tokens,
)
from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import (
    _get_feat_extract_output_lengths as qwen3_audio_tokens,
)

from omni.checkpoints.family import QWEN2_5_OMNI, QWEN3_OMNI, Family
from omni.engine.positions import POSITIONS_PER_SECOND

# the system prompt Qwen2.5-Omni needs to produce speech (from Qwen's model card)
SPEECH_SYSTEM_PROMPT = (
    "You are Qwen, a virtual human developed by the Qwen Team, Alibaba Group, capable of "
    "perceiving auditory and visual inputs, as well as generating text and speech."
)
QWEN2_5_FRAMES_PER_CHUNK = 200  # 2 s of log-mel at 100 frames/s: the audio encoder's window


@dataclass(frozen=True)
class ThinkerFamily:
    family: Family
    speech_prompt: str | None  # a system prompt the model needs to speak, first in every one
    frames_per_chunk: int  # log-mel frames of user speech prefilled at once
    audio_tokens: Callable[[int], int]  # the audio tokens of that many log-mel frames
    # the talker reads a middle layer's states of multimodal tokens (its config's
    # accept_hidden_layer, which ThinkerStage is given) rather than the last hidden state
    talker_reads_layer: bool
    deepstack: bool  # image and video features added into the first LLM layers too
    # a video's audio and grid steps: "chunks" (Qwen2.5-Omni) or "timeline" (Qwen3-Omni)
    video_interleave: Literal["chunks", "timeline"]
    positions_per_second: float  # TMRoPE's temporal positions per second of video

    @property
    def name(self) -> str:
        return self.family.name

    def system_prompt(self, instructions: str | None) -> str:
        """The system turn's text ("": no system turn)."""
        parts = [text for text in (self.speech_prompt, instructions) if text]
        return "\n".join(parts)

    def talker_rows(
        self,
        embeds: torch.Tensor,
        multimodal: torch.Tensor,
        hidden: torch.Tensor,
        layer_hidden: torch.Tensor | None,
    ) -> torch.Tensor:
        """(n, E) context rows from a step's input embeddings, (n,) multimodal flags, last
        hidden states and (Qwen3-Omni) the talker's layer's states (None: the step had no
        multimodal rows, so none were kept)."""
        multimodal = multimodal.to(hidden.device)[:, None]
        if not self.talker_reads_layer:
            # generate() zeroes multimodal positions in the embedding half of the talker's input
            return torch.where(multimodal, 0.0, embeds) + hidden
        if layer_hidden is None:
            return embeds
        return torch.where(multimodal, layer_hidden, embeds)


def thinker_family(thinker: torch.nn.Module) -> ThinkerFamily:
    """The family of a loaded thinker, from its config."""
    config = thinker.config
    if config.model_type.startswith("qwen3_omni"):
        audio = config.audio_config
        return ThinkerFamily(
            family=QWEN3_OMNI,
            speech_prompt=None,
            frames_per_chunk=audio.n_window_infer,
            audio_tokens=lambda n: int(qwen3_audio_tokens(torch.tensor(n), audio.n_window)),
            talker_reads_layer=True,
            deepstack=True,
            video_interleave="timeline",
            positions_per_second=config.position_id_per_seconds,
        )
    return ThinkerFamily(
        family=QWEN2_5_OMNI,
        speech_prompt=SPEECH_SYSTEM_PROMPT,
        frames_per_chunk=QWEN2_5_FRAMES_PER_CHUNK,
        audio_tokens=lambda n: int(qwen2_5_audio_tokens(torch.tensor(n))),
        talker_reads_layer=False,
        deepstack=False,
        video_interleave="chunks",
        positions_per_second=POSITIONS_PER_SECOND,
    )
