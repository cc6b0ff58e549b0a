"""Qwen3-Omni's talker inside the engine: one conversation per session, one batched step for all.

The same inputs as `Qwen3OmniMoeForConditionalGeneration.generate()` feeds its talker (and
`Qwen3OmniStreamer.talker_frames`, omni/engine/qwen3_stream.py, reproduces batch 1), arriving
as the thinker computes them:

- the prompt is the conversation's USER turns only (a token belongs to the turn whose
  `<|im_start|>` is the last one before it, and the turn is the user's when the token after that
  `<|im_start|>` is the user role token): text rows through `text_projection`, multimodal rows
  (the thinker's `accept_hidden_layer` states) through `hidden_projection`. They are prefilled
  into the session's KV slot as they arrive; system and assistant rows are kept (rollback,
  eviction) but never run. A user row's talker position is its thinker position minus the
  non-user rows before it (the talker's own rope index: the removed rows are all text);
- a reply opens with `_get_talker_assistant_parts`' 9 rows (the assistant header, 4 tts_pad,
  tts_bos, the reply's first token, plus the codec's nothink / think_bos / think_eos / speaker /
  pad / bos embeddings on rows 3..8), sequential after the last user position;
- then one step per frame: the sum of the frame's 16 code embeddings plus the projected
  embedding of reply token k+1 (tts_eos in place of the reply's last row, tts_pad after).
  Code 0 comes from `codec_head` with generate()'s processors, codebooks 1..15 from the code
  predictor (a fresh cache per frame), batched over every session that got a frame this step.

After a reply the cache is cut back to the user rows. Like talker.py, a conversation only says
what it has ready; `Qwen3TalkerStage.step()` plans and runs it (talker.BatchedTalkerStep).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers import LogitsProcessorList

from omni.engine.buffers import GrowingTensor, clipped
from omni.engine.context_budget import removed_before
from omni.engine.kv_memory import KVSlots
from omni.engine.protocol import ContextRows
from omni.engine.qwen3_stream import (
    code0_processors,
    frame_embeddings,
    residual_codes,
    residual_processors,
)
from omni.engine.sampling import choose, sampling_generator
from omni.engine.talker import BatchedTalkerStep, SlotConversation, StepInput

OPENING_ROWS = 9  # _get_talker_assistant_parts: header (3), tts_pad x4, tts_bos, first token
# generate()'s talker sampling defaults
TALKER_SAMPLING = {"top_k": 50, "top_p": 1.0, "temperature": 0.9, "repetition_penalty": 1.05}


@dataclass
class Qwen3Special:
    """What the Qwen3 talker needs from the whole model's config and the thinker's embeddings."""

    im_start: int
    user: int
    media: tuple[int, ...]  # the thinker's audio, image and video placeholder ids
    tts_bos: torch.Tensor  # (E,) thinker input embeddings, projected like text rows
    tts_eos: torch.Tensor
    tts_pad: torch.Tensor
    speakers: dict[str, int]  # lower-case voice name -> codec id

    @classmethod
    def from_config(cls, config, embedding_rows) -> Qwen3Special:
        """config: Qwen3OmniMoeConfig; embedding_rows(ids) -> (len(ids), E) thinker embeddings."""
        bos, eos, pad = embedding_rows(
            [config.tts_bos_token_id, config.tts_eos_token_id, config.tts_pad_token_id]
        )
        thinker = config.thinker_config
        return cls(
            im_start=config.im_start_token_id,
            user=config.user_token_id,
            media=(thinker.audio_token_id, thinker.image_token_id, thinker.video_token_id),
            tts_bos=bos,
            tts_eos=eos,
            tts_pad=pad,
            speakers={name.lower(): int(i) for name, i in config.talker_config.speaker_id.items()},
        )


@dataclass
class Qwen3Reply:
    first_row: int  # P: the reply's first token's row; P-3..P-1 are <|im_start|>assistant\n
    speaker: int  # the voice's codec id
    processors: LogitsProcessorList  # code 0 (generate()'s talker processors)
    residual_processors: LogitsProcessorList  # codebooks 1..15 (the code predictor's)
    greedy: bool
    generator: torch.Generator | None  # code 0 and the residuals draw from it, in that order
    max_codes: int  # generate()'s talker max_new_tokens: the last one's frame is not emitted
    eos: int
    seen: GrowingTensor  # the first codes so far (the repetition penalty's ids)
    frames: list[torch.Tensor] = field(default_factory=list)  # (16,) codes each
    next_embed: torch.Tensor | None = None  # (H,) the last frame's summed code embeddings
    text_rows: int | None = None  # R: reply rows the thinker produced, once its text ended
    start_pos: int = 0  # the opening's first position
    opened: bool = False
    done: bool = False


class Qwen3TalkerConversation(SlotConversation):
    def __init__(self, talker: torch.nn.Module, special: Qwen3Special, kv: KVSlots) -> None:
        super().__init__(talker, special, kv)
        self.codec = talker.config
        self.rows = GrowingTensor((special.tts_pad.shape[-1],), self.dtype, self.device)
        self.token_ids = GrowingTensor((), torch.long)
        self.thinker_pos = GrowingTensor((3,), torch.long)
        # per classified row (a row is classified once its turn's role token has arrived)
        self.role = GrowingTensor((), torch.long)  # the role token of the row's turn
        self.user = GrowingTensor((), torch.bool)
        self.talker_pos = GrowingTensor((3,), torch.long)
        self.nonuser_upto = GrowingTensor((), torch.long)  # non-user rows up to and with it
        self.done_rows = 0  # rows behind us: user rows prefilled, the others skipped
        self.context_len = 0  # user rows in the cache (those among the first done_rows)
        self.reply: Qwen3Reply | None = None

    @property
    def classified(self) -> int:
        return len(self.user)

    # -- context --------------------------------------------------------------------------

    def append(self, piece: ContextRows) -> None:
        if piece.token_ids is None:
            raise ValueError("Qwen3-Omni's talker needs the context rows' token ids")
        self.rows.append(piece.rows)
        self.token_ids.append(torch.as_tensor(piece.token_ids).reshape(-1).long())
        self.thinker_pos.append(torch.as_tensor(piece.positions).long().T)
        self._classify()

    def _classify(self) -> None:
        """Mark the rows whose turn's role is known: user or not, and the talker positions."""
        ids = self.token_ids.view()
        n, i = len(ids), self.classified
        if i == n:
            return
        roles, users = [], []
        role = int(self.role.view()[i - 1]) if i else None
        while i < n:
            if i == 0 or int(ids[i]) == self.special.im_start:  # a turn opens: its role follows
                if i + 1 >= n:
                    break
                role = int(ids[i + 1])
            roles.append(role)
            users.append(role == self.special.user)
            i += 1
        if not roles:
            return
        lo = self.classified
        user = torch.tensor(users)
        before = int(self.nonuser_upto.view()[lo - 1]) if lo else 0
        upto = before + torch.cumsum((~user).long(), 0)
        nonuser_before = upto - (~user).long()
        self.role.append(torch.tensor(roles))
        self.user.append(user)
        self.nonuser_upto.append(upto)
        self.talker_pos.append(self.thinker_pos.view()[lo:i] - nonuser_before[:, None])

    def rollback(self, start: int) -> None:
        keep = start
        if 0 < start <= self.classified:
            last = int(self.token_ids.view()[start - 1])
            opener = start - 1 == 0 or last == self.special.im_start
            keep = start - 1 if opener else start  # its role came from a row now gone
        for t in (self.rows, self.token_ids, self.thinker_pos):
            t.truncate(start)
        for t in (self.role, self.user, self.talker_pos, self.nonuser_upto):
            t.truncate(keep)
        if self.done_rows > self.classified:
            self.done_rows = self.classified
            self.context_len = self._users_before(self.done_rows)
            self.kv.crop(self.slot, self.context_len)
        self._classify()

    def evict_rows(self, ranges: list[tuple[int, int]]) -> None:
        """Drop the rows the thinker evicted, and their keys where they were prefilled (the
        cache beyond them, a reply's included, moves down with its rotary positions kept)."""
        ranges = clipped(ranges, self.n_rows)
        in_cache = [
            (self._users_before(a), self._users_before(min(b, self.done_rows)))
            for a, b in ranges
            if a < self.done_rows
        ]
        self.context_len -= self.kv.evict(self.slot, in_cache)
        self.done_rows -= removed_before(ranges, self.done_rows)
        if self.reply is not None:
            self.reply.first_row -= removed_before(ranges, self.reply.first_row)
        for t in (self.rows, self.token_ids, self.thinker_pos):
            t.delete(ranges)
        for t in (self.role, self.user, self.talker_pos, self.nonuser_upto):
            t.delete(ranges)

    def _users_before(self, row: int) -> int:
        return int(self.user.view()[:row].sum())

    def _limit(self) -> int:
        """Rows that may be run or skipped now (up to the reply's first row while it speaks)."""
        upto = self.classified
        if self.reply is not None and not self.reply.done:
            upto = min(upto, self.reply.first_row)
        return upto

    def _waiting_users(self) -> torch.Tensor:
        """Row indices of the user rows that can be prefilled now."""
        lo, hi = self.done_rows, self._limit()
        if hi <= lo:
            return torch.zeros(0, dtype=torch.long)
        return self.user.view()[lo:hi].nonzero().flatten() + lo

    def context_waiting(self) -> int:
        """User rows that can be prefilled now (rows of other turns before them are skipped)."""
        waiting = self._waiting_users()
        if waiting.numel() == 0:
            self.done_rows = max(self.done_rows, self._limit())
        return waiting.numel()

    def take_context(self, n: int) -> StepInput:
        """The next `n` waiting user rows (projected by the stage), counted as prefilled."""
        index = self._waiting_users()[:n]
        self.done_rows = int(index[-1]) + 1
        self.context_len += n
        ids = self.token_ids.view()[index]
        return StepInput(
            rows=self.rows.view()[index.to(self.device)],
            positions=self.talker_pos.view()[index].T,
            media=torch.isin(ids, torch.tensor(self.special.media)).to(self.device),
        )

    def recover(self) -> None:
        """After a failed step: the rows it took but never cached are waiting again."""
        cached = self.kv.lengths[self.slot]
        if self.context_len > cached:
            users = self.user.view()[: self.done_rows].nonzero().flatten()
            self.done_rows = int(users[cached]) if cached < users.numel() else self.done_rows
            self.context_len = cached

    # -- reply ----------------------------------------------------------------------------

    def start_reply(
        self, first_row: int, voice: str, *, greedy: bool, max_codes: int, min_codes: int = 0,
        seed: int | None = None, **sampling: float
    ) -> None:
        """sampling: top_k, top_p, temperature, repetition_penalty (generate()'s defaults)."""
        sampling = TALKER_SAMPLING | sampling
        speaker = self.special.speakers.get(voice.lower())
        if speaker is None:
            raise ValueError(f"unknown voice {voice!r}; available: {sorted(self.special.speakers)}")
        self.reply = Qwen3Reply(
            first_row=first_row,
            speaker=speaker,
            processors=code0_processors(self.codec, greedy, min_codes, **sampling),
            residual_processors=residual_processors(self.model, greedy),
            greedy=greedy,
            generator=None if greedy else sampling_generator(self.device, seed),
            max_codes=max_codes,
            eos=self.codec.codec_eos_token_id,
            seen=GrowingTensor((), torch.long, self.device),
        )

    def can_step(self) -> bool:
        """True when the reply's next talker step has its inputs."""
        reply = self.reply
        if reply is None or reply.done:
            return False
        if not reply.opened:  # the user rows before it in the cache, and the first token
            if self.context_waiting() or self.done_rows < reply.first_row:
                return False
            return self.n_rows > reply.first_row or reply.text_rows is not None
        # the step feeding frame j consumes reply row j + 1
        return reply.text_rows is not None or self.n_rows > reply.first_row + len(reply.frames)

    def step_inputs(self) -> StepInput | None:
        """The reply's next step (the opening, or the last frame's); None: no text to voice."""
        reply = self.reply
        assert reply is not None and self.can_step()
        rows = self.rows.view()
        p = reply.first_row
        if not reply.opened:
            if (reply.text_rows or 0) == 0 and self.n_rows <= p:
                return None  # a one-token reply: generate() cannot voice it either
            users = self.user.view()[:p]
            before = self.talker_pos.view()[:p][users]
            reply.start_pos = int(before.max()) + 1 if before.numel() else 0
            special = self.special
            pads = special.tts_pad.expand(4, -1)
            text = torch.cat((rows[p - 3 : p], pads, special.tts_bos[None], rows[p : p + 1]))
            codec = self.codec
            ids = [
                codec.codec_nothink_id,
                codec.codec_think_bos_id,
                codec.codec_think_eos_id,
                reply.speaker,
                codec.codec_pad_id,
                codec.codec_bos_id,
            ]
            embed = self.model.get_input_embeddings()
            codec_rows = embed(torch.tensor(ids, device=self.device))
            codec_rows = torch.cat((codec_rows.new_zeros(3, codec_rows.shape[1]), codec_rows))
            positions = torch.arange(reply.start_pos, reply.start_pos + OPENING_ROWS)
            return StepInput(text, positions.view(1, -1).expand(3, -1), codec=codec_rows)
        j = len(reply.frames) - 1
        pos = reply.start_pos + OPENING_ROWS + j
        text = self._reply_text(j + 1)[None]
        return StepInput(text, torch.full((3, 1), pos), codec=reply.next_embed[None])

    def _reply_text(self, k: int) -> torch.Tensor:
        """The text the step after frame k-1 adds: reply row k, then tts_eos, then tts_pad."""
        reply = self.reply
        if reply.text_rows is None or k < reply.text_rows:
            return self.rows.view()[reply.first_row + k]
        return self.special.tts_eos if k == reply.text_rows else self.special.tts_pad

    def choose_code0(self, logits: torch.Tensor) -> int | None:
        """A frame's first code from the step's logits; None: the speech ended (codec eos, or
        the cap, whose last code gets no residuals, as in generate())."""
        reply = self.reply
        assert reply is not None and not reply.done
        reply.opened = True
        seen = reply.seen.view()[None]
        code = choose(reply.processors, seen, logits, reply.greedy, reply.generator)
        if code == reply.eos or len(reply.frames) == reply.max_codes - 1:
            reply.done = True
            return None
        reply.seen.append(torch.tensor([code]))
        return code

    def add_frame(self, codes: torch.Tensor, embedding: torch.Tensor) -> None:
        """The frame's 16 codes, and the sum of their embeddings (the next step's input)."""
        self.reply.frames.append(codes)
        self.reply.next_embed = embedding

    def end_reply(self) -> None:
        """Forget the reply's positions: the cache goes back to the user rows."""
        if self.reply is None:
            return
        self.kv.crop(self.slot, self.context_len)
        self.reply = None


