"""One conversation inside the talker: context rows from the thinker, a KV cache, codec steps.

transformers' generate() prefills the talker with the whole conversation (thinker embedding +
last hidden state per position, multimodal embeddings zeroed) followed by the speaker's bos and
the first reply part, then feeds one reply part per codec step: t1 .. t(N-2), text-eos, then
text-pad for ever. Here the same inputs arrive as the thinker computes them: context rows are
prefilled into the talker's cache while the user is still talking, so a reply's prefill is just
its two opening positions, and each codec step waits only for the reply part it consumes.

After a reply the cache is cut back to the context: in the next turn's prefill the reply's
positions hold thinker rows, not the codes spoken over them (as generate() does).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers import DynamicCache, LogitsProcessorList

from omni.engine.sampling import build_processors, choose, sampling_generator
from omni.engine.thinker import ContextRows

MAX_VALID_CODE = 8192  # the DiT embeds codes 0..8192


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
    codes: list[int] = field(default_factory=list)
    text_rows: int | None = None  # reply rows the thinker produced, once its text ended
    start_pos: int = 0  # TMRoPE position of the speaker bos that opens the reply
    logits: torch.Tensor | None = None
    done: bool = False


class TalkerConversation:
    def __init__(self, talker: torch.nn.Module, special: SpecialEmbeds) -> None:
        self.model = talker
        self.special = special
        self.device = next(talker.parameters()).device
        self.dtype = next(talker.parameters()).dtype
        dim = talker.config.embedding_size
        self.rows = torch.empty(0, dim, device=self.device, dtype=self.dtype)
        self.row_pos = torch.empty(3, 0, dtype=torch.long)
        self.cache = DynamicCache(config=talker.config)
        self.prefilled = 0  # rows in the cache as context
        self.reply: TalkerReply | None = None
        codec = talker.config
        self.mask, self.pad, self.bos = (
            codec.tts_codec_mask_token_id,
            codec.tts_codec_pad_token_id,
            codec.tts_codec_start_token_id,
        )

    @property
    def n_rows(self) -> int:
        return self.rows.shape[0]

    def add_rows(self, piece: ContextRows) -> None:
        """Append rows; an empty piece rolls the context back to `piece.start` rows."""
        if piece.rows.numel() == 0:
            self.rows = self.rows[: piece.start]
            self.row_pos = self.row_pos[:, : piece.start]
            if self.prefilled > piece.start:
                self._crop(piece.start)
                self.prefilled = piece.start
            return
        if piece.start != self.n_rows:
            raise ValueError(f"context rows out of order: got {piece.start}, have {self.n_rows}")
        self.rows = torch.cat([self.rows, piece.rows.to(self.device, self.dtype)])
        self.row_pos = torch.cat([self.row_pos, piece.positions.long()], dim=1)

    def prefill_context(self, upto: int | None = None) -> None:
        """Run context rows [prefilled, upto) into the cache (done ahead, while the user talks)."""
        upto = self.n_rows if upto is None else upto
        if self.reply is not None and not self.reply.done:
            upto = min(upto, self.reply.first_row)
        if upto > self.prefilled:
            self._forward(self.rows[self.prefilled : upto], self.row_pos[:, self.prefilled : upto])
            self.prefilled = upto

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
        self.prefill_context(first_row)
        generator = None if greedy else sampling_generator(self.device, seed)
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
        )

    def text_ended(self, text_rows: int) -> None:
        """The thinker's reply is complete: it produced `text_rows` reply parts."""
        if self.reply is not None:
            self.reply.text_rows = text_rows

    def can_step(self) -> bool:
        """True when the next codec step has its reply part (or the reply is finished)."""
        reply = self.reply
        if reply is None or reply.done:
            return False
        k = len(reply.codes)
        if reply.logits is None:  # the opening prefill needs the first reply part
            return self.n_rows > reply.first_row or reply.text_rows is not None
        if reply.text_rows is not None:
            return True
        return self.n_rows > reply.first_row + k

    def step(self) -> int | None:
        """Produce the next codec token; None when the reply's speech has ended."""
        reply = self.reply
        assert reply is not None and not reply.done
        if reply.logits is None:
            if (reply.text_rows or 0) == 0 and self.n_rows <= reply.first_row:
                return self._finish()  # no reply text at all: nothing to say
            self._open_reply()
        else:
            k = len(reply.codes)
            part = self._reply_part(k)
            codec = self.model.get_input_embeddings()(torch.tensor([reply.codes[-1]], device=self.device))
            pos = reply.start_pos + 1 + k  # the opening took start_pos and start_pos + 1
            logits = self._forward((codec[0] + part)[None], torch.full((3, 1), pos))
            reply.logits = logits
        seen = torch.tensor([[self.mask, self.pad, self.bos, *reply.codes]], device=self.device)
        code = choose(reply.processors, seen, reply.logits, reply.greedy, reply.generator)
        if code in reply.eos:
            return self._finish()
        reply.codes.append(code)
        if len(reply.codes) >= reply.max_codes:
            reply.done = True
        return code

    def end_reply(self) -> None:
        """Forget the reply's codec positions; its text rows become context for the next turn."""
        if self.reply is None:
            return
        self._crop(self.reply.first_row)
        self.prefilled = min(self.prefilled, self.reply.first_row)
        self.reply = None

    # -- internals ------------------------------------------------------------------------

    def _open_reply(self) -> None:
        reply = self.reply
        assert reply is not None
        p = reply.first_row
        # as get_rope_index: text after the context continues from its last position
        reply.start_pos = int(self.row_pos[:, p - 1].max()) + 1 if p else 0
        embed = self.model.get_input_embeddings()
        codec = embed(torch.tensor([self.pad, self.bos], device=self.device))
        opening = torch.stack([self.special.speaker_bos[reply.voice], self.rows[p]]) + codec
        positions = torch.arange(reply.start_pos, reply.start_pos + 2).view(1, -1).expand(3, -1)
        reply.logits = self._forward(opening, positions)

    def _reply_part(self, k: int) -> torch.Tensor:
        """What codec step k (k >= 1) consumes: reply row k, then text-eos, then text-pad."""
        reply = self.reply
        assert reply is not None
        if reply.text_rows is None or k < reply.text_rows:
            return self.rows[reply.first_row + k]
        return self.special.text_eos if k == reply.text_rows else self.special.text_pad

    def _finish(self) -> None:
        assert self.reply is not None
        self.reply.done = True
        return None

    def _forward(self, inputs: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        out = self.model(
            inputs_embeds=inputs[None].to(self.dtype),
            position_ids=positions.to(self.device)[:, None, :],
            past_key_values=self.cache,
            use_cache=True,
        )
        return out.logits[0, -1].float()

    def _crop(self, length: int) -> None:
        current = self.cache.get_seq_length()
        if current > length:
            self.cache.crop(length - current)
