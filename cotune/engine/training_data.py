"""The fine-tuning data of a job: a JSONL file read into token ids and loss masks.

One example per line, in one of three forms (a file uses one form throughout):

- `{"prompt": str, "completion": str}`: the prompt's tokens (with the tokenizer's default
  special tokens), the completion's tokens, then EOS; the loss is on the completion and EOS.
- `{"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}`: rendered
  with the tokenizer's own chat template; the loss is on each assistant turn as rendered
  (its content and the template's end-of-turn tokens).
- `{"text": str}`: the loss is on every token but the first.

The whole file is read and validated before anything is returned: a job never trains on a
half-read file. Every error names `path:line:`, what was wrong and what is accepted.

`check_training_file` checks a file's lines without a tokenizer (UTF-8, JSON, one form, the
fields and their types): what an upload can be refused for before any job reads it. What
depends on the model (a chat template, an EOS token, lengths in tokens) is checked when a job
reads the file.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path

from cotune import bounded_json

ACCEPTED = ('each line must be one JSON object of one form: {"prompt": str, "completion": str}, '
            '{"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]} '
            'or {"text": str}')

_FORM_FIELDS = {
    "prompt/completion": ("prompt", "completion"),
    "messages": ("messages",),
    "text": ("text",),
}
_ROLES = ("system", "user", "assistant")


class DataError(ValueError):
    """Bad training data; the message names the file, the line and what is accepted."""


@dataclass(frozen=True)
class Example:
    token_ids: list[int]
    # loss_mask[t]: token t is a target, predicted from tokens < t (loss_mask[0] is False)
    loss_mask: list[bool]


@dataclass(frozen=True)
class Dataset:
    examples: list[Example]
    fingerprint: str  # sha256 hex of the file's bytes (provenance of the adapter version)
    truncated: int    # how many examples were cut to max_length


def read_training_data(path: str | Path, tokenizer, max_length: int = 2048) -> Dataset:
    """Reads, validates and tokenizes every line of the JSONL file at `path`.

    Examples longer than `max_length` tokens keep their first `max_length` tokens; an
    example left without a target token is an error. Blank lines are skipped.
    """
    if max_length < 2:
        raise ValueError(f"max_length {max_length} is too small; an example needs at least "
                         "2 tokens (a context token and a target)")
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot read the training data: {e.strerror}; expected a "
                        f"JSONL file ({ACCEPTED})") from None

    examples, truncated = [], 0
    for where, form, record in _records(str(path), raw.split(b"\n")):
        if form == "prompt/completion":
            example = _prompt_completion(where, record, tokenizer)
        elif form == "messages":
            example = _messages(where, record["messages"], tokenizer)
        else:
            example = _text(where, record["text"], tokenizer)
        if not any(example.loss_mask):  # a text of a single token
            raise DataError(f"{where}: the example has {len(example.token_ids)} token and so "
                            "nothing to predict; a text needs at least 2 tokens")
        if len(example.token_ids) > max_length:
            truncated += 1
            example = Example(example.token_ids[:max_length], example.loss_mask[:max_length])
            if not any(example.loss_mask):
                raise DataError(f"{where}: no target token within the first {max_length} "
                                "tokens; shorten what comes before the targets or raise "
                                "max_length")
        examples.append(example)
    return Dataset(examples, hashlib.sha256(raw).hexdigest(), truncated)


def check_training_file(path: Path, name: str) -> int:
    """Checks the JSONL file at `path` line by line, holding one line at a time, without a
    tokenizer (see the module's docstring); returns its number of examples. Errors name
    `name:line`."""
    with open(path, "rb") as f:
        return sum(1 for _ in _records(name, f))


def _records(name: str, lines):
    """(where, form, record) of each non-blank line of `lines` (bytes, with or without their
    newline), every one checked in form and fields; DataError at the first that is not, or
    when there is none."""
    file_form, first_line = None, 0
    for number, line in enumerate(lines, start=1):
        where = f"{name}:{number}"
        text = _decode(where, line, first=number == 1)
        if not text.strip():
            continue
        record = _parse(where, text)
        form = _form_of(where, record)
        if form == "messages":
            _check_messages(where, record["messages"])
        if file_form is None:
            file_form, first_line = form, number
        elif form != file_form:
            raise DataError(f"{where}: this line is in the {form} form but line {first_line} "
                            f"is in the {file_form} form; a file must use one form throughout")
        yield where, form, record
    if file_form is None:
        raise DataError(f"{name}: the file holds no examples; {ACCEPTED}")


def split_eval(dataset: Dataset, eval_fraction: float,
               seed: int) -> tuple[list[Example], list[Example]]:
    """(train, eval): a random `eval_fraction` of the examples held out, the same for the
    same seed. Eval gets round(n * eval_fraction) examples, at least 1 when the fraction is
    positive and n >= 2, and never all of them. Both lists keep the file's order."""
    if not 0.0 <= eval_fraction < 1.0:
        raise ValueError(f"eval_fraction {eval_fraction} is outside [0, 1); use 0 for no "
                         "held-out examples")
    n = len(dataset.examples)
    count = round(n * eval_fraction)
    if eval_fraction > 0 and n >= 2:
        count = max(count, 1)
    count = min(count, n - 1)  # training keeps at least one example
    held_out = set(random.Random(seed).sample(range(n), max(count, 0)))
    train = [e for i, e in enumerate(dataset.examples) if i not in held_out]
    held = [e for i, e in enumerate(dataset.examples) if i in held_out]
    return train, held


def _decode(where: str, line: bytes, first: bool) -> str:
    # line by line: a newline byte is never part of a multi-byte UTF-8 character
    try:
        return line.decode("utf-8-sig" if first else "utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{where}: not UTF-8 (byte {line[e.start]:#04x} at column "
                        f"{e.start + 1}); training data must be UTF-8 encoded JSONL") from None


def _parse(where: str, line: str) -> dict:
    try:
        record = bounded_json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(f"{where}: invalid JSON ({e.msg} at column {e.colno}); "
                        f"{ACCEPTED}") from None
    except bounded_json.NestedTooDeeply as e:
        raise DataError(f"{where}: {e}; {ACCEPTED}") from None
    if not isinstance(record, dict):
        raise DataError(f"{where}: a JSON {type(record).__name__} is not an object; "
                        f"{ACCEPTED}")
    return record


def _form_of(where: str, record: dict) -> str:
    """The form whose fields `record` uses; its field set must be exactly that form's."""
    if "messages" in record:
        form = "messages"
    elif "text" in record:
        form = "text"
    elif "prompt" in record or "completion" in record:
        form = "prompt/completion"
    else:
        names = ", ".join(map(repr, record)) or "none"
        raise DataError(f"{where}: no known fields (found {names}); {ACCEPTED}")
    expected = _FORM_FIELDS[form]
    unknown = [k for k in record if k not in expected]
    missing = [k for k in expected if k not in record]
    if unknown or missing:
        what = "; ".join(filter(None, [
            unknown and "unknown field " + ", ".join(map(repr, unknown)),
            missing and "missing field " + ", ".join(map(repr, missing))]))
        raise DataError(f"{where}: {what} in the {form} form; {ACCEPTED}")
    for name in expected:
        if name != "messages":
            _check_string(where, record[name], repr(name))
    return form


def _check_string(where: str, value, name: str) -> None:
    if not isinstance(value, str):
        raise DataError(f"{where}: {name} is a JSON {_json_type(value)}; it must be a "
                        f"non-empty string")
    if not value:
        raise DataError(f"{where}: {name} is empty; it must be a non-empty string")


def _json_type(value) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", int: "number",
            float: "number", type(None): "null"}[type(value)]


