"""The names of the ways a base's projections can be stored quantized (`--quantize`), and their
check: imported by the command line, which never loads torch."""

from __future__ import annotations

QUANTIZATIONS = ("int8", "int4")


class QuantizationError(ValueError):
    """A weight or a request for quantization that cotune cannot serve; says what is accepted."""


def check_quantization(quantize: str | None) -> None:
    if quantize is not None and quantize not in QUANTIZATIONS:
        raise QuantizationError(f"quantization {quantize!r} is not supported; accepted: "
                                f"{', '.join(QUANTIZATIONS)}, or none for the model's dtype")
