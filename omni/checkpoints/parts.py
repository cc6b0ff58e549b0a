"""Loading the thinker or the talker side of a checkpoint on its own.

The thinker and the talker run in separate processes, so each builds only its own submodules
from the sub-config and reads only its own tensors (`thinker.*`, or `talker.*` and
`token2wav.*`). transformers' `from_pretrained` with an explicit config and state dict does
the rest (key renaming, tied weights, buffers), so the result equals the corresponding
submodule of `Qwen2_5OmniForConditionalGeneration.from_pretrained`. A Qwen3-Omni checkpoint
(family.py) gives its own classes: the MoE thinker, the talker with its code predictor
(`talker.*`), and Code2Wav (`code2wav.*`), equal to `Qwen3OmniMoeForConditionalGeneration`'s.

A random-shapes checkpoint (random_shapes.py) has no tensors: each part is built from its
config on the device, from the checkpoint's fixed seed, so every process gets the same weights
(and `load_whole`, the reference's, is those parts put together).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from transformers import (
    PreTrainedModel,
    Qwen2_5OmniConfig,
    Qwen2_5OmniForConditionalGeneration,
    Qwen2_5OmniProcessor,
    Qwen2_5OmniTalkerForConditionalGeneration,
    Qwen2_5OmniThinkerForConditionalGeneration,
    Qwen2_5OmniToken2WavModel,
    Qwen3OmniMoeCode2Wav,
    Qwen3OmniMoeConfig,
    Qwen3OmniMoeForConditionalGeneration,
    Qwen3OmniMoeTalkerForConditionalGeneration,
    Qwen3OmniMoeThinkerForConditionalGeneration,
)
from transformers.conversion_mapping import (
    get_checkpoint_conversion_mapping,
    register_checkpoint_conversion_mapping,
)
from transformers.utils import check_torch_load_is_safe

from omni.checkpoints.family import QWEN3_OMNI, family_of
from omni.checkpoints.processor import load_processor
from omni.checkpoints.random_shapes import (
    build_random_part,
    is_random_checkpoint,
    random_embedding_rows,
)
from omni.checkpoints.weights import read_part, weight_map

SPEAKERS_FILE = "spk_dict.pt"
THINKER_EMBEDDINGS = "thinker.model.embed_tokens.weight"
QWEN3_TALKER = Qwen3OmniMoeTalkerForConditionalGeneration.__name__

# Checkpoints store MoE experts one tensor each; transformers fuses them on load by the model
# type's conversion, but Qwen3-Omni's talker config has no model type of its own (only the
# whole model's converts it), so loaded alone it gets the same conversion by class name.
if get_checkpoint_conversion_mapping(QWEN3_TALKER) is None:
    register_checkpoint_conversion_mapping(
        QWEN3_TALKER, get_checkpoint_conversion_mapping("qwen3_omni_moe")
    )


@dataclass
class ThinkerParts:
    model: Qwen2_5OmniThinkerForConditionalGeneration | Qwen3OmniMoeThinkerForConditionalGeneration
    processor: Qwen2_5OmniProcessor  # or Qwen3OmniMoeProcessor
    # Qwen3-Omni: the thinker layer whose states its talker reads (the talker config's
    # accept_hidden_layer); None for Qwen2.5-Omni, whose talker reads the last
    talker_layer: int | None = None

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
    if is_random_checkpoint(checkpoint):
        return build_random_part(cls, config, checkpoint, prefix, device, dtype or torch.float32)
    state = read_part(checkpoint, prefix, device)
    return cls.from_pretrained(
        None, config=config, state_dict=state, dtype=dtype or "auto", device_map=device
    )


def _is_qwen3(path: Path) -> bool:
    return family_of(path) is QWEN3_OMNI


def load_thinker(
    path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> ThinkerParts:
    """The thinker (audio and vision encoders, LLM) and the processor. dtype None: as stored."""
    path = Path(path)
    talker_layer = None
    if _is_qwen3(path):
        config = Qwen3OmniMoeConfig.from_pretrained(path)
        cls = Qwen3OmniMoeThinkerForConditionalGeneration
        talker_layer = config.talker_config.accept_hidden_layer
    else:
        config = Qwen2_5OmniConfig.from_pretrained(path)
        cls = Qwen2_5OmniThinkerForConditionalGeneration
    model = _load(cls, config.thinker_config, path, "thinker.", device, dtype)
    return ThinkerParts(model=model, processor=load_processor(path), talker_layer=talker_layer)


def load_thinker_embedding_rows(
    path: str | Path, ids: list[int], device: str | torch.device, dtype: torch.dtype
) -> torch.Tensor:
    """Rows `ids` of the thinker's token embeddings, (len(ids), E), without loading the thinker
    (the talker consumes a few: speaker bos, text eos and pad)."""
    path = Path(path)
    if is_random_checkpoint(path):
        return random_embedding_rows(path, ids).to(device, dtype)
    with safe_open(path / weight_map(path)[THINKER_EMBEDDINGS], framework="pt") as f:
        table = f.get_slice(THINKER_EMBEDDINGS)
        return torch.cat([table[i : i + 1] for i in ids]).to(device, dtype)


def load_speakers(path: str | Path) -> dict[str, dict[str, Any]]:
    check_torch_load_is_safe()
    return torch.load(Path(path) / SPEAKERS_FILE, weights_only=True)


def load_talker_lm(
    path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> Qwen2_5OmniTalkerForConditionalGeneration | Qwen3OmniMoeTalkerForConditionalGeneration:
    """The talker LM alone (in `dtype`, None: as stored): what the talker process runs
    (Qwen3-Omni's with its code predictor)."""
    path = Path(path)
    if _is_qwen3(path):
        config = Qwen3OmniMoeConfig.from_pretrained(path)
        talker = Qwen3OmniMoeTalkerForConditionalGeneration
        return _load(talker, config.talker_config, path, "talker.", device, dtype)
    config = Qwen2_5OmniConfig.from_pretrained(path)
    return _load(
        Qwen2_5OmniTalkerForConditionalGeneration, config.talker_config, path, "talker.", device, dtype
    )


def load_token2wav(path: str | Path, device: str | torch.device = "cpu") -> Qwen2_5OmniToken2WavModel:
    """Token2Wav (DiT + BigVGAN) alone, in float32 as transformers runs it: the vocoder process."""
    path = Path(path)
    config = Qwen2_5OmniConfig.from_pretrained(path)
    return _load(
        Qwen2_5OmniToken2WavModel, config.token2wav_config, path, "token2wav.", device, torch.float32
    )


def load_code2wav(
    path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> Qwen3OmniMoeCode2Wav:
    """Qwen3-Omni's Code2Wav alone (in `dtype`, None: as stored)."""
    path = Path(path)
    config = Qwen3OmniMoeConfig.from_pretrained(path)
    return _load(Qwen3OmniMoeCode2Wav, config.code2wav_config, path, "code2wav.", device, dtype)


def load_talker(
    path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> TalkerParts:
    """The talker (in `dtype`, None: as stored), Token2Wav (float32) and the voices."""
    return TalkerParts(
        talker=load_talker_lm(path, device, dtype),
        token2wav=load_token2wav(path, device),
        speakers=load_speakers(path),
    )


def load_whole(
    path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> Qwen2_5OmniForConditionalGeneration | Qwen3OmniMoeForConditionalGeneration:
    """The whole model, for transformers' own generate() (the benchmarks' reference). A
    random-shapes checkpoint is assembled from the parts built as the workers build them."""
    path = Path(path)
    qwen3 = _is_qwen3(path)
    if not is_random_checkpoint(path):
        cls = Qwen3OmniMoeForConditionalGeneration if qwen3 else Qwen2_5OmniForConditionalGeneration
        return cls.from_pretrained(path, dtype=dtype or "auto", device_map=device).eval()
    if qwen3:
        config = Qwen3OmniMoeConfig.from_pretrained(path)
        with torch.device("meta"):  # a shell: its parts are replaced below
            whole = Qwen3OmniMoeForConditionalGeneration._from_config(config)
        whole.thinker = load_thinker(path, device, dtype).model
        whole.talker = load_talker_lm(path, device, dtype)
        whole.code2wav = load_code2wav(path, device, dtype)
        return whole.eval()
    config = Qwen2_5OmniConfig.from_pretrained(path)
    with torch.device("meta"):  # a shell: its parts are replaced below
        whole = Qwen2_5OmniForConditionalGeneration._from_config(config)
    talker = load_talker(path, device, dtype)
    whole.thinker = load_thinker(path, device, dtype).model
    whole.talker, whole.token2wav = talker.talker, talker.token2wav
    whole.speaker_map = talker.speakers
    return whole.eval()
