"""One conversation inside the thinker: its tokens, KV cache and TMRoPE positions.

The conversation follows Qwen2.5-Omni's chat template token for token, but is prefilled as
it arrives instead of all at once: text and images when they come, user speech in 2-second
chunks while the user is still talking (the audio encoder attends within 2-second windows and
the LLM is causal, so the cache equals one prefill of the whole turn). At the end of the turn
only the remainder is left to prefill, then the reply is decoded one token per `choose()`.

Nothing runs the model when input arrives: each piece (text, an audio chunk, image or video
patches) is queued as a segment of LLM input rows, and `ThinkerStage.step()` runs the queued
segments of every session in one batched forward, chunked under the scheduler's token budget
(omni/engine/scheduler.py), into each session's KV slot (omni/engine/kv_memory.py). So an
image or a long text in one call never holds up another call's reply.

A ledger notes what each range of the context is (system turn, words, an audio chunk, a
video grid step, an image) and which exchange it belongs to; with it the context keeps to its
budget (omni/engine/context_budget.py: old video, then old audio, then old words are evicted
from the KV slot in place) and an exchange can be rewound (a deleted item).

Every position that enters the cache also yields a "context row" for the talker: the token's
input embedding (zeroed for audio/image/video placeholders, as transformers' generate() does)
plus its last-layer hidden state. The rows of reply tokens are the talker's reply parts.

No I/O here: the worker process owns sockets; this module owns the thinker's model math.
"""

from __future__ import annotations

import hashlib
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from transformers import LogitsProcessorList

from omni.engine.audio_features import StreamingLogMel
from omni.engine.batched_forward import BatchedForward, Row
from omni.engine.buffers import GrowingTensor
from omni.engine.api import Truncation
from omni.engine.context_budget import Span, choose_evictions, position_map, removed_before
from omni.engine.kv_memory import KVFull, KVSlots
from omni.engine.positions import AudioVideoChunker, PositionTracker
from omni.engine.protocol import ContextRows
from omni.engine.sampling import choose, sampling_generator, thinker_processors
from omni.engine.scheduler import Demand, StepScheduler
from omni.engine.thinker_family import thinker_family
from omni.engine.video_clock import Frame, FrameTimeline
from omni.engine.vision import VideoPatcher, image_to_patches

VIDEO_FPS = 2.0


@dataclass
class TokenIds:
    """Special token ids, read from the checkpoint's config (real ids in every checkpoint)."""

    im_start: int
    im_end: int
    newline: int
    user: list[int]
    assistant: list[int]
    system: list[int]
    audio: int
    audio_bos: int
    audio_eos: int
    image: int
    video: int
    vision_bos: int
    vision_eos: int
    eos: list[int]


@dataclass
class _Exchange:
    """Where an exchange (a user turn and its reply) began, after the last reply's end: a
    rewind goes back here."""

    start_len: int
    start_pos: int


@dataclass
class _Turn:
    """The open user turn: where it started (for clearing) and its streaming audio/video."""

    start_len: int
    start_pos: int
    tail_before: list[int]
    # raw inputs (a method's name and arguments), replayed when the reply before this turn is
    # truncated after the turn began
    inputs: list[tuple[str, tuple[object, ...]]] = field(default_factory=list)
    mel: StreamingLogMel | None = None
    mel_frames: list[np.ndarray] = field(default_factory=list)
    mel_buffered: int = 0
    audio_tokens: int = 0
    video: VideoPatcher | None = None
    chunker: AudioVideoChunker | None = None
    mel_done: int = 0  # log-mel frames prefilled so far (the video timeline follows them)
    # where the open span's audio begins on the caller's audio clock (None: not said)
    span_start: float | None = None
    # camera frames waiting for their video steps; one slot is 1 / VIDEO_FPS seconds
    frames: FrameTimeline = field(default_factory=lambda: FrameTimeline(1 / VIDEO_FPS))


@dataclass
class Reply:
    start_len: int  # conversation length where the reply's first token goes
    exchange: int  # the exchange it answers
    processors: LogitsProcessorList
    max_tokens: int
    greedy: bool
    generator: torch.Generator | None
    tokens: list[int] = field(default_factory=list)
    logits: torch.Tensor | None = None  # next-token logits, (vocab,), once computed
    done: bool = False
    ended_by_eos: bool = False


@dataclass(eq=False)  # segments are compared by identity
class _Segment:
    """LLM input rows queued for the next steps; `done` of them have run."""

    embeds: torch.Tensor  # (n, E)
    positions: torch.Tensor  # (3, n)
    multimodal: bool  # audio/image/video placeholders: zeroed in the talker's embedding half
    reply_token: bool = False  # a reply token chosen but not yet run
    logits_for: Reply | None = None  # the last row's logits are this reply's next-token logits
    # (layers, n, E) Qwen3-Omni image features added into the first LLM layers (thinker_family)
    deepstack: torch.Tensor | None = None
    done: int = 0

    @property
    def left(self) -> int:
        return self.embeds.shape[0] - self.done


