"""Qwen3-Omni's streaming Code2Wav batched across replies, and the vocoder worker serving it,
on the tiny Qwen3-Omni checkpoint (fp32, CPU)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from omni.bench.qwen3 import WAV_TOLERANCE, wav_error
from omni.checkpoints.parts import load_code2wav
from omni.engine import protocol as p
from omni.engine import vocoder_worker
from omni.engine.qwen3_code2wav import Code2WavBatch, Code2WavStream
from omni.engine.worker import Addresses, WorkerConfig

QUANTIZERS = 16


@pytest.fixture(scope="module")
def code2wav(tiny_qwen3_checkpoint: Path) -> torch.nn.Module:
    return load_code2wav(tiny_qwen3_checkpoint, "cpu", torch.float32).eval()


def random_frames(frames: int, seed: int) -> torch.Tensor:
    """(16, frames) codes."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2048, (QUANTIZERS, frames), generator=generator)


def whole_decode(code2wav: torch.nn.Module, frames: torch.Tensor) -> np.ndarray:
    with torch.inference_mode():
        return code2wav(frames[None]).reshape(-1).numpy()


def flat(frames: torch.Tensor) -> list[int]:
    """Frame after frame, each frame's codebooks 0..15: as Codes messages carry them."""
    return frames.T.reshape(-1).tolist()


def error(wav: np.ndarray, reference: np.ndarray) -> float:
    return wav_error(torch.from_numpy(wav), torch.from_numpy(reference))


class CallRows:
    """Records the batch size of every call into Code2Wav's convolutions (the cost)."""

    def __init__(self, code2wav: torch.nn.Module) -> None:
        self.rows: list[tuple[int, int]] = []  # (batch, frames) per call
        first_convolution = code2wav.upsample[0][0]
        self._hook = first_convolution.register_forward_hook(self._record)

    def _record(self, module, args, output) -> None:
        self.rows.append((args[0].shape[0], args[0].shape[-1]))

    def remove(self) -> None:
        self._hook.remove()


def interleaved(
    batch: Code2WavBatch, replies: list[torch.Tensor], decode_every: int = 1, offsets=None
) -> list[np.ndarray]:
    """Feed the replies one frame per round each (reply i from round offsets[i]), finishing
    each after its last frame; every `decode_every` rounds one decode_ready() over all
    streams, and at the end decodes until every stream is done. Returns each reply's audio."""
    offsets = offsets or [0] * len(replies)
    streams = [batch.stream() for _ in replies]
    audio: list[list[np.ndarray]] = [[] for _ in replies]

    def decode() -> None:
        for chunks, wav in zip(audio, batch.decode_ready(streams)):
            if wav is not None:
                chunks.append(wav)

    rounds = max(o + r.shape[1] for o, r in zip(offsets, replies)) + 1
    for step in range(rounds):
        for stream, frames, offset in zip(streams, replies, offsets):
            index = step - offset
            if 0 <= index < frames.shape[1]:
                stream.add(frames[:, index].tolist())
            elif index == frames.shape[1]:
                stream.finish()
        if step % decode_every == 0:
            decode()
    while not all(s.done for s in streams):
        decode()
    return [np.concatenate(chunks) if chunks else np.zeros(0, np.float32) for chunks in audio]


def test_interleaved_replies_each_equal_their_whole_decode_and_share_calls(code2wav):
    """Replies of different lengths (none, one frame, under and past the pre-transformer's
    reach, where its sliding-window cache has dropped keys) fed frame by frame together: each
    stream's audio is its whole-reply decode, and the same as the stream decoded alone; some
    Code2Wav calls stacked several replies' windows, none longer than context + chunk."""
    batch = Code2WavBatch(code2wav)
    config = code2wav.config
    reach = config.num_hidden_layers * (config.sliding_window - 1)  # 142 frames on the tiny
    window = batch.left_context_frames + batch.chunk_frames
    lengths = [0, 1, 13, 40, reach + 12]
    replies = [random_frames(n, seed) for seed, n in enumerate(lengths)]
    calls = CallRows(code2wav)
    try:
        together = interleaved(batch, replies)
    finally:
        calls.remove()
    alone = [interleaved(batch, [frames])[0] for frames in replies]
    for frames, wav, single in zip(replies, together, alone):
        if frames.shape[1] == 0:
            assert wav.size == 0
            continue
        whole = whole_decode(code2wav, frames)
        assert wav.dtype == np.float32 and wav.shape == whole.shape
        assert error(wav, whole) <= WAV_TOLERANCE
        assert error(wav, single) <= WAV_TOLERANCE
    assert max(rows for rows, _ in calls.rows) >= 4  # the first frames of all four replies
    assert max(frames for _, frames in calls.rows) == window  # bounded, however long the reply


