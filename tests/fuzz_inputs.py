"""Generated client input for the fuzz and soak suites (hypothesis strategies).

Three kinds, each mixing well-formed and broken input:
- `ws_messages`: WebSocket text messages: realtime events with the right shape and random
  values, events with random fields, and text that is not an event at all (broken JSON,
  deep nesting, NaN, wrong types, huge strings);
- `sdp_offers`: real offers (one made by aiortc, one shaped as Chromium writes them) with
  lines deleted, duplicated, swapped, replaced by unusual but legal ones, or cut short;
- `http_requests`: any method on every route, with or without a key, any content type,
  any body.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from typing import Any

from hypothesis import strategies as st

from omni.session.client_events import EVENT_TYPES

API_KEY = "test-key"

json_leaf = (
    st.none()
    | st.booleans()
    | st.integers(-(2**40), 2**40)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=16)
)
json_value = st.recursive(
    json_leaf,
    lambda inner: st.lists(inner, max_size=4)
    | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
# field names the events and sessions know, so random values land where they are checked
KNOWN_FIELDS = [
    "session", "audio", "image", "item", "item_id", "content_index", "audio_end_ms", "response",
    "response_id", "previous_item_id", "event_id", "type", "instructions", "voice", "modalities",
    "output_modalities", "turn_detection", "input_audio_format", "tools", "max_output_tokens",
]


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


audio_payload = st.one_of(
    st.binary(max_size=4800).map(_b64),
    st.text(max_size=64),  # not base64
    st.just(_b64(b"\x00")),  # an odd number of pcm16 bytes
    json_value,
)
content_part = st.fixed_dictionaries(
    {"type": st.sampled_from(["input_text", "input_audio", "input_image", "text", "bogus"])},
    optional={
        "text": st.one_of(st.text(max_size=64), json_value),
        "audio": audio_payload,
        "image_url": st.one_of(
            st.just("data:image/png;base64,iVBORw0KGgo="),
            st.binary(max_size=256).map(lambda b: "data:image/jpeg;base64," + _b64(b)),
            st.text(max_size=32),
        ),
    },
)
session_fields = st.fixed_dictionaries(
    {},
    optional={
        "type": st.sampled_from(["realtime", "transcription", 3]),
        "instructions": st.one_of(st.text(max_size=64), json_value),
        "voice": st.sampled_from(["Ethan", "chelsie", "alloy", "", "x" * 300]),
        "output_modalities": st.lists(st.sampled_from(["text", "audio", "video"]), max_size=3),
        "modalities": st.lists(st.sampled_from(["text", "audio"]), max_size=3),
        "input_audio_format": st.sampled_from(["pcm16", "pcm", "g711_ulaw", "flac", ""]),
        "turn_detection": st.one_of(
            st.none(),
            st.fixed_dictionaries(
                {},
                optional={
                    "type": st.sampled_from(["server_vad", "semantic_vad", "none"]),
                    "threshold": st.one_of(st.floats(-1, 2), st.text(max_size=4)),
                    "silence_duration_ms": st.one_of(st.integers(-10, 20_000), st.just("500")),
                    "create_response": st.one_of(st.booleans(), st.integers()),
                },
            ),
        ),
        "audio": st.fixed_dictionaries(
            {},
            optional={
                "input": st.fixed_dictionaries(
                    {}, optional={"format": st.dictionaries(st.sampled_from(["type", "rate"]),
                                                            json_leaf, max_size=2)}
                ),
                "output": st.fixed_dictionaries(
                    {}, optional={"speed": json_leaf, "voice": st.text(max_size=8)}
                ),
            },
        ),
        "max_output_tokens": st.one_of(st.integers(-5, 5000), st.just("inf"), st.just("10")),
        "tools": st.lists(json_value, max_size=2),
    },
)
shaped_event = st.one_of(
    st.fixed_dictionaries({"type": st.just("session.update"), "session": session_fields}),
    st.fixed_dictionaries({"type": st.just("input_audio_buffer.append"), "audio": audio_payload}),
    st.sampled_from([{"type": "input_audio_buffer.commit"}, {"type": "input_audio_buffer.clear"},
                     {"type": "response.cancel"}, {"type": "output_audio_buffer.clear"}]),
    st.fixed_dictionaries({"type": st.just("input_image_buffer.append"), "image": audio_payload}),
    st.fixed_dictionaries(
        {
            "type": st.just("conversation.item.create"),
            "item": st.fixed_dictionaries(
                {"type": st.sampled_from(["message", "function_call"]),
                 "role": st.sampled_from(["user", "assistant", "system", None])},
                optional={"content": st.lists(content_part, max_size=3),
                          "id": st.text(max_size=70)},
            ),
        },
        optional={"previous_item_id": st.one_of(st.none(), st.text(max_size=8))},
    ),
    st.fixed_dictionaries(
        {"type": st.sampled_from(["conversation.item.truncate", "conversation.item.delete",
                                  "conversation.item.retrieve"])},
        optional={
            "item_id": st.one_of(st.text(max_size=12), json_leaf),
            "content_index": st.one_of(st.integers(-2, 3), st.just("0")),
            "audio_end_ms": st.one_of(st.integers(-5, 10**9), st.floats(allow_nan=False)),
        },
    ),
    st.fixed_dictionaries(
        {"type": st.just("response.create")},
        optional={"response": st.one_of(
            st.none(),
            st.fixed_dictionaries({}, optional={
                "output_modalities": st.lists(st.sampled_from(["text", "audio"]), max_size=2),
                "instructions": st.text(max_size=32),
                "max_output_tokens": st.one_of(st.integers(1, 8), st.just("inf")),
                "conversation": st.sampled_from(["auto", "none"]),
                "metadata": st.dictionaries(st.text(max_size=8), json_leaf, max_size=2),
            }),
            json_value,
        )},
    ),
)
random_event = st.builds(
    lambda kind, fields: {"type": kind, **fields},
    st.sampled_from(sorted(EVENT_TYPES) + ["bogus", "", "response.audio.delta"]),
    st.dictionaries(st.sampled_from(KNOWN_FIELDS), json_value, max_size=4),
)


def _with_event_id(event: dict[str, Any], event_id: str | None) -> dict[str, Any]:
    return event if event_id is None else {**event, "event_id": event_id}


broken_text = st.one_of(
    st.text(max_size=64),
    json_value.map(json.dumps),  # JSON, but rarely an object with a type
    st.integers(1, 5000).map(lambda n: '{"type": "session.update", "session": ' + "[" * n),
    st.integers(30, 3000).map(lambda n: "[" * n + "]" * n),
    st.sampled_from([
        '{"type": "session.update", "session": {"audio": {"output": {"speed": NaN}}}}',
        '{"type": "conversation.item.truncate", "item_id": "x", "content_index": 1e400}',
        '{"type": "session.update", "session": {"max_output_tokens": ' + "9" * 5000 + "}}",
        '{"type": "' + "t" * 100_000 + '"}',
        '{"type": "session.update", "session": {"model": "' + "m" * 200_000 + '"}}',
        '{"type": "input_audio_buffer.append", "audio": "' + "A" * 400_000 + '"}',
        '{"type": null}', "[]", "null", '"text"', "{}", '"\\ud800"',
    ]),
)
ws_messages = st.one_of(
    st.builds(_with_event_id, shaped_event, st.one_of(st.none(), st.text(max_size=12)))
    .map(json.dumps),
    random_event.map(json.dumps),
    broken_text,
)

# -- SDP

def _transport(mid: int) -> list[str]:
    """A media section's ICE and DTLS lines, as Chromium repeats them in each."""
    return [
        "c=IN IP4 0.0.0.0",
        "a=ice-ufrag:Ab3d",
        "a=ice-pwd:0123456789abcdefghijklmn",
        "a=ice-options:trickle",
        "a=fingerprint:sha-256 " + ":".join(["AB"] * 32),
        "a=setup:actpass",
        f"a=mid:{mid}",
    ]


