"""Which of a reply's text tokens the caller heard, from how much of its audio was played.

The talker reads one text token per codec step (20 ms), but speaks far slower: a word takes
250-350 ms. So the codec step count says nothing about where the speech is (after 2 s the
talker has read ~100 tokens and said 6-8 of them). What is known per reply: its text tokens T,
the codes C the talker produced, and whether the talker ended the speech itself (its end code)
or was stopped (a cancel, a failure, the codec cap).

- Speech that ended by itself covers all T tokens, spread over its C codes: hearing H codes
  keeps H / C of them (proportional; words of different lengths and pauses make it
  approximate, by a word or two).
- Speech that was stopped covers an unknown prefix of the text. Its length is estimated from
  the speaking rate, codes per text token: this session's own (over its replies that ended by
  themselves) or, before there is one, `PRIOR_CODES_PER_TOKEN`. The C codes covered about
  C / rate tokens (at most T), and H of them keep the same share of those.

The count is then rounded down to a boundary between the text deltas the client was sent,
so the transcript, the model's context and the replay log keep the same tokens.

Why not the talker's own alignment (the text row its attention is on at each codec step):
it needs attention weights out of the batched, fused-attention step, and the only checkpoint
here has random weights, whose attention says nothing, so its error could not be measured.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

from omni.engine.api import OUTPUT_SAMPLE_RATE, SAMPLES_PER_CODE

# ~240 ms of speech per text token: English is ~1.3 tokens per word at 250-350 ms a word
PRIOR_CODES_PER_TOKEN = 12.0
MS_PER_CODE = 1000 * SAMPLES_PER_CODE // OUTPUT_SAMPLE_RATE  # 20


@dataclass
class SpokenReply:
    """What the engine saw of one reply: enough to map heard audio to its text tokens."""

    text_tokens: int  # without the end token
    codes: int  # codec steps the talker produced (0: no speech)
    ended_itself: bool  # the talker's end code, not a cancel, failure or the codec cap
    # token counts at the end of each text delta sent, ascending (where a cut may fall)
    delta_ends: list[int] = field(default_factory=list)


@dataclass
class SpeakingRate:
    """A session's codes per text token, over its replies whose speech ended by itself."""

    codes: int = 0
    tokens: int = 0

    def add(self, reply: SpokenReply) -> None:
        if reply.ended_itself and reply.text_tokens and reply.codes:
            self.codes += reply.codes
            self.tokens += reply.text_tokens

    @property
    def codes_per_token(self) -> float:
        return self.codes / self.tokens if self.tokens else PRIOR_CODES_PER_TOKEN


def heard_tokens(reply: SpokenReply, audio_ms: int, codes_per_token: float) -> int:
    """How many of the reply's first text tokens the caller heard in its first `audio_ms`."""
    if reply.codes == 0 or audio_ms <= 0:
        return 0
    heard = min(1.0, audio_ms / MS_PER_CODE / reply.codes)
    covered = float(reply.text_tokens)
    if not reply.ended_itself:
        covered = min(covered, reply.codes / codes_per_token)
    keep = min(reply.text_tokens, int(heard * covered + 0.5))
    # at a delta boundary: the client's transcript can only be cut between deltas
    ends = [0, *reply.delta_ends]
    return ends[bisect.bisect_right(ends, keep) - 1]
