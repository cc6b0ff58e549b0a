"""Checks of the JSON `omni bench engine --sessions` writes (its shape is a contract)."""

from __future__ import annotations

RUN_KEYS = {"codec_tokens_per_s", "first_audio_ms", "rtf_p95"}


def check_run(run: dict) -> None:
    assert RUN_KEYS <= set(run)
    assert isinstance(run["codec_tokens_per_s"], float) and run["codec_tokens_per_s"] > 0
    assert set(run["first_audio_ms"]) == {"p50", "p95"}
    assert 0 < run["first_audio_ms"]["p50"] <= run["first_audio_ms"]["p95"]
    assert isinstance(run["rtf_p95"], float) and run["rtf_p95"] > 0


def check_result(result: dict, sessions: int) -> None:
    """The shape the issue asks for, plus the staggered runs and the profile; every reply
    equal to generate()'s."""
    assert result["sessions"] == sessions
    for mode in ("batched", "unbatched"):
        check_run(result[mode])
        check_run(result["staggered"][mode])
        assert result["profile"][mode]["thinker_prefill_ms"] is not None
    assert result["matches_reference"] is True, result["mismatched"]
