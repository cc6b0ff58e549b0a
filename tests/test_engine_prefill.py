"""Streaming prefill equals one prefill of the whole turn.

The thinker prefills the user's speech in 2-second chunks while it arrives; at the end of the
turn the next-token logits must equal those of one forward pass over the whole prompt with
the same log-mel features (transformers' own thinker forward, which also runs the audio
encoder and TMRoPE itself).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from omni.checkpoints.parts import load_thinker
from omni.engine.audio_features import StreamingLogMel
from omni.engine.kv_memory import KVSlots
from omni.engine.scheduler import StepScheduler
from omni.engine.thinker import ThinkerConversation, ThinkerStage
from omni.engine.thinker_family import QWEN2_5_FRAMES_PER_CHUNK as FRAMES_PER_CHUNK, SPEECH_SYSTEM_PROMPT
from omni.engine.thinker_worker import token_ids


@pytest.fixture(scope="module")
def thinker(tiny_checkpoint):
    torch.set_grad_enabled(False)
    yield load_thinker(tiny_checkpoint)
    torch.set_grad_enabled(True)


@pytest.fixture(scope="module")
def stage(thinker):
    kv = KVSlots.for_model(thinker.model.config.text_config, 8, 4096, "cpu", torch.float32)
    # a small budget, so the turn's audio runs in several chunks of a step each
    return ThinkerStage(thinker.model.eval(), kv, StepScheduler(token_budget=32, max_rows=4))


def conversation(parts, stage: ThinkerStage, rows: list) -> ThinkerConversation:
    tok = parts.tokenizer
    return ThinkerConversation(
        parts.model.eval(),
        token_ids(tok, parts.model.generation_config.eos_token_id),
        parts.processor.feature_extractor,
        parts.processor.image_processor.to_dict(),
        SPEECH_SYSTEM_PROMPT,
        lambda text: tok.encode(text, add_special_tokens=False),
        rows.append,
        stage.kv,
    )


# 4.0113 s ends on a 1-frame tail (no audio token); 1.3 s is a single partial chunk
@pytest.mark.parametrize("seconds", [5.37, 4.0, 4.0113, 1.3])
def test_chunked_prefill_equals_whole_turn(thinker, stage, seconds):
    rng = np.random.default_rng(7)
    audio = (rng.standard_normal(int(seconds * 16000)) * 0.1).astype(np.float32)
    rows: list = []
    conv = conversation(thinker, stage, rows)
    for piece in np.array_split(audio, 29):
        conv.append_audio(piece)
        stage.step({"s": conv})
    stage.drain({"s": conv})
    # everything but the last partial chunk is already in the cache before the turn ends
    streamed_audio_tokens = conv.turn.audio_tokens
    assert conv.cached == len(conv.tokens)
    # a log-mel frame is complete once the 200 samples after its centre have arrived
    complete_frames = (audio.size - 200) // 160 + 1
    assert streamed_audio_tokens == complete_frames // FRAMES_PER_CHUNK * 50
    conv.end_turn()
    reply = conv.start_reply(max_tokens=1, greedy=True)
    stage.drain({"s": conv})
    logits = reply.logits
    conv.close()

    mel = StreamingLogMel(thinker.processor.feature_extractor)
    frames = np.concatenate([mel.push(audio), mel.finish()], axis=1)
    ids = torch.tensor([conv.token_ids])
    out = thinker.model(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        input_features=torch.from_numpy(frames)[None],
        feature_attention_mask=torch.ones(1, frames.shape[1], dtype=torch.long),
    )
    whole = out.logits[0, -1].float()
    assert torch.allclose(logits, whole, atol=1e-4, rtol=1e-4), (logits - whole).abs().max()
    # the context rows cover every cache position exactly once
    assert sum(r.rows.shape[0] for r in rows) == len(conv.token_ids)


def test_new_instructions_become_a_system_turn_before_the_reply(thinker, stage):
    """Changing instructions mid-call adds a system turn; the cache keeps what came before."""
    conv = conversation(thinker, stage, [])
    conv.add_text("Hi")
    conv.end_turn()
    before = list(conv.token_ids)
    conv.add_text("Again")
    conv.end_turn(system_prompt=SPEECH_SYSTEM_PROMPT + "\nAnswer in French.")
    conv.end_turn(system_prompt=SPEECH_SYSTEM_PROMPT + "\nAnswer in French.")  # unchanged: no turn
    text = thinker.tokenizer.decode(conv.token_ids[len(before) :])
    assert conv.token_ids[: len(before)] == before
    assert text.count("<|im_start|>system\n") == 1
    assert text.index("Again") < text.index("Answer in French.<|im_end|>\n<|im_start|>assistant\n")
    conv.close()
