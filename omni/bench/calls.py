"""`omni bench calls`: N simultaneous WebRTC calls with spoken turns against a running server.

Each call is an aiortc client doing what a browser does (OpenAI's flow: the SDP offer by
POST, events on the `oai-events` data channel). Per turn it speaks a sentence (espeak-ng)
into its microphone in real time, then listens, and records the time from the end of its
speech to the first sound of the reply arriving: voice to voice as the caller's network
stack sees it (the server's VAD silence, the model, both directions of the network; not the
caller's playout buffer). Over the run it also records the arrival jitter of reply audio
frames, what the server itself reports (its /metrics listener: the silence it sent mid-reply
because the model fell behind, and its own time from the VAD's end of turn to the first audio
sent, so the client's latency can be taken apart; the share of its speculative replies that
hit, so a run with the server's `speculative_pause_ms` on and one with it off (0) compare),
and the server's CPU time (its process and the
engine's worker processes, read from /proc) per call.

`CallClient` is also the tests' client for /v1/realtime/calls.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import shutil
import statistics
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import soundfile
import soxr
from aiortc import MediaStreamTrack, RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError

from omni.engine.api import OUTPUT_SAMPLE_RATE
from omni.gateway.playout import FRAME, ReplyAudioTrack
from omni.session.outputs import AudioOut

SENTENCE = "Hello there. Could you tell me what the weather is like today?"
LOUD = 200  # int16 peak: above the codec's rendering of silence
TIMEOUT = 30.0


def speech(text: str = SENTENCE) -> np.ndarray:
    """`text` spoken by espeak-ng as int16 at 24 kHz."""
    if shutil.which("espeak-ng") is None:
        raise RuntimeError("espeak-ng is needed to speak the turns (apt-get install espeak-ng)")
    wav = subprocess.run(["espeak-ng", "--stdout", text], check=True, capture_output=True).stdout
    audio, rate = soundfile.read(io.BytesIO(wav), dtype="float32")
    return (np.clip(soxr.resample(audio, rate, OUTPUT_SAMPLE_RATE), -1, 1) * 32767).astype(np.int16)


class CallClient:
    """One caller: a microphone that speaks on demand, the reply's audio, the server's events.

    The microphone is the server's own paced track: it plays an utterance in real time and
    silence otherwise, and its `output_audio_buffer.stopped` marks the end of the speech.
    """

    def __init__(
        self,
        base_url: str,
        api_key: str | None = None,
        video: MediaStreamTrack | None = None,
        microphone: bool = True,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        self.mic = ReplyAudioTrack(self._on_mic_event) if microphone else None
        self.video = video
        self.location: str | None = None
        self.events: list[dict[str, Any]] = []
        self.arrivals: list[float] = []  # monotonic time of each reply audio frame
        self.loud: list[float] = []  # ... of each frame with sound in it
        self._cursor = 0
        self._new_event = asyncio.Event()
        self._new_sound = asyncio.Event()
        self._spoken: asyncio.Future[float] | None = None
        self._utterances = 0
        self._tasks: list[asyncio.Task[None]] = []
        self._opened = asyncio.Event()

    async def connect(self, path: str = "/v1/realtime/calls") -> httpx.Response:
        """Place the call; returns the server's response (201, or the refusal)."""
        if self.mic is not None:  # without it and video: an offer with a data channel only
            self.pc.addTrack(self.mic)
        if self.video is not None:
            self.pc.addTrack(self.video)
        channel = self.pc.createDataChannel("oai-events")
        channel.on("open", self._opened.set)
        channel.on("message", self._on_message)
        self.channel = channel
        self.pc.on("track", self._on_track)
        await self.pc.setLocalDescription(await self.pc.createOffer())
        async with httpx.AsyncClient(base_url=self.base_url, timeout=TIMEOUT) as http:
            response = await http.post(
                path,
                content=self.pc.localDescription.sdp,
                headers={**self.headers, "Content-Type": "application/sdp"},
            )
        if response.status_code == 201:
            self.location = response.headers["location"]
            await self.pc.setRemoteDescription(RTCSessionDescription(response.text, "answer"))
            await asyncio.wait_for(self._opened.wait(), TIMEOUT)
        return response

    async def hang_up(self) -> int | None:
        """DELETE the call (returns the status), then close the connection."""
        status = None
        if self.location is not None:
            async with httpx.AsyncClient(base_url=self.base_url, timeout=TIMEOUT) as http:
                status = (await http.delete(self.location, headers=self.headers)).status_code
        await self.close()
        return status

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.pc.close()

    # -- events

    def send(self, event: dict[str, Any]) -> None:
        self.channel.send(json.dumps(event))

    def _on_message(self, message: str | bytes) -> None:
        self.events.append(json.loads(message))
        self._new_event.set()

    async def expect(self, kind: str, timeout: float = TIMEOUT) -> dict[str, Any]:
        """The next event of type `kind`, skipping (but keeping in `events`) any others."""

        async def find() -> dict[str, Any]:
            while True:
                while self._cursor < len(self.events):
                    event = self.events[self._cursor]
                    self._cursor += 1
                    if event["type"] == kind:
                        return event
                self._new_event.clear()
                await self._new_event.wait()

        return await asyncio.wait_for(find(), timeout)

    async def seen(self, kind: str, timeout: float = TIMEOUT, **fields: Any) -> dict[str, Any]:
        """The first event of type `kind` with these field values, whenever it came."""

        async def find() -> dict[str, Any]:
            while True:
                for event in self.events:
                    if event["type"] == kind and all(event.get(k) == v for k, v in fields.items()):
                        return event
                self._new_event.clear()
                await self._new_event.wait()

        return await asyncio.wait_for(find(), timeout)

    # -- media

    async def say(self, pcm: np.ndarray) -> float:
        """Speak `pcm` (int16, 24 kHz) in real time; returns when the last sample left."""
        if self.mic is None:
            raise RuntimeError("this caller has no microphone")
        self._utterances += 1
        item = f"utterance{self._utterances}"
        self._spoken = asyncio.get_running_loop().create_future()
        self.mic.play(AudioOut("mic", item, pcm, 0))
        self.mic.finish(item)
        return await asyncio.wait_for(self._spoken, TIMEOUT + len(pcm) / OUTPUT_SAMPLE_RATE)

    def _on_mic_event(self, event: dict[str, Any]) -> None:
        spoken = self._spoken
        if event["type"] == "output_audio_buffer.stopped" and spoken and not spoken.done():
            spoken.set_result(time.monotonic())

    async def first_sound_after(self, t0: float, timeout: float = TIMEOUT) -> float:
        """The arrival time of the first reply frame with sound in it after `t0`."""

        async def find() -> float:
            while True:
                later = [t for t in self.loud if t > t0]
                if later:
                    return later[0]
                self._new_sound.clear()
                await self._new_sound.wait()

        return await asyncio.wait_for(find(), timeout)

    def _on_track(self, track: MediaStreamTrack) -> None:
        read = self._listen(track) if track.kind == "audio" else _drain(track)
        self._tasks.append(asyncio.create_task(read))

    async def _listen(self, track: MediaStreamTrack) -> None:
        while True:
            try:
                frame = await track.recv()
            except MediaStreamError:
                return
            now = time.monotonic()
            self.arrivals.append(now)
            if np.abs(frame.to_ndarray()).max() > LOUD:  # type: ignore[union-attr]
                self.loud.append(now)
                self._new_sound.set()


