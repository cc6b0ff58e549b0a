"""One conversation inside the talker: context rows from the thinker, a KV cache, codec steps.

transformers' generate() prefills the talker with the whole conversation (thinker embedding +
last hidden state per position, multimodal embeddings zeroed) followed by the speaker's bos and
the first reply part, then feeds one reply part per codec step: t1 .. t(N-2), text-eos, then
text-pad for ever. Here the same inputs arrive as the thinker computes them: context rows are
prefilled into the talker's cache while the user is still talking, so a reply's prefill is just
its two opening positions, and each codec step waits only for the reply part it consumes.

After a reply the cache is cut back to the context: in the next turn's prefill the reply's
positions hold thinker rows, not the codes spoken over them (as generate() does).

Like the thinker, a conversation only says what it has ready; `TalkerStage.step()` runs the
codec steps of every speaking session and chunks of waiting context rows in one batched
forward over the sessions' KV slots (context that a reply waits for goes first).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers import LogitsProcessorList

from omni.engine.batched_forward import BatchedForward, Row
from omni.engine.buffers import GrowingTensor
from omni.engine.context_budget import removed_before
from omni.engine.kv_memory import KVSlots
from omni.engine.protocol import ContextRows
from omni.engine.sampling import build_processors, choose, sampling_generator
from omni.engine.scheduler import Demand, StepScheduler

MAX_VALID_CODE = 8192  # the DiT embeds codes 0..8192


@dataclass
class StepInput:
    """One session's rows for a talker step, as a conversation hands them to the stage."""

    rows: torch.Tensor  # (n, E): thinker-side rows, before the talker's input projection
    positions: torch.Tensor  # (3, n) TMRoPE positions
    media: torch.Tensor | None = None  # (n,) bool: multimodal rows (Qwen3: hidden_projection)
    codec: torch.Tensor | None = None  # (n, H): added after the projection (Qwen3's codec rows)


@dataclass
class SpecialEmbeds:
    """Thinker input embeddings the talker needs (read from the thinker's embedding matrix)."""

    speaker_bos: dict[str, torch.Tensor]  # voice -> (E,)
    text_eos: torch.Tensor
    text_pad: torch.Tensor


@dataclass
class TalkerReply:
    first_row: int  # P: the reply's first token's row; rows before it are context
    voice: str
    processors: LogitsProcessorList
    greedy: bool
    generator: torch.Generator | None
    max_codes: int
    eos: list[int]
    seen: GrowingTensor  # generate()'s talker ids: [mask, pad, bos] + the codes so far
    codes: list[int] = field(default_factory=list)
    text_rows: int | None = None  # reply rows the thinker produced, once its text ended
    start_pos: int = 0  # TMRoPE position of the speaker bos that opens the reply
    opened: bool = False  # the opening (speaker bos + first reply part) has run
    done: bool = False


class SlotConversation:
    """What both families' talker conversations share: the session's KV slot, its rows (the
    subclass's `rows`, appended by `append`, rolled back by `rollback`) and the reply's
    `text_rows` / `done` flags."""

    reply = None
    rows: GrowingTensor

    def __init__(self, talker: torch.nn.Module, special, kv: KVSlots) -> None:
        self.kv, self.slot = kv, kv.allocate()
        self.model, self.special = talker, special
        parameter = next(talker.parameters())
        self.device, self.dtype = parameter.device, parameter.dtype

    @property
    def n_rows(self) -> int:
        return len(self.rows)

    def close(self) -> None:
        self.kv.release(self.slot)

    def add_rows(self, piece: ContextRows) -> None:
        """Append rows; an empty piece rolls the context back to `piece.start` rows."""
        if piece.rows.numel() == 0:
            self.rollback(piece.start)
            return
        if piece.start != self.n_rows:
            raise ValueError(f"context rows out of order: got {piece.start}, have {self.n_rows}")
        self.append(piece)

    def append(self, piece: ContextRows) -> None:
        raise NotImplementedError

    def rollback(self, start: int) -> None:
        raise NotImplementedError

    def text_ended(self, text_rows: int) -> None:
        """The thinker's reply is complete: it produced `text_rows` reply rows."""
        if self.reply is not None:
            self.reply.text_rows = text_rows

    def finish_silent(self) -> None:
        """End a reply that has nothing to say (its text was empty)."""
        assert self.reply is not None
        self.reply.done = True


