"""The thinker process: owns the thinker model and every session's conversation.

Loop: drain messages (inputs are queued as LLM rows as they arrive), then one batched step:
the scheduler picks every session's decode row and chunks of queued prefill under the token
budget, one forward runs them all (ThinkerStage), and each reply whose next-token logits came
out chooses its token, streaming text to the front end; every row that ran goes to the
talker as a context row.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch

from omni.engine import protocol as p
from omni.engine.api import CONTEXT_LENGTH_EXCEEDED, Truncation
from omni.engine.scheduler import StepScheduler
from omni.engine.thinker import ThinkerConversation, ThinkerStage, TokenIds
from omni.engine.thinker_family import thinker_family
from omni.engine.varlen_attention import set_attn_implementation
from omni.engine.worker import WorkerConfig, WorkerIO, configure_worker, kv_store

log = logging.getLogger(__name__)


@dataclass
class _Active:
    """A reply being decoded."""

    msg: p.Respond
    started: float  # perf_counter() at the Respond
    input_tokens: int  # prompt tokens this turn added
    prefill_ms: float | None = None  # set when the reply's first logits come out
    text: str = ""
    unsent: list[int] = field(default_factory=list)  # tokens whose text is not out yet


class ThinkerWorker:
    def __init__(self, cfg: WorkerConfig) -> None:
        from omni.checkpoints.parts import load_thinker

        parts = load_thinker(cfg.model_path, cfg.device, getattr(torch, cfg.dtype))
        self.model = parts.model.eval()
        self.family = thinker_family(self.model)
        set_attn_implementation(self.model, cfg.attn_implementation, cfg.device)
        self.tokenizer = parts.tokenizer
        self.feature_extractor = parts.processor.feature_extractor
        self.processor_config = parts.processor.image_processor.to_dict()
        self.ids = token_ids(self.tokenizer, self.model.generation_config.eos_token_id)
        self.max_frame_side = cfg.max_frame_side
        reserve = cfg.reply_reserve_tokens
        self.budget = cfg.context_budget_tokens or cfg.max_context_tokens - reserve
        # positions past the trained range are not evicted away: the context is rebuilt first
        self.position_limit = self.model.config.text_config.max_position_embeddings - reserve
        a = cfg.addresses
        self.io = WorkerIO(
            "thinker", a.thinker, {"frontend": a.frontend, "talker": a.talker}, cfg.allow_faults
        )
        self.kv = kv_store(self.model.config.text_config, cfg, self.model)
        scheduler = StepScheduler(cfg.step_token_budget, cfg.max_batch)
        self.stage = ThinkerStage(
            self.model, self.kv, scheduler, cfg.cuda_graphs, talker_layer=parts.talker_layer
        )
        self.sessions: dict[str, ThinkerConversation] = {}
        self.active: dict[str, _Active] = {}

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def run(self) -> None:
        self.io.send("frontend", p.Ready("thinker", {"device": str(self.model.device)}))
        while True:
            busy = any(conv.pending for conv in self.sessions.values())
            for msg in self.io.receive(0 if busy else 100):
                self.handle(msg)
            self.step()
            contexts = {key: len(conv.tokens) for key, conv in self.sessions.items()}
            self.io.beat(self.stats(), contexts)

    def stats(self) -> dict[str, int]:
        """The heartbeat's numbers: KV memory, and the worst distance (ms) between a stamped
        camera frame's capture and the video instant it stood for, over the open sessions."""
        offsets = [conv.frame_offset_max_s for conv in self.sessions.values()]
        return {**self.kv.stats(), "frame_offset_ms_max": round(1000 * max(offsets, default=0.0))}

    # -- messages -------------------------------------------------------------------------

    def handle(self, msg: p.Msg) -> None:
        session = getattr(msg, "session", None)
        try:
            self._handle(msg)
        except Exception as exc:
            log.exception("thinker: %s failed", type(msg).__name__)
            reply = getattr(msg, "reply", None)
            self.io.send("frontend", p.WorkerError("thinker", f"{type(exc).__name__}: {exc}", session, reply))
            if isinstance(msg, p.Respond):  # the reply ends here, failed
                self.active.pop(msg.session, None)
                conv = self.sessions.get(msg.session)
                if conv is not None:
                    conv.cancel_reply()
                done = p.ThinkerDone(msg.session, msg.reply, "failed", "", 0, 0, 0.0)
                self.io.send("frontend", done)

    def _handle(self, msg: p.Msg) -> None:
        match msg:
            case p.OpenSession():
                self.open(msg)
            case p.CloseSession():
                conv = self.sessions.pop(msg.session, None)
                if conv is not None:
                    conv.close()
                self.active.pop(msg.session, None)
                # relayed, so the talker drops the session before any rows of a reopened one
                self.io.send("talker", msg)
            case p.AppendAudio():
                self.conv(msg.session).append_audio(msg.pcm.numpy(), msg.timestamp)
                self.io.count_step()
            case p.AppendFrame():
                self.conv(msg.session).append_video_frame(msg.rgb.numpy(), msg.timestamp)
            case p.AddImage():
                self.conv(msg.session).add_image(msg.rgb.numpy())
            case p.AddText():
                self.conv(msg.session).add_text(msg.text)
            case p.ClearTurn():
                self.conv(msg.session).clear_turn()
            case p.Respond():
                self.respond(msg)
            case p.Cancel():
                self.cancel(msg)
            case p.Truncate():
                kept = self.conv(msg.session).truncate_reply(msg.keep_tokens)
                self.io.send("frontend", p.Result(msg.request, kept))
            case p.AddReply():  # the engine rebuilding a conversation after a restart
                system = None if msg.instructions is None else self.family.system_prompt(msg.instructions)
                self.conv(msg.session).add_reply(msg.token_ids, system)
            case p.SetTruncation():
                self.conv(msg.session).truncation = truncation(msg.truncation, msg.retention_ratio)
            case p.Digest():
                self.io.send("frontend", p.Result(msg.request, self.conv(msg.session).digest()))
            case p.Rewind():  # an older item deleted: the engine sends the rest again
                self.conv(msg.session).rewind(msg.exchange)
            case _:
                raise ValueError(f"thinker got an unexpected {type(msg).__name__}")

    def conv(self, session_id: str) -> ThinkerConversation:
        conv = self.sessions.get(session_id)
        if conv is None:
            raise KeyError(f"unknown session {session_id}")
        return conv

    def open(self, msg: p.OpenSession) -> None:
        if msg.session in self.sessions:  # reopened: the old conversation's slot goes back
            self.sessions.pop(msg.session).close()
        system = self.family.system_prompt(msg.instructions)

        def send_rows(piece: p.ContextRows, session: str = msg.session) -> None:
            self.io.send("talker", piece.message(session))

        def send_evicted(ranges: list[tuple[int, int]], session: str = msg.session) -> None:
            self.io.send("talker", p.EvictRows(session, ranges))

        self.sessions[msg.session] = ThinkerConversation(
            self.model,
            self.ids,
            self.feature_extractor,
            self.processor_config,
            system,
            self.encode,
            send_rows,
            self.kv,
            self.max_frame_side,
            budget=self.budget,
            position_limit=self.position_limit,
            truncation=truncation(msg.truncation, msg.retention_ratio),
            on_evict=send_evicted,
            first_exchange=msg.first_exchange,
        )

    def respond(self, msg: p.Respond) -> None:
        conv = self.conv(msg.session)
        if msg.session in self.active:
            raise RuntimeError("a reply is already in progress")
        input_before = conv.turn.start_len if conv.turn is not None else len(conv.tokens)
        # instructions=None keeps the session's; anything else (even "") sets them from here on
        system = None if msg.instructions is None else self.family.system_prompt(msg.instructions)
        conv.end_turn(system)
        conv.start_reply(msg.max_text_tokens, msg.greedy, msg.min_text_tokens, msg.seed)
        first_row = len(conv.tokens)
        self.active[msg.session] = _Active(msg, time.perf_counter(), first_row - input_before)
        if msg.output_audio:
            self.io.send(
                "talker",
                p.TalkerStart(
                    msg.session,
                    msg.reply,
                    first_row,
                    msg.voice,
                    msg.greedy,
                    msg.max_codec_tokens,
                    msg.min_codec_tokens,
                    msg.top_k,
                    msg.top_p,
                    msg.temperature,
                    msg.repetition_penalty,
                    msg.seed,
                ),
            )

    def cancel(self, msg: p.Cancel) -> None:
        active = self.active.get(msg.session)
        if active is None or active.msg.reply != msg.reply:
            return
        conv = self.conv(msg.session)
        conv.cancel_reply()
        self.finish(msg.session, "cancelled")

    # -- model work -----------------------------------------------------------------------

    def step(self) -> None:
        """One batched forward over every session's queued rows, then each ready reply's token."""
        try:
            result = self.stage.step(self.sessions)
        except Exception as exc:  # a failed forward: the sessions in it lose their queued input
            log.exception("thinker: batched step failed")
            for session_id in self.stage.last_plan:
                self.fail(session_id, f"the model step failed: {type(exc).__name__}: {exc}")
            return
        if result.ran:
            self.io.count_step()
        for session_id in result.full:
            full = f"the conversation is full ({self.kv.max_len} tokens)"
            self.fail(session_id, f"{CONTEXT_LENGTH_EXCEEDED}: {full}", too_big=True)
        for session_id in result.over:
            self.fail(session_id, self.over_budget(self.sessions[session_id]), too_big=True)
        for session_id in result.ready:
            self.emit_token(session_id)

    def fail(self, session_id: str, message: str, too_big: bool = False) -> None:
        """Drop a session's queued rows (`too_big`: input that cannot fit the context, the
        whole exchange it is in, if nothing of its reply was said); its reply (if any) ends
        failed with `message`."""
        conv = self.sessions[session_id]
        conv.cancel_reply()
        if too_big and (turn := conv.drop_exchange()) is not None:
            self.io.send("frontend", p.TurnDropped(session_id, turn))
        else:
            conv.drop_pending()
        active = self.active.get(session_id)
        reply = active.msg.reply if active is not None else None
        self.io.send("frontend", p.WorkerError("thinker", message, session_id, reply))
        if active is not None:
            self.finish(session_id, "failed")

    def over_budget(self, conv: ThinkerConversation) -> str:
        why = (
            "session.truncation is disabled"
            if conv.truncation.mode == "disabled"
            else "what may not be evicted (the instructions and the turn in progress) fills it"
        )
        return (
            f"{CONTEXT_LENGTH_EXCEEDED}: the conversation would pass its {conv.budget}-token "
            f"context budget ({why}); the turn whose input did not fit was dropped"
        )

    def emit_token(self, session_id: str) -> None:
        active = self.active.get(session_id)
        conv = self.sessions[session_id]
        if active is None or not conv.can_choose():
            return
        if active.prefill_ms is None:
            active.prefill_ms = (time.perf_counter() - active.started) * 1000
        token, last = conv.choose()
        assert conv.reply is not None
        text = self.tokenizer.decode(
            [t for t in conv.reply.tokens if t not in self.ids.eos], skip_special_tokens=True
        )
        # hold back a partial UTF-8 character until the next token completes it
        active.unsent.append(token)
        if len(text) > len(active.text) and not text.endswith("\ufffd"):
            self.io.send(
                "frontend",
                p.TextOut(session_id, active.msg.reply, text[len(active.text) :], active.unsent),
            )
            active.text, active.unsent = text, []
        if last:
            self.finish(session_id, "completed")

    def finish(self, session_id: str, status: str) -> None:
        active = self.active.pop(session_id)
        conv = self.sessions[session_id]
        reply = conv.reply
        assert reply is not None
        text_rows = len(conv.tokens) - reply.start_len
        if active.msg.output_audio:
            self.io.send("talker", p.TextEnd(session_id, active.msg.reply, text_rows))
        tokens = [t for t in reply.tokens if t not in self.ids.eos]
        self.io.send(
            "frontend",
            p.ThinkerDone(
                session_id,
                active.msg.reply,
                status,
                self.tokenizer.decode(tokens, skip_special_tokens=True),
                len(tokens),
                active.input_tokens,
                active.prefill_ms or 0.0,
                active.msg.output_audio,
                list(reply.tokens),
            ),
        )
        # the reply may have used the reserve: the context goes back within its budget now,
        # not with the next input (the same evictions, while nobody waits on them)
        conv.fit_budget(0)