async def _drain(track: MediaStreamTrack) -> None:
    try:
        while True:
            await track.recv()
    except MediaStreamError:
        pass


# -- the benchmark


@dataclass
class CallResult:
    latencies_ms: list[float] = field(default_factory=list)
    arrivals: list[float] = field(default_factory=list)
    reply_frames: int = 0  # frames of the replies with sound in them
    failed_turns: list[str] = field(default_factory=list)
    error: str | None = None  # the call itself failed


@dataclass
class LevelResult:
    calls: int
    turns: int  # answered with audio
    failed_turns: int
    failed_calls: int
    p50_ms: float | None
    p95_ms: float | None
    jitter_p95_ms: float | None  # |frame inter-arrival - 20 ms|, 95th percentile
    jitter_max_ms: float | None
    server_first_audio_ms: float | None  # server: mean VAD end of turn to first audio sent
    reply_audio_s: float  # reply audio heard, over all calls
    gap_frames: int | None  # server: silent frames sent mid-reply
    cpu_per_call_pct: float | None  # server process tree, % of one core
    gateway_cpu_per_call_pct: float | None  # the server process alone (gateway + sessions)
    load_average: float  # this machine's 1-minute load when the run started
    # server: speculative replies that hit, of all started (None: the server started none)
    speculation_hit_rate: float | None = None
    errors: list[str] = field(default_factory=list)


async def _one_call(
    url: str, key: str | None, utterance: np.ndarray, turns: int, max_tokens: int, wait: float
) -> CallResult:
    result = CallResult()
    client = CallClient(url, key)
    try:
        response = await client.connect()
        if response.status_code != 201:
            result.error = f"HTTP {response.status_code}: {response.text[:200]}"
            return result
        await client.expect("session.created")
        client.send(
            {
                "type": "session.update",
                "session": {"type": "realtime", "max_output_tokens": max_tokens},
            }
        )
        await client.expect("session.updated")
        for _ in range(turns):
            ended = await client.say(utterance)
            done = (await client.expect("response.done", wait))["response"]
            if done["status"] != "completed":
                details = done.get("status_details") or {}
                reason = (details.get("error") or {}).get("message") or details.get("reason")
                result.failed_turns.append(f"reply {done['status']}: {reason}")
                continue
            await client.seen("output_audio_buffer.stopped", wait, response_id=done["id"])
            heard = await client.first_sound_after(ended)
            result.latencies_ms.append((heard - ended) * 1000)
        result.arrivals = client.arrivals
        result.reply_frames = len(client.loud)
    except Exception as exc:  # noqa: BLE001 - one call failing is a result, not the end of the run
        result.error = f"{type(exc).__name__}: {exc}"
    finally:
        await client.hang_up()
    return result


