"""The talker process: the talker LM and streaming Token2Wav for every session.

Loop: drain messages (context rows from the thinker, reply starts, cancels), then one batched
step (TalkerStage): the codec step of every reply whose next reply part has arrived, and
chunks of waiting context rows (so the next reply starts from a warm cache), in one forward;
the codes go to each reply's Token2Wav stream; then one batched Token2Wav decode over every
reply with a chunk ready sends the audio to the front end.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np
import torch

from omni.engine import protocol as p
from omni.engine.kv_memory import KVSlots
from omni.engine.scheduler import StepScheduler
from omni.engine.talker import SpecialEmbeds, TalkerConversation, TalkerStage
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
        self.model.set_attn_implementation(cfg.attn_implementation)
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
        self.kv = KVSlots.for_model(
            self.model.config,
            cfg.kv_slots,
            cfg.max_context_tokens,
            self.model.device,
            self.model.dtype,
            scratch_slot=cfg.cuda_graphs,
        )
        scheduler = StepScheduler(cfg.step_token_budget, cfg.max_batch)
        self.stage = TalkerStage(self.model, self.kv, scheduler, cfg.cuda_graphs)
        self.max_batch = cfg.max_batch
        self._vocode_turn = 0
        self.sessions: dict[str, TalkerConversation] = {}
        self.speaking: dict[str, _Speaking] = {}
        # replies cancelled before their TalkerStart arrived (front end and thinker race)
        self.cancelled: OrderedDict[str, None] = OrderedDict()

    def run(self) -> None:
        self.io.send("frontend", p.Ready("talker", {"device": str(self.model.device)}))
        while True:
            busy = any(c.can_step() or c.context_waiting() for c in self.sessions.values())
            busy = busy or any(r.vocoder.has_ready_chunk for r in self.speaking.values())
            for msg in self.io.receive(0 if busy else 20):
                self.handle(msg)
            self.step()
            self.vocode_ready()
            self.io.beat(self.kv.stats())

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
                self.conversation(msg.session).add_rows(msg.context_rows())
            case p.CloseSession():
                conv = self.sessions.pop(msg.session, None)
                if conv is not None:
                    conv.close()
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

    def conversation(self, session_id: str) -> TalkerConversation:
        """The session's conversation, opened by whichever comes first: its rows or a reply
        (the thinker sends rows only once a step has run them)."""
        conv = self.sessions.get(session_id)
        if conv is None:
            conv = self.sessions[session_id] = TalkerConversation(self.model, self.special, self.kv)
        return conv

    def start(self, msg: p.TalkerStart) -> None:
        if msg.reply in self.cancelled:
            del self.cancelled[msg.reply]
            self.io.send("frontend", p.TalkerDone(msg.session, msg.reply, "cancelled", [], 0))
            return
        conv = self.conversation(msg.session)
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

    def step(self) -> None:
        try:
            codes = self.stage.step({s: self.sessions[s] for s in self.sessions})
        except Exception as exc:
            log.exception("talker: batched step failed")
            for session_id in self.stage.last_plan:
                conv = self.sessions[session_id]
                conv.prefilled = min(conv.prefilled, self.kv.lengths[conv.slot])
                speaking = self.speaking.get(session_id)
                if speaking is not None:
                    self.io.send("frontend", p.WorkerError("talker", str(exc), session_id, speaking.reply))
                    self.stop(session_id, "failed")
            return
        if self.stage.last_plan:
            self.io.count_step()
        for session_id, code in codes.items():
            self.take_code(session_id, code)

    def take_code(self, session_id: str, code: int | None) -> None:
        """A codec step's result: to the vocoder, and the reply ends when its speech does."""
        speaking = self.speaking.get(session_id)
        conv = self.sessions[session_id]
        if speaking is None or conv.reply is None:
            return
        try:
            if code is not None:
                if not speaking.codes:
                    self.io.send("frontend", p.CodeOut(session_id, speaking.reply))
                speaking.codes.append(code)
                speaking.vocoder.add([code])
            if conv.reply.done:  # the last chunk comes with the next vocode_ready()
                speaking.vocoder.finish()
                conv.end_reply()  # the cache goes back to the context now: prefill may go on
        except Exception as exc:
            log.exception("talker: vocoder failed")
            self.io.send("frontend", p.WorkerError("talker", str(exc), session_id, speaking.reply))
            self.stop(session_id, "failed")

    def vocode_ready(self) -> None:
        """One batched Token2Wav decode: a chunk for each reply that has one ready. Replies
        whose audio is all out are completed."""
        ready = [s for s, speaking in self.speaking.items() if speaking.vocoder.has_ready_chunk]
        # at most max_batch replies per decode, taking turns (max_batch=1: one at a time)
        self._vocode_turn += 1
        if len(ready) > self.max_batch:
            k = self._vocode_turn % len(ready)
            ready = (ready[k:] + ready[:k])[: self.max_batch]
        try:
            audio = self.token2wav.decode_ready([self.speaking[s].vocoder for s in ready])
        except Exception as exc:  # one decode for all: each of its replies failed
            log.exception("talker: Token2Wav decode failed")
            for session_id in ready:
                reply = self.speaking[session_id].reply
                self.io.send("frontend", p.WorkerError("talker", str(exc), session_id, reply))
                self.stop(session_id, "failed")
            return
        for session_id, chunk in zip(ready, audio):
            assert chunk is not None  # every stream passed had a chunk ready
            self.send_audio(session_id, self.speaking[session_id], [chunk])
        for session_id in [s for s, speaking in self.speaking.items() if speaking.vocoder.done]:
            self.stop(session_id, "completed")

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


def special_embeds(path: str, talker: torch.nn.Module, speakers: dict) -> SpecialEmbeds:
    """The few thinker embedding rows the talker consumes (speaker bos, text eos and pad),
    read from the checkpoint without loading the thinker."""
    from omni.checkpoints.parts import load_thinker_embedding_rows

    config = talker.config
    wanted = {name: int(s["bos_token"]) for name, s in speakers.items()}
    wanted |= {"<eos>": config.tts_text_end_token_id, "<pad>": config.tts_text_pad_token_id}
    rows = load_thinker_embedding_rows(path, list(wanted.values()), talker.device, talker.dtype)
    embeds = dict(zip(wanted, rows))
    eos, pad = embeds.pop("<eos>"), embeds.pop("<pad>")
    return SpecialEmbeds(speaker_bos=embeds, text_eos=eos, text_pad=pad)


def main(cfg: WorkerConfig) -> None:
    configure_worker("talker", cfg.device)
    TalkerWorker(cfg).run()
