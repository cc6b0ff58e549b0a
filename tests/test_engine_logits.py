"""Step by step, the streaming thinker and talker compute the same logits as generate().

Token equality (test_engine_reference.py) can hide small errors on a tiny random model, whose
top choices are often far apart: a talker position off by one kept every greedy code of the
tiny model and changed those of the 7B-sized talker. So here both models run in this process
(the same modules the workers run) and every step's logits must match the reference's, on a
turn with an image (TMRoPE positions that differ from token indices) and a second turn.
"""

from __future__ import annotations

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
from omni.engine.thinker import ThinkerStage

TEXT, CODES = 8, 24


class Recorder:
    """Last-position logits of every forward through `module`."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.steps: list[torch.Tensor] = []
        module.register_forward_hook(
            lambda _m, _i, out: self.steps.append(out.reshape(-1, out.shape[-1])[-1].float().clone())
        )

    def take(self) -> list[torch.Tensor]:
        steps, self.steps = self.steps, []
        return steps


def test_every_step_matches_generate(tiny_checkpoint):
    torch.set_grad_enabled(False)
    model = Qwen2_5OmniForConditionalGeneration.from_pretrained(tiny_checkpoint).eval()
    processor = load_processor(tiny_checkpoint)
    thinker_logits, talker_logits = Recorder(model.thinker.lm_head), Recorder(model.talker.codec_head)
    scheduler = StepScheduler(token_budget=512, max_rows=4)
    kv = KVSlots.for_model(model.thinker.config.text_config, 1, 4096, "cpu", torch.float32)
    thinker_stage = ThinkerStage(model.thinker, kv, scheduler)
    talker_kv = KVSlots.for_model(model.talker.config, 1, 4096, "cpu", torch.float32)
    talker_stage = TalkerStage(model.talker, talker_kv, scheduler)
    talker = TalkerConversation(
        model.talker,
        special_embeds(str(tiny_checkpoint), model.talker, load_speakers(tiny_checkpoint)),
        talker_kv,
    )
    conv = thinker_conversation(model.thinker, processor, talker.add_rows, kv)
    thinkers, talkers = {"s": conv}, {"s": talker}
    reference = ReferenceConversation(model, processor)
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (84, 140, 3), dtype=np.uint8)
    turns = [dict(image=image, text="What is this?"), dict(text="And what colour is it?")]
    for turn in turns:
        if "image" in turn:
            conv.add_image(turn["image"])
        conv.add_text(turn["text"])
        thinker_logits.take()
        conv.end_turn()
        conv.start_reply(TEXT, greedy=True, min_tokens=TEXT)
        first_row = len(conv.tokens)
        talker.start_reply(first_row, "Chelsie", greedy=True, max_codes=CODES, min_codes=CODES)
        thinker_stage.drain(thinkers)
        streamed_thinker = thinker_logits.take()
        while True:
            token, last = conv.choose()
            thinker_stage.drain(thinkers)
            streamed_thinker += thinker_logits.take()
            while talker.can_step() or talker.context_waiting():
                talker_stage.step(talkers)
            if last:
                talker.text_ended(len(conv.tokens) - first_row)
                break
        while not talker.reply.done:
            talker_stage.step(talkers)
        streamed_talker = talker_logits.take()
        codes = list(talker.reply.codes)
        talker.end_reply()

        reference.user_turn(**turn)
        want = reference.generate(
            max_text_tokens=TEXT, min_text_tokens=TEXT, max_codec_tokens=CODES, min_codec_tokens=CODES
        )
        ref_thinker, ref_talker = thinker_logits.take(), talker_logits.take()
        assert conv.reply.tokens == want.text_ids
        assert codes == want.codes
        # end_turn's logits, then one per fed token (the last token chosen is never fed)
        assert len(streamed_thinker) == len(ref_thinker) == TEXT
        for a, b in zip(streamed_thinker, ref_thinker):
            assert torch.allclose(a, b, atol=2e-5), (a - b).abs().max()
        assert len(streamed_talker) == len(ref_talker) == CODES
        for step, (a, b) in enumerate(zip(streamed_talker, ref_talker)):
            assert torch.allclose(a, b, atol=2e-5), f"talker step {step}: {(a - b).abs().max():.2e}"
        reference.add_reply(want.text_ids)
