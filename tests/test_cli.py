"""The `cotune` command's parsers: every option of every command documented, with its
default."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from cotune.cli import build_parser


def _commands(parser: argparse.ArgumentParser, path: str = "cotune"):
    """(path, parser) of `parser` and of every subcommand under it, however deep."""
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _commands(sub, f"{path} {name}")


COMMANDS = dict(_commands(build_parser()))


@pytest.mark.parametrize("path", sorted(COMMANDS))
def test_every_option_of_every_command_has_a_help_line(path):
    parser = COMMANDS[path]
    undocumented = [action.option_strings[0] for action in parser._actions
                    if action.option_strings and not (action.help or "").strip()]
    assert undocumented == [], f"`{path}` options with no help: {undocumented}"
    parser.format_help()  # every help string formats: no stray % in them


def test_help_shows_the_defaults():
    serve = COMMANDS["cotune serve"].format_help()
    assert "paged KV cache holds, every sequence together (default: 16384)" in \
        " ".join(serve.split())
    generate = " ".join(COMMANDS["cotune generate"].format_help().split())
    assert "(as the wire contract's default) (default: 16)" in generate
    assert "--addr [ADDR], --server [ADDR]" in generate
    finetune = " ".join(COMMANDS["cotune finetune"].format_help().split())
    for flag in ("--schedule", "--warmup STEPS", "--max-length TOKENS",
                 "--grad-accumulation N", "--weight-decay", "--dropout"):
        assert flag in finetune


@pytest.mark.parametrize("command", ["serve", "route"])
def test_serve_and_route_offer_the_openai_http_api_off_by_default(command):
    shown = " ".join(COMMANDS[f"cotune {command}"].format_help().split())
    assert "--http-port PORT also serve the OpenAI-compatible HTTP API (/v1/...) and an " \
        "open /health" in shown
    assert build_parser().parse_args([command]).http_port is None
    assert build_parser().parse_args([command, "--http-port", "0"]).http_port == 0


def test_generate_asks_for_the_wire_contracts_16_tokens():
    """inference.proto: `optional int32 max_tokens = 1;  // [16]`."""
    proto = Path(__file__).parents[1] / "proto/cotune/v1/inference.proto"
    assert "optional int32 max_tokens = 1;  // [16]" in proto.read_text()
    args = build_parser().parse_args(["generate", "--addr", "h:1", "hi"])
    assert (args.max_tokens, args.addr) == (16, "h:1")
    assert build_parser().parse_args(["generate", "--server", "h:1", "hi"]).addr == "h:1"

