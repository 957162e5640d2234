"""`cotune serve`'s serving targets: the engine's defaults, and bad values refused by the
parser, naming the flag, before anything loads."""

from __future__ import annotations

import argparse

import pytest

from cotune.engine.engine import EngineConfig
from cotune.server.options import add_serve_arguments


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="cotune serve")
    add_serve_arguments(parser)
    return parser.parse_args(argv)


def test_the_serving_targets_default_to_the_engines():
    args = parse()
    assert (args.ttft_target, args.tpot_target) == (EngineConfig.ttft_target_s,
                                                    EngineConfig.tpot_target_s)
    assert (parse("--ttft-target", "3", "--tpot-target", ".5").ttft_target,
            parse("--tpot-target", ".5").tpot_target) == (3.0, 0.5)


@pytest.mark.parametrize("flag", ["--ttft-target", "--tpot-target"])
@pytest.mark.parametrize("value", ["0", "-0.1", "soon", "inf", "nan"])
def test_a_target_that_is_not_seconds_above_zero_is_refused_naming_the_flag(flag, value,
                                                                            capsys):
    with pytest.raises(SystemExit) as refused:
        parse(flag, value)
    assert refused.value.code == 2
    error = capsys.readouterr().err
    assert f"argument {flag}" in error and "seconds above 0, such as 0.25" in error