def _jitter_ms(arrivals: list[float]) -> list[float]:
    gaps = np.diff(np.asarray(arrivals)) * 1000.0
    return list(np.abs(gaps - FRAME * 1000.0 / 48_000))


# the server's own counters, from /metrics: gap frames, and its VAD-end-to-first-audio stage
_COUNTERS = {
    "gaps": "omni_webrtc_playout_gap_frames_total",
    "first_audio_s": 'omni_turn_stage_seconds_sum{stage="vad_end_to_first_audio"}',
    "first_audio_n": 'omni_turn_stage_seconds_count{stage="vad_end_to_first_audio"}',
    "speculation_hits": 'omni_speculations_total{outcome="hit"}',
    "speculation_misses": 'omni_speculations_total{outcome="miss"}',
}


async def _server_counters(metrics_url: str) -> dict[str, float] | None:
    try:
        async with httpx.AsyncClient(timeout=10) as http:
            text = (await http.get(metrics_url)).text
    except httpx.HTTPError:
        return None
    values = dict(line.rsplit(" ", 1) for line in text.splitlines() if line[:1] not in "#")
    if _COUNTERS["gaps"] not in values:
        return None  # not a server with WebRTC calls
    # a labelled series appears with its first observation
    return {key: float(values.get(name, 0)) for key, name in _COUNTERS.items()}


async def run_level(
    url: str,
    key: str | None,
    calls: int,
    turns: int,
    max_tokens: int,
    wait: float,
    pid: int | None,
    metrics_url: str,
) -> LevelResult:
    utterance = speech()
    load = os.getloadavg()[0]
    before = await _server_counters(metrics_url)
    cpu_before, wall_before = _cpu_seconds(pid), time.monotonic()
    results = await asyncio.gather(
        *(_one_call(url, key, utterance, turns, max_tokens, wait) for _ in range(calls))
    )
    cpu_after, wall = _cpu_seconds(pid), time.monotonic() - wall_before
    after = await _server_counters(metrics_url)
    latencies = sorted(ms for r in results for ms in r.latencies_ms)
    delta = {k: after[k] - before[k] for k in after} if before and after else None
    jitter = [j for r in results for j in _jitter_ms(r.arrivals)]

    def pct(values: list[float], q: float) -> float | None:
        return float(np.percentile(values, q)) if values else None

    def per_call(which: int) -> float | None:
        if cpu_before is None or cpu_after is None:
            return None
        return 100.0 * (cpu_after[which] - cpu_before[which]) / wall / calls

    return LevelResult(
        calls=calls,
        turns=len(latencies),
        failed_turns=sum(len(r.failed_turns) for r in results),
        failed_calls=sum(r.error is not None for r in results),
        p50_ms=statistics.median(latencies) if latencies else None,
        p95_ms=pct(latencies, 95),
        jitter_p95_ms=pct(jitter, 95),
        jitter_max_ms=max(jitter) if jitter else None,
        reply_audio_s=sum(r.reply_frames for r in results) * FRAME / 48_000,
        gap_frames=int(delta["gaps"]) if delta else None,
        server_first_audio_ms=(
            1000 * delta["first_audio_s"] / delta["first_audio_n"]
            if delta and delta["first_audio_n"]
            else None
        ),
        speculation_hit_rate=(
            delta["speculation_hits"] / (delta["speculation_hits"] + delta["speculation_misses"])
            if delta and delta["speculation_hits"] + delta["speculation_misses"]
            else None
        ),
        cpu_per_call_pct=per_call(0),
        gateway_cpu_per_call_pct=per_call(1),
        load_average=load,
        errors=sorted({e for r in results for e in [r.error, *r.failed_turns] if e}),
    )


# -- server CPU from /proc (Linux)


def _cpu_seconds(pid: int | None) -> tuple[float, float] | None:
    """(CPU seconds of `pid` and its descendants, of `pid` alone), or None if unreadable."""
    if pid is None:
        return None
    try:
        found = {int(p): _stat(p) for p in os.listdir("/proc") if p.isdigit()}
    except OSError:
        return None
    stats = {p: s for p, s in found.items() if s is not None}
    if pid not in stats:
        return None
    tree, frontier = {pid}, [pid]
    while frontier:
        parent = frontier.pop()
        children = [p for p, (ppid, _) in stats.items() if ppid == parent and p not in tree]
        tree.update(children)
        frontier.extend(children)
    return sum(stats[p][1] for p in tree), stats[pid][1]