def _prompt_completion(where: str, record: dict, tokenizer) -> Example:
    if tokenizer.eos_token_id is None:
        raise DataError(f"{where}: the model's tokenizer has no EOS token, which the "
                        "prompt/completion form appends; use the messages or text form")
    prompt = tokenizer(record["prompt"]).input_ids
    completion = tokenizer(record["completion"], add_special_tokens=False).input_ids
    targets = completion + [tokenizer.eos_token_id]
    mask = [False] * len(prompt) + [True] * len(targets)
    mask[0] = False  # a prompt of no tokens: the first token has nothing to be predicted from
    return Example(prompt + targets, mask)


def _text(where: str, text: str, tokenizer) -> Example:
    ids = tokenizer(text).input_ids
    return Example(ids, [False] + [True] * (len(ids) - 1))


def _messages(where: str, messages, tokenizer) -> Example:
    """The rendered conversation, with the loss on the assistant turns.

    A turn spans from the end of the rendered `messages[:i]` with the generation prompt to
    the end of the rendered `messages[:i+1]`, both of which must be prefixes of the whole
    rendering. The pieces between those boundaries are tokenized one by one, so a turn
    starts on a token boundary exactly as it does when the model generates it after the
    prompt (tokenizing the whole text at once could merge the prompt's last newline with
    content that starts with whitespace).
    """
    if getattr(tokenizer, "chat_template", None) is None:
        raise DataError(f"{where}: the model's tokenizer has no chat template, which the "
                        "messages form needs; use the prompt/completion or text form")
    full = _render(where, tokenizer, messages, generation_prompt=False)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start = _render(where, tokenizer, messages[:i], generation_prompt=True)
        end = _render(where, tokenizer, messages[:i + 1], generation_prompt=False)
        for prefix, count, what in ((start, i, " with the generation prompt"),
                                    (end, i + 1, "")):
            if not full.startswith(prefix):
                raise DataError(
                    f"{where}: the model's chat template is not prefix-stable: the rendering "
                    f"of messages[:{count}]{what} is not a prefix of the rendering of the "
                    "whole conversation, so the assistant turns cannot be located; use the "
                    "prompt/completion form")
        if not (spans[-1][1] if spans else 0) <= len(start) <= len(end):
            raise DataError(f"{where}: the model's chat template renders assistant message "
                            f"{i} out of order; use the prompt/completion form")
        spans.append((len(start), len(end)))

    ids, mask, cursor = [], [], 0
    for start, end in spans + [(len(full), len(full))]:
        for piece, target in ((full[cursor:start], False), (full[start:end], True)):
            if piece:
                piece_ids = tokenizer(piece, add_special_tokens=False).input_ids
                ids += piece_ids
                mask += [target] * len(piece_ids)
        cursor = end
    if mask:
        mask[0] = False
    return Example(ids, mask)


