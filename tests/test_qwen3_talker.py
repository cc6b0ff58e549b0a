"""The engine's Qwen3-Omni talker (omni/engine/qwen3_talker.py) against transformers' generate().

fp32, CPU, the tiny Qwen3 checkpoint. The thinker side is built in-process as the thinker
worker would send it: one thinker forward over the prompt and the reply's run tokens (all but
its last), per position its input embedding (text) or `accept_hidden_layer` state (audio),
TMRoPE positions and token ids, sent in pieces; the reply's text is generate()'s own (greedy).
The talker's 16-codebook codes must equal the codes generate() hands to Code2Wav.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from test_qwen3_stream import PROMPTS, ending_on_their_own  # the streamer's prompts

from omni.bench.qwen3 import Reply, reference_reply
from omni.checkpoints.parts import load_whole
from omni.engine import protocol as p
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


@pytest.fixture(scope="module")
def references(model) -> dict:
    out = {}
    for name, make in PROMPTS.items():
        ids, media = make(model)
        out[name] = (ids, media, reference_reply(model, ids, OPTIONS, **media))
    return out


@torch.no_grad()
def thinker_rows(model, ids: torch.Tensor, media: dict, reply: list[int]) -> ContextRows:
    """What the thinker sends for the prompt and the reply's run tokens (all but its last): one
    forward over both, each row the input embedding (text) or the `accept_hidden_layer` state
    (multimodal), with the thinker's TMRoPE positions."""
    config = model.config
    thinker = model.thinker
    all_ids = torch.cat((ids[0], torch.tensor(reply[:-1], dtype=torch.long)))[None]
    ones = torch.ones_like(all_ids)
    out = thinker(input_ids=all_ids, attention_mask=ones, output_hidden_states=True, **media)
    layer = config.talker_config.accept_hidden_layer
    kinds = ("audio", "image", "video")
    media_ids = [getattr(config.thinker_config, f"{kind}_token_id") for kind in kinds]
    multimodal = torch.isin(all_ids[0], torch.tensor(media_ids))[:, None]
    rows = torch.where(multimodal, out.hidden_states[layer][0], out.hidden_states[0][0])
    mask = media.get("feature_attention_mask")
    lengths = None if mask is None else mask.sum(1)
    positions, _ = thinker.get_rope_index(all_ids, attention_mask=ones, audio_seqlens=lengths)
    return ContextRows(0, rows, positions[:, 0], all_ids[0])


def piece(rows: ContextRows, lo: int, hi: int | None = None, start: int | None = None):
    """Rows [lo, hi) of `rows`, sent as the piece that starts at `start` (default: lo)."""
    hi = rows.rows.shape[0] if hi is None else hi
    part = ContextRows(lo, rows.rows[lo:hi], rows.positions[:, lo:hi], rows.token_ids[lo:hi])
    if start is not None:
        part.start = start
    return part


def rollback(start: int) -> ContextRows:
    no_ids = torch.zeros(0, dtype=torch.long)
    return ContextRows(start, torch.zeros(0, 1), torch.zeros(3, 0), no_ids)


def _codes(frames: list[list[int]]) -> torch.Tensor:
    return torch.tensor(frames, dtype=torch.long).reshape(-1, 16).T


class Talker:
    """A Qwen3TalkerStage over its own KV store, recording the code predictor's batch sizes."""

    def __init__(self, model, special) -> None:
        self.kv = KVSlots.for_model(model.talker.config.text_config, 4, 1024, "cpu", torch.float32)
        self.stage = Qwen3TalkerStage(model.talker, self.kv, StepScheduler(64, 4))
        self.model, self.special = model, special
        self.batches: list[int] = []

        def recorded(_module, _args, kwargs) -> None:
            if kwargs.get("inputs_embeds") is not None:  # a frame's first call (then input_ids)
                self.batches.append(kwargs["inputs_embeds"].shape[0])

        # on the module-scoped model: one hook per Talker, each filling its own list
        model.talker.code_predictor.register_forward_pre_hook(recorded, with_kwargs=True)

    def conversation(self) -> Qwen3TalkerConversation:
        return Qwen3TalkerConversation(self.model.talker, self.special, self.kv)

    @torch.no_grad()
    def step(self, convs: dict) -> dict:
        return self.stage.step(convs)

    @torch.no_grad()
    def speak(self, convs: dict[str, Qwen3TalkerConversation], feed=None) -> dict:
        """Step until every conversation's reply ends; `feed()` runs before each step."""
        frames: dict[str, list[list[int]]] = {key: [] for key in convs}
        speaking = set(convs)
        for _ in range(400):
            if feed is not None:
                feed()
            for key, codes in self.stage.step(convs).items():
                if codes is not None:
                    frames[key].append(codes)
                if convs[key].reply is not None and convs[key].reply.done:
                    convs[key].end_reply()
                    speaking.discard(key)
            if not speaking:
                return {key: _codes(f) for key, f in frames.items()}
        raise AssertionError("the replies did not end")


