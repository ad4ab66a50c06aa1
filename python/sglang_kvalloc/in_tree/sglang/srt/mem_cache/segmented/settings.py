"""Value rules of the KV allocation settings, shared by the CLI fields and the
environment variables that stand in for them. Stdlib only (no torch)."""

from __future__ import annotations

import math
import re

__all__ = [
    "KV_ALLOC_MODES",
    "parse_bytes",
    "parse_hold_off_seconds",
    "parse_whole_tokens",
]

KV_ALLOC_MODES = ("static", "segmented", "auto")

_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_bytes(text: str) -> int:
    """Bytes from '123', '512M', '8G', '8GiB' (powers of 1024); ValueError otherwise."""
    match = re.fullmatch(
        r"\s*(\d+)\s*([KMGT]?)(?:I?B)?\s*", str(text), flags=re.IGNORECASE
    )
    if match is None:
        raise ValueError(f"expected bytes such as 8G or 512M, got {text!r}")
    return int(match.group(1)) * _UNITS[match.group(2).upper()]


def parse_whole_tokens(text: str) -> int:
    """A whole number of tokens; ValueError otherwise."""
    try:
        return int(str(text).strip())
    except ValueError:
        raise ValueError(f"expected a whole number of tokens, got {text!r}") from None


def parse_hold_off_seconds(text: str) -> float:
    """Seconds >= 0; 'inf' means memory is never given back; ValueError otherwise."""
    try:
        value = float(text)
    except ValueError:
        raise ValueError(
            f"--kv-segment-hold-off expects seconds, got {text!r}"
        ) from None
    if math.isnan(value) or value < 0:
        raise ValueError(
            "--kv-segment-hold-off must be >= 0 seconds (inf: never give memory "
            f"back), got {text}"
        )
    return value
