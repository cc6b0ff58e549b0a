"""The transcriber process: what the caller said, as text, for each committed user audio item.

Whisper (transformers' WhisperForConditionalGeneration) runs in a process of its own, at a
lower CPU priority than the model workers: it never joins the thinker's batch or touches its
KV memory, so a transcript can never delay a reply, and it can sit on a device of its own.
It takes one item at a time; the front end (transcriber.py) keeps the queue and sends the
next item when one is done.

Audio goes in 30 s windows, Whisper's input length; the tokens of each window are sent as
text deltas while generate() makes them, so a caller's words show before the item is done.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from transformers.generation.streamers import BaseStreamer

from omni.engine import protocol as p
from omni.engine.api import INPUT_SAMPLE_RATE
from omni.engine.worker import WorkerIO, configure_worker

log = logging.getLogger(__name__)

NAME = "transcriber"
WINDOW_SAMPLES = 30 * INPUT_SAMPLE_RATE  # Whisper's encoder takes 30 s
NICE = 10  # below the model workers: on a shared CPU the reply's stages win
TASK_TOKENS = 4  # <|startoftranscript|> <|lang|> <|transcribe|> <|notimestamps|>


@dataclass(frozen=True)
class TranscriberConfig:
    model_path: str
    device: str
    dtype: str
    inbox: str  # the worker binds it
    frontend: str
    allow_faults: bool = False


class _Deltas(BaseStreamer):
    """generate()'s tokens as text deltas to the front end, as they come. Byte-level BPE
    text only grows as tokens are added, except while a UTF-8 sequence is incomplete: that
    waits for its last byte. Beats and counts steps, since a long window blocks the loop."""

    def __init__(self, worker: TranscriberWorker, request: str, before: str) -> None:
        self.worker = worker
        self.request = request
        self.before = before  # the item's text from earlier windows
        self.tokens: list[int] = []
        self.prompt_seen = False
        self.text = before

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # the first call carries the decoder's start tokens
            self.prompt_seen = True
            return
        self.tokens.extend(value.flatten().tolist())
        text = self.before + self.worker.tokenizer.decode(
            self.tokens, skip_special_tokens=True, clean_up_tokenization_spaces=False
        )
        if not text.endswith("\ufffd"):
            self.worker.send_text(self.request, text)
            self.text = text
        self.worker.io.count_step()
        self.worker.io.beat()

    def end(self) -> None:
        pass


class TranscriberWorker:
    def __init__(self, cfg: TranscriberConfig) -> None:
        from omni.checkpoints.whisper import load_whisper

        self.device = cfg.device
        self.model, self.processor = load_whisper(cfg.model_path, cfg.device, _dtype(cfg.dtype))
        self.tokenizer = self.processor.tokenizer
        self.io = WorkerIO(NAME, cfg.inbox, {"frontend": cfg.frontend}, cfg.allow_faults)
        self._sent = ""  # the current item's text the front end has

    def run(self) -> None:
        self.io.send("frontend", p.Ready(NAME, {"device": self.device}))
        while True:
            for msg in self.io.receive(20):
                self.handle(msg)
            self.io.beat()

    def handle(self, msg: p.Msg) -> None:
        if not isinstance(msg, p.Transcribe):
            self.io.send("frontend", p.WorkerError(NAME, f"unexpected {type(msg).__name__}"))
            return
        self._sent = ""
        try:
            text = self.transcribe(msg)
        except Exception as exc:  # bad audio, a bad language: this item fails, the worker goes on
            log.exception("transcriber: request %s failed", msg.request)
            error = f"{type(exc).__name__}: {exc}"
            self.io.send("frontend", p.TranscriptDone(msg.request, "failed", self._sent, error))
            return
        self.send_text(msg.request, text)
        self.io.send("frontend", p.TranscriptDone(msg.request, "completed", self._sent))

    def send_text(self, request: str, text: str) -> None:
        """The item's text so far, as a delta past what was sent (leading spaces dropped:
        Whisper starts its text with one)."""
        visible = text.lstrip()
        if len(visible) > len(self._sent):
            self.io.send("frontend", p.TranscriptDelta(request, visible[len(self._sent) :]))
            self._sent = visible

    def transcribe(self, msg: p.Transcribe) -> str:
        pcm = msg.pcm.numpy()
        if pcm.dtype != np.float32 or pcm.ndim != 1:
            raise ValueError(f"expected float32 mono 16 kHz audio, got {pcm.dtype} {pcm.shape}")
        options = self._options(msg)
        text = ""
        for start in range(0, len(pcm), WINDOW_SAMPLES):
            streamer = _Deltas(self, msg.request, text)
            self._generate(pcm[start : start + WINDOW_SAMPLES], streamer, options)
            text = streamer.text
        return text

    def _options(self, msg: p.Transcribe) -> dict[str, Any]:
        config = self.model.generation_config
        options: dict[str, Any] = {}
        if config.is_multilingual:  # English-only checkpoints take neither
            options.update(task="transcribe", language=msg.language)
        if msg.prompt:
            # Whisper's own rule: a prompt gets at most half the decoder's context
            room = self.model.config.max_target_positions // 2 - 1
            ids = self.processor.get_prompt_ids(msg.prompt, return_tensors="pt")
            prompt = torch.cat([ids[:1], ids[1:][-room:]])
            options["prompt_ids"] = prompt.to(self.device)
            # the prompt shares the decoder's positions with the text
            limit = config.max_new_tokens or config.max_length
            room_left = self.model.config.max_target_positions - TASK_TOKENS - len(prompt)
            options["max_new_tokens"] = min(limit, room_left)
        return options

    def _generate(self, window: np.ndarray, streamer: _Deltas, options: dict[str, Any]) -> None:
        features = self.processor.feature_extractor(
            window, sampling_rate=INPUT_SAMPLE_RATE, return_tensors="pt"
        ).input_features.to(self.device, self.model.dtype)
        self.model.generate(features, streamer=streamer, **options)


def _dtype(name: str) -> torch.dtype | None:
    return None if name == "auto" else getattr(torch, name)


def main(cfg: TranscriberConfig) -> None:
    configure_worker(NAME, cfg.device)
    os.nice(NICE)
    TranscriberWorker(cfg).run()