CHROMIUM_LIKE_OFFER = "\r\n".join([
    "v=0",
    "o=- 4611731400430051336 2 IN IP4 127.0.0.1",
    "s=-",
    "t=0 0",
    "a=group:BUNDLE 0 1 2",
    "a=extmap-allow-mixed",
    "a=msid-semantic: WMS stream",
    "m=audio 9 UDP/TLS/RTP/SAVPF 111 63 9 0 8 13 110 126",
    *_transport(0),
    "a=rtcp:9 IN IP4 0.0.0.0",
    "a=extmap:1 urn:ietf:params:rtp-hdrext:ssrc-audio-level",
    "a=sendrecv",
    "a=msid:stream track-audio",
    "a=rtcp-mux",
    "a=rtpmap:111 opus/48000/2",
    "a=rtcp-fb:111 transport-cc",
    "a=fmtp:111 minptime=10;useinbandfec=1",
    "a=rtpmap:63 red/48000/2",
    "a=fmtp:63 111/111",
    "a=rtpmap:9 G722/8000",
    "a=rtpmap:0 PCMU/8000",
    "a=rtpmap:8 PCMA/8000",
    "a=rtpmap:13 CN/8000",
    "a=rtpmap:110 telephone-event/48000",
    "a=rtpmap:126 telephone-event/8000",
    "a=ssrc:1001 cname:caller",
    "m=video 9 UDP/TLS/RTP/SAVPF 96 97 102",
    *_transport(1),
    "a=rtcp:9 IN IP4 0.0.0.0",
    "a=sendrecv",
    "a=rtcp-mux",
    "a=rtcp-rsize",
    "a=rtpmap:96 VP8/90000",
    "a=rtcp-fb:96 nack",
    "a=rtcp-fb:96 nack pli",
    "a=rtpmap:97 rtx/90000",
    "a=fmtp:97 apt=96",
    "a=rtpmap:102 H264/90000",
    "a=fmtp:102 level-asymmetry-allowed=1;packetization-mode=1;profile-level-id=42001f",
    "a=ssrc-group:FID 2001 2002",
    "a=ssrc:2001 cname:caller",
    "a=ssrc:2002 cname:caller",
    "m=application 9 UDP/DTLS/SCTP webrtc-datachannel",
    *_transport(2),
    "a=sctp-port:5000",
    "a=max-message-size:262144",
    "",
])
# unusual but legal lines (and a few illegal ones) to splice into offers
ODD_LINES = [
    "a=group:BUNDLE 0", "a=group:BUNDLE 0 1 2 3", "a=group:LS 0 1", "a=mid:0", "a=mid:",
    "a=mid:0", "a=mid:x y", "a=sendonly", "a=recvonly", "a=inactive", "a=setup:active",
    "a=setup:passive", "a=setup:holdconn", "m=audio 0 UDP/TLS/RTP/SAVPF 111",
    "m=audio 9 UDP/TLS/RTP/SAVPF 0", "m=video 9 UDP/TLS/RTP/SAVPF 45", "m=text 9 RTP/AVP 98",
    "m=application 9 UDP/DTLS/SCTP webrtc-datachannel", "m=audio 9 RTP/AVP 0",
    "a=rtpmap:111 opus/48000", "a=rtpmap:96 AV1/90000", "a=rtpmap:45 AV1/90000",
    "a=rtpmap:98 t140/1000", "a=rtpmap:111 L16/44100/2", "a=fmtp:111 stereo=1;sprop-stereo=1",
    "a=fingerprint:sha-1 00", "a=fingerprint:sha-256 zz", "a=ice-ufrag:", "a=ice-pwd:x",
    "a=ice-lite", "a=candidate:1 1 udp 2130706431 127.0.0.1 9 typ host", "a=end-of-candidates",
    "a=extmap:15 urn:example", "a=rtcp-mux-only", "a=sctp-port:0", "a=max-message-size:0",
    "a=sctpmap:5000 webrtc-datachannel 1024", "a=ssrc:1 cname:x", "a=simulcast:send 1;2",
    "a=rid:1 send", "c=IN IP6 ::", "b=AS:30", "a=msid:- -", "i=", "x", "",
]