class TalkerConversation(SlotConversation):
    def __init__(self, talker: torch.nn.Module, special: SpecialEmbeds, kv: KVSlots) -> None:
        super().__init__(talker, special, kv)
        self.rows = GrowingTensor((talker.config.embedding_size,), self.dtype, self.device)
        self.row_pos = GrowingTensor((3,), torch.long)  # (n, 3): rows' TMRoPE positions
        self.prefilled = 0  # rows in the cache as context
        self.reply: TalkerReply | None = None
        codec = talker.config
        self.mask, self.pad, self.bos = (
            codec.tts_codec_mask_token_id,
            codec.tts_codec_pad_token_id,
            codec.tts_codec_start_token_id,
        )

    def rollback(self, start: int) -> None:
        self.rows.truncate(start)
        self.row_pos.truncate(start)
        if self.prefilled > start:
            self.kv.crop(self.slot, start)
            self.prefilled = start

    def append(self, piece: ContextRows) -> None:
        self.rows.append(piece.rows)
        self.row_pos.append(piece.positions.long().T)

    def evict_rows(self, ranges: list[tuple[int, int]]) -> None:
        """Drop the rows the thinker evicted: from the rows, and from the cache where they were
        prefilled (the cache beyond them, a reply's codec positions included, moves down
        with its rotary positions kept, as the thinker's does)."""
        in_cache = [(a, min(b, self.prefilled)) for a, b in ranges if a < self.prefilled]
        self.kv.evict(self.slot, in_cache)
        self.prefilled -= removed_before(ranges, self.prefilled)
        if self.reply is not None:
            self.reply.first_row -= removed_before(ranges, self.reply.first_row)
        self.rows.delete(ranges)
        self.row_pos.delete(ranges)

    # -- reply ----------------------------------------------------------------------------

    def start_reply(
        self,
        first_row: int,
        voice: str,
        *,
        greedy: bool,
        max_codes: int,
        min_codes: int = 0,
        top_k: int = 40,
        top_p: float = 0.8,
        temperature: float = 0.9,
        repetition_penalty: float = 1.05,
        eos: tuple[int, ...] = (8292, 8294),
        seed: int | None = None,
    ) -> None:
        generator = None if greedy else sampling_generator(self.device, seed)
        seen = GrowingTensor((), torch.long, self.device)
        seen.append(torch.tensor([self.mask, self.pad, self.bos]))
        self.reply = TalkerReply(
            first_row=first_row,
            voice=voice,
            # generate()'s talker prompt ids are [mask]*P + [pad, bos]; only the set matters
            processors=build_processors(
                prompt_length=3,
                eos=list(eos),
                greedy=greedy,
                repetition_penalty=repetition_penalty,
                min_new_tokens=min_codes,
                suppress=[self.bos],
                temperature=temperature,
                top_k=top_k,
                top_p=top_p,
            ),
            greedy=greedy,
            generator=generator,
            max_codes=max_codes,
            eos=list(eos),
            seen=seen,
        )

    def context_waiting(self) -> int:
        """Context rows that can be prefilled now (up to the reply's first row while it speaks)."""
        upto = self.n_rows
        if self.reply is not None and not self.reply.done:
            upto = min(upto, self.reply.first_row)
        return max(0, upto - self.prefilled)

    def can_step(self) -> bool:
        """True when the next codec step has its inputs (or the reply is finished)."""
        reply = self.reply
        if reply is None or reply.done:
            return False
        if not reply.opened:  # the opening needs the context in the cache and the first part
            if self.prefilled < min(reply.first_row, self.n_rows):
                return False
            return self.n_rows > reply.first_row or reply.text_rows is not None
        if reply.text_rows is not None:
            return True
        return self.n_rows > reply.first_row + len(reply.codes)

    def step_inputs(self) -> StepInput | None:
        """The next codec step's inputs; None: the reply has no text."""
        reply = self.reply
        assert reply is not None and self.can_step()
        embed = self.model.get_input_embeddings()
        if not reply.opened:
            p = reply.first_row
            if (reply.text_rows or 0) == 0 and self.n_rows <= p:
                return None  # no reply text at all: nothing to say
            # as get_rope_index: text after the context continues from its last position
            reply.start_pos = int(self.row_pos.view()[p - 1].max()) + 1 if p else 0
            codec = embed(torch.tensor([self.pad, self.bos], device=self.device))
            rows = self.rows.view()
            opening = torch.stack([self.special.speaker_bos[reply.voice], rows[p]]) + codec
            positions = torch.arange(reply.start_pos, reply.start_pos + 2).view(1, -1).expand(3, -1)
            return StepInput(opening, positions)
        k = len(reply.codes)
        codec = embed(torch.tensor([reply.codes[-1]], device=self.device))
        pos = reply.start_pos + 1 + k  # the opening took start_pos and start_pos + 1
        return StepInput(codec + self._reply_part(k)[None], torch.full((3, 1), pos))

    def choose_code(self, logits: torch.Tensor) -> int | None:
        """Pick the code from this step's logits; None when the reply's speech has ended."""
        reply = self.reply
        assert reply is not None and not reply.done
        reply.opened = True
        code = choose(reply.processors, reply.seen.view()[None], logits, reply.greedy, reply.generator)
        if code in reply.eos:
            reply.done = True
            return None
        reply.codes.append(code)
        reply.seen.append(torch.tensor([code]))
        if len(reply.codes) >= reply.max_codes:
            reply.done = True
        return code

    def end_reply(self) -> None:
        """Forget the reply's codec positions; its text rows become context for the next turn."""
        if self.reply is None:
            return
        self.kv.crop(self.slot, self.reply.first_row)
        self.prefilled = min(self.prefilled, self.reply.first_row)
        self.reply = None

    def take_context(self, n: int) -> StepInput:
        """The next `n` waiting context rows and their positions, counted as prefilled."""
        lo = self.prefilled
        self.prefilled += n
        return StepInput(self.rows.view()[lo : lo + n], self.row_pos.view()[lo : lo + n].T)

    def recover(self) -> None:
        """After a failed step: rows the step took but never cached are waiting again."""
        self.prefilled = min(self.prefilled, self.kv.lengths[self.slot])

    # -- internals ------------------------------------------------------------------------

    def _reply_part(self, k: int) -> torch.Tensor:
        """What codec step k (k >= 1) consumes: reply row k, then text-eos, then text-pad."""
        reply = self.reply
        assert reply is not None
        if reply.text_rows is None or k < reply.text_rows:
            return self.rows.view()[reply.first_row + k]
        return self.special.text_eos if k == reply.text_rows else self.special.text_pad