def test_steady_state_windows_of_replies_out_of_step_share_one_call(code2wav):
    """Replies started at different frames, decoded every few frames (a busy vocoder): their
    windows end at different frames but have one length, so they go in one call; a short
    left context keeps it cheap (batched against alone, not against the whole decode)."""
    batch = Code2WavBatch(code2wav, left_context_frames=6, chunk_frames=3)
    replies = [random_frames(n, 10 + seed) for seed, n in enumerate([30, 27, 21])]
    offsets = [0, 1, 5]
    calls = CallRows(code2wav)
    try:
        together = interleaved(batch, replies, decode_every=3, offsets=offsets)
    finally:
        calls.remove()
    alone = [interleaved(batch, [frames])[0] for frames in replies]
    for frames, wav, single in zip(replies, together, alone):
        assert wav.size == frames.shape[1] * batch.samples_per_frame - batch.lookahead
        assert error(wav, single) <= WAV_TOLERANCE
    assert (3, 9) in calls.rows  # left context + chunk frames, all three replies


def test_first_audio_comes_with_the_first_frame_and_windows_stay_bounded(code2wav):
    batch = Code2WavBatch(code2wav, left_context_frames=5, chunk_frames=2)
    stream = batch.stream()
    assert not stream.has_ready_chunk and not stream.done
    frames = random_frames(20, 3)
    stream.add(flat(frames[:, :1]))
    assert stream.has_ready_chunk
    (first,) = batch.decode_ready([stream])
    assert first.size == batch.samples_per_frame - batch.lookahead
    stream.add(flat(frames[:, 1:]))  # many frames at once: still one chunk per decode
    calls = CallRows(code2wav)
    try:
        while stream.has_ready_chunk:
            batch.decode_ready([stream])
        stream.finish()
        assert not stream.done  # the last frame's chunk is still to decode
        while not stream.done:
            batch.decode_ready([stream])
    finally:
        calls.remove()
    # a chunk of 2 frames each, with up to 5 before it; the last (one frame) with 6
    assert [frames for _, frames in calls.rows] == [min(hi, 7) for hi in range(3, 20, 2)] + [7]
    assert batch.decode_ready([stream]) == [None]
    assert stream.samples_emitted == 20 * batch.samples_per_frame - batch.lookahead


def test_bad_frames_and_streams_are_refused_clearly(code2wav):
    batch = Code2WavBatch(code2wav, left_context_frames=5)
    stream = batch.stream()
    with pytest.raises(ValueError, match="whole frames of 16, got 17"):
        stream.add([0] * 17)
    with pytest.raises(ValueError, match=r"out of Code2Wav's range 0\.\.2047: \[2048\]"):
        stream.add([0] * 15 + [2048])
    with pytest.raises(ValueError, match="appears twice"):
        batch.decode_ready([stream, stream])
    with pytest.raises(ValueError, match="another Code2WavBatch"):
        Code2WavBatch(code2wav, left_context_frames=5).decode_ready([stream])
    with pytest.raises(ValueError, match="chunk_frames must be at least 1, got 0"):
        Code2WavBatch(code2wav, chunk_frames=0)
    stream.finish()
    assert stream.done  # no frames at all
    with pytest.raises(RuntimeError, match="finish"):
        stream.add([0] * 16)


# -- the vocoder worker ------------------------------------------------------------------


class FakeIO:
    """The worker's sockets: what it sends is kept."""

    def __init__(self, *args) -> None:
        self.sent: list[p.Msg] = []

    def send(self, to: str, msg: p.Msg) -> None:
        assert to == "frontend"
        self.sent.append(msg)

    def count_step(self) -> None:
        pass


def sent_to(worker: vocoder_worker.VocoderWorker, kind: type) -> list:
    """The messages of one kind the worker sent the front end, in order."""
    return [m for m in worker.io.sent if isinstance(m, kind)]