@dataclass(frozen=True)
class Mutation:
    op: str  # delete, duplicate, swap, insert, replace, truncate
    at: int
    other: int
    line: str


mutations = st.lists(
    st.builds(
        Mutation,
        st.sampled_from(["delete", "duplicate", "swap", "insert", "replace", "truncate"]),
        st.integers(0, 200),
        st.integers(0, 200),
        st.one_of(st.sampled_from(ODD_LINES), st.text(max_size=24)),
    ),
    min_size=1,
    max_size=6,
)


def mutate(offer: str, steps: list[Mutation]) -> str:
    lines = offer.split("\r\n")
    for step in steps:
        i, j = step.at % max(len(lines), 1), step.other % max(len(lines), 1)
        if step.op == "delete" and lines:
            del lines[i]
        elif step.op == "duplicate" and lines:
            lines.insert(i, lines[i])
        elif step.op == "swap" and lines:
            lines[i], lines[j] = lines[j], lines[i]
        elif step.op == "insert":
            lines.insert(i, step.line)
        elif step.op == "replace" and lines:
            lines[i] = step.line
        elif step.op == "truncate":
            lines = lines[: i + 1]
    return "\r\n".join(lines)


def sdp_offers(bases: list[str]) -> st.SearchStrategy[str]:
    return st.one_of(
        st.sampled_from(bases),
        st.builds(mutate, st.sampled_from(bases), mutations),
        st.builds(lambda base, n: base + "".join(
            f"m=audio 9 UDP/TLS/RTP/SAVPF 111\r\na=mid:{100 + k}\r\n" for k in range(n)
        ), st.sampled_from(bases), st.integers(1, 20)),
    )


