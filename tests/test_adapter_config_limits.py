"""Adapter configs that would hold a server: tenants' regexes (matched by RE2, in linear time;
what RE2 cannot run is refused naming it) and JSON nested too deeply."""

from __future__ import annotations

import json
import re
import threading
from pathlib import Path

import pytest
import test_adapter_format
from test_adapter_format import Q0, edit_config, load

from cotune.adapters.peft_format import AdapterError

adapter_dir = test_adapter_format.adapter_dir  # the fixture: a real PEFT adapter

# Python's `re` backtracks on these for minutes to hours per module path; RE2 runs in linear time.
LOOKAHEAD_BOMB = r"model\.layers\.\d+\.(?=s)(.*.*)*Z"
BACKTRACKING_BOMB = r"model\.layers\.\d+\.(.*.*)*Z"


def outcome_within(seconds: float, call):
    """The exception that call() raised (None if it returned), asserting that it finished within
    `seconds`: a deadline against a hang, far above the time it takes."""
    outcome = []

    def run():
        try:
            call()
            outcome.append(None)
        except Exception as e:  # noqa: BLE001 - the test asserts what it was
            outcome.append(e)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout=seconds)
    assert not thread.is_alive(), f"still running after {seconds} s"
    return outcome[0]


@pytest.mark.parametrize("changes, what", [
    (dict(target_modules=LOOKAHEAD_BOMB), "target_modules"),
    (dict(exclude_modules=LOOKAHEAD_BOMB), "exclude_modules"),
    (dict(rank_pattern={LOOKAHEAD_BOMB: 4}), "rank_pattern key"),
    (dict(alpha_pattern={LOOKAHEAD_BOMB: 4}), "alpha_pattern key"),
    (dict(layers_to_transform=[0, 1], layers_pattern=LOOKAHEAD_BOMB), "layers_pattern"),
])
def test_a_regex_with_lookaround_is_refused_at_once_naming_it(adapter_dir, changes, what):
    edit_config(adapter_dir, **changes)
    error = outcome_within(10, lambda: load(adapter_dir))
    assert isinstance(error, AdapterError)
    assert f"invalid regex in {what}: {LOOKAHEAD_BOMB!r} (invalid perl operator: (?=)" in str(error)
    assert str(error).endswith("accepted: a regex of at most 4096 characters in RE2 syntax "
                               "(Python's, without lookahead, lookbehind or backreferences)")


@pytest.mark.parametrize("changes, refusal", [
    (dict(target_modules=BACKTRACKING_BOMB), "matches no module of the base model"),
    (dict(exclude_modules=BACKTRACKING_BOMB), None),
    (dict(rank_pattern={BACKTRACKING_BOMB: 4}), None),
    (dict(alpha_pattern={BACKTRACKING_BOMB: 4}), None),
    (dict(layers_to_transform=[0, 1], layers_pattern=r"(.*.*)*Z"),
     "but its target_modules do not select it"),
])
def test_a_backtracking_regex_is_matched_at_once(adapter_dir, changes, refusal):
    edit_config(adapter_dir, **changes)
    error = outcome_within(10, lambda: load(adapter_dir))
    if refusal is None:
        assert error is None  # it matches no module: every module keeps its r and lora_alpha
    else:
        assert isinstance(error, AdapterError) and refusal in str(error)


@pytest.mark.parametrize("layers_pattern", ["(layers|h)", "(?P<idx>layers)"])
def test_a_layers_pattern_with_groups_of_its_own_reads_the_layer_index(adapter_dir,
                                                                        layers_pattern):
    edit_config(adapter_dir, layers_to_transform=[0, 1], layers_pattern=layers_pattern)
    assert Q0 in load(adapter_dir).modules
    edit_config(adapter_dir, layers_to_transform=[0])  # now layer 1's weights are not targeted
    with pytest.raises(AdapterError, match="but its target_modules do not select it"):
        load(adapter_dir)


def test_a_regex_longer_than_4096_characters_is_refused(adapter_dir):
    edit_config(adapter_dir, target_modules="|".join(["q_proj"] * 700))
    with pytest.raises(AdapterError, match=re.escape(
            "has a regex of 4899 characters in target_modules: 'q_proj|q_proj|")):
        load(adapter_dir)


def with_task_type_nested(adapter_dir: Path, depth: int) -> None:
    """task_type (an inert option) becomes a list nested `depth` levels deep, inside the config's
    own object: the file nests depth + 1 levels."""
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    config["task_type"] = "@"
    text = json.dumps(config).replace('"@"', "[" * depth + "]" * depth)
    (adapter_dir / "adapter_config.json").write_text(text)


@pytest.mark.parametrize("depth", [100, 100_000])
def test_a_config_nested_too_deeply_is_refused(adapter_dir, depth):
    with_task_type_nested(adapter_dir, depth)
    with pytest.raises(AdapterError, match=re.escape(
            "has an invalid adapter_config.json: JSON nested too deeply (more than 100 levels of "
            "arrays and objects); accepted: at most 100 levels")):
        load(adapter_dir)


def test_a_config_nested_100_levels_deep_is_read(adapter_dir):
    with_task_type_nested(adapter_dir, 99)
    assert json.dumps(load(adapter_dir).config["task_type"]) == "[" * 99 + "]" * 99
