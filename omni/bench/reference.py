"""The reference: a conversation run through transformers' own `generate()`, turn by turn.

Each turn's prompt is rendered by the checkpoint's chat template and expanded by its
processor (placeholders, log-mel, image patches), the earlier replies are appended as token
ids, and the whole conversation goes to `Qwen2_5OmniForConditionalGeneration.generate()`.
The streaming engine must produce the same text and codec tokens (greedy) from the same turns.

One detail: transformers 5.x drops an all-ones attention mask inside generate() as an
optimisation, and the talker's forward only takes its prefill branch (TMRoPE positions and
the codec pad/bos embeddings on the last two positions, the behaviour the model was trained
with) when it gets a mask. A batch with padding keeps its mask, so the reference prompt is
left-padded by one masked token; the thinker ignores it and the talker takes that branch.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch

from omni.checkpoints.family import FAMILIES
from omni.engine.audio_features import num_audio_tokens
from omni.engine.thinker_family import SPEECH_SYSTEM_PROMPT
from omni.engine.vision import VideoPatcher

FPS = 2.0


@dataclass
class ReferenceReply:
    text_ids: list[int]
    codes: list[int]
    wav: np.ndarray
    first_text_ms: float
    total_ms: float


@dataclass
class _Media:
    features: list[torch.Tensor] = field(default_factory=list)  # (128, 3000) each
    feature_masks: list[torch.Tensor] = field(default_factory=list)
    pixel_values: list[torch.Tensor] = field(default_factory=list)
    image_grids: list[torch.Tensor] = field(default_factory=list)
    video_pixels: list[torch.Tensor] = field(default_factory=list)
    video_grids: list[torch.Tensor] = field(default_factory=list)


class ReferenceConversation:
    def __init__(self, model, processor, system_prompt: str | None = None) -> None:
        """`system_prompt` None: the one the model needs to speak (Qwen2.5-Omni's speech
        prompt; Qwen3-Omni needs none: no system turn, as the engine without instructions)."""
        self.model = model
        self.processor = processor
        self.tokenizer = processor.tokenizer
        if system_prompt is None and model.config.model_type != "qwen3_omni_moe":
            system_prompt = SPEECH_SYSTEM_PROMPT
        self.system = system_prompt
        self.ids: list[int] = self._encode(self._template([], add_generation_prompt=False))
        self.media = _Media()
        self.use_audio_in_video = False
        self._first_token_at: float | None = None

    # -- turns ----------------------------------------------------------------------------

    def user_turn(
        self,
        text: str | None = None,
        audio: np.ndarray | None = None,
        image: np.ndarray | None = None,
        video_frames: list[np.ndarray] | None = None,
        max_frame_side: int = 448,
    ) -> None:
        """One user message: an image, then audio (with video frames: a video with audio), then text."""
        parts: list[dict] = []
        if image is not None:
            parts.append({"type": "image"})
        if audio is not None and video_frames is None:
            parts.append({"type": "audio"})
        if video_frames is not None:
            parts.append({"type": "video"})
        if text is not None:
            parts.append({"type": "text", "text": text})
        prompt = self._template([{"role": "user", "content": parts}], add_generation_prompt=True)
        if video_frames is not None:
            assert audio is not None, "a live video always comes with its audio"
            # the processor can't expand a video here (no torchvision): expand it ourselves
            # with the processor's own interleaving, then tokenize the expanded text
            prompt = prompt.replace("<|VIDEO|>", self._video_placeholder(audio, video_frames, max_frame_side))
            self.ids += self._encode(prompt)
            feats = self.processor.feature_extractor(
                audio, sampling_rate=16000, padding="max_length", return_attention_mask=True, return_tensors="pt"
            )
            self.media.features.append(feats["input_features"][0])
            self.media.feature_masks.append(feats["attention_mask"][0])
            return
        batch = self.processor(
            text=[prompt],
            audio=[audio] if audio is not None else None,
            images=[image] if image is not None else None,
            return_tensors="pt",
        )
        self.ids += batch["input_ids"][0].tolist()
        if audio is not None:
            self.media.features.append(batch["input_features"][0])
            self.media.feature_masks.append(batch["feature_attention_mask"][0])
        if image is not None:
            self.media.pixel_values.append(batch["pixel_values"])
            self.media.image_grids.append(batch["image_grid_thw"])

    def add_reply(self, text_ids: list[int]) -> None:
        """The assistant's reply as generated, closed the way the chat template closes a turn."""
        im_end = self.tokenizer.convert_tokens_to_ids("<|im_end|>")
        ids = list(text_ids)
        if not ids or ids[-1] != im_end:
            ids = [t for t in ids if t != self.tokenizer.convert_tokens_to_ids("<|endoftext|>")]
            ids.append(im_end)
        self.ids += ids + self._encode("\n")

    def generate(
        self,
        voice: str | None = None,  # None: the family's default voice, as generate()'s
        max_text_tokens: int = 32,
        max_codec_tokens: int = 64,
        min_text_tokens: int = 0,
        min_codec_tokens: int = 0,
    ) -> ReferenceReply:
        """generate()'s greedy reply to the conversation so far. Its codes as the engine
        reports them: Qwen2.5-Omni's one per step, Qwen3-Omni's 16 per frame, frame by frame
        (read on the way into Token2Wav / Code2Wav)."""
        qwen3 = self.model.config.model_type == "qwen3_omni_moe"
        kwargs = self._qwen3_inputs() if qwen3 else self._qwen2_5_inputs()
        # generate() keeps everything on its inputs' device: the model's, e.g. a GPU
        kwargs = {name: value.to(self.model.device) for name, value in kwargs.items()}
        codes: list[int] = []
        if qwen3:
            # Code2Wav decodes a long reply in chunks: each call's (1, 16, frames) codes
            hook = self.model.code2wav.register_forward_pre_hook(
                lambda _mod, args: codes.extend(args[0][0].T.reshape(-1).tolist())
            )
            options = {"thinker_eos_token_id": self._eos()}
            if min_codec_tokens:
                options["talker_min_new_tokens"] = min_codec_tokens
        else:
            hook = self.model.token2wav.register_forward_pre_hook(
                lambda _mod, args, _kw: codes.extend(args[0][0].tolist()), with_kwargs=True
            )
            options = {
                "use_audio_in_video": self.use_audio_in_video,
                "talker_min_new_tokens": min_codec_tokens,
            }
        self._first_token_at = None
        started = time.perf_counter()
        try:
            sequences, wav = self.model.generate(
                **kwargs,
                **options,
                speaker=voice or FAMILIES[self.model.config.model_type].voices[0],
                thinker_max_new_tokens=max_text_tokens,
                thinker_min_new_tokens=min_text_tokens,
                thinker_do_sample=False,
                thinker_streamer=_FirstToken(self),
                talker_do_sample=False,
                talker_max_new_tokens=max_codec_tokens,
            )
        finally:
            hook.remove()
        total_ms = (time.perf_counter() - started) * 1000
        first_ms = ((self._first_token_at or time.perf_counter()) - started) * 1000
        text_ids = sequences[0, kwargs["input_ids"].shape[1] :].tolist()
        wav = wav.float().reshape(-1).cpu().numpy() if wav is not None else np.zeros(0, np.float32)
        return ReferenceReply(text_ids, codes, wav, first_ms, total_ms)

    def _qwen2_5_inputs(self) -> dict:
        pad = self.tokenizer.convert_tokens_to_ids("<|endoftext|>")
        input_ids = torch.tensor([[pad, *self.ids]])
        mask = torch.ones_like(input_ids)
        mask[0, 0] = 0
        kwargs: dict = {"input_ids": input_ids, "attention_mask": mask}
        m = self.media
        if m.features:
            kwargs["input_features"] = torch.stack(m.features)
            kwargs["feature_attention_mask"] = torch.stack(m.feature_masks)
        # pixels go to the thinker only (generate() would also hand them to the talker, whose
        # generate() rejects them); the grids go to both, the talker needs them for TMRoPE
        if m.pixel_values:
            kwargs["thinker_pixel_values"] = torch.cat(m.pixel_values)
            kwargs["image_grid_thw"] = torch.cat(m.image_grids)
        if m.video_pixels:
            kwargs["thinker_pixel_values_videos"] = torch.cat(m.video_pixels)
            kwargs["video_grid_thw"] = torch.cat(m.video_grids)
            kwargs["video_second_per_grid"] = torch.full((len(m.video_grids),), 2 / FPS)
        return kwargs

    def _qwen3_inputs(self) -> dict:
        """Qwen3-Omni's processor does not pad audio to 30 s: each clip's log-mel has its own
        length, so several clips are right-padded to the longest (their masks say how long).
        Video is not here: the engine does not take it for Qwen3-Omni yet."""
        kwargs: dict = {"input_ids": torch.tensor([self.ids])}
        m = self.media
        if m.features:
            longest = max(f.shape[-1] for f in m.features)
            kwargs["input_features"] = torch.stack(
                [torch.nn.functional.pad(f, (0, longest - f.shape[-1])) for f in m.features]
            )
            kwargs["feature_attention_mask"] = torch.stack(
                [torch.nn.functional.pad(k, (0, longest - k.shape[-1])) for k in m.feature_masks]
            )
        if m.pixel_values:  # the thinker takes the pixels, the talker the grids (its positions)
            kwargs["pixel_values"] = torch.cat(m.pixel_values)
            kwargs["image_grid_thw"] = torch.cat(m.image_grids)
        return kwargs

    def _eos(self) -> list[int]:
        """The thinker's end of reply, as the engine's thinker takes it (its generation
        config's, else the chat template's ends)."""
        eos = self.model.thinker.generation_config.eos_token_id
        if eos is not None:
            return [eos] if isinstance(eos, int) else list(eos)
        return [self.tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")]

    # -- helpers --------------------------------------------------------------------------

    def _template(self, messages: list[dict], add_generation_prompt: bool) -> str:
        """The template's text for `messages`, without the system turn it starts with."""
        if self.system is None:
            if not messages:
                return ""
            return self.processor.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=add_generation_prompt
            )
        system = {"role": "system", "content": self.system}
        full = self.processor.apply_chat_template(
            [system, *messages], tokenize=False, add_generation_prompt=add_generation_prompt
        )
        if not messages:
            return full
        head = self.processor.apply_chat_template([system], tokenize=False)
        assert full.startswith(head)
        return full[len(head) :]

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def _video_placeholder(self, audio: np.ndarray, frames: list[np.ndarray], max_side: int) -> str:
        """Video patches (our live patcher: torchvision, which the video processor needs, may
        be absent) and the processor's own interleaving of video and audio placeholders."""
        patcher = VideoPatcher(max_side)
        steps = [s for s in (patcher.push(f) for f in frames) if s is not None]
        if (last := patcher.flush()) is not None:
            steps.append(last)
        grid = torch.tensor([[len(steps), *steps[0].grid_thw[1:]]])
        self.media.video_pixels.append(torch.from_numpy(np.concatenate([s.pixel_values for s in steps])))
        self.media.video_grids.append(grid)
        self.use_audio_in_video = True
        audio_inputs = {"num_audio_tokens": [num_audio_tokens(len(audio))]}
        video_inputs = {"video_grid_thw": grid, "video_second_per_grid": [2 / FPS]}
        return interleave_video_audio(
            self.processor,
            video_inputs,
            audio_inputs,
            patcher.merge_size,
            position_id_per_seconds=25,
            seconds_per_chunk=2.0,
        )


def interleave_video_audio(
    processor, video_inputs: dict, audio_inputs: dict, merge_size: int, **timing: float
) -> str:
    """Call the processor's own replace_video_with_audio_token (it reads the video
    processor's merge_size, which a processor without torchvision lacks); `timing`: its
    family's keywords (Qwen2.5-Omni: 25 positions a second, 2 s chunks; Qwen3-Omni's
    position_id_per_seconds)."""
    video_processor = processor.video_processor
    had = hasattr(video_processor, "merge_size")
    if not had:
        video_processor.merge_size = merge_size
    try:
        return processor.replace_video_with_audio_token(video_inputs, 0, audio_inputs, 0, **timing)
    finally:
        if not had:
            del video_processor.merge_size


class _FirstToken:
    """A generate() streamer that notes when the first new token arrives."""

    def __init__(self, owner: ReferenceConversation) -> None:
        self.owner = owner
        self.calls = 0

    def put(self, _value) -> None:
        self.calls += 1
        if self.calls == 2 and self.owner._first_token_at is None:  # the first put is the prompt
            self.owner._first_token_at = time.perf_counter()

    def end(self) -> None:
        pass
