"""The vocoder process: streaming codes -> audio for every reply being spoken.

Qwen2.5-Omni's codes go through streaming Token2Wav (omni/engine/token2wav.py), Qwen3-Omni's
16-codebook frames through streaming Code2Wav (omni/engine/qwen3_code2wav.py); `_load_decoder`
holds what differs. The talker sends each reply's codes as its steps produce them
(VocoderStart, Codes, CodesEnd). Each loop the worker drains them, then decodes, in one batch,
a chunk of every reply that has one ready (at most `max_batch`, taking turns) and sends the
audio to the front end. A stage of its own, so the vocoder runs beside the talker LM instead
of between its codec steps: on a GPU the two overlap, on a CPU they use two cores (Token2Wav
costs as much as the rest of the speech path together there).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from omni.checkpoints.family import QWEN3_OMNI, family_of
from omni.engine import protocol as p
from omni.engine.qwen3_code2wav import Code2WavBatch, Code2WavStream
from omni.engine.token2wav import Token2WavBatch, Token2WavOptions, Token2WavStream
from omni.engine.worker import EarlyCancels, WorkerConfig, WorkerIO, configure_worker

log = logging.getLogger(__name__)

_Stream = Token2WavStream | Code2WavStream


@dataclass
class _Voicing:
    """A reply whose codes are being turned into audio."""

    reply: str
    stream: _Stream
    samples: int = 0


@dataclass(frozen=True)
class _Decoder:
    """The family's batched decoder, and how it makes the stream of a reply."""

    batch: Token2WavBatch | Code2WavBatch
    stream: Callable[[p.VocoderStart], _Stream]


def _load_decoder(cfg: WorkerConfig) -> _Decoder:
    """Qwen3-Omni: Code2Wav (no voice input, no noise); Qwen2.5-Omni: Token2Wav in the voice
    from spk_dict.pt, its noise seeded by the reply's seed. Both in float32."""
    from omni.checkpoints.parts import load_code2wav, load_speakers, load_token2wav

    if family_of(Path(cfg.model_path)) is QWEN3_OMNI:
        code2wav = Code2WavBatch(load_code2wav(cfg.model_path, cfg.device, torch.float32).eval())
        return _Decoder(code2wav, lambda msg: code2wav.stream())

    options = Token2WavOptions(
        solver=cfg.vocoder_solver,  # type: ignore[arg-type]
        num_steps=cfg.vocoder_steps,
        first_chunk_steps=cfg.vocoder_first_chunk_steps,
    )
    token2wav = Token2WavBatch(load_token2wav(cfg.model_path, cfg.device).eval(), options)
    speakers = load_speakers(cfg.model_path)

    def stream(msg: p.VocoderStart) -> Token2WavStream:
        speaker = speakers.get(msg.voice)
        if speaker is None:
            raise ValueError(f"unknown voice {msg.voice!r}; available: {sorted(speakers)}")
        noise = torch.Generator()
        if msg.seed is not None:
            noise.manual_seed(msg.seed)
        else:
            noise.seed()
        return token2wav.stream(speaker["cond"], speaker["ref_mel"], noise)

    return _Decoder(token2wav, stream)


