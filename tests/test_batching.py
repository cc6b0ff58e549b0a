"""Batched steps give every session what it gets alone, and what generate() gives it.

Sessions with different inputs (so different context lengths) start at different steps: some
prefill (a long text in chunks under a small token budget, an image, audio) while others
decode, some finish while others go on, and later ones reuse the freed KV slots (fewer slots
than sessions). For each session, every thinker step's and every talker step's logits in the
batch equal those of the same session run alone (`max_rows=1`), within 1e-4: the rows see
exactly the same keys and positions, only the fp32 matmul shapes differ, which changes the
rounding (measured differences are ~1e-6). Its text tokens and codec tokens equal
transformers' `generate()` for that session alone (omni/bench/reference.py; it shares no
model code with the engine: transformers builds its own cache, masks and positions).

Both stages run in this process on the same modules the workers run; the workers' own
batching is covered end to end by tests/test_engine_batching.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pytest
import torch
from engine_helpers import thinker_conversation
from transformers import Qwen2_5OmniForConditionalGeneration

from omni.bench.reference import ReferenceConversation
from omni.checkpoints.parts import load_speakers
from omni.checkpoints.processor import load_processor
from omni.engine.kv_memory import KVSlots
from omni.engine.scheduler import StepScheduler
from omni.engine.talker import TalkerConversation, TalkerStage
from omni.engine.talker_worker import special_embeds
from omni.engine.thinker import ThinkerConversation, ThinkerStage
from omni.engine.varlen_attention import reference_kernel, use_varlen_attention

TEXT, CODES = 8, 20
BUDGET = 48  # small, so long inputs take several steps of prefill beside the decodes
TOLERANCE = 1e-4

_rng = np.random.default_rng(3)
# streamed log-mel equals the offline one when the clip's loudest part comes first
_audio = (_rng.standard_normal(20800) * 0.1).astype(np.float32)
_audio[800:1600] *= 4.0
TURNS = [
    dict(text="Hello there."),
    dict(text=" ".join(f"item {i} is on the list;" for i in range(40)) + " which one is last?"),
    dict(image=_rng.integers(0, 255, (84, 140, 3), dtype=np.uint8), text="What is in the picture?"),
    dict(audio=_audio),
    dict(text="Name three colours."),
    dict(text="Why is the sky blue? Explain it to a child in two sentences, please."),
    dict(image=_rng.integers(0, 255, (56, 56, 3), dtype=np.uint8)),
    dict(text="Count to five."),
]


class RecordingTalker(TalkerConversation):
    """Keeps every codec step's logits."""

    def __init__(self, *args) -> None:
        super().__init__(*args)
        self.logits: list[torch.Tensor] = []

    def choose_code(self, logits: torch.Tensor) -> int | None:
        self.logits.append(logits.clone())
        return super().choose_code(logits)


@dataclass
class Trace:
    thinker_logits: list[torch.Tensor] = field(default_factory=list)
    talker_logits: list[torch.Tensor] = field(default_factory=list)
    text: list[int] = field(default_factory=list)
    codes: list[int] = field(default_factory=list)


@pytest.fixture(scope="module")
def tiny(tiny_checkpoint):
    torch.set_grad_enabled(False)
    model = Qwen2_5OmniForConditionalGeneration.from_pretrained(tiny_checkpoint).eval()
    processor = load_processor(tiny_checkpoint)
    special = special_embeds(str(tiny_checkpoint), model.talker, load_speakers(tiny_checkpoint))
    yield model, processor, special
    torch.set_grad_enabled(True)


