"""The engine's Qwen3-Omni talker (omni/engine/qwen3_talker.py) against transformers' generate().

fp32, CPU, the tiny Qwen3 checkpoint. The thinker side is built in-process as the thinker
worker would send it: per position the thinker's input embedding (text) or its
`accept_hidden_layer` state (audio), TMRoPE positions and token ids, in pieces; the reply's
text is generate()'s own (greedy), its rows the tokens the thinker would have run (all but the
last). The talker's 16-codebook codes must equal the codes generate() hands to Code2Wav.
"""

from __future__ import annotations

import pytest
import torch
from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import (
    _get_feat_extract_output_lengths,
)

from omni.bench.qwen3 import chat_prompt, reference_reply
from omni.checkpoints.parts import load_whole
from omni.checkpoints.tiny_qwen3_config import AUDIO_END, AUDIO_START, AUDIO_TOKEN
from omni.engine.kv_memory import KVSlots
from omni.engine.protocol import ContextRows
from omni.engine.qwen3_stream import StreamOptions
from omni.engine.qwen3_talker import Qwen3Special, Qwen3TalkerConversation, Qwen3TalkerStage
from omni.engine.scheduler import StepScheduler

OPTIONS = StreamOptions(max_text_tokens=12, max_codec_frames=30)
NEWLINE = 198


@pytest.fixture(scope="module")
def model(tiny_qwen3_checkpoint):
    return load_whole(tiny_qwen3_checkpoint, "cpu", torch.float32)


@pytest.fixture(scope="module")
def special(model) -> Qwen3Special:
    embed = model.thinker.get_input_embeddings()
    return Qwen3Special.from_config(model.config, lambda ids: embed(torch.tensor(ids)).detach())


def _text(model, words):
    return chat_prompt(model.config, words), {}


def _audio(model):
    generator = torch.Generator().manual_seed(1)
    mel_frames = 300
    tokens = int(_get_feat_extract_output_lengths(torch.tensor(mel_frames)))
    ids = chat_prompt(model.config, [AUDIO_START, *[AUDIO_TOKEN] * tokens, AUDIO_END, 3000])
    media = {
        "input_features": torch.randn(1, 128, mel_frames, generator=generator),
        "feature_attention_mask": torch.ones(1, mel_frames, dtype=torch.long),
    }
    return ids, media


PROMPTS = {
    "text": lambda model: _text(model, [3000, 4000, 5000]),
    "other text": lambda model: _text(model, [777, 12345, 90000, 42]),
    "audio": _audio,
}


@torch.no_grad()
def thinker_rows(model, ids: torch.Tensor, media: dict, reply: list[int]) -> ContextRows:
    """What the thinker sends for the prompt and the reply's run tokens (all but its last):
    the prompt's states from one forward over it (as generate()'s prefill), each reply token's
    input embedding (what generate() reads back for it)."""
    config = model.config
    thinker = model.thinker
    out = thinker(input_ids=ids, attention_mask=torch.ones_like(ids), output_hidden_states=True, **media)
    layer = config.talker_config.accept_hidden_layer
    media_ids = torch.tensor(
        [config.thinker_config.audio_token_id, config.thinker_config.image_token_id, config.thinker_config.video_token_id]
    )
    multimodal = torch.isin(ids[0], media_ids)[:, None]
    prompt = torch.where(multimodal, out.hidden_states[layer][0], out.hidden_states[0][0])
    run = torch.tensor(reply[:-1], dtype=torch.long)
    rows = torch.cat((prompt, thinker.get_input_embeddings()(run)))
    all_ids = torch.cat((ids[0], run))[None]
    lengths = media["feature_attention_mask"].sum(1) if "feature_attention_mask" in media else None
    positions, _ = thinker.get_rope_index(
        all_ids, attention_mask=torch.ones_like(all_ids), audio_seqlens=lengths
    )
    return ContextRows(0, rows, positions[:, 0], all_ids[0])


def piece(rows: ContextRows, lo: int, hi: int) -> ContextRows:
    return ContextRows(lo, rows.rows[lo:hi], rows.positions[:, lo:hi], rows.token_ids[lo:hi])


def rollback(start: int) -> ContextRows:
    return ContextRows(start, torch.zeros(0, 1), torch.zeros(3, 0), torch.zeros(0, dtype=torch.long))