@dataclass
class _Take:
    """What one step runs of a conversation: rows, and whose logits come from which row."""

    embeds: torch.Tensor
    positions: torch.Tensor
    multimodal: torch.Tensor  # (n,) bool
    logits_at: list[tuple[int, Reply]]
    deepstack: torch.Tensor | None = None  # (layers, m, E) for the m rows deepstack_rows marks
    deepstack_rows: torch.Tensor | None = None  # (n,) bool: the rows that have them


class ThinkerConversation:
    def __init__(
        self,
        thinker: torch.nn.Module,
        ids: TokenIds,
        feature_extractor,
        processor_config: dict,
        system_prompt: str,
        encode_text: Callable[[str], list[int]],
        on_rows: Callable[[ContextRows], None],
        kv: KVSlots,
        max_frame_side: int = 448,
        *,
        budget: int | None = None,
        position_limit: int | None = None,
        truncation: Truncation = Truncation(),
        on_evict: Callable[[list[tuple[int, int]]], None] | None = None,
        first_exchange: int = 0,
    ) -> None:
        self.model = thinker
        self.family = thinker_family(thinker)
        self.ids = ids
        self.feature_extractor = feature_extractor
        self.processor_config = processor_config
        self.encode_text = encode_text
        self.on_rows = on_rows
        self.max_frame_side = max_frame_side
        self.device = next(thinker.parameters()).device
        self.dtype = next(thinker.parameters()).dtype
        self.kv = kv
        self.slot = kv.allocate()
        # every token of the conversation, queued ones included (the cache holds `cached`)
        self.tokens = GrowingTensor((), torch.long, self.device)
        self.pending: deque[_Segment] = deque()
        self.positions = PositionTracker(thinker.config.vision_config.spatial_merge_size)
        self.tail: list[int] = []  # tokens closing the last reply, fed with the next input
        self.turn: _Turn | None = None
        self.reply: Reply | None = None
        self.last_reply_start: int | None = None
        self.last_reply_tokens: list[int] = []
        self.system_prompt = system_prompt
        self._closing: _Segment | None = None  # the end of the last end_turn()
        # the worst distance of a stamped camera frame's capture from the instant it stood for
        self.frame_offset_max_s = 0.0
        # the context budget (context_budget.py): input stays within `budget` tokens (a reply
        # may use the rest of the slot), positions below `position_limit`
        self.budget = kv.max_len if budget is None else min(budget, kv.max_len)
        self.position_limit = position_limit
        self.truncation = truncation
        self.on_evict = on_evict
        self.ledger: list[Span] = []  # what each range of the context is, in order
        self.first_exchange = first_exchange
        self.exchanges: list[_Exchange] = []  # the exchanges so far, from `first_exchange` on
        self._holes = False  # evictions left unused positions that a recompute would close
        self._prefill_text(self._system_turn(system_prompt), kind="system")

    @property
    def token_ids(self) -> list[int]:
        return self.tokens.view().tolist()

    def digest(self) -> int:
        """A 63-bit digest of the token ids (queued ones included)."""
        data = self.tokens.view().cpu().numpy().astype("<i8").tobytes()
        return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big") >> 1

    @property
    def cached(self) -> int:
        return self.kv.lengths[self.slot]

    @property
    def exchange(self) -> int:
        """The current exchange's number (the replay log's turn number)."""
        return self.first_exchange + len(self.exchanges) - 1

    def close(self) -> None:
        """Give the KV slot back (the session ended)."""
        self.kv.release(self.slot)

    # -- user input ---------------------------------------------------------------------

    def add_text(self, text: str) -> None:
        turn = self._open_turn()
        turn.inputs.append(("add_text", (text,)))
        self._close_audio_span(turn)
        self._prefill_text(self.encode_text(text))

    def add_image(self, rgb: np.ndarray) -> None:
        turn = self._open_turn()
        turn.inputs.append(("add_image", (rgb,)))
        self._close_audio_span(turn)
        pixels, grid = image_to_patches(rgb, self.processor_config)
        grid_t = torch.tensor([grid], device=self.device)
        pixels_t = torch.from_numpy(pixels).to(self.device)
        features = self.model.model.get_image_features(pixels_t, grid_t)
        embeds = torch.cat(features.pooler_output)
        deepstack = self._deepstack(features)
        n = embeds.shape[0]
        self._prefill_text([self.ids.vision_bos])
        self._prefill(
            [self.ids.image] * n,
            embeds.to(self.dtype),
            self.positions.vision(grid),
            multimodal=True,
            deepstack=deepstack,
        )
        self._prefill_text([self.ids.vision_eos])

    def append_video_frame(self, rgb: np.ndarray, timestamp: float | None = None) -> None:
        """Camera frames before or during the user's speech make the speech a video with audio.

        `timestamp`: the capture time on the caller's audio clock (omni/engine/api.py); the
        frame then stands for the video instant nearest it (video_clock.py). A frame before
        the speech starts counts from its time too: the earliest frame stands for the speech's
        first instants until a nearer one comes, as an unstamped one would.
        """
        turn = self._open_turn()
        turn.inputs.append(("append_video_frame", (rgb, timestamp)))
        if turn.mel is not None and turn.chunker is None:
            return  # speech already started as plain audio; the model can't switch mid-span
        turn.frames.add(Frame(rgb, timestamp))

    def append_audio(self, pcm: np.ndarray, timestamp: float | None = None) -> None:
        """`timestamp`: where the first sample is on the caller's audio clock; the first
        audio of a span sets where its video's instants are."""
        turn = self._open_turn()
        turn.inputs.append(("append_audio", (pcm, timestamp)))
        if turn.mel is None:
            self._open_audio_span(turn, timestamp)
        frames = turn.mel.push(pcm)
        if frames.shape[1]:
            turn.mel_frames.append(frames)
            turn.mel_buffered += frames.shape[1]
        chunk = self.family.frames_per_chunk
        while turn.mel_buffered >= chunk:
            self._prefill_audio_chunk(turn, self._take_frames(turn, chunk))

    def end_turn(self, system_prompt: str | None = None) -> None:
        """Close the user turn (queueing what is left) and open the assistant's.

        The reply's first logits come from the last row queued here, once a step has run it
        (`start_reply` asks for them). A changed `system_prompt` (new instructions mid-call)
        goes in as a system turn right before the reply: the cache keeps everything said so
        far, nothing is recomputed.
        """
        closing: list[int] = []
        turn = self.turn
        if turn is not None:
            self._close_audio_span(turn)
            closing += [self.ids.im_end, self.ids.newline]
        else:  # a reply with no input first: the last reply's end, then a new exchange
            self._prefill_text(self.tail)
            self._begin_exchange()
        self._prefill_text(closing)
        if system_prompt is not None and system_prompt != self.system_prompt:
            self._prefill_text(self._system_turn(system_prompt), kind="system")
            self.system_prompt = system_prompt
        self.tail = []
        self.turn = None
        self._prefill_text([self.ids.im_start, *self.ids.assistant, self.ids.newline])
        self._closing = self.pending[-1]

    def clear_turn(self) -> None:
        if self.turn is not None:
            self._rollback(self.turn.start_len, self.turn.start_pos)
            self.tail = self.turn.tail_before
            self.turn = None
            self.exchanges.pop()  # the turn began it; the next input begins it again

    # -- reply ----------------------------------------------------------------------------

    def start_reply(
        self,
        max_tokens: int,
        greedy: bool,
        min_tokens: int = 0,
        seed: int | None = None,
    ) -> Reply:
        """Start decoding after `end_turn()`; the first token is chosen once its logits exist."""
        gen_cfg = self.model.generation_config
        greedy = greedy or not gen_cfg.do_sample
        start = len(self.tokens)
        generator = None if greedy else sampling_generator(self.device, seed)
        self.reply = Reply(
            start_len=start,
            exchange=self.exchange,
            processors=thinker_processors(gen_cfg, greedy, min_tokens, self.ids.eos, start),
            max_tokens=max_tokens,
            greedy=greedy,
            generator=generator,
        )
        if self._closing is None or self._closing not in self.pending:
            raise RuntimeError("start_reply() needs the turn closed by end_turn() first")
        self._closing.logits_for = self.reply
        self._closing = None
        self.last_reply_start = start
        self.last_reply_tokens = self.reply.tokens
        return self.reply

    def can_choose(self) -> bool:
        reply = self.reply
        return reply is not None and not reply.done and reply.logits is not None

    def choose(self) -> tuple[int, bool]:
        """Choose the next reply token and queue it unless it ends the reply: (token, last)."""
        reply = self.reply
        assert reply is not None and self.can_choose()
        # every reply token so far has been queued: the conversation is exactly what was seen
        token = choose(reply.processors, self.tokens.view()[None], reply.logits, reply.greedy, reply.generator)
        reply.tokens.append(token)
        reply.logits = None
        if token in self.ids.eos:
            reply.ended_by_eos = True
        if reply.ended_by_eos or len(reply.tokens) >= reply.max_tokens:
            self._close_reply()
            return token, True
        self._prefill_text([token], reply_token=True, logits_for=reply)
        return token, False

    def cancel_reply(self) -> None:
        """Stop decoding; the tokens chosen so far stay in the conversation."""
        if self.reply is not None and not self.reply.done:
            self._close_reply()

    def truncate_reply(self, keep_tokens: int) -> int:
        """Keep the first `keep_tokens` tokens of the last reply (what the caller heard: the
        front end maps heard audio to tokens, omni/engine/heard.py).

        With server VAD the caller's next turn usually starts (and is prefilled) before the
        client's truncate arrives; that turn is rolled back and replayed after the cut.
        """
        if self.last_reply_start is None or (self.reply is not None and not self.reply.done):
            return 0
        replay = self.turn.inputs if self.turn is not None else []
        self.clear_turn()
        tokens = [t for t in self.last_reply_tokens if t not in self.ids.eos]
        keep = max(0, min(keep_tokens, len(tokens)))
        fed = len(self.tokens) - self.last_reply_start
        if keep < fed:
            self._rollback(self.last_reply_start + keep, self.positions.next - fed + keep)
            self.tail = [self.ids.im_end, self.ids.newline]
        else:
            self.tail = [*tokens[fed:keep], self.ids.im_end, self.ids.newline]
        del self.last_reply_tokens[keep:]
        for method, args in replay:
            getattr(self, method)(*args)
        return keep

    def _close_reply(self) -> None:
        reply = self.reply
        assert reply is not None
        reply.done = True
        reply.logits = None
        # a chosen token still queued (a cancel between steps) is not run: it joins the tail
        queued = [s for s in self.pending if s.reply_token]
        if queued:
            self.pending = deque(s for s in self.pending if not s.reply_token)
            self._truncate_tokens(len(self.tokens) - sum(s.left for s in queued))
            self.positions.next -= sum(s.left for s in queued)
        # the last chosen token was not fed: it ended the reply, or the reply stopped first
        fed = len(self.tokens) - reply.start_len
        unfed = [t for t in reply.tokens[fed:] if t not in self.ids.eos]
        self.tail = [*unfed, self.ids.im_end, self.ids.newline]

    # -- the batched step's side -----------------------------------------------------------

    def pending_tokens(self) -> int:
        return sum(s.left for s in self.pending)

    def decoding(self) -> bool:
        """Only a reply token is queued: a decode row."""
        return len(self.pending) == 1 and self.pending[0].reply_token

    def waiting_reply(self) -> bool:
        """A started reply waits for this queue (its first logits are at its end)."""
        return self.reply is not None and not self.reply.done and self.reply.logits is None

    def take(self, n: int) -> _Take:
        """Dequeue the next `n` rows (whole or part segments) for this step."""
        embeds, positions, multimodal, logits_at = [], [], [], []
        deepstack: list[torch.Tensor | None] = []
        got = 0
        while got < n:
            seg = self.pending[0]
            k = min(seg.left, n - got)
            embeds.append(seg.embeds[seg.done : seg.done + k])
            positions.append(seg.positions[:, seg.done : seg.done + k])
            multimodal.append(torch.full((k,), seg.multimodal))
            deepstack.append(None if seg.deepstack is None else seg.deepstack[:, seg.done : seg.done + k])
            seg.done += k
            got += k
            if seg.left == 0:
                self.pending.popleft()
                if seg.logits_for is not None:
                    logits_at.append((got - 1, seg.logits_for))
        take = _Take(torch.cat(embeds), torch.cat(positions, dim=1), torch.cat(multimodal), logits_at)
        if any(d is not None for d in deepstack):
            take.deepstack = torch.cat([d for d in deepstack if d is not None], dim=1)
            take.deepstack_rows = torch.cat(
                [torch.full((e.shape[0],), d is not None) for e, d in zip(embeds, deepstack)]
            )
        return take

    def drop_pending(self) -> None:
        """Forget queued rows that could not run (a failed step): the conversation is what ran."""
        self.pending.clear()
        self._truncate_tokens(self.cached)
        self._clamp_reply_start()

    def drop_exchange(self) -> int | None:
        """Forget the exchange in progress, the part of its input that ran too, when its reply
        has said nothing yet (an input that does not fit the context never will: keeping half
        of it would only fail the next turn as well). Returns its number; None (nothing said
        is forgotten): what could not run is dropped, as `drop_pending`."""
        reply = self.reply
        answering = reply is not None and reply.exchange == self.exchange and not reply.tokens
        if not self.exchanges or not (self.turn is not None or answering):
            self.drop_pending()
            return None
        if reply is not None:
            reply.done = True
        exchange = self.exchange
        self.rewind(exchange)
        self._clamp_reply_start()
        return exchange

    def _clamp_reply_start(self) -> None:
        """A reply asked for after input that never ran starts where the conversation ends."""
        if self.reply is not None:
            self.reply.start_len = min(self.reply.start_len, len(self.tokens))

    # -- rebuilding a conversation on a restarted worker ---------------------------------

    def add_reply(self, tokens: list[int], system_prompt: str | None = None) -> None:
        """A past reply, teacher-forced: close the user turn as `end_turn` does, then leave the
        conversation as a finished reply that kept `tokens` would (truncatable, its end still
        to come as the tail), so a replayed conversation has the original's tokens.
        """
        self.end_turn(system_prompt)
        self.last_reply_start = len(self.tokens)
        self.last_reply_tokens = list(tokens)
        if tokens:
            self._prefill_text(tokens)
        self.tail = [self.ids.im_end, self.ids.newline]

    # -- the context budget (context_budget.py) -------------------------------------------

    def fit_budget(self, step_rows: int) -> int:
        """Before a step that may run up to `step_rows` of this conversation's queued rows:
        keep it within its budget, evicting the oldest cached content as `truncation` says,
        and rebuild it at closed-up positions when they near the model's trained range.
        Returns how many rows may run (0: over the budget, and nothing more may go:
        truncation disabled, or what is cached is all protected). Evictions make room for
        the rows about to run, not for the whole queue: a rebuilt conversation arrives all at
        once, and its older exchanges become evictable only once they have run."""
        reply = self.reply
        decoding = reply is not None and not reply.done and bool(reply.tokens)
        limit = self.kv.max_len if decoding else self.budget  # a reply may use the reserve
        if len(self.tokens) > limit and self.truncation.mode == "disabled":
            return 0
        need = self.cached + min(self.pending_tokens(), step_rows) - limit
        if need > 0:
            chosen = choose_evictions(self.ledger, self.cached, self.exchange, need, self.truncation)
            self.evict(chosen)
        if self._positions_past_limit() and not decoding:
            self.recompute()
        return max(0, limit - self.cached)

    def _positions_past_limit(self) -> bool:
        """Positions passed the limit and a recompute would close up some (else it would only
        cost a prefill: past the trained range then is approximate, as for any long input)."""
        if not self._holes or self.position_limit is None:
            return False
        next_position = self.positions.next
        if next_position <= self.position_limit:
            return False
        self._holes = int(position_map(self.ledger, next_position)[next_position]) < next_position
        return self._holes

    def evict(self, spans: list[Span]) -> None:
        """Drop these cached spans from the KV slot (compacted in place: the keys that stay
        keep their rotary positions), the token list and the ledger; the talker drops the
        same rows. Nothing else is recomputed (what that leaves approximate: context_budget.py)."""
        if not spans:
            return
        ranges = [(s.start, s.end) for s in spans]
        assert all(end <= self.cached for _, end in ranges), "only cached rows can be evicted"
        self.kv.evict(self.slot, ranges)
        self.tokens.delete(ranges)
        self._holes = True
        if self.on_evict is not None:
            self.on_evict(ranges)
        gone = set(map(id, spans))
        self.ledger = [s for s in self.ledger if id(s) not in gone]
        for s in self.ledger:
            shift = removed_before(ranges, s.start)
            s.start, s.end = s.start - shift, s.end - shift
        for ex in self.exchanges:
            ex.start_len -= removed_before(ranges, ex.start_len)
        if self.turn is not None:
            self.turn.start_len -= removed_before(ranges, self.turn.start_len)
        if self.last_reply_start is not None:
            self.last_reply_start -= removed_before(ranges, self.last_reply_start)
        if self.reply is not None:
            shift = removed_before(ranges, self.reply.start_len)
            self.reply.start_len -= shift
            for processor in self.reply.processors:  # min-new-tokens counts from the prompt's end
                if hasattr(processor, "prompt_length_to_skip"):
                    processor.prompt_length_to_skip -= shift

    def recompute(self) -> None:
        """Rebuild the cache from the retained content at closed-up positions (exact for that
        content, unlike eviction): every row is queued again, the talker's rows with them.
        Not while a reply is decoding (its rows would move under it)."""
        remap = position_map(self.ledger, self.positions.next)
        self._holes = False
        waiting = [seg.logits_for for seg in self.pending if seg.logits_for is not None]
        closing = self._closing is not None and self._closing in self.pending
        self.pending.clear()
        self.kv.crop(self.slot, 0)
        self.on_rows(ContextRows(0, torch.empty(0), torch.empty(3, 0, dtype=torch.long)))
        embed = self.model.get_input_embeddings()
        tokens = self.tokens.view()
        for s in self.ledger:
            s.positions = remap[s.positions]
            if s.embeds is not None:
                inputs = s.embeds.to(self.device)
            else:
                inputs = embed(tokens[s.start : s.end])
            deepstack = None if s.deepstack is None else s.deepstack.to(self.device)
            self.pending.append(_Segment(inputs, s.positions, s.embeds is not None, deepstack=deepstack))
        if waiting:
            self.pending[-1].logits_for = waiting[-1]
        if closing:
            self._closing = self.pending[-1]
        self.positions.next = int(remap[self.positions.next])
        for ex in self.exchanges:
            ex.start_pos = int(remap[min(ex.start_pos, len(remap) - 1)])
        turn = self.turn
        if turn is not None:
            turn.start_pos = int(remap[min(turn.start_pos, len(remap) - 1)])
            if turn.chunker is not None:
                turn.chunker.start = int(remap[turn.chunker.start])
                turn.chunker.last_piece_max = int(remap[turn.chunker.last_piece_max + 1]) - 1

    def rewind(self, exchange: int) -> None:
        """Forget exchange `exchange` and everything after it (a deleted item: the engine
        sends what follows it again), as if it had never been; nothing before it changes."""
        if self.reply is not None and not self.reply.done:
            raise RuntimeError("cannot rewind while a reply is in progress")
        if exchange < self.first_exchange:
            raise ValueError(f"exchange {exchange} is older than this conversation's first")
        index = exchange - self.first_exchange
        if index < len(self.exchanges):
            self.turn = None
            start = self.exchanges[index]
            self._rollback(start.start_len, start.start_pos)
            del self.exchanges[index:]
            self.tail = []
        if self.last_reply_start is not None and self.last_reply_start >= len(self.tokens):
            self.last_reply_start, self.last_reply_tokens = None, []

    def _begin_exchange(self) -> None:
        self.exchanges.append(_Exchange(len(self.tokens), self.positions.next))

    def _multimodal_kind(self, token: int) -> str:
        return {self.ids.audio: "audio", self.ids.image: "image"}.get(token, "video")

    def _record(
        self,
        kind: str,
        positions: torch.Tensor,
        embeds: torch.Tensor | None,
        deepstack: torch.Tensor | None = None,
    ) -> None:
        """Note in the ledger what the rows about to be queued are (text runs of one
        exchange join one span; each audio chunk, grid step and image is a span of its own)."""
        n = positions.shape[1]
        start = len(self.tokens)
        last = self.ledger[-1] if self.ledger else None
        if (
            embeds is None
            and last is not None
            and last.embeds is None
            and last.kind == kind
            and last.exchange == self.exchange
            and last.end == start
        ):
            last.end += n
            last.positions = torch.cat([last.positions, positions.cpu()], dim=1)
            return
        # audio/vision embeddings wait for a recompute in host memory, not on the GPU
        kept = None if embeds is None else embeds.to("cpu", non_blocking=True)
        kept_deepstack = None if deepstack is None else deepstack.to("cpu", non_blocking=True)
        self.ledger.append(
            Span(kind, self.exchange, start, start + n, positions.cpu(), kept, kept_deepstack)
        )

    def _truncate_tokens(self, length: int) -> None:
        """The conversation ends at `length` tokens: the token list and the ledger."""
        self.tokens.truncate(length)
        while self.ledger and self.ledger[-1].start >= length:
            self.ledger.pop()
        if self.ledger and self.ledger[-1].end > length:
            last = self.ledger[-1]
            keep = length - last.start
            last.end, last.positions = length, last.positions[:, :keep]
            if last.embeds is not None:
                last.embeds = last.embeds[:keep]
            if last.deepstack is not None:
                last.deepstack = last.deepstack[:, :keep]

    # -- internals ------------------------------------------------------------------------

    def _system_turn(self, text: str) -> list[int]:
        if not text:  # no instructions, and the family needs no prompt to speak
            return []
        ids = self.ids
        return [ids.im_start, *ids.system, ids.newline, *self.encode_text(text), ids.im_end, ids.newline]

    def _open_turn(self) -> _Turn:
        if self.turn is None:
            self.turn = _Turn(len(self.tokens), self.positions.next, tail_before=self.tail)
            self._prefill_text(self.tail)  # the last reply's end belongs to its exchange
            self._begin_exchange()
            self._prefill_text([self.ids.im_start, *self.ids.user, self.ids.newline])
            self.tail = []
        return self.turn

    def _open_audio_span(self, turn: _Turn, start: float | None) -> None:
        turn.mel = StreamingLogMel(self.feature_extractor)
        turn.span_start = start
        if turn.frames.pending:
            turn.video = VideoPatcher(self.max_frame_side, self.processor_config)
            self._prefill([self.ids.vision_bos, self.ids.audio_bos], None, self._paired_positions())
            turn.chunker = AudioVideoChunker(
                self.positions, 2 / VIDEO_FPS, self.family.positions_per_second
            )
        else:
            self._prefill_text([self.ids.audio_bos])

    def _close_audio_span(self, turn: _Turn) -> None:
        """End the open audio (or video-with-audio) span, if any, before other input.

        Input goes where the chat template puts a message's next content part: text or an
        image that comes while speech streams in lands after `<|audio_eos|>`, never inside
        the span; speech after it opens a span of its own. (Already prefilled speech stays
        as it is: nothing is recomputed. Qwen2.5-Omni's template takes any number of audio
        parts in one message, each its own span.)
        """
        if turn.mel is None:
            return
        self._finish_audio_span(turn)
        if turn.chunker is None:
            self._prefill_text([self.ids.audio_eos])
        turn.mel, turn.video, turn.chunker = None, None, None
        turn.mel_done = 0

    def _finish_audio_span(self, turn: _Turn) -> None:
        assert turn.mel is not None
        tail = turn.mel.finish()
        if tail.shape[1]:
            turn.mel_frames.append(tail)
            turn.mel_buffered += tail.shape[1]
        while turn.mel_buffered:
            n = min(self.family.frames_per_chunk, turn.mel_buffered)
            self._prefill_audio_chunk(turn, self._take_frames(turn, n))
        if turn.chunker is not None:
            turn.chunker.close()
            self._prefill([self.ids.audio_eos, self.ids.vision_eos], None, self._paired_positions())

    def _deepstack(self, features) -> torch.Tensor | None:
        """(layers, n, E): one image's or grid step's features per deepstack layer, if the
        family has them (the vision encoder's output, split per item)."""
        if not self.family.deepstack:
            return None
        return torch.stack([layer[0] for layer in features.deepstack_features]).to(self.dtype)

    def _paired_positions(self) -> torch.Tensor:
        """The paired vision/audio bos (or eos) of a video with its audio: one position
        (Qwen2.5-Omni) or one each (Qwen3-Omni)."""
        if self.family.video_interleave == "chunks":
            return self.positions.repeat_last(2)
        return self.positions.sequential(2)

    @staticmethod
    def _take_frames(turn: _Turn, n: int) -> np.ndarray:
        frames = np.concatenate(turn.mel_frames, axis=1)
        taken, rest = frames[:, :n], frames[:, n:]
        turn.mel_frames = [rest] if rest.shape[1] else []
        turn.mel_buffered -= n
        return taken

    def _prefill_audio_chunk(self, turn: _Turn, frames: np.ndarray) -> None:
        """An audio chunk, and with a video the grid steps that fall in its seconds: before
        all of its audio (Qwen2.5-Omni), or each before the audio token at its start time
        (Qwen3-Omni)."""
        n_frames = frames.shape[1]
        chunker = turn.chunker
        steps = [] if chunker is None else self._video_steps_for_chunk(turn, n_frames)
        n_tokens = self.family.audio_tokens(n_frames)
        embeds = None
        if n_tokens:  # a 1-2 frame tail makes no audio token (offline too)
            feats = torch.from_numpy(frames).to(self.device, self.dtype)[None]
            mask = torch.ones(1, n_frames, dtype=torch.long, device=self.device)
            embeds = self.model.model.get_audio_features(feats, feature_attention_mask=mask).last_hidden_state
            assert embeds.shape[0] == n_tokens
            embeds = embeds.to(self.dtype)
        if chunker is None:
            if embeds is not None:
                positions = self.positions.sequential(n_tokens)
                self._prefill([self.ids.audio] * n_tokens, embeds, positions, multimodal=True)
            turn.audio_tokens += n_tokens
            return
        base, done = chunker.audio_done, 0  # the span's audio tokens before it; of this chunk's
        for step in steps:
            at = 0  # "chunks": every step before the chunk's audio
            if self.family.video_interleave == "timeline":
                at = chunker.grid_audio_index(chunker.grids_done) - base
            split = min(max(at, done), n_tokens)
            self._prefill_chunk_audio(chunker, embeds, done, split)
            done = split
            self._prefill_video_step(chunker, *step)
        self._prefill_chunk_audio(chunker, embeds, done, n_tokens)
        turn.audio_tokens += n_tokens

    def _prefill_chunk_audio(
        self, chunker: AudioVideoChunker, embeds: torch.Tensor | None, lo: int, hi: int
    ) -> None:
        """Audio tokens [lo, hi) of a chunk inside a video."""
        if embeds is None or hi <= lo:
            return
        positions = chunker.audio(hi - lo)
        self._prefill([self.ids.audio] * (hi - lo), embeds[lo:hi], positions, multimodal=True)

    def _prefill_video_step(
        self,
        chunker: AudioVideoChunker,
        grid_thw: tuple[int, int, int],
        embeds: torch.Tensor,
        deepstack: torch.Tensor | None,
    ) -> None:
        positions = chunker.video(*grid_thw)
        self._prefill(
            [self.ids.video] * embeds.shape[0], embeds, positions, multimodal=True, deepstack=deepstack
        )

    def _video_steps_for_chunk(
        self, turn: _Turn, n_frames: int
    ) -> list[tuple[tuple[int, int, int], torch.Tensor, torch.Tensor | None]]:
        """The video grid steps that fall in this audio chunk's seconds: (grid, embeddings,
        deepstack features) each.

        One grid step spans temporal_patch_size / fps seconds; by the end of the chunk the video
        has as many steps as cover the audio so far (the last partial second counts whole, as
        the processor's frame sampling does).
        """
        assert turn.video is not None and turn.chunker is not None
        turn.mel_done += n_frames
        seconds_per_step = turn.chunker.seconds_per_grid
        steps_due = int(np.ceil(turn.mel_done / 100 / seconds_per_step)) - turn.chunker.grids_done
        per_step = turn.video.temporal_patch_size
        slot = seconds_per_step / per_step
        steps = []
        for k in range(steps_due):
            # the step's frames stand for instants g*S + j*S/T of the span (video_clock.py)
            step_start = (turn.chunker.grids_done + k) * seconds_per_step
            step = None
            for j in range(per_step):
                instant = None
                if turn.span_start is not None:
                    instant = turn.span_start + step_start + j * slot
                step = turn.video.push(turn.frames.take(instant))
            assert step is not None
            self.frame_offset_max_s = max(self.frame_offset_max_s, turn.frames.worst_offset_s)
            grid = torch.tensor([step.grid_thw], device=self.device)
            pixels = torch.from_numpy(step.pixel_values).to(self.device)
            features = self.model.model.get_video_features(pixels, grid)
            embeds = torch.cat(features.pooler_output).to(self.dtype)
            steps.append((step.grid_thw, embeds, self._deepstack(features)))
        return steps

    def _prefill_text(
        self,
        tokens: list[int],
        reply_token: bool = False,
        logits_for: Reply | None = None,
        kind: str = "text",
    ) -> None:
        positions = self.positions.sequential(len(tokens))
        self._prefill(
            tokens, None, positions, reply_token=reply_token, logits_for=logits_for, kind=kind
        )

    def _prefill(
        self,
        tokens: list[int],
        embeds: torch.Tensor | None,
        positions: torch.Tensor,
        multimodal: bool = False,
        reply_token: bool = False,
        logits_for: Reply | None = None,
        kind: str = "text",
        deepstack: torch.Tensor | None = None,
    ) -> None:
        """Queue `tokens` (with their input embeddings) for the LLM; a step runs them."""
        if not tokens:
            return
        ids = torch.tensor(tokens, device=self.device)
        inputs = self.model.get_input_embeddings()(ids) if embeds is None else embeds
        kind = self._multimodal_kind(tokens[0]) if multimodal else kind
        self._record(kind, positions, embeds, deepstack)
        self.tokens.append(ids)
        self.pending.append(
            _Segment(inputs, positions, multimodal, reply_token, logits_for, deepstack)
        )

    def _rollback(self, length: int, next_position: int) -> None:
        drop = len(self.tokens) - length
        while drop > 0 and self.pending:
            seg = self.pending[-1]
            if seg.left <= drop:
                self.pending.pop()
                drop -= seg.left
            else:
                keep = seg.embeds.shape[0] - drop
                seg.embeds, seg.positions = seg.embeds[:keep], seg.positions[:, :keep]
                if seg.deepstack is not None:
                    seg.deepstack = seg.deepstack[:, :keep]
                drop = 0
        self.kv.crop(self.slot, length)
        self._truncate_tokens(length)
        self.positions.next = next_position
        self.on_rows(ContextRows(length, torch.empty(0), torch.empty(3, 0, dtype=torch.long)))