def _stat(pid: str) -> tuple[int, float] | None:
    """(parent pid, user + system CPU seconds) of one process."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2 :].split()  # the name may hold spaces and parens
    ticks = os.sysconf("SC_CLK_TCK")
    return int(fields[1]), (int(fields[11]) + int(fields[12])) / ticks


def _listening_pid(port: int) -> int | None:
    """The local process listening on TCP `port` (same user), from /proc."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            parts = line.split()
            if int(parts[1].rsplit(":", 1)[1], 16) == port and parts[3] == "0A":  # LISTEN
                inodes.add(f"socket:[{parts[9]}]")
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
            if any(os.readlink(f"/proc/{pid}/fd/{fd}") in inodes for fd in fds):
                return int(pid)
        except OSError:
            continue
    return None


# -- the command


def table(levels: list[LevelResult]) -> str:
    def f(value: float | None) -> str:
        return "-" if value is None else f"{value:.0f}"

    def f1(value: float | None) -> str:
        return "-" if value is None else f"{value:.1f}"

    rows = [
        (
            "calls",
            "turns",
            "failed turns",
            "failed calls",
            "p50 ms",
            "p95 ms",
            "jitter p95 ms",
            "jitter max ms",
            "server first audio ms",
            "reply s",
            "gap frames",
            "spec hit %",
            "CPU/call %",
            "gateway CPU/call %",
            "load",
        )
    ]
    for r in levels:
        rows.append(
            (
                str(r.calls),
                str(r.turns),
                str(r.failed_turns),
                str(r.failed_calls),
                f(r.p50_ms),
                f(r.p95_ms),
                f1(r.jitter_p95_ms),
                f1(r.jitter_max_ms),
                f(r.server_first_audio_ms),
                f1(r.reply_audio_s),
                "-" if r.gap_frames is None else str(r.gap_frames),
                "-" if r.speculation_hit_rate is None else f(100 * r.speculation_hit_rate),
                f1(r.cpu_per_call_pct),
                f1(r.gateway_cpu_per_call_pct),
                f1(r.load_average),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.rjust(w) for cell, w in zip(row, widths)) for row in rows]
    for r in levels:
        lines += [f"  {r.calls} calls: {error}" for error in r.errors]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    url = args.url.rstrip("/")
    pid = args.server_pid
    if pid is None and httpx.URL(url).host in ("127.0.0.1", "localhost"):
        pid = _listening_pid(httpx.URL(url).port or 80)
    key = args.api_key or os.environ.get("OMNI_API_KEY")
    levels = []
    for calls in args.calls:
        level = run_level(
            url, key, calls, args.turns, args.max_tokens, args.reply_timeout, pid, args.metrics_url
        )
        levels.append(asyncio.run(level))
        print(table(levels[-1:]), flush=True)
    print()
    print(table(levels))
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(level) for level in levels], indent=2))
        print(f"wrote {args.json}")
    return 0 if all(level.failed_calls + level.failed_turns == 0 for level in levels) else 1


def add_calls_command(actions: argparse._SubParsersAction) -> None:
    bench = actions.add_parser(
        "calls", help="N simultaneous WebRTC calls with spoken turns against a running server"
    )
    bench.add_argument("--url", default="http://127.0.0.1:8000", help="the server's base URL")
    bench.add_argument(
        "--metrics-url",
        default="http://127.0.0.1:9464/metrics",
        help="the server's /metrics listener (its metrics_port)",
    )
    bench.add_argument(
        "--calls",
        type=int,
        nargs="+",
        default=[1],
        help="simultaneous calls; several: one run each",
    )
    bench.add_argument("--turns", type=int, default=3, help="spoken turns per call (default 3)")
    bench.add_argument(
        "--max-tokens", type=int, default=16, help="cap on each reply's text tokens (default 16)"
    )
    bench.add_argument(
        "--reply-timeout",
        type=float,
        default=120.0,
        help="seconds a turn may wait for its reply (a loaded CPU server is slow; default 120)",
    )
    bench.add_argument("--api-key", help="API key (default: $OMNI_API_KEY; none if auth is off)")
    bench.add_argument(
        "--server-pid", type=int, help="the server's pid for CPU (default: found by its port)"
    )
    bench.add_argument("--json", help="also write the results to this JSON file")
    bench.set_defaults(run=run)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="omni bench")
    add_calls_command(parser.add_subparsers(dest="action", required=True))
    args = parser.parse_args(argv)
    return args.run(args)