def run(
    tiny, sessions: list[tuple[int, dict]], max_rows: int, slots: int, graphs: bool = False
) -> list[Trace]:
    """Run sessions (start step, turn) to the end of their speech; one trace per session.
    `graphs`: decode-only steps take the CUDA-graph path (eager here, same static shapes)."""
    model, processor, special = tiny
    text_config = model.thinker.config.text_config
    kv = KVSlots.for_model(text_config, slots, 2048, "cpu", torch.float32, scratch_slot=graphs)
    talker_kv = KVSlots.for_model(model.talker.config, slots, 2048, "cpu", torch.float32, scratch_slot=graphs)
    thinker_stage = ThinkerStage(model.thinker, kv, StepScheduler(BUDGET, max_rows), graphs)
    talker_stage = TalkerStage(model.talker, talker_kv, StepScheduler(BUDGET, max_rows), graphs)
    traces = [Trace() for _ in sessions]
    thinkers: dict[int, ThinkerConversation] = {}
    talkers: dict[int, RecordingTalker] = {}
    first_rows: dict[int, int] = {}
    waiting = sorted(range(len(sessions)), key=lambda i: sessions[i][0])
    step = 0
    while waiting or talkers:
        # a session starts at its step, once a slot is free (earlier ones finish meanwhile)
        while waiting and sessions[waiting[0]][0] <= step and len(talkers) < slots:
            i = waiting.pop(0)
            turn = sessions[i][1]
            talker = RecordingTalker(model.talker, special, talker_kv)
            conv = thinker_conversation(model.thinker, processor, talker.add_rows, kv)
            if "image" in turn:
                conv.add_image(turn["image"])
            if "audio" in turn:
                conv.append_audio(turn["audio"])
            if "text" in turn:
                conv.add_text(turn["text"])
            conv.end_turn()
            conv.start_reply(TEXT, greedy=True, min_tokens=TEXT)
            first_rows[i] = len(conv.tokens)
            talker.start_reply(first_rows[i], "Chelsie", greedy=True, max_codes=CODES, min_codes=CODES)
            thinkers[i], talkers[i] = conv, talker
        for key in thinker_stage.step(thinkers).ready:
            conv = thinkers[key]
            traces[key].thinker_logits.append(conv.reply.logits.clone())
            token, last = conv.choose()
            if last:
                traces[key].text = list(conv.reply.tokens)
                talkers[key].text_ended(len(conv.tokens) - first_rows[key])
        talker_stage.step(talkers)
        for key in [k for k, t in talkers.items() if t.reply.done]:
            talker = talkers.pop(key)
            traces[key].codes = list(talker.reply.codes)
            traces[key].talker_logits = talker.logits
            talker.end_reply()
            talker.close()
            thinkers.pop(key).close()
        step += 1
        assert step < 2000, "the sessions did not finish"
    return traces


@pytest.mark.parametrize("n,graphs", [(1, False), (3, False), (8, False), (3, True)])
def test_batched_sessions_equal_alone_and_generate(tiny, n, graphs):
    # staggered starts; with 8 sessions only 5 slots, so the last ones wait for freed slots
    sessions = [(3 * i, TURNS[i]) for i in range(n)]
    slots = min(n, 5)
    batched = run(tiny, sessions, max_rows=16, slots=slots, graphs=graphs)
    model, processor, _ = tiny
    for i, (_, turn) in enumerate(sessions):
        alone = run(tiny, [(0, turn)], max_rows=1, slots=1)[0]
        got = batched[i]
        assert got.text == alone.text and got.codes == alone.codes, f"session {i}"
        for name in ("thinker_logits", "talker_logits"):
            a, b = getattr(got, name), getattr(alone, name)
            assert len(a) == len(b)
            worst = max(float((x - y).abs().max()) for x, y in zip(a, b))
            assert worst <= TOLERANCE, f"session {i} {name}: {worst:.2e}"
        reference = ReferenceConversation(model, processor)
        reference.user_turn(**turn)
        want = reference.generate(
            max_text_tokens=TEXT, min_text_tokens=TEXT, max_codec_tokens=CODES, min_codec_tokens=CODES
        )
        assert got.text == want.text_ids, f"session {i}: text differs from generate()"
        assert got.codes == want.codes, f"session {i}: codes differ from generate()"


def test_sessions_batch_together(tiny, monkeypatch):
    """The batched run really batches: forwards with all three sessions' rows in them."""
    rows_per_forward: list[int] = []
    original = ThinkerStage.step

    def counting(self, conversations):
        result = original(self, conversations)
        if result.ran:
            rows_per_forward.append(len(self.last_plan))
        return result

    monkeypatch.setattr(ThinkerStage, "step", counting)
    run(tiny, [(0, TURNS[0]), (0, TURNS[1]), (2, TURNS[4])], max_rows=16, slots=3)
    assert max(rows_per_forward) == 3


def test_packed_attention_equals_padded(tiny):
    """flash_attention_2's packed path (here with the CPU reference kernel in flash-attn's
    place) gives every session what the padded SDPA path gives it."""
    model, _, _ = tiny
    sessions = [(3 * i, TURNS[i]) for i in range(4)]
    padded = run(tiny, sessions, max_rows=16, slots=4)
    for part in (model.thinker, model.talker):
        use_varlen_attention(part, reference_kernel)
    try:
        packed = run(tiny, sessions, max_rows=16, slots=4)
    finally:
        for part in (model.thinker, model.talker):
            part.set_attn_implementation("sdpa")
    for i, (got, want) in enumerate(zip(packed, padded)):
        assert got.text == want.text and got.codes == want.codes, f"session {i}"
        for name in ("thinker_logits", "talker_logits"):
            worst = max(float((x - y).abs().max()) for x, y in zip(getattr(got, name), getattr(want, name)))
            assert worst <= TOLERANCE, f"session {i} {name}: {worst:.2e}"
