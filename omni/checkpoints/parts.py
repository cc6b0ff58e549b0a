"""Loading the thinker or the talker side of a checkpoint on its own.

The thinker and the talker run in separate processes, so each builds only its own submodules
from the sub-config and reads only its own tensors (`thinker.*`, or `talker.*` and
`token2wav.*`). transformers' `from_pretrained` with an explicit config and state dict does
the rest (key renaming, tied weights, buffers), so the result equals the corresponding
submodule of `Qwen2_5OmniForConditionalGeneration.from_pretrained`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import (
    PreTrainedModel,
    Qwen2_5OmniConfig,
    Qwen2_5OmniProcessor,
    Qwen2_5OmniTalkerForConditionalGeneration,
    Qwen2_5OmniThinkerForConditionalGeneration,
    Qwen2_5OmniToken2WavModel,
)
from transformers.utils import check_torch_load_is_safe

from omni.checkpoints.processor import load_processor
from omni.checkpoints.weights import read_part

SPEAKERS_FILE = "spk_dict.pt"


@dataclass
class ThinkerParts:
    model: Qwen2_5OmniThinkerForConditionalGeneration
    processor: Qwen2_5OmniProcessor

    @property
    def tokenizer(self) -> Any:
        return self.processor.tokenizer


@dataclass
class TalkerParts:
    talker: Qwen2_5OmniTalkerForConditionalGeneration
    token2wav: Qwen2_5OmniToken2WavModel  # always float32, as transformers runs it
    speakers: dict[str, dict[str, Any]]  # voice -> {bos_token, cond (1,192), ref_mel (1,T,80)}


def _load(
    cls: type[PreTrainedModel],
    config: Any,
    checkpoint: Path,
    prefix: str,
    device: str | torch.device,
    dtype: torch.dtype | None,
) -> Any:
    state = read_part(checkpoint, prefix, device)
    return cls.from_pretrained(
        None, config=config, state_dict=state, dtype=dtype or "auto", device_map=device
    )


def load_thinker(
    path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> ThinkerParts:
    """The thinker (audio and vision encoders, LLM) and the processor. dtype None: as stored."""
    path = Path(path)
    config = Qwen2_5OmniConfig.from_pretrained(path)
    model = _load(
        Qwen2_5OmniThinkerForConditionalGeneration,
        config.thinker_config,
        path,
        "thinker.",
        device,
        dtype,
    )
    return ThinkerParts(model=model, processor=load_processor(path))


def load_speakers(path: str | Path) -> dict[str, dict[str, Any]]:
    check_torch_load_is_safe()
    return torch.load(Path(path) / SPEAKERS_FILE, weights_only=True)


def load_talker(
    path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> TalkerParts:
    """The talker (in `dtype`, None: as stored), Token2Wav (float32) and the voices."""
    path = Path(path)
    config = Qwen2_5OmniConfig.from_pretrained(path)
    talker = _load(
        Qwen2_5OmniTalkerForConditionalGeneration,
        config.talker_config,
        path,
        "talker.",
        device,
        dtype,
    )
    token2wav = _load(
        Qwen2_5OmniToken2WavModel,
        config.token2wav_config,
        path,
        "token2wav.",
        device,
        torch.float32,
    )
    return TalkerParts(talker=talker, token2wav=token2wav, speakers=load_speakers(path))