# -- HTTP

PATHS = [
    "/healthz", "/livez", "/metrics", "/v1/realtime/client_secrets", "/v1/realtime/calls",
    "/v1/realtime/calls/config", "/v1/realtime/calls/rtc_nosuchcall", "/", "/web/index.html",
    "/web/../pyproject.toml", "/web/%2e%2e/x", "/nope", "/v1/realtime", "/v1/realtime/calls/",
]
# printable ASCII without spaces at the ends (which clients strip or refuse to send)
header_text = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=40)


@dataclass(frozen=True)
class HttpRequest:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


http_requests = st.builds(
    HttpRequest,
    st.sampled_from(["GET", "POST", "DELETE", "PUT", "PATCH", "OPTIONS", "HEAD"]),
    st.sampled_from(PATHS),
    st.fixed_dictionaries(
        {},
        optional={
            "Authorization": st.sampled_from([f"Bearer {API_KEY}", "Bearer nope", "Basic x", ""]),
            "Content-Type": st.one_of(
                st.sampled_from(["application/sdp", "application/json", "text/plain",
                                 "application/sdp; charset=utf-8", ""]),
                header_text,
            ),
            "OpenAI-Beta": st.sampled_from(["realtime=v1", ""]),
            "X-Junk": header_text,
        },
    ),
    st.one_of(
        st.binary(max_size=256),
        json_value.map(lambda v: json.dumps(v).encode()),
        st.builds(
            lambda s: json.dumps({"session": s, "expires_after": {"seconds": 60}}).encode(),
            session_fields,
        ),
        st.just(CHROMIUM_LIKE_OFFER.encode()),
    ),
)
