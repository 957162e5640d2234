"""Incremental detokenization with the real tokenizer of the embedded model: the streamed
deltas join to the tokenizer's own decode, cut before the first stop string."""

from __future__ import annotations

import random

import pytest
import transformers

from cotune.engine.detokenizer import IncrementalDetokenizer
from cotune.model.default_model import resolve_model_path

PROMPT = "<|im_start|>user\nWrite something.<|im_end|>\n<|im_start|>assistant\n"


@pytest.fixture(scope="module")
def tokenizer():
    path = resolve_model_path("default")  # converts the GGUF once into the cache
    return transformers.AutoTokenizer.from_pretrained(path)


def stream(tokenizer, ids, stop=(), prompt=PROMPT, skip_special_tokens=True, finish=True):
    """Feeds `ids` until the detokenizer stops; returns (deltas, tokens fed, detokenizer)."""
    prompt_ids = tokenizer.encode(prompt) if isinstance(prompt, str) else prompt
    detok = IncrementalDetokenizer(tokenizer, prompt_ids, stop=stop,
                                   skip_special_tokens=skip_special_tokens)
    deltas, fed = [], []
    for token in ids:
        if detok.stopped:
            break
        fed.append(token)
        deltas.append(detok.add(token))
    if finish:
        deltas.append(detok.finish())
    return deltas, fed, detok


def expected(tokenizer, ids, stop=(), skip_special_tokens=True) -> str:
    """The tokenizer's decode of `ids`, cut right before the first stop string."""
    text = tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
    cuts = [i for i in (text.find(s) for s in stop) if i >= 0]
    return text[:min(cuts)] if cuts else text


def check_invariant(tokenizer, ids, stop=(), prompt=PROMPT, skip_special_tokens=True):
    deltas, fed, detok = stream(tokenizer, ids, stop, prompt, skip_special_tokens)
    want = expected(tokenizer, fed, stop, skip_special_tokens)
    assert "".join(deltas) == want == detok.text
    full = tokenizer.decode(fed, skip_special_tokens=skip_special_tokens)
    assert detok.stopped == any(s in full for s in stop)
    return deltas, fed, detok


def test_emoji_and_cjk_split_across_tokens_arrive_whole(tokenizer):
    text = "Hi 😀👍🏽 世界和平 héllo"
    ids = tokenizer.encode(text)
    assert len(ids) > len(text.split()) + 8  # the characters really are split over tokens
    deltas, _, _ = check_invariant(tokenizer, ids)
    assert "".join(deltas) == text
    assert not any("\ufffd" in d for d in deltas)
    for char in "😀👍🏽世界和平é":
        assert any(d.endswith(char) for d in deltas), char


def test_each_delta_is_final_text_as_soon_as_its_characters_are_complete(tokenizer):
    ids = tokenizer.encode(" world 世")  # Ġworld, Ġ, ä¸, ĸ
    detok = IncrementalDetokenizer(tokenizer, tokenizer.encode(PROMPT))
    assert [detok.add(t) for t in ids] == [" world", " ", "", "世"]
    assert detok.finish() == "" and not detok.stopped


def test_leading_space_of_the_first_token_is_kept(tokenizer):
    ids = tokenizer.encode(" Hello there")
    deltas, _, _ = check_invariant(tokenizer, ids, prompt="Say:")
    assert deltas[0] == " Hello"


def test_special_tokens_are_skipped_or_kept_as_asked(tokenizer):
    ids = tokenizer.encode("Yes.<|im_end|>\n<|im_start|>user\nno") + [tokenizer.eos_token_id]
    deltas, _, _ = check_invariant(tokenizer, ids)
    assert "".join(deltas) == "Yes.\nuser\nno"
    deltas, _, _ = check_invariant(tokenizer, ids, skip_special_tokens=False)
    assert "".join(deltas) == "Yes.<|im_end|>\n<|im_start|>user\nno<|im_end|>"


def test_prompt_ending_inside_a_character_does_not_leak_into_the_output(tokenizer):
    emoji = tokenizer.encode("😀")
    assert len(emoji) > 1
    prompt = tokenizer.encode("Look: ") + emoji[:1]  # ends inside the emoji
    check_invariant(tokenizer, emoji[1:] + tokenizer.encode(" ok"), prompt=prompt)
    check_invariant(tokenizer, emoji[1:] + tokenizer.encode(" ok"), prompt=[])


def test_stop_string_over_several_tokens_is_held_back_then_cut(tokenizer):
    ids = tokenizer.encode("I want world peace now, and more")
    detok = IncrementalDetokenizer(tokenizer, tokenizer.encode(PROMPT), stop=("world peace",))
    deltas = []
    for token in ids:
        deltas.append(detok.add(token))
        if detok.stopped:
            break
    assert "".join(deltas) == "I want " == detok.text
    assert not any("world" in d for d in deltas)
    assert detok.stopped and detok.add(ids[-1]) == "" and detok.finish() == ""