@dataclass
class StepResult:
    ran: bool = False  # a forward ran
    ready: list[str] = field(default_factory=list)  # sessions whose reply got next-token logits
    full: list[str] = field(default_factory=list)  # sessions left out: their context is full
    over: list[str] = field(default_factory=list)  # left out: past their budget (fit_budget)


class ThinkerStage:
    """The thinker's batched model step: the queued rows of every session, in one forward."""

    def __init__(
        self,
        thinker: torch.nn.Module,
        kv: KVSlots,
        scheduler: StepScheduler,
        cuda_graphs: bool = False,
        talker_layer: int | None = None,
    ) -> None:
        """`talker_layer`: the layer whose states the talker reads (Qwen3-Omni's talker config
        `accept_hidden_layer`; the thinker's own config does not say)."""
        self.model = thinker
        self.kv = kv
        self.scheduler = scheduler
        self.family = thinker_family(thinker)
        if self.family.talker_reads_layer and talker_layer is None:
            raise ValueError(f"a {self.family.name} thinker stage needs the talker's layer")
        keep = talker_layer if self.family.talker_reads_layer else None
        self.forward = BatchedForward(
            thinker.model.language_model, kv, scheduler.max_rows, cuda_graphs, keep_layer=keep
        )
        self.last_plan: list[str] = []  # the sessions of the step in progress (for failures)

    def step(self, conversations: dict[str, ThinkerConversation]) -> StepResult:
        result = StepResult()
        room = {
            key: conv.fit_budget(self.scheduler.token_budget)
            for key, conv in conversations.items()
            if conv.pending
        }
        result.over = [key for key, rows in room.items() if rows == 0]
        demands = [
            Demand(key, min(conv.pending_tokens(), room[key]), conv.decoding(), conv.waiting_reply())
            for key, conv in conversations.items()
            if room.get(key)
        ]
        plan = []
        for key, n in self.scheduler.plan(demands):
            conv = conversations[key]
            (plan if n <= self.kv.room(conv.slot) else result.full).append((key, n))
        result.full = [key for key, _ in result.full]
        self.last_plan = [key for key, _ in plan]
        if not plan:
            return result
        convs = [conversations[key] for key, _ in plan]
        starts = [conv.cached for conv in convs]
        takes = [conv.take(n) for conv, (_, n) in zip(convs, plan)]
        hidden = self.forward(
            [Row(c.slot, t.embeds, t.positions, t.deepstack, t.deepstack_rows) for c, t in zip(convs, takes)]
        )
        layers = self.forward.kept or [None] * len(hidden)
        result.ran = True
        wanting: list[tuple[str, Reply, torch.Tensor]] = []
        for (key, _), conv, take, start, h, layer in zip(plan, convs, takes, starts, hidden, layers):
            rows = self.family.talker_rows(take.embeds, take.multimodal, h, layer)
            ids = conv.tokens.view()[start : start + h.shape[0]].cpu()
            conv.on_rows(ContextRows(start, rows, take.positions.clone(), ids))
            wanting += [(key, reply, h[i]) for i, reply in take.logits_at if not reply.done]
        if wanting:
            logits = self.model.lm_head(torch.stack([h for _, _, h in wanting])).float()
            for (_, reply, _), row in zip(wanting, logits):
                reply.logits = row
            result.ready = [key for key, _, _ in wanting]
        return result

    def drain(self, conversations: dict[str, ThinkerConversation]) -> None:
        """Run steps until nothing is queued (in-process use: tests, the reference check)."""
        while any(conv.pending for conv in conversations.values()):
            result = self.step(conversations)
            if result.full or result.over:
                raise KVFull("a conversation's context is full")
