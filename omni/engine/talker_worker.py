"""The talker process: the talker LM and streaming Token2Wav for every session.

Loop: drain messages (context rows from the thinker, reply starts, cancels), then one codec
step for each reply whose next reply part has arrived, adding its code to the reply's
Token2Wav stream, then one batched Token2Wav decode over every reply with a chunk ready,
sending the audio to the front end. When no reply can step, it prefills waiting context
rows, so the next reply starts from a warm cache.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass, field

from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

from omni.checkpoints.weights import weight_map

from omni.engine import protocol as p
from omni.engine.talker import SpecialEmbeds, TalkerConversation
from omni.engine.thinker import ContextRows
from omni.engine.token2wav import Token2WavBatch, Token2WavOptions, Token2WavStream
from omni.engine.worker import WorkerConfig, WorkerIO, configure_worker

log = logging.getLogger(__name__)


@dataclass
class _Speaking:
    """A reply whose speech is being produced."""

    reply: str
    vocoder: Token2WavStream
    samples: int = 0
    codes: list[int] = field(default_factory=list)


class TalkerWorker:
    def __init__(self, cfg: WorkerConfig) -> None:
        from omni.checkpoints.parts import load_talker

        parts = load_talker(cfg.model_path, cfg.device, getattr(torch, cfg.dtype))
        self.model = parts.talker.eval()
        self.speakers = parts.speakers
        self.special = special_embeds(cfg.model_path, self.model, self.speakers)
        options = Token2WavOptions(
            solver=cfg.vocoder_solver,  # type: ignore[arg-type]
            num_steps=cfg.vocoder_steps,
            first_chunk_steps=cfg.vocoder_first_chunk_steps,
        )
        self.token2wav = Token2WavBatch(parts.token2wav.eval(), options)
        a = cfg.addresses
        self.io = WorkerIO("talker", a.talker, {"frontend": a.frontend}, cfg.allow_faults)
        self.sessions: dict[str, TalkerConversation] = {}
        self.speaking: dict[str, _Speaking] = {}
        # replies cancelled before their TalkerStart arrived (front end and thinker race)
        self.cancelled: OrderedDict[str, None] = OrderedDict()

    def run(self) -> None:
        self.io.send("frontend", p.Ready("talker", {"device": str(self.model.device)}))
        while True:
            busy = any(
                self.sessions[s].can_step() or r.vocoder.has_ready_chunk
                for s, r in self.speaking.items()
            )
            for msg in self.io.receive(0 if busy else 20):
                self.handle(msg)
            stepped = False
            for session_id in list(self.speaking):
                stepped |= self.codec_step(session_id)
            stepped |= self.vocode_ready()
            if not stepped:
                self.prefill_one()
            self.io.beat()

    # -- messages -------------------------------------------------------------------------

    def handle(self, msg: p.Msg) -> None:
        try:
            self._handle(msg)
        except Exception as exc:
            log.exception("talker: %s failed", type(msg).__name__)
            session = getattr(msg, "session", None)
            reply = getattr(msg, "reply", None)
            self.io.send("frontend", p.WorkerError("talker", f"{type(exc).__name__}: {exc}", session, reply))
            if session in self.speaking and self.speaking[session].reply == reply:
                self.stop(session, "failed")
            elif isinstance(msg, p.TalkerStart):  # the reply ends here, failed
                self.io.send("frontend", p.TalkerDone(msg.session, msg.reply, "failed", [], 0))

    def _handle(self, msg: p.Msg) -> None:
        match msg:
            case p.Rows():
                conv = self.sessions.get(msg.session)
                if conv is None:  # the thinker opens a session with its system prompt rows
                    conv = self.sessions[msg.session] = TalkerConversation(self.model, self.special)
                conv.add_rows(ContextRows(msg.start, msg.rows.tensor(), msg.positions.tensor()))
            case p.CloseSession():
                self.sessions.pop(msg.session, None)
                self.speaking.pop(msg.session, None)
            case p.TalkerStart():
                self.start(msg)
            case p.TextEnd():
                conv = self.sessions.get(msg.session)
                speaking = self.speaking.get(msg.session)
                if conv is not None and speaking is not None and speaking.reply == msg.reply:
                    conv.text_ended(msg.text_rows)
            case p.Cancel():
                speaking = self.speaking.get(msg.session)
                if speaking is not None and speaking.reply == msg.reply:
                    self.stop(msg.session, "cancelled")
                else:
                    self.cancelled[msg.reply] = None
                    while len(self.cancelled) > 1024:
                        self.cancelled.popitem(last=False)
            case _:
                raise ValueError(f"talker got an unexpected {type(msg).__name__}")

    def start(self, msg: p.TalkerStart) -> None:
        if msg.reply in self.cancelled:
            del self.cancelled[msg.reply]
            self.io.send("frontend", p.TalkerDone(msg.session, msg.reply, "cancelled", [], 0))
            return
        conv = self.sessions[msg.session]
        speaker = self.speakers.get(msg.voice)
        if speaker is None:
            raise ValueError(f"unknown voice {msg.voice!r}; available: {sorted(self.speakers)}")
        if msg.session in self.speaking:
            self.stop(msg.session, "cancelled")
        conv.start_reply(
            msg.first_row,
            msg.voice,
            greedy=msg.greedy,
            max_codes=msg.max_codes,
            min_codes=msg.min_codes,
            top_k=msg.top_k,
            top_p=msg.top_p,
            temperature=msg.temperature,
            repetition_penalty=msg.repetition_penalty,
            seed=msg.seed,
        )
        noise = torch.Generator()
        if msg.seed is not None:
            noise.manual_seed(msg.seed)
        else:
            noise.seed()
        vocoder = self.token2wav.stream(speaker["cond"], speaker["ref_mel"], noise)
        self.speaking[msg.session] = _Speaking(msg.reply, vocoder)

    # -- model work -----------------------------------------------------------------------

    def codec_step(self, session_id: str) -> bool:
        conv = self.sessions[session_id]
        speaking = self.speaking[session_id]
        if not conv.can_step():
            return False
        try:
            code = conv.step()
            self.io.count_step()
            if code is not None:
                if not speaking.codes:
                    self.io.send("frontend", p.CodeOut(session_id, speaking.reply))
                speaking.codes.append(code)
                speaking.vocoder.add([code])
            assert conv.reply is not None
            if conv.reply.done:  # the last chunk comes with the next vocode_ready()
                speaking.vocoder.finish()
        except Exception as exc:
            log.exception("talker: codec step failed")
            self.io.send("frontend", p.WorkerError("talker", str(exc), session_id, speaking.reply))
            self.stop(session_id, "failed")
        return True

    def vocode_ready(self) -> bool:
        """One batched Token2Wav decode: a chunk for each reply that has one ready. Replies
        whose audio is all out are completed."""
        ready = [s for s, speaking in self.speaking.items() if speaking.vocoder.has_ready_chunk]
        try:
            audio = self.token2wav.decode_ready([self.speaking[s].vocoder for s in ready])
        except Exception as exc:  # one decode for all: each of its replies failed
            log.exception("talker: Token2Wav decode failed")
            for session_id in ready:
                reply = self.speaking[session_id].reply
                self.io.send("frontend", p.WorkerError("talker", str(exc), session_id, reply))
                self.stop(session_id, "failed")
            return True
        for session_id, chunk in zip(ready, audio):
            assert chunk is not None  # every stream passed had a chunk ready
            self.send_audio(session_id, self.speaking[session_id], [chunk])
        for session_id in [s for s, speaking in self.speaking.items() if speaking.vocoder.done]:
            self.stop(session_id, "completed")
        return bool(ready)

    def send_audio(self, session_id: str, speaking: _Speaking, chunks: list[np.ndarray]) -> None:
        for chunk in chunks:
            pcm = np.clip(np.round(chunk * 32767.0), -32768, 32767).astype(np.int16)
            self.io.send("frontend", p.AudioOut(session_id, speaking.reply, p.Array.of(pcm), speaking.samples))
            speaking.samples += pcm.size

    def stop(self, session_id: str, status: str) -> None:
        speaking = self.speaking.pop(session_id)  # its Token2Wav stream goes with it
        conv = self.sessions.get(session_id)
        if conv is not None:
            conv.end_reply()
        self.io.send(
            "frontend",
            p.TalkerDone(session_id, speaking.reply, status, speaking.codes, speaking.samples),
        )

    def prefill_one(self) -> None:
        """Prefill one session's waiting context rows (the one with most waiting)."""
        waiting = [
            (conv.n_rows - conv.prefilled, sid)
            for sid, conv in self.sessions.items()
            if sid not in self.speaking and conv.n_rows > conv.prefilled
        ]
        if waiting:
            _, sid = max(waiting)
            self.sessions[sid].prefill_context()


def special_embeds(path: str, talker: torch.nn.Module, speakers: dict) -> SpecialEmbeds:
    """The few thinker embedding rows the talker consumes (speaker bos, text eos and pad),
    read from the checkpoint without loading the thinker."""
    config = talker.config
    wanted = {name: int(s["bos_token"]) for name, s in speakers.items()}
    wanted |= {"<eos>": config.tts_text_end_token_id, "<pad>": config.tts_text_pad_token_id}
    table = "thinker.model.embed_tokens.weight"
    shard = Path(path) / weight_map(Path(path))[table]
    with safe_open(shard, framework="pt") as f:
        rows = f.get_slice(table)
        embeds = {k: rows[i : i + 1][0].to(talker.device, talker.dtype) for k, i in wanted.items()}
    eos, pad = embeds.pop("<eos>"), embeds.pop("<pad>")
    return SpecialEmbeds(speaker_bos=embeds, text_eos=eos, text_pad=pad)


def main(cfg: WorkerConfig) -> None:
    configure_worker("talker", cfg.device)
    TalkerWorker(cfg).run()