def start(conv, first_row: int, text_rows: int | None = None) -> None:
    conv.start_reply(
        first_row,
        "Ethan",
        greedy=True,
        max_codes=OPTIONS.max_codec_frames,
        repetition_penalty=OPTIONS.talker_repetition_penalty,
    )
    if text_rows is not None:
        conv.text_ended(text_rows)


@dataclass
class Case:
    """One prompt's reference, its thinker rows and a fresh talker conversation."""

    ids: torch.Tensor
    reference: Reply
    rows: ContextRows
    talker: Talker
    conv: Qwen3TalkerConversation

    @property
    def first_row(self) -> int:
        return self.ids.shape[1]

    @property
    def text_rows(self) -> int:
        return len(self.reference.text_ids) - 1

    def cached(self) -> int:
        return self.talker.kv.lengths[self.conv.slot]

    def reply_equals_generate(self, first_row: int | None = None) -> None:
        """Start the reply (its rows all sent) and speak it: generate()'s codes."""
        start(self.conv, self.first_row if first_row is None else first_row, self.text_rows)
        assert torch.equal(self.talker.speak({"a": self.conv})["a"], self.reference.codes)


def case(model, special, references, name: str) -> Case:
    ids, media, reference = references[name]
    rows = thinker_rows(model, ids, media, reference.text_ids)
    talker = Talker(model, special)
    return Case(ids, reference, rows, talker, talker.conversation())


@pytest.mark.parametrize("prompt", PROMPTS)
def test_reply_equals_generate(model, special, references, prompt):
    c = case(model, special, references, prompt)
    conv, rows, first = c.conv, c.rows, c.first_row
    assert c.reference.codes.shape == (16, OPTIONS.max_codec_frames - 1)
    # the prompt in pieces, some prefilled before the reply starts
    conv.add_rows(piece(rows, 0, 5))
    conv.add_rows(piece(rows, 5, first - 4))
    c.talker.step({"a": conv})
    conv.add_rows(piece(rows, first - 4, first + 1))  # the header and the reply's first token
    start(conv, first)
    end = first + c.text_rows

    def feed() -> None:  # the reply's rows arrive one per step, then its end
        if conv.n_rows < end:
            conv.add_rows(piece(rows, conv.n_rows, conv.n_rows + 1))
        elif conv.reply.text_rows is None:
            conv.text_ended(c.text_rows)

    assert torch.equal(c.talker.speak({"a": conv}, feed)["a"], c.reference.codes)
    # after the reply the cache holds the user rows only
    assert c.cached() == conv.context_len == int(conv.user.view().sum())


def test_two_sessions_batched_each_equal_generate(model, special, references):
    talker = Talker(model, special)
    convs, expected = {}, {}
    for name in ("text", "other text"):
        c = case(model, special, references, name)
        conv = convs[name] = talker.conversation()
        conv.add_rows(c.rows)
        start(conv, c.first_row, c.text_rows)
        expected[name] = c.reference.codes
    assert not torch.equal(expected["text"], expected["other text"])
    got = talker.speak(convs)
    for name in convs:
        assert torch.equal(got[name], expected[name]), name
    assert max(talker.batches) == 2  # the code predictor ran both frames in one batch