class Talker:
    def __init__(self, model, special, max_rows: int = 4, budget: int = 64) -> None:
        self.kv = KVSlots.for_model(model.talker.config.text_config, 4, 1024, "cpu", torch.float32)
        self.stage = Qwen3TalkerStage(model.talker, self.kv, StepScheduler(budget, max_rows))
        self.model, self.special = model, special
        self.batches: list[int] = []  # the code predictor's batch sizes
        residual = self.stage.residual_codes

        def recorded(hidden, code0, replies):
            self.batches.append(hidden.shape[0])
            return residual(hidden, code0, replies)

        self.stage.residual_codes = recorded

    def conversation(self) -> Qwen3TalkerConversation:
        return Qwen3TalkerConversation(self.model.talker, self.special, self.kv)

    @torch.no_grad()
    def speak(self, convs: dict[str, Qwen3TalkerConversation], feed=None, steps: int = 400) -> dict:
        """Step until every conversation's reply ends; `feed(step)` runs before each step."""
        frames: dict[str, list[list[int]]] = {key: [] for key in convs}
        speaking = set(convs)
        for step in range(steps):
            if feed is not None:
                feed(step)
            for key, codes in self.stage.step(convs).items():
                if codes is not None:
                    frames[key].append(codes)
                if convs[key].reply is not None and convs[key].reply.done:
                    convs[key].end_reply()
                    speaking.discard(key)
            if not speaking:
                return {key: _codes(f) for key, f in frames.items()}
        raise AssertionError("the replies did not end")


def _codes(frames: list[list[int]]) -> torch.Tensor:
    return torch.tensor(frames, dtype=torch.long).reshape(-1, 16).T


def start(conv, first_row: int, max_codes: int = OPTIONS.max_codec_frames) -> None:
    conv.start_reply(
        first_row,
        "Ethan",
        greedy=True,
        max_codes=max_codes,
        repetition_penalty=OPTIONS.talker_repetition_penalty,
    )


@pytest.fixture(scope="module")
def references(model) -> dict:
    out = {}
    for name, make in PROMPTS.items():
        ids, media = make(model)
        out[name] = (ids, media, reference_reply(model, ids, OPTIONS, **media))
    return out


@pytest.mark.parametrize("prompt", PROMPTS)
def test_reply_equals_generate(model, special, references, prompt):
    ids, media, reference = references[prompt]
    assert reference.codes.shape == (16, OPTIONS.max_codec_frames - 1)
    rows = thinker_rows(model, ids, media, reference.text_ids)
    talker = Talker(model, special)
    conv = talker.conversation()
    p = ids.shape[1]
    text_rows = len(reference.text_ids) - 1
    # the prompt in three pieces, some prefilled before the reply starts
    conv.add_rows(piece(rows, 0, 5))
    conv.add_rows(piece(rows, 5, p - 4))
    talker.stage.step({"a": conv})
    conv.add_rows(piece(rows, p - 4, p + 1))  # the header and the reply's first token
    start(conv, p)
    end = p + text_rows

    def feed(step: int) -> None:  # the reply's rows arrive one per step, then its end
        if conv.n_rows < end:
            conv.add_rows(piece(rows, conv.n_rows, conv.n_rows + 1))
        elif conv.reply.text_rows is None:
            conv.text_ended(text_rows)

    codes = talker.speak({"a": conv}, feed)["a"]
    assert torch.equal(codes, reference.codes)
    # after the reply the cache holds the user rows only
    users = int(conv.user.view().sum())
    assert talker.kv.lengths[conv.slot] == conv.context_len == users


def test_two_sessions_batched_each_equal_generate(model, special, references):
    talker = Talker(model, special)
    convs, expected = {}, {}
    for name in ("text", "other text"):
        ids, media, reference = references[name]
        rows = thinker_rows(model, ids, media, reference.text_ids)
        conv = convs[name] = talker.conversation()
        conv.add_rows(rows)
        start(conv, ids.shape[1])
        conv.text_ended(len(reference.text_ids) - 1)
        expected[name] = reference.codes
    assert not torch.equal(expected["text"], expected["other text"])
    got = talker.speak(convs)
    for name in convs:
        assert torch.equal(got[name], expected[name]), name
    assert max(talker.batches) == 2  # the code predictor ran both frames in one batch


