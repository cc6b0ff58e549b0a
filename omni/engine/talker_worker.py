"""The talker process: the talker LM for every session.

Loop: drain messages (context rows from the thinker, reply starts, cancels), then one batched
step (TalkerStage): the codec step of every reply whose next reply part has arrived, and
chunks of waiting context rows (so the next reply starts from a warm cache), in one forward;
each reply's codes go to the vocoder process, which turns them into audio.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from omni.engine import protocol as p
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
        self.speakers = load_speakers(cfg.model_path)
        self.special = special_embeds(cfg.model_path, self.model, self.speakers)
        a = cfg.addresses
        outputs = {"frontend": a.frontend, "vocoder": a.vocoder}
        self.io = WorkerIO("talker", a.talker, outputs, cfg.allow_faults)
        self.kv = kv_store(self.model.config, cfg, self.model)
        scheduler = StepScheduler(cfg.step_token_budget, cfg.max_batch)
        self.stage = TalkerStage(self.model, self.kv, scheduler, cfg.cuda_graphs)
        self.sessions: dict[str, TalkerConversation] = {}
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

    def conversation(self, session_id: str) -> TalkerConversation:
        """The session's conversation, opened by whichever comes first: its rows or a reply
        (the thinker sends rows only once a step has run them)."""
        conv = self.sessions.get(session_id)
        if conv is None:
            conv = self.sessions[session_id] = TalkerConversation(self.model, self.special, self.kv)
        return conv

    def start(self, msg: p.TalkerStart) -> None:
        if self.cancelled.take(msg.reply):
            self.io.send("frontend", p.TalkerDone(msg.session, msg.reply, "cancelled", []))
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
        if code is not None:
            if not speaking.codes:
                self.io.send("frontend", p.CodeOut(session_id, speaking.reply))
            speaking.codes.append(code)
            self.io.send("vocoder", p.Codes(session_id, speaking.reply, [code]))
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


def main(cfg: WorkerConfig) -> None:
    configure_worker("talker", cfg.device)
    TalkerWorker(cfg).run()