def test_sampled_reply_follows_its_seed_alone_or_batched(model, special, references):
    """Sampling: each reply draws from its own generator (code 0, then its residuals), so a
    seeded reply is the same alone and batched with another one."""

    def sampled(names: list[str]) -> dict:
        talker = Talker(model, special)
        convs = {}
        for seed, name in enumerate(names):
            c = case(model, special, references, name)
            conv = convs[name] = talker.conversation()
            conv.add_rows(c.rows)
            conv.start_reply(c.first_row, "Ethan", greedy=False, max_codes=12, seed=seed + 7)
            conv.text_ended(c.text_rows)
        return talker.speak(convs)

    alone = sampled(["text"])["text"]
    batched = sampled(["text", "other text"])
    assert alone.shape == (16, 11)
    assert torch.equal(batched["text"], alone)
    greedy = references["text"][2].codes[:, :11]
    assert not torch.equal(alone, greedy)


def test_second_turn_equals_generate_on_the_whole_conversation(model, special, references):
    config = model.config
    first = case(model, special, references, "text")
    ids1, reply1 = first.ids, first.reference
    turn2 = [config.im_end_token_id, NEWLINE]
    turn2 += [config.im_start_token_id, config.user_token_id, NEWLINE]
    turn2 += [6000, 7000, config.im_end_token_id, NEWLINE]
    turn2 += [config.im_start_token_id, config.assistant_token_id, NEWLINE]
    ids2 = torch.cat((ids1, torch.tensor([reply1.text_ids + turn2])), dim=1)
    reply2 = reference_reply(model, ids2, OPTIONS)
    rows2 = thinker_rows(model, ids2, {}, reply2.text_ids)
    second = Case(ids2, reply2, rows2, first.talker, first.conv)
    conv = first.conv
    sent = first.first_row + first.text_rows
    conv.add_rows(piece(second.rows, 0, sent))
    first.reply_equals_generate()
    # the thinker runs the reply's last token, the turn's end and the next user turn
    conv.add_rows(piece(second.rows, sent, second.first_row + 2))
    second.talker.step({"a": conv})
    conv.add_rows(piece(second.rows, second.first_row + 2))
    second.reply_equals_generate()
    # the talker's prompt: the two user turns only (<|im_start|>user\n ... <|im_end|>\n)
    assert int(conv.user.view().sum()) == (3 + 3 + 2) + (3 + 2 + 2)


def test_replies_that_end_on_their_own_equal_generate(model, special, references):
    """Text that ends with an eos (tts_eos after its last run row) and speech that ends with
    the codec eos (eos ids set to a text token and a first code the greedy reply produces)."""
    ids = references["other text"][0]
    with ending_on_their_own(model, ids) as ending:
        reference = reference_reply(model, ids, ending.options)
        assert len(reference.text_ids) < 12 and 2 <= reference.codes.shape[1] == ending.frames
        c = case(model, special, {"it": (ids, {}, reference)}, "it")
        c.conv.add_rows(c.rows)
        c.reply_equals_generate()


def test_rollback_then_reply_equals_generate(model, special, references):
    c = case(model, special, references, "text")
    wrong = case(model, special, references, "other text").rows
    k = 10  # inside the user turn
    c.conv.add_rows(piece(c.rows, 0, k))
    c.talker.step({"a": c.conv})
    c.conv.add_rows(piece(wrong, k, k + 6))
    c.talker.step({"a": c.conv})
    assert c.cached() > 3
    c.conv.add_rows(rollback(k - 1))  # back into what was already prefilled
    assert c.conv.n_rows == k - 1 and c.cached() == c.conv.context_len == 2
    c.conv.add_rows(piece(c.rows, k - 1))
    c.reply_equals_generate()


def test_cancel_mid_reply_then_a_new_reply(model, special, references):
    c = case(model, special, references, "other text")
    c.conv.add_rows(piece(c.rows, 0, c.first_row + 6))
    start(c.conv, c.first_row)
    frames = 0
    while frames < 4:
        frames += sum(codes is not None for codes in c.talker.step({"a": c.conv}).values())
    c.conv.end_reply()  # cancelled: the worker stops the reply
    assert c.cached() == c.conv.context_len
    c.conv.add_rows(rollback(c.first_row))  # the thinker drops the cancelled reply's rows
    c.conv.add_rows(piece(c.rows, c.first_row))
    c.reply_equals_generate()