class Qwen3TalkerStage(BatchedTalkerStep):
    """Every speaking session's talker step and chunks of waiting user rows in one forward of
    the talker's decoder stack, then code 0 per session and the code predictor batched over
    the sessions that got a frame."""

    def project(self, inputs: list[StepInput]) -> list[torch.Tensor]:
        """Text rows through text_projection, multimodal ones through hidden_projection (one
        matmul each for the whole step), then the codec rows added."""
        rows = torch.cat([x.rows for x in inputs]).to(self.model.dtype)
        text = rows.new_zeros(0, dtype=torch.bool)
        media = torch.cat(
            [text.new_zeros(len(x.rows)) if x.media is None else x.media for x in inputs]
        )
        projected = rows.new_empty(rows.shape[0], self.model.config.text_config.hidden_size)
        if media.any():
            projected[media] = self.model.hidden_projection(rows[media])
        if not media.all():
            projected[~media] = self.model.text_projection(rows[~media])
        pieces = list(projected.split([len(x.rows) for x in inputs]))
        return [p if x.codec is None else p + x.codec for p, x in zip(pieces, inputs)]

    def step(
        self, conversations: dict[str, Qwen3TalkerConversation]
    ) -> dict[str, list[int] | None]:
        """One step; returns {session: the frame's 16 codes (None: its speech ended)}."""
        silent, last = self.run(conversations)
        if not last:
            return silent
        logits = self.model.codec_head(torch.stack(list(last.values()))).float()
        ended: dict[str, None] = {}
        framed: dict[str, int] = {}
        for key, row in zip(last, logits):
            code = conversations[key].choose_code0(row)
            if code is None:
                ended[key] = None
            else:
                framed[key] = code
        if not framed:
            return silent | ended
        keys = list(framed)
        replies = [conversations[key].reply for key in keys]
        codes = residual_codes(
            self.model,
            torch.stack([last[key] for key in keys]),
            torch.tensor([framed[key] for key in keys], device=logits.device),
            [(r.residual_processors, r.greedy, r.generator) for r in replies],
        )
        embeddings = frame_embeddings(self.model, codes)
        frames = {}
        for key, frame, embedding in zip(keys, codes, embeddings):
            conversations[key].add_frame(frame, embedding)
            frames[key] = frame.tolist()
        return silent | ended | frames