class BatchedTalkerStep:
    """What both families' talker stages share: plan the step (every speaking session's codec
    step, then chunks of waiting context, under the StepScheduler), project the thinker-side
    rows of all sessions at once (`project`), and run one batched forward of the stack.

    A conversation offers can_step / step_inputs / finish_silent / context_waiting /
    take_context / slot / reply (with `done` and `opened`)."""

    def __init__(
        self,
        talker: torch.nn.Module,
        kv: KVSlots,
        scheduler: StepScheduler,
        cuda_graphs: bool = False,
    ) -> None:
        self.model = talker  # transformers' talker LM; its decoder stack is `.model`
        self.kv = kv
        self.scheduler = scheduler
        self.forward = BatchedForward(talker.model, kv, scheduler.max_rows, cuda_graphs)
        self.last_plan: list[str] = []

    def project(self, inputs: list[StepInput]) -> list[torch.Tensor]:
        """The stack's input embeddings (n, H) for each session's rows."""
        raise NotImplementedError

    def run(self, conversations: dict) -> tuple[dict[str, None], dict[str, torch.Tensor]]:
        """One forward: returns ({session: None} for replies that ended silent, {session: last
        hidden state (H,)} for the codec steps that ran, in plan order)."""
        silent: dict[str, None] = {}
        decode_inputs: dict[str, StepInput] = {}
        demands = []
        for key, conv in conversations.items():
            self.last_plan = [key]  # so a failure building one session's inputs is its own
            if conv.can_step():
                inputs = conv.step_inputs()
                if inputs is None:
                    conv.finish_silent()
                    silent[key] = None
                    continue
                decode_inputs[key] = inputs
                demands.append(Demand(key, inputs.rows.shape[0], decode=True))
            elif waiting := conv.context_waiting():
                reply = conv.reply
                urgent = reply is not None and not reply.done and not reply.opened
                demands.append(Demand(key, waiting, urgent=urgent))
        plan = self.scheduler.plan(demands)
        self.last_plan = [key for key, _ in plan]
        if not plan:
            return silent, {}
        inputs = [
            decode_inputs[key] if key in decode_inputs else conversations[key].take_context(n)
            for key, n in plan
        ]
        hidden = self.forward(
            [
                Row(conversations[key].slot, x, step.positions)
                for (key, _), x, step in zip(plan, self.project(inputs), inputs)
            ]
        )
        last = {key: h[-1] for (key, _), h in zip(plan, hidden) if key in decode_inputs}
        return silent, last


class TalkerStage(BatchedTalkerStep):
    """The talker's batched model step: every speaking session's codec step and chunks of
    waiting context rows, in one forward of transformers' talker LM."""

    def project(self, inputs: list[StepInput]) -> list[torch.Tensor]:
        # the thinker-side rows go through the talker's input projection in one matmul
        rows = torch.cat([x.rows for x in inputs]).to(self.model.dtype)
        projected = self.model.thinker_to_talker_proj(rows)
        return list(projected.split([x.rows.shape[0] for x in inputs]))

    def step(self, conversations: dict[str, TalkerConversation]) -> dict[str, int | None]:
        """One forward; returns {session: code chosen (None: its speech ended)} for codec steps."""
        silent, last = self.run(conversations)
        if not last:
            return silent
        logits = self.model.codec_head(torch.stack(list(last.values()))).float()
        codes = {key: conversations[key].choose_code(row) for key, row in zip(last, logits)}
        return silent | codes