def test_a_one_token_reply_is_silent(model, special, references):
    c = case(model, special, references, "text")
    c.conv.add_rows(piece(c.rows, 0, c.first_row))
    start(c.conv, c.first_row, 0)
    assert c.talker.step({"a": c.conv}) == {}  # the context first
    assert c.talker.speak({"a": c.conv})["a"].numel() == 0


def test_eviction_keeps_the_cache_in_step(model, special, references):
    """Evicting rows drops the cached user rows among them (system rows were never run)."""
    c = case(model, special, references, "text")
    c.conv.add_rows(piece(c.rows, 0, c.first_row))
    while c.conv.context_waiting():
        c.talker.step({"a": c.conv})
    users = int(c.conv.user.view().sum())
    assert c.cached() == users
    with torch.no_grad():
        c.conv.evict_rows([(1, 3), (8, 10)])  # two system rows, two user rows
    assert c.conv.n_rows == c.first_row - 4
    assert c.cached() == c.conv.context_len == users - 2 == int(c.conv.user.view().sum())


def test_evicting_system_rows_leaves_the_reply_as_generate(model, special, references):
    """System rows are no part of the talker's prompt: dropping them (rows only, nothing was
    cached for them) changes no position the talker uses."""
    c = case(model, special, references, "text")
    c.conv.add_rows(piece(c.rows, 0, 12))
    c.talker.step({"a": c.conv})
    cached = c.cached()
    with torch.no_grad():
        c.conv.evict_rows([(1, 5)])
    assert c.cached() == cached
    c.conv.add_rows(piece(c.rows, 12, start=8))
    c.reply_equals_generate(c.first_row - 4)


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

    names = ("thinker", "talker", "vocoder", "frontend")
    addresses = Addresses(*(f"ipc://{tmp_path}/{name}" for name in names))
    cfg = WorkerConfig(
        str(tiny_qwen3_checkpoint), "cpu", "float32", addresses, kv_slots=2, max_context_tokens=1024
    )
    worker = TalkerWorker(cfg)
    worker.io.close()
    worker.io = _Outbox()
    return worker


@torch.no_grad()
def test_worker_sends_each_frame_as_its_16_codes(model, special, references, worker):
    assert worker.qwen3
    c = case(model, special, references, "audio")
    worker.handle(piece(c.rows, 0, 20).message("s"))
    worker.handle(piece(c.rows, 20).message("s"))
    settings = dict(
        session="s",
        first_row=c.first_row,
        greedy=True,
        max_codes=OPTIONS.max_codec_frames,
        min_codes=0,
        top_k=50,
        top_p=1.0,
        temperature=0.9,
        repetition_penalty=OPTIONS.talker_repetition_penalty,
    )
    worker.handle(p.TalkerStart(reply="r1", voice="Ethan", **settings))
    worker.handle(p.TextEnd("s", "r1", c.text_rows))
    for _ in range(200):
        worker.step()
        if worker.io.of(p.TalkerDone):
            break
    frames = [msg.codes for msg in worker.io.of(p.Codes)]
    assert all(len(codes) == 16 for codes in frames)
    assert torch.equal(_codes(frames), c.reference.codes)
    assert len(worker.io.of(p.CodeOut)) == 1 and len(worker.io.of(p.VocoderStart)) == 1
    (done,) = worker.io.of(p.TalkerDone)
    assert done.status == "completed" and done.codes == [code for frame in frames for code in frame]
    assert [msg.status for msg in worker.io.of(p.CodesEnd)] == ["completed"]
    # voices by the family's names, in any case; an unknown one is refused with the list
    worker.handle(p.TalkerStart(reply="r2", voice="aiden", **settings))
    assert worker.speaking["s"].reply == "r2"
    worker.handle(p.Cancel("s", "r2"))
    worker.handle(p.TalkerStart(reply="r3", voice="Nobody", **settings))
    (error,) = worker.io.of(p.WorkerError)
    assert "unknown voice 'Nobody'" in error.message and "Aiden" in error.message
    assert worker.io.of(p.TalkerDone)[-1].status == "failed"