def _check_messages(where: str, messages) -> None:
    if not isinstance(messages, list):
        raise DataError(f"{where}: 'messages' is a JSON {_json_type(messages)}; it must be "
                        'an array of {"role": ..., "content": ...} objects')
    if not messages:
        raise DataError(f"{where}: 'messages' is empty; it must hold at least one user or "
                        "system message and one assistant message")
    for i, message in enumerate(messages):
        name = f"messages[{i}]"
        if not isinstance(message, dict):
            raise DataError(f"{where}: {name} is a JSON {_json_type(message)}; it must be "
                            'an object {"role": ..., "content": ...}')
        unknown = [k for k in message if k not in ("role", "content")]
        missing = [k for k in ("role", "content") if k not in message]
        if unknown or missing:
            what = "; ".join(filter(None, [
                unknown and "unknown field " + ", ".join(map(repr, unknown)),
                missing and "missing field " + ", ".join(map(repr, missing))]))
            raise DataError(f"{where}: {name} has {what}; a message is exactly "
                            '{"role": "system"|"user"|"assistant", "content": str}')
        if message["role"] not in _ROLES:
            raise DataError(f"{where}: {name} has role {message['role']!r}; accepted roles "
                            f"are {', '.join(map(repr, _ROLES))}")
        _check_string(where, message["content"], f"{name}.content")
    roles = [m["role"] for m in messages]
    if "assistant" not in roles:
        raise DataError(f"{where}: the conversation has no assistant message, so nothing "
                        "to learn; add at least one message with role 'assistant'")
    if roles[0] == "assistant":
        raise DataError(f"{where}: messages[0] is an assistant message; a conversation "
                        "starts with a system or user message (the prompt of the turn)")


def _render(where: str, tokenizer, messages: list, *, generation_prompt: bool) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False,
                                             add_generation_prompt=generation_prompt)
    except Exception as e:  # the template's own checks (e.g. roles must alternate)
        raise DataError(f"{where}: the model's chat template rejects this conversation: "
                        f"{e}") from None
