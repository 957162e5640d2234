"""`cotune serve`'s serving targets, engine threads and time slicing: the engine's defaults,
and bad values refused by the parser, naming the flag, before anything loads."""

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


def test_threads_and_time_slicing_default_to_the_engines():
    args = parse()
    assert (args.threads, args.time_slice) == (EngineConfig.num_threads,
                                               EngineConfig.time_slice_s) == (None, None)
    assert (parse("--threads", "2").threads, parse("--time-slice", "1.5").time_slice) == (2, 1.5)


@pytest.mark.parametrize("value", ["0", "-1", "1.5", "many"])
def test_threads_that_are_not_a_whole_number_above_zero_are_refused(value, capsys):
    with pytest.raises(SystemExit):
        parse("--threads", value)
    assert "argument --threads" in capsys.readouterr().err


@pytest.mark.parametrize("flag", ["--ttft-target", "--tpot-target", "--time-slice",
                                  "--health-stall-seconds"])
@pytest.mark.parametrize("value", ["0", "-0.1", "soon", "inf", "nan"])
def test_a_target_that_is_not_seconds_above_zero_is_refused_naming_the_flag(flag, value,
                                                                            capsys):
    with pytest.raises(SystemExit) as refused:
        parse(flag, value)
    assert refused.value.code == 2
    error = capsys.readouterr().err
    assert f"argument {flag}" in error and "seconds above 0, such as 0.25" in error


def test_training_threads_default_to_auto_and_take_zero_or_more():
    assert parse().training_threads is None  # the serve command picks the idle cores
    assert [parse("--training-threads", n).training_threads for n in ("0", "3")] == [0, 3]


@pytest.mark.parametrize("value", ["-1", "1.5", "all"])
def test_training_threads_that_are_not_a_whole_number_are_refused(value, capsys):
    with pytest.raises(SystemExit):
        parse("--training-threads", value)
    error = capsys.readouterr().err
    assert "argument --training-threads" in error and "whole number of 0 or more" in error


def test_logprobs_a_request_may_ask_for_are_bounded_by_default():
    assert parse().max_logprobs == 20
    assert parse("--max-logprobs", "0").max_logprobs == 0


def test_health_turns_not_serving_after_a_minute_of_a_wedged_engine_by_default():
    assert parse().health_stall_seconds == 60.0
    assert parse("--health-stall-seconds", "2.5").health_stall_seconds == 2.5


def test_tenant_isolation_defaults_to_the_engines_and_takes_zero_or_a_factor():
    assert parse().tenant_isolation == EngineConfig.tenant_isolation == 0
    assert [parse("--tenant-isolation", v).tenant_isolation for v in ("0", "1", "4")] == \
        [0.0, 1.0, 4.0]


@pytest.mark.parametrize("value", ["0.5", "-1", "inf", "nan", "fair"])
def test_a_tenant_isolation_below_one_or_not_a_number_is_refused(value, capsys):
    with pytest.raises(SystemExit):
        parse("--tenant-isolation", value)
    assert "0 or a factor of 1 or more, such as 1.5" in capsys.readouterr().err