class VocoderWorker:
    def __init__(self, cfg: WorkerConfig) -> None:
        self.decoder = _load_decoder(cfg)
        self.device = cfg.device
        a = cfg.addresses
        self.io = WorkerIO("vocoder", a.vocoder, {"frontend": a.frontend}, cfg.allow_faults)
        self.max_batch = cfg.max_batch
        self.voicing: dict[str, _Voicing] = {}  # by session
        # replies cancelled before their VocoderStart arrived (front end and talker race)
        self.cancelled = EarlyCancels()
        self._turn = 0

    def run(self) -> None:
        self.io.send("frontend", p.Ready("vocoder", {"device": self.device}))
        while True:
            busy = any(v.stream.has_ready_chunk for v in self.voicing.values())
            for msg in self.io.receive(0 if busy else 20):
                self.handle(msg)
            self.vocode_ready()
            self.io.beat()

    # -- messages -------------------------------------------------------------------------

    def handle(self, msg: p.Msg) -> None:
        try:
            self._handle(msg)
        except Exception as exc:
            log.exception("vocoder: %s failed", type(msg).__name__)
            session, reply = getattr(msg, "session", None), getattr(msg, "reply", None)
            self.io.send("frontend", p.WorkerError("vocoder", f"{type(exc).__name__}: {exc}", session, reply))
            voicing = self.voicing.get(session or "")
            if session is not None and voicing is not None and voicing.reply == reply:
                self.stop(session, "failed")
            elif isinstance(msg, p.VocoderStart):
                self.io.send("frontend", p.VocoderDone(msg.session, msg.reply, "failed", 0))

    def _handle(self, msg: p.Msg) -> None:
        match msg:
            case p.VocoderStart():
                self.start(msg)
            case p.Codes():
                voicing = self.voicing.get(msg.session)
                if voicing is not None and voicing.reply == msg.reply:
                    voicing.stream.add(msg.codes)
            case p.CodesEnd():
                voicing = self.voicing.get(msg.session)
                if voicing is None or voicing.reply != msg.reply:
                    return
                if msg.status == "completed":
                    voicing.stream.finish()  # the last chunk comes with a coming decode
                    if voicing.stream.done:  # no codes at all (a reply with nothing to say)
                        self.stop(msg.session, "completed")
                else:
                    self.stop(msg.session, msg.status)
            case p.Cancel():
                voicing = self.voicing.get(msg.session)
                if voicing is not None and voicing.reply == msg.reply:
                    self.stop(msg.session, "cancelled")
                else:
                    self.cancelled.add(msg.reply)
            case p.CloseSession():
                self.voicing.pop(msg.session, None)
            case _:
                raise ValueError(f"vocoder got an unexpected {type(msg).__name__}")

    def start(self, msg: p.VocoderStart) -> None:
        if self.cancelled.take(msg.reply):
            self.io.send("frontend", p.VocoderDone(msg.session, msg.reply, "cancelled", 0))
            return
        stream = self.decoder.stream(msg)  # an unknown voice fails here, before the stop below
        if msg.session in self.voicing:
            self.stop(msg.session, "cancelled")
        self.voicing[msg.session] = _Voicing(msg.reply, stream)

    # -- model work -----------------------------------------------------------------------

    def vocode_ready(self) -> None:
        """One batched decode: a chunk for each reply that has one ready (at most
        max_batch, taking turns). Replies whose audio is all out are completed."""
        ready = [s for s, v in self.voicing.items() if v.stream.has_ready_chunk]
        if not ready:
            return
        self._turn += 1
        if len(ready) > self.max_batch:
            k = self._turn % len(ready)
            ready = (ready[k:] + ready[:k])[: self.max_batch]
        try:
            audio = self.decoder.batch.decode_ready([self.voicing[s].stream for s in ready])
        except Exception as exc:  # one decode for all: each of its replies failed
            log.exception("vocoder: decode failed")
            for session_id in ready:
                reply = self.voicing[session_id].reply
                self.io.send("frontend", p.WorkerError("vocoder", str(exc), session_id, reply))
                self.stop(session_id, "failed")
            return
        self.io.count_step()
        for session_id, chunk in zip(ready, audio):
            assert chunk is not None  # every stream passed had a chunk ready
            self.send_audio(session_id, self.voicing[session_id], chunk)
        for session_id in [s for s, v in self.voicing.items() if v.stream.done]:
            self.stop(session_id, "completed")

    def send_audio(self, session_id: str, voicing: _Voicing, chunk: np.ndarray) -> None:
        pcm = np.clip(np.round(chunk * 32767.0), -32768, 32767).astype(np.int16)
        self.io.send("frontend", p.AudioOut(session_id, voicing.reply, p.Array.of(pcm), voicing.samples))
        voicing.samples += pcm.size

    def stop(self, session_id: str, status: str) -> None:
        voicing = self.voicing.pop(session_id)  # its stream goes with it
        self.io.send("frontend", p.VocoderDone(session_id, voicing.reply, status, voicing.samples))


def main(cfg: WorkerConfig) -> None:
    configure_worker("vocoder", cfg.device)
    VocoderWorker(cfg).run()