@pytest.fixture
def worker(tiny_qwen3_checkpoint, monkeypatch) -> vocoder_worker.VocoderWorker:
    monkeypatch.setattr(vocoder_worker, "WorkerIO", FakeIO)
    addresses = Addresses("ipc://t", "ipc://k", "ipc://v", "ipc://f")
    cfg = WorkerConfig(str(tiny_qwen3_checkpoint), "cpu", "float32", addresses, max_batch=2)
    return vocoder_worker.VocoderWorker(cfg)


def test_worker_voices_qwen3_replies_as_their_whole_decode(worker, code2wav):
    """Three replies at once (max_batch 2: they take turns), frames coming one or two to a
    Codes message; each reply's AudioOut, end to end, is its whole decode in int16, and its
    VocoderDone counts them. Qwen3 has no voice file: any voice name goes."""
    assert isinstance(worker.decoder.batch, Code2WavBatch)
    replies = {"a": random_frames(23, 20), "b": random_frames(9, 21), "c": random_frames(14, 22)}
    for session in replies:
        worker.handle(p.VocoderStart(session, f"r-{session}", voice="none at all"))
    sent = 0  # frames sent of each reply so far
    while sent < max(r.shape[1] for r in replies.values()):
        step = 1 + sent % 2
        for session, frames in replies.items():
            if sent < frames.shape[1]:
                worker.handle(p.Codes(session, f"r-{session}", flat(frames[:, sent : sent + step])))
                if sent + step >= frames.shape[1]:
                    worker.handle(p.CodesEnd(session, f"r-{session}", "completed"))
        sent += step
        worker.vocode_ready()
    for _ in range(100):
        if not worker.voicing:
            break
        worker.vocode_ready()
    assert not worker.voicing

    for session, frames in replies.items():
        out = [m for m in sent_to(worker, p.AudioOut) if m.session == session]
        assert [m.first_sample for m in out] == list(
            np.cumsum([0] + [m.pcm.shape[0] for m in out[:-1]])
        )
        pcm = np.concatenate([m.pcm.numpy() for m in out])
        whole = whole_decode(code2wav, frames)
        expected = np.clip(np.round(whole * 32767.0), -32768, 32767).astype(np.int16)
        assert pcm.dtype == np.int16 and pcm.shape == expected.shape
        assert np.abs(pcm.astype(np.int32) - expected).max() <= 1 + WAV_TOLERANCE * 32767
        (done,) = [m for m in sent_to(worker, p.VocoderDone) if m.session == session]
        assert (done.reply, done.status) == (f"r-{session}", "completed")
        assert done.audio_samples == pcm.size
    assert not sent_to(worker, p.WorkerError)


def test_worker_drops_cancelled_failed_and_empty_qwen3_replies(worker):
    frames = random_frames(6, 30)
    worker.handle(p.VocoderStart("a", "r-a", voice="Ethan"))
    worker.handle(p.Codes("a", "r-a", flat(frames)))
    worker.vocode_ready()  # the first frame's audio
    worker.handle(p.CodesEnd("a", "r-a", "cancelled"))
    worker.handle(p.Cancel("b", "r-b"))  # before its start
    worker.handle(p.VocoderStart("b", "r-b", voice="Ethan"))
    worker.handle(p.VocoderStart("c", "r-c", voice="Ethan"))
    worker.handle(p.CodesEnd("c", "r-c", "completed"))  # nothing to say
    worker.handle(p.VocoderStart("d", "r-d", voice="Ethan"))
    worker.handle(p.Codes("d", "r-d", [0] * 15 + [4096]))
    assert not worker.voicing
    done = {m.session: m for m in sent_to(worker, p.VocoderDone)}
    audio = sum(m.pcm.shape[0] for m in sent_to(worker, p.AudioOut))
    assert audio == worker.decoder.batch.samples_per_frame - worker.decoder.batch.lookahead
    assert (done["a"].status, done["a"].audio_samples) == ("cancelled", audio)
    assert (done["b"].status, done["b"].audio_samples) == ("cancelled", 0)
    assert (done["c"].status, done["c"].audio_samples) == ("completed", 0)
    assert (done["d"].status, done["d"].audio_samples) == ("failed", 0)
    (failure,) = sent_to(worker, p.WorkerError)
    assert failure.session == "d" and "out of Code2Wav's range" in failure.message
