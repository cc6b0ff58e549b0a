"""Which of a reply's text tokens the caller heard, from how much of its audio was played.

The talker reads one text token per codec step (20 ms), but speaks far slower: a word takes
250-350 ms. So the codec step count says nothing about where the speech is (after 2 s the
talker has read ~100 tokens and said 6-8 of them). What is known per reply: its text tokens T,
the codes C the talker produced, and whether the talker ended the speech itself (its end code)
or was stopped (a cancel, a failure, the codec cap).

- Speech that ended by itself covers all T tokens; speech that was stopped covers an
  unknown prefix of them, estimated from the speaking rate in codes per text token (this
  session's own, over its replies that ended by themselves, or before there is one
  `PRIOR_CODES_PER_TOKEN`): about C / rate tokens, at most T. Tokens are spoken at a
  similar rate across languages, so the rate is counted in them.
- Within the covered text, hearing H of the C codes keeps the share H / C of its characters
  (proportional in characters, not tokens: a long word takes longer to say, however few
  tokens it is). Against espeak-ng's timing of three sentences in Qwen's tokens
  (tests/test_heard.py), cut at each tenth, this is off by 3.4 % of the tokens on average
  and 10 % at worst; shares of tokens instead would be off by 5.6 % and 14 %.

Cuts fall on a boundary between the text deltas the client was sent (the nearest one), so
the transcript, the model's context and the replay log keep the same tokens.

Why not the talker's own alignment (the text row its attention is on at each codec step):
it needs attention weights out of the batched, fused-attention step, and the only checkpoint
here has random weights, whose attention says nothing, so its error could not be measured.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from omni.engine.api import OUTPUT_SAMPLE_RATE, SAMPLES_PER_CODE

# ~240 ms of speech per text token: English is ~1.3 tokens per word at 250-350 ms a word
PRIOR_MS_PER_TOKEN = 240
MS_PER_CODE = 1000 * SAMPLES_PER_CODE // OUTPUT_SAMPLE_RATE  # 20: a Qwen2.5-Omni code
PRIOR_CODES_PER_TOKEN = PRIOR_MS_PER_TOKEN / MS_PER_CODE


@dataclass
class SpokenReply:
    """What the engine saw of one reply: enough to map heard audio to its text tokens."""

    text_tokens: int  # without the end token
    codes: int  # codec steps the talker produced (0: no speech)
    ended_itself: bool  # the talker's end code, not a cancel, failure or the codec cap
    # (tokens, characters) so far at the end of each text delta sent, ascending
    delta_ends: list[tuple[int, int]] = field(default_factory=list)
    code_ms: int = MS_PER_CODE  # speech per talker step (a Qwen3-Omni frame: 80 ms)

    def add_delta(self, tokens: int, text: str) -> None:
        last_tokens, last_chars = self.delta_ends[-1] if self.delta_ends else (0, 0)
        self.delta_ends.append((last_tokens + tokens, last_chars + len(text)))


@dataclass
class SpeakingRate:
    """A session's codes per text token, over its replies whose speech ended by itself."""

    codes: int = 0
    tokens: int = 0
    code_ms: int = MS_PER_CODE  # speech per talker step, as SpokenReply's

    def add(self, reply: SpokenReply) -> None:
        if reply.ended_itself and reply.text_tokens and reply.codes:
            self.codes += reply.codes
            self.tokens += reply.text_tokens

    @property
    def codes_per_token(self) -> float:
        return self.codes / self.tokens if self.tokens else PRIOR_MS_PER_TOKEN / self.code_ms


def heard_tokens(reply: SpokenReply, audio_ms: int, codes_per_token: float) -> int:
    """How many of the reply's first text tokens the caller heard in its first `audio_ms`."""
    if reply.codes == 0 or audio_ms <= 0:
        return 0
    heard = min(1.0, audio_ms / reply.code_ms / reply.codes)
    covered = float(reply.text_tokens)
    if not reply.ended_itself:
        covered = min(covered, reply.codes / codes_per_token)
    spoken = [end for end in [(0, 0), *reply.delta_ends] if end[0] <= covered + 0.5]
    target_chars = heard * spoken[-1][1]
    return min(spoken, key=lambda end: (abs(end[1] - target_chars), end[0]))[0]