def truncation(mode: str, retention_ratio: float) -> Truncation:
    if mode not in ("auto", "disabled", "retention_ratio"):
        raise ValueError(f"unknown truncation {mode!r}")
    return Truncation(mode, retention_ratio)  # type: ignore[arg-type]


def token_ids(tokenizer, eos: int | list[int] | None) -> TokenIds:
    """The chat template's special tokens, looked up by name so any checkpoint's ids work."""

    def one(token: str) -> int:
        value = tokenizer.convert_tokens_to_ids(token)
        if value is None or value == tokenizer.unk_token_id:
            raise ValueError(f"tokenizer has no {token}")
        return int(value)

    def words(text: str) -> list[int]:
        return tokenizer.encode(text, add_special_tokens=False)

    def named(name: str, qwen2_5: str) -> int:
        """A modality token by the tokenizer's name for it (Qwen3-Omni's differ), else
        Qwen2.5-Omni's."""
        return one(getattr(tokenizer, name, None) or qwen2_5)

    return TokenIds(
        im_start=one("<|im_start|>"),
        im_end=one("<|im_end|>"),
        newline=words("\n")[0],
        user=words("user"),
        assistant=words("assistant"),
        system=words("system"),
        audio=named("audio_token", "<|AUDIO|>"),
        audio_bos=named("audio_bos_token", "<|audio_bos|>"),
        audio_eos=named("audio_eos_token", "<|audio_eos|>"),
        image=named("image_token", "<|IMAGE|>"),
        video=named("video_token", "<|VIDEO|>"),
        vision_bos=named("vision_bos_token", "<|vision_bos|>"),
        vision_eos=named("vision_eos_token", "<|vision_eos|>"),
        # the thinker's end of reply: its generation config, else the chat template's ends
        eos=[eos] if isinstance(eos, int) else list(eos or [one("<|im_end|>"), one("<|endoftext|>")]),
    )


def main(cfg: WorkerConfig) -> None:
    configure_worker("thinker", cfg.device)
    ThinkerWorker(cfg).run()
