"""The `omni` command line.

Each command group registers itself on the top-level subparsers through one `add_*_commands`
function listed in COMMAND_GROUPS, and sets `run` (args -> exit code) on its leaf parsers.
Errors a user can fix (CheckpointError, an existing directory) print one line, no traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path

from omni.checkpoints.errors import CheckpointError
from omni.checkpoints.hub import cached_snapshot
from omni.checkpoints.loader import resolve_model
from omni.checkpoints.presets import load_presets
from omni.checkpoints.tiny_cache import TINY_VARIANTS, default_tiny_dir, is_tiny_checkpoint

Subparsers = argparse._SubParsersAction


def _models_list(args: argparse.Namespace) -> int:
    rows = [("NAME", "SOURCE", "LOCAL", "DESCRIPTION")]
    for preset in load_presets().values():
        if preset.hub_id:
            local = "yes" if cached_snapshot(preset.hub_id) else "no"
        else:
            local = "yes" if is_tiny_checkpoint(default_tiny_dir(preset.make)) else "no (made on first use)"
        rows.append((preset.name, preset.source, local, preset.description))
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + row[3])
    return 0


def _models_make_tiny(args: argparse.Namespace) -> int:
    # imported here: torch and transformers take seconds to import, other commands skip them
    from omni.checkpoints.tiny import make_tiny_checkpoint

    path = make_tiny_checkpoint(
        args.dir or default_tiny_dir(args.variant), overwrite=args.force, variant=args.variant
    )
    print(path)
    return 0


def _models_fetch(args: argparse.Namespace) -> int:
    resolved = resolve_model(args.model)
    print(resolved.path)
    return 0


def add_models_commands(commands: Subparsers) -> None:
    models = commands.add_parser("models", help="model presets and checkpoints")
    actions = models.add_subparsers(dest="action", required=True, metavar="ACTION")

    listing = actions.add_parser("list", help="list the presets and whether each is here already")
    listing.set_defaults(run=_models_list)

    tiny = actions.add_parser(
        "make-tiny", help="write a tiny random-weight checkpoint (for tests)"
    )
    tiny.add_argument(
        "--variant",
        choices=TINY_VARIANTS,
        default="tiny",
        help="tiny: Qwen2.5-Omni; tiny-7b-speech: with the 7B's speech sizes; "
        "tiny-qwen3-omni: Qwen3-Omni (default: tiny)",
    )
    tiny.add_argument("dir", nargs="?", type=Path, help="target directory (default: the cache)")
    tiny.add_argument("--force", action="store_true", help="replace a tiny checkpoint in DIR")
    tiny.set_defaults(run=_models_make_tiny)

    fetch = actions.add_parser(
        "fetch", help="resolve a model (preset, directory, hub id, auto), download it if needed"
    )
    fetch.add_argument("model", help="preset name, checkpoint directory, hub id or 'auto'")
    fetch.set_defaults(run=_models_fetch)


def _serve(args: argparse.Namespace) -> int:
    from pydantic import ValidationError
    from pydantic_settings import SettingsError

    from omni.checkpoints.whisper import resolve_transcriber
    from omni.engine.engine import EngineConfig, resolve_devices, running_engine
    from omni.engine.transcriber import Transcriber, TranscriberOptions
    from omni.gateway.serve import run_server
    from omni.logs import configure_logging
    from omni.settings import Settings

    try:
        source = args.settings_source(parsed_args=args)
        settings = Settings(_cli_settings_source=source)  # type: ignore[call-arg]
    except (ValidationError, SettingsError) as error:
        print(f"omni serve: invalid settings: {error}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level, settings.log_format, settings.secrets())
    # the workers are processes of their own that read these from the environment
    os.environ.update(
        OMNI_LOG_LEVEL=settings.log_level.upper(),
        OMNI_LOG_FORMAT=settings.log_format,
        OMNI_CPU_THREADS=str(settings.cpu_threads),
    )
    resolved = resolve_model(settings.model)
    thinker_device, talker_device = resolve_devices(settings.device, settings.talker_device)
    config = EngineConfig(
        model_path=str(resolved.path),
        thinker_device=thinker_device,
        talker_device=talker_device,
        dtype=settings.dtype,
        max_codec_tokens=resolved.max_codec_tokens,
        max_frame_side=settings.engine_max_frame_side,
        vocoder_steps=settings.vocoder_steps,
        vocoder_first_chunk_steps=settings.vocoder_first_chunk_steps,
        start_timeout_s=settings.engine_start_timeout_seconds,
        heartbeat_timeout_s=settings.engine_heartbeat_timeout_seconds,
        replay_max_bytes=int(settings.engine_replay_max_mb * 1e6),
        vocoder_solver=settings.vocoder_solver,
        kv_slots=settings.max_sessions,
        max_context_tokens=settings.max_context_tokens,
        context_budget_tokens=settings.context_budget_tokens,
        reply_reserve_tokens=settings.reply_reserve_tokens,
        step_token_budget=settings.step_token_budget,
        max_batch=settings.max_batch,
        attn_implementation=settings.attn_implementation,
        cuda_graphs=settings.cuda_graphs,
    )
    logging.getLogger("omni").info(
        "model %s (%s); thinker on %s, talker on %s", resolved.name, resolved.path, thinker_device, talker_device
    )
    whisper = resolve_transcriber(settings.transcriber_model, resolved.is_tiny)
    transcriber_factory = None
    if whisper is not None:
        options = TranscriberOptions(
            model_path=str(whisper.path),
            device=settings.transcriber_device or thinker_device,
            dtype=settings.dtype,
            queue_max=settings.transcription_queue_max,
            start_timeout_s=settings.engine_start_timeout_seconds,
            heartbeat_timeout_s=settings.engine_heartbeat_timeout_seconds,
        )
        transcriber_factory = partial(Transcriber, options)
    logging.getLogger("omni").info(
        "transcriber: %s", f"{whisper.name} ({whisper.path})" if whisper else "off"
    )
    run_server(
        settings, lambda: running_engine(config), transcriber_factory, resolved.family.voices
    )
    return 0


def add_serve_commands(commands: Subparsers) -> None:
    from pydantic_settings import CliSettingsSource

    from omni.settings import Settings

    serve = commands.add_parser(
        "serve",
        help="run the service (HTTP, WebSocket and WebRTC)",
        description="Run the service. Every setting can also come from an OMNI_* environment "
        "variable or a TOML file (--config); flags win over the environment, which wins over "
        "the file.",
    )
    # one flag per Settings field, derived from it (name, type, description, default)
    source: CliSettingsSource[Settings] = CliSettingsSource(
        Settings,
        root_parser=serve,
        cli_kebab_case=True,
        cli_show_env_vars=True,
        cli_hide_none_type=True,
    )
    serve.set_defaults(run=_serve, settings_source=source)


def add_bench_commands(commands: Subparsers) -> None:
    from omni.bench.calls import add_calls_command
    from omni.bench.engine import add_engine_command
    from omni.bench.long_call import add_long_call_command
    from omni.bench.turns import add_turns_command

    bench = commands.add_parser("bench", help="benchmarks (print a table, optionally write JSON)")
    actions = bench.add_subparsers(dest="action", required=True, metavar="BENCHMARK")
    add_engine_command(actions)
    add_calls_command(actions)
    add_long_call_command(actions)
    add_turns_command(actions)


COMMAND_GROUPS: tuple[Callable[[Subparsers], None], ...] = (
    add_models_commands,
    add_serve_commands,
    add_bench_commands,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="omni", description="Real-time voice and video calls with Qwen2.5-Omni."
    )
    # SUPPRESS: absent unless given, so `omni serve` can tell it from OMNI_LOG_LEVEL or its file
    parser.add_argument(
        "--log-level", default=argparse.SUPPRESS, help="logging level (default: INFO)"
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add_commands in COMMAND_GROUPS:
        add_commands(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = getattr(args, "log_level", "INFO")
    logging.basicConfig(level=level.upper(), format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.run(args)
    except (CheckpointError, FileExistsError) as error:
        print(f"omni: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