def test_second_turn_equals_generate_on_the_whole_conversation(model, special, references):
    config = model.config
    ids1, _, reply1 = references["text"]
    turn2 = [config.im_end_token_id, NEWLINE, config.im_start_token_id, config.user_token_id, NEWLINE]
    turn2 += [6000, 7000, config.im_end_token_id, NEWLINE]
    turn2 += [config.im_start_token_id, config.assistant_token_id, NEWLINE]
    ids2 = torch.cat((ids1, torch.tensor([reply1.text_ids + turn2])), dim=1)
    reply2 = reference_reply(model, ids2, OPTIONS)
    rows = thinker_rows(model, ids2, {}, reply2.text_ids)
    talker = Talker(model, special)
    conv = talker.conversation()
    p1 = ids1.shape[1]
    r1 = len(reply1.text_ids) - 1
    conv.add_rows(piece(rows, 0, p1 + r1))
    start(conv, p1)
    conv.text_ended(r1)
    assert torch.equal(talker.speak({"a": conv})["a"], reply1.codes)
    # the thinker runs the reply's last token, the turn's end and the next user turn
    p2 = ids2.shape[1]
    conv.add_rows(piece(rows, p1 + r1, p2 + 2))
    talker.stage.step({"a": conv})
    conv.add_rows(piece(rows, p2 + 2, rows.rows.shape[0]))
    start(conv, p2)
    conv.text_ended(len(reply2.text_ids) - 1)
    assert torch.equal(talker.speak({"a": conv})["a"], reply2.codes)
    # the talker's prompt: the two user turns only
    users = conv.user.view()
    assert int(users.sum()) == (3 + 3 + 2) + (3 + 2 + 2)  # <|im_start|>user\n ... <|im_end|>\n twice


def test_rollback_then_reply_equals_generate(model, special, references):
    ids, media, reference = references["text"]
    rows = thinker_rows(model, ids, media, reference.text_ids)
    _, _, other = references["other text"]
    wrong = thinker_rows(model, *PROMPTS["other text"](model), other.text_ids)
    talker = Talker(model, special)
    conv = talker.conversation()
    k = 10  # inside the user turn
    conv.add_rows(piece(rows, 0, k))
    talker.stage.step({"a": conv})
    conv.add_rows(ContextRows(k, wrong.rows[k : k + 6], wrong.positions[:, k : k + 6], wrong.token_ids[k : k + 6]))
    talker.stage.step({"a": conv})
    assert talker.kv.lengths[conv.slot] > 3
    conv.add_rows(rollback(k - 1))  # back into what was already prefilled
    assert conv.n_rows == k - 1 and talker.kv.lengths[conv.slot] == conv.context_len
    conv.add_rows(piece(rows, k - 1, rows.rows.shape[0]))
    start(conv, ids.shape[1])
    conv.text_ended(len(reference.text_ids) - 1)
    assert torch.equal(talker.speak({"a": conv})["a"], reference.codes)


def test_cancel_mid_reply_then_a_new_reply(model, special, references):
    ids, media, reference = references["other text"]
    rows = thinker_rows(model, ids, media, reference.text_ids)
    talker = Talker(model, special)
    conv = talker.conversation()
    p = ids.shape[1]
    conv.add_rows(piece(rows, 0, p + 6))
    start(conv, p)
    frames = 0
    with torch.no_grad():
        while frames < 4:
            frames += sum(c is not None for c in talker.stage.step({"a": conv}).values())
    conv.end_reply()  # cancelled: the worker stops the reply
    assert talker.kv.lengths[conv.slot] == conv.context_len
    conv.add_rows(rollback(p))  # the thinker drops the cancelled reply's rows
    conv.add_rows(piece(rows, p, rows.rows.shape[0]))
    start(conv, p)
    conv.text_ended(len(reference.text_ids) - 1)
    assert torch.equal(talker.speak({"a": conv})["a"], reference.codes)


def test_a_one_token_reply_is_silent(model, special, references):
    ids, media, reference = references["text"]
    rows = thinker_rows(model, ids, media, reference.text_ids)
    talker = Talker(model, special)
    conv = talker.conversation()
    p = ids.shape[1]
    conv.add_rows(piece(rows, 0, p))
    start(conv, p)
    conv.text_ended(0)
    assert talker.stage.step({"a": conv}) == {}  # the context first
    codes = talker.speak({"a": conv})["a"]
    assert codes.numel() == 0


