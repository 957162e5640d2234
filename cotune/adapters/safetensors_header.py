"""The header of a safetensors file, read with bounds before any tensor: so that an adapter
of the wrong ranks, shapes or dtypes is refused having read a few kilobytes of its file, not
the file (an upload of gigabytes, read whole, took about three times its size in memory).

The format: 8 bytes, the header's length N (little-endian), then N bytes of JSON
{name: {"dtype": "F32", "shape": [r, n], "data_offsets": [begin, end]}, "__metadata__": {...}},
then the tensors' bytes, offsets counted from the end of the header.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from cotune import bounded_json

MAX_HEADER_BYTES = 100 << 20  # safetensors' own limit
METADATA_KEY = "__metadata__"
# The safetensors names of dtypes, as torch names them (what a refusal shows).
DTYPE_NAMES = {
    "BOOL": "bool", "U8": "uint8", "I8": "int8", "U16": "uint16", "I16": "int16",
    "U32": "uint32", "I32": "int32", "U64": "uint64", "I64": "int64", "F16": "float16",
    "BF16": "bfloat16", "F32": "float32", "F64": "float64", "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
}


class HeaderError(ValueError):
    """A file that is not safetensors; the message says what is wrong with it."""


@dataclass(frozen=True)
class TensorInfo:
    """A tensor as the header describes it."""

    dtype: str  # the safetensors name: "F32", "BF16", ...
    shape: tuple[int, ...]
    data_offsets: tuple[int, int]  # [begin, end) in the bytes after the header

    @property
    def dtype_name(self) -> str:
        """The dtype as torch names it (the header's own name, cut short, where unknown)."""
        return DTYPE_NAMES.get(self.dtype, self.dtype[:20])

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class Header:
    tensors: dict[str, TensorInfo]
    data_bytes: int  # the bytes after the header


def read_header(path: Path) -> Header:
    """The tensors that `path`'s header describes, having read its first 8 + N bytes only
    (N at most MAX_HEADER_BYTES, within the file); raises HeaderError."""
    size = path.stat().st_size
    if size < 8:
        raise HeaderError(f"the file has {size} bytes, fewer than the 8 that give the length "
                          "of its header")
    with open(path, "rb") as f:
        length = int.from_bytes(f.read(8), "little")
        if length > MAX_HEADER_BYTES or 8 + length > size:
            raise HeaderError(f"its first 8 bytes give a header of {length} bytes, which a file "
                              f"of {size} bytes cannot hold (at most {MAX_HEADER_BYTES})")
        text = f.read(length)
    try:
        parsed = bounded_json.loads(text.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise HeaderError(f"its header is not JSON: {e}") from None
    if not isinstance(parsed, dict):
        raise HeaderError("its header is not a JSON object")
    tensors = {name: _tensor_info(name, entry) for name, entry in parsed.items()
               if name != METADATA_KEY}
    return Header(tensors, size - 8 - length)


def _tensor_info(name: str, entry) -> TensorInfo:
    if not isinstance(entry, dict):
        raise HeaderError(f"its header's entry {name[:200]!r} is not an object")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str) or not _naturals(shape) or not _naturals(offsets) \
            or len(offsets) != 2 or offsets[0] > offsets[1]:
        raise HeaderError(f"its header's entry {name[:200]!r} lacks a dtype (a string), a "
                          "shape (whole numbers) or data_offsets ([begin, end])")
    return TensorInfo(dtype, tuple(shape), (offsets[0], offsets[1]))


def check_extent(header: Header, item_bytes: dict[str, int]) -> None:
    """Refuses a header whose tensors (of the dtypes in `item_bytes`, bytes per item) do not
    fill the data after it exactly, each the bytes its shape and dtype take: then reading the
    file reads no more than the tensors that were checked."""
    end = 0
    for name, info in sorted(header.tensors.items(), key=lambda item: item[1].data_offsets):
        begin, stop = info.data_offsets
        due = info.numel * item_bytes[info.dtype]
        if begin != end or stop - begin != due:
            raise HeaderError(f"its tensor {name!r} spans bytes [{begin}, {stop}) after the "
                              f"header, where [{end}, {end + due}) was due (tensors one after "
                              "another, each of the bytes its shape and dtype take)")
        end = stop
    if end != header.data_bytes:
        raise HeaderError(f"its tensors span {end} bytes after the header, but the file has "
                          f"{header.data_bytes}")


def _naturals(value) -> bool:
    return isinstance(value, list) and all(
        isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value)
