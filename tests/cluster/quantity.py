"""Kubernetes resource quantities ("500m", "2Gi", "1e3") as exact numbers."""
from __future__ import annotations

from decimal import Decimal
from fractions import Fraction

_SUFFIXES = {
    "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60,
    "n": Fraction(1, 10**9), "u": Fraction(1, 10**6), "m": Fraction(1, 1000),
    "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15, "E": 10**18,
}


def parse_quantity(text: str | int | float) -> Fraction:
    text = str(text).strip()
    for suffix in sorted(_SUFFIXES, key=len, reverse=True):
        if text.endswith(suffix) and text[: -len(suffix)]:
            return Fraction(Decimal(text[: -len(suffix)])) * _SUFFIXES[suffix]
    return Fraction(Decimal(text))  # plain number or decimal exponent ("1e3")