def test_a_held_back_prefix_that_does_not_become_a_stop_string_is_released(tokenizer):
    ids = tokenizer.encode("the world turns")
    detok = IncrementalDetokenizer(tokenizer, [], stop=(" world peace",))
    deltas = [detok.add(t) for t in ids]
    assert deltas == ["the", "", " world turns"]
    assert not detok.stopped
    # At the end of the generation the held-back text is flushed.
    detok = IncrementalDetokenizer(tokenizer, [], stop=(" world peace",))
    assert [detok.add(t) for t in tokenizer.encode("the world")] == ["the", ""]
    assert detok.finish() == " world" and detok.text == "the world" and not detok.stopped


def test_stop_string_at_the_very_start_gives_no_text(tokenizer):
    ids = tokenizer.encode("STOP and more text")
    deltas, fed, detok = check_invariant(tokenizer, ids, stop=("STOP",))
    assert deltas == ["", ""] and fed == ids[:1] and detok.stopped and detok.text == ""


def test_stop_string_inside_a_token_cuts_the_token(tokenizer):
    deltas, _, detok = check_invariant(tokenizer, tokenizer.encode("Hello world"), stop=("ll",))
    assert "".join(deltas) == "He" and detok.stopped


def test_of_several_stop_strings_the_earliest_wins(tokenizer):
    ids = tokenizer.encode("one two three four")
    deltas, _, _ = check_invariant(tokenizer, ids, stop=("four", " thr", "two"))
    assert "".join(deltas) == "one "
    # Both complete within the same token: the one that begins first cuts.
    deltas, _, _ = check_invariant(tokenizer, tokenizer.encode("a world"), stop=("or", "world"))
    assert "".join(deltas) == "a "


def test_stop_string_completed_by_a_special_token_is_kept_literal(tokenizer):
    ids = tokenizer.encode("done<|im_end|>")
    _, _, detok = check_invariant(tokenizer, ids, stop=("<|im_end|>",))
    assert not detok.stopped  # skipped special tokens are not text
    _, _, detok = check_invariant(tokenizer, ids, stop=("<|im_end|>",), skip_special_tokens=False)
    assert detok.stopped and detok.text == "done"


def test_finish_flushes_an_incomplete_character_as_the_tokenizer_decodes_it(tokenizer):
    ids = tokenizer.encode("ok 😀")[:-1]  # the emoji's last byte never comes
    deltas, _, _ = check_invariant(tokenizer, ids)
    assert deltas[-1].endswith("\ufffd") and not any("\ufffd" in d for d in deltas[:-1])


def random_ids(rng: random.Random, tokenizer, length: int) -> list[int]:
    """Tokens as a model might emit them, and worse: words, emoji and CJK split over byte
    tokens, special tokens, and uniformly random ids (often stray UTF-8 bytes)."""
    pieces = [" the", " world", " peace", "\n\n", "Hello", " 😀", "👍🏽", "世界", "和平", " é",
              "<|im_end|>", "<|im_start|>", "END", " ::", "...", "ab", "c"]
    ids: list[int] = []
    while len(ids) < length:
        if rng.random() < 0.3:
            ids.append(rng.randrange(len(tokenizer)))
        else:
            ids.extend(tokenizer.encode(rng.choice(pieces)))
    return ids[:length]


@pytest.mark.parametrize("case", range(60))
def test_random_token_sequences_stream_to_the_cut_decode(tokenizer, seed, case):
    rng = random.Random(seed * 1000 + case)
    ids = random_ids(rng, tokenizer, rng.randint(1, 60))
    full = tokenizer.decode(ids, skip_special_tokens=True)
    stop = []
    for _ in range(rng.randint(0, 3)):  # substrings of the text, so that they do occur
        if len(full) >= 1 and rng.random() < 0.7:
            start = rng.randrange(len(full))
            stop.append(full[start:start + rng.randint(1, 8)])
        else:
            stop.append(rng.choice(["END", "world peace", "zzz", "😀👍", "\n\n\n"]))
    skip = rng.random() < 0.8
    prompt = rng.choice([PROMPT, "", "x 世"]) if rng.random() < 0.8 else random_ids(rng,
                                                                                 tokenizer, 7)
    check_invariant(tokenizer, ids, tuple(stop), prompt, skip)


def test_each_token_decodes_a_small_window_not_the_whole_output(tokenizer):
    class Counting:
        def __init__(self, inner):
            self.inner, self.longest, self.calls = inner, 0, 0

        def decode(self, ids, **kwargs):
            self.longest, self.calls = max(self.longest, len(ids)), self.calls + 1
            return self.inner.decode(ids, **kwargs)

    ids = tokenizer.encode(" ".join(["A long answer with 世界 and 😀 in it."] * 40))
    counting = Counting(tokenizer)
    detok = IncrementalDetokenizer(counting, tokenizer.encode(PROMPT), stop=("never there",))
    text = "".join(detok.add(t) for t in ids) + detok.finish()
    assert text == tokenizer.decode(ids)
    assert len(ids) > 400 and counting.longest <= 8 and counting.calls <= 2 * len(ids) + 3
