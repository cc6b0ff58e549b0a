"""A session's input transcription settings: both wire shapes, echoed back, and every bad
value refused naming its field (the whole update then changes nothing)."""

from __future__ import annotations

from typing import Any

import pytest

from omni.session.client_events import parse_client_event
from omni.session.config import SessionConfig
from omni.session.errors import RealtimeError
from omni.settings import Settings


def updated(session: dict[str, Any], config: SessionConfig | None = None) -> SessionConfig:
    """A session.update through the event parser and the config, as the server takes it."""
    config = config or SessionConfig.from_settings(Settings())
    return config.updated(parse_client_event({"type": "session.update", "session": session}).session)


def test_ga_and_beta_fields_set_it_and_null_turns_it_off() -> None:
    asked = {"model": "gpt-4o-transcribe", "language": "DE"}
    ga = updated({"audio": {"input": {"transcription": asked}}})
    assert ga.transcription is not None and ga.transcription.language == "de"
    wire = ga.to_wire("ga", "sess_1", 0)["audio"]["input"]["transcription"]
    assert wire == {"model": "gpt-4o-transcribe", "language": "de"}  # no nulls added

    beta = updated({"input_audio_transcription": {"prompt": "Ada"}})
    assert beta.to_wire("beta", "sess_1", 0)["input_audio_transcription"] == {
        "model": "whisper-1",
        "prompt": "Ada",
    }
    # other fields leave it alone; null switches it off
    assert updated({"instructions": "hi"}, ga).transcription == ga.transcription
    assert updated({"audio": {"input": {"transcription": None}}}, ga).transcription is None


@pytest.mark.parametrize(
    ("transcription", "param"),
    [
        ({"language": "klingon"}, "session.audio.input.transcription.language"),
        ({"language": 7}, "session.audio.input.transcription.language"),
        ({"model": ["whisper-1"]}, "session.audio.input.transcription.model"),
        ({"prompt": "x" * 5000}, "session.audio.input.transcription.prompt"),
    ],
)
def test_bad_values_are_refused_naming_the_field(
    transcription: dict[str, Any], param: str
) -> None:
    with pytest.raises(RealtimeError) as refused:
        updated({"voice": "Ethan", "audio": {"input": {"transcription": transcription}}})
    assert refused.value.code == "invalid_value" and refused.value.param == param
