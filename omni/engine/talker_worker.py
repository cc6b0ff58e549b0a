"""The talker process: the talker LM for every session.

Loop: drain messages (context rows from the thinker, reply starts, cancels), then one batched
step (TalkerStage): the codec step of every reply whose next reply part has arrived, and
chunks of waiting context rows (so the next reply starts from a warm cache), in one forward;
each reply's codes go to the vocoder process, which turns them into audio.

The checkpoint's family is read once at startup: Qwen2.5-Omni's talker (talker.py: one code
per step) or Qwen3-Omni's (qwen3_talker.py: one 80 ms frame of 16 codebooks per step, sent
to the vocoder as its codes 0..15).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from omni.checkpoints.family import QWEN3_OMNI, family_of
from omni.engine import protocol as p
from omni.engine.qwen3_talker import Qwen3Special, Qwen3TalkerConversation, Qwen3TalkerStage
from omni.engine.scheduler import StepScheduler
from omni.engine.talker import SpecialEmbeds, TalkerConversation, TalkerStage
from omni.engine.varlen_attention import set_attn_implementation
from omni.engine.worker import EarlyCancels, WorkerConfig, WorkerIO, configure_worker, kv_store

log = logging.getLogger(__name__)


@dataclass
class _Speaking:
    """A reply whose speech is being produced."""

    reply: str
    codes: list[int] = field(default_factory=list)


class TalkerWorker:
    def __init__(self, cfg: WorkerConfig) -> None:
        from omni.checkpoints.parts import load_speakers, load_talker_lm

        self.model = load_talker_lm(cfg.model_path, cfg.device, getattr(torch, cfg.dtype)).eval()
        set_attn_implementation(self.model, cfg.attn_implementation, cfg.device)
        self.qwen3 = family_of(Path(cfg.model_path)) is QWEN3_OMNI
        scheduler = StepScheduler(cfg.step_token_budget, cfg.max_batch)
        if self.qwen3:
            self.special = qwen3_special(cfg.model_path, self.model)
            # voice names as the family lists them ("Ethan"), matched case-insensitively
            self.voices = voice_names(self.special.speakers)
            self.kv = kv_store(self.model.config.text_config, cfg, self.model)
            self.stage = Qwen3TalkerStage(self.model, self.kv, scheduler, cfg.cuda_graphs)
        else:
            self.speakers = load_speakers(cfg.model_path)
            self.special = special_embeds(cfg.model_path, self.model, self.speakers)
            self.voices = {name: name for name in self.speakers}
            self.kv = kv_store(self.model.config, cfg, self.model)
            self.stage = TalkerStage(self.model, self.kv, scheduler, cfg.cuda_graphs)
        a = cfg.addresses
        outputs = {"frontend": a.frontend, "vocoder": a.vocoder}
        self.io = WorkerIO("talker", a.talker, outputs, cfg.allow_faults)
        self.sessions: dict[str, TalkerConversation | Qwen3TalkerConversation] = {}
        self.speaking: dict[str, _Speaking] = {}
        # replies cancelled before their TalkerStart arrived (front end and thinker race)
        self.cancelled = EarlyCancels()

    def run(self) -> None:
        self.io.send("frontend", p.Ready("talker", {"device": str(self.model.device)}))
        while True:
            busy = any(c.can_step() or c.context_waiting() for c in self.sessions.values())
            for msg in self.io.receive(0 if busy else 20):
                self.handle(msg)
            self.step()
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
                self.io.send("frontend", p.TalkerDone(msg.session, msg.reply, "failed", []))

    def _handle(self, msg: p.Msg) -> None:
        match msg:
            case p.Rows():
                self.conversation(msg.session).add_rows(msg.context_rows())
            case p.EvictRows():
                self.conversation(msg.session).evict_rows([tuple(r) for r in msg.ranges])
            case p.CloseSession():
                self.io.send("vocoder", msg)  # relayed on, as the thinker relays it here
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
                    self.cancelled.add(msg.reply)
            case _:
                raise ValueError(f"talker got an unexpected {type(msg).__name__}")

    def conversation(self, session_id: str) -> TalkerConversation | Qwen3TalkerConversation:
        """The session's conversation, opened by whichever comes first: its rows or a reply
        (the thinker sends rows only once a step has run them)."""
        conv = self.sessions.get(session_id)
        if conv is None:
            kind = Qwen3TalkerConversation if self.qwen3 else TalkerConversation
            conv = self.sessions[session_id] = kind(self.model, self.special, self.kv)
        return conv

    def start(self, msg: p.TalkerStart) -> None:
        if self.cancelled.take(msg.reply):
            self.io.send("frontend", p.TalkerDone(msg.session, msg.reply, "cancelled", []))
            return
        conv = self.conversation(msg.session)
        if self.voice_key(msg.voice) not in self.voices:
            known = sorted(self.voices.values())
            raise ValueError(f"unknown voice {msg.voice!r}; available: {known}")
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
        self.io.send("vocoder", p.VocoderStart(msg.session, msg.reply, msg.voice, msg.seed))
        self.speaking[msg.session] = _Speaking(msg.reply)

    # -- model work -----------------------------------------------------------------------

    def step(self) -> None:
        try:
            codes = self.stage.step({s: self.sessions[s] for s in self.sessions})
        except Exception as exc:
            log.exception("talker: batched step failed")
            for session_id in self.stage.last_plan:
                conv = self.sessions[session_id]
                conv.recover()
                speaking = self.speaking.get(session_id)
                if speaking is not None:
                    self.io.send("frontend", p.WorkerError("talker", str(exc), session_id, speaking.reply))
                    self.stop(session_id, "failed")
            return
        if self.stage.last_plan:
            self.io.count_step()
        for session_id, code in codes.items():
            self.take_code(session_id, code)

    def voice_key(self, voice: str) -> str:
        return voice.lower() if self.qwen3 else voice

    def take_code(self, session_id: str, code: int | list[int] | None) -> None:
        """A codec step's result (a code, or a Qwen3 frame's 16): to the vocoder, and the reply
        ends when its speech does."""
        speaking = self.speaking.get(session_id)
        conv = self.sessions[session_id]
        if speaking is None or conv.reply is None:
            return
        if code is not None:
            codes = [code] if isinstance(code, int) else list(code)
            if not speaking.codes:
                self.io.send("frontend", p.CodeOut(session_id, speaking.reply))
            speaking.codes.extend(codes)
            self.io.send("vocoder", p.Codes(session_id, speaking.reply, codes))
        if conv.reply.done:
            self.stop(session_id, "completed")

    def stop(self, session_id: str, status: str) -> None:
        speaking = self.speaking.pop(session_id)
        conv = self.sessions.get(session_id)
        if conv is not None:
            conv.end_reply()  # the cache goes back to the context: prefill may go on
        # completed: the vocoder decodes what is left; otherwise it drops the reply
        self.io.send("vocoder", p.CodesEnd(session_id, speaking.reply, status))
        self.io.send(
            "frontend",
            p.TalkerDone(session_id, speaking.reply, status, speaking.codes, vocoder_started=True),
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


def qwen3_special(path: str, talker: torch.nn.Module) -> Qwen3Special:
    """Qwen3-Omni's special rows (tts bos/eos/pad embeddings) and ids, read from the checkpoint
    without loading the thinker."""
    from transformers import Qwen3OmniMoeConfig

    from omni.checkpoints.parts import load_thinker_embedding_rows

    config = Qwen3OmniMoeConfig.from_pretrained(path)
    return Qwen3Special.from_config(
        config, lambda ids: load_thinker_embedding_rows(path, ids, talker.device, talker.dtype)
    )


def voice_names(speakers: dict[str, int]) -> dict[str, str]:
    """{lower-case name: the name as the family lists it} for the talker config's speakers."""
    listed = {name.lower(): name for name in QWEN3_OMNI.voices}
    return {key: listed.get(key, key) for key in speakers}


def main(cfg: WorkerConfig) -> None:
    configure_worker("talker", cfg.device)
    TalkerWorker(cfg).run()