@torch.no_grad()
def test_eviction_keeps_the_cache_in_step(model, special, references):
    """Evicting rows drops the cached user rows among them (system rows were never run)."""
    ids, media, reference = references["text"]
    rows = thinker_rows(model, ids, media, reference.text_ids)
    talker = Talker(model, special)
    conv = talker.conversation()
    p = ids.shape[1]
    conv.add_rows(piece(rows, 0, p))
    while conv.context_waiting():
        talker.stage.step({"a": conv})
    users = int(conv.user.view().sum())
    assert talker.kv.lengths[conv.slot] == users
    conv.evict_rows([(1, 3), (8, 10)])  # two system rows, two user rows
    assert conv.n_rows == p - 4
    assert talker.kv.lengths[conv.slot] == conv.context_len == users - 2 == int(conv.user.view().sum())


def test_evicting_system_rows_leaves_the_reply_as_generate(model, special, references):
    """System rows are no part of the talker's prompt: dropping them (rows only, nothing was
    cached for them) changes no position the talker uses."""
    ids, media, reference = references["text"]
    rows = thinker_rows(model, ids, media, reference.text_ids)
    talker = Talker(model, special)
    conv = talker.conversation()
    p = ids.shape[1]
    conv.add_rows(piece(rows, 0, 12))
    talker.stage.step({"a": conv})
    cached = talker.kv.lengths[conv.slot]
    with torch.no_grad():
        conv.evict_rows([(1, 5)])
    assert talker.kv.lengths[conv.slot] == cached
    conv.add_rows(ContextRows(8, rows.rows[12:], rows.positions[:, 12:], rows.token_ids[12:]))
    start(conv, p - 4)
    conv.text_ended(len(reference.text_ids) - 1)
    assert torch.equal(talker.speak({"a": conv})["a"], reference.codes)


class _Outbox:
    """Stands in for the worker's sockets: what it sends, in order."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, object]] = []

    def send(self, to: str, msg) -> None:
        self.sent.append((to, msg))

    def count_step(self) -> None:
        pass

    def of(self, kind) -> list:
        return [msg for _, msg in self.sent if isinstance(msg, kind)]


@pytest.fixture
def worker(tiny_qwen3_checkpoint, tmp_path):
    from omni.engine.talker_worker import TalkerWorker
    from omni.engine.worker import Addresses, WorkerConfig

    addresses = Addresses(*(f"ipc://{tmp_path}/{name}" for name in ("thinker", "talker", "vocoder", "frontend")))
    cfg = WorkerConfig(str(tiny_qwen3_checkpoint), "cpu", "float32", addresses, kv_slots=2, max_context_tokens=1024)
    worker = TalkerWorker(cfg)
    worker.io.close()
    worker.io = _Outbox()
    return worker


@torch.no_grad()
def test_worker_sends_each_frame_as_its_16_codes(model, worker, references):
    from omni.engine import protocol as p

    assert worker.qwen3
    ids, media, reference = references["audio"]
    rows = thinker_rows(model, ids, media, reference.text_ids)
    n = rows.rows.shape[0]
    worker.handle(piece(rows, 0, 20).message("s"))
    worker.handle(piece(rows, 20, n).message("s"))
    start = dict(
        session="s", first_row=ids.shape[1], greedy=True, max_codes=OPTIONS.max_codec_frames,
        min_codes=0, top_k=50, top_p=1.0, temperature=0.9,
        repetition_penalty=OPTIONS.talker_repetition_penalty,
    )
    worker.handle(p.TalkerStart(reply="r1", voice="Ethan", **start))
    worker.handle(p.TextEnd("s", "r1", len(reference.text_ids) - 1))
    for _ in range(200):
        worker.step()
        if worker.io.of(p.TalkerDone):
            break
    frames = [msg.codes for msg in worker.io.of(p.Codes)]
    assert all(len(codes) == 16 for codes in frames)
    assert torch.equal(_codes(frames), reference.codes)
    assert len(worker.io.of(p.CodeOut)) == 1 and len(worker.io.of(p.VocoderStart)) == 1
    (done,) = worker.io.of(p.TalkerDone)
    assert done.status == "completed" and done.codes == [c for frame in frames for c in frame]
    assert [msg.status for msg in worker.io.of(p.CodesEnd)] == ["completed"]
    # voices by the family's names, in any case; an unknown one is refused with the list
    worker.handle(p.TalkerStart(reply="r2", voice="aiden", **start))
    assert worker.speaking["s"].reply == "r2"
    worker.handle(p.Cancel("s", "r2"))
    worker.handle(p.TalkerStart(reply="r3", voice="Nobody", **start))
    (error,) = worker.io.of(p.WorkerError)
    assert "unknown voice 'Nobody'" in error.message and "Aiden" in error.message
    assert worker.io.of(p.TalkerDone)[-1].status == "failed"
