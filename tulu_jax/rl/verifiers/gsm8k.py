r"""GSM8K: the last signed number in the response equals the reference answer.

Both sides drop thousands separators first (``2,125`` → ``2125``), and the comparison is numeric and exact
(``3.50`` == ``3.5``, ``-3`` != ``3``). A minus sign counts only when it is not a subtraction between numbers,
so ``20-18`` ends in ``18``; a leading decimal point is part of the number (``.5`` is 0.5).

Deliberate differences from the reference implementation (open-instruct ``verify_gsm8k_sample``, Dec 2024, which
takes the last match of ``[-+]?\d*\.\d+|\d+`` after deleting every digit-comma-digit comma and compares strings):

- numbers compare by value, not text: ``3.50`` == ``3.5`` and ``18.0`` == ``18`` (the reference says no);
- a minus right after a digit is a subtraction: ``20-18`` ends in ``18`` (the reference reads ``-18``);
- ``+5`` is 5 (the reference compares the text ``+5`` with ``5`` and says no);
- a comma is a thousands separator only before exactly three digits: ``1,2,3`` ends in ``3`` (reference: ``123``);
- the Unicode minus ``−`` is a minus sign;
- the ground truth may be a full GSM8K solution (the number after its last ``####``) and must be one number
  (a ValueError otherwise); the reference compares with whatever string it gets;
- a response without any number scores 0 (the reference compares the whole response with the ground truth);
- numbers longer than 1000 characters are judged wrong instead of compared.
"""

from __future__ import annotations

import re
from fractions import Fraction

# A comma between a digit and exactly three more digits is a thousands separator ("1,234,567"); "1,2,3" is a list.
_THOUSANDS_COMMA = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")
# A minus directly after a digit is a subtraction ("20-18"), not a sign; ".5" is a number, as in the reference.
_NUMBER = re.compile(r"(?:(?<!\d)-)?(?:\d+(?:\.\d+)?|\.\d+)")
_UNICODE_MINUS = "\u2212"
# Longest number worth comparing; Python refuses int() on more than 4300 digits anyway.
_MAX_NUMBER_CHARS = 1000


def _numbers(text: str) -> list[str]:
    text = _THOUSANDS_COMMA.sub("", text.replace(_UNICODE_MINUS, "-"))
    return _NUMBER.findall(text)


def extract_answer(response: str) -> str | None:
    """The last signed number in ``response`` with thousands commas removed, or None if it has none."""
    numbers = _numbers(response)
    return numbers[-1] if numbers else None


def reference_answer(ground_truth: str) -> str:
    """The reference number: the text after the last ``####`` of a GSM8K solution, or the bare string.

    Raises ValueError if it is not a single number (a malformed ground truth, not a wrong response).
    """
    text = ground_truth.rsplit("####", 1)[-1].strip()
    numbers = _numbers(text)
    if len(numbers) != 1 or _THOUSANDS_COMMA.sub("", text.replace(_UNICODE_MINUS, "-")).strip() != numbers[0]:
        raise ValueError(f"GSM8K ground truth must be one number (after '####' if present), got {ground_truth!r}")
    return numbers[0]


def _value(number: str) -> Fraction | None:
    if len(number) > _MAX_NUMBER_CHARS:
        return None
    return Fraction(number)


def numbers_equal(a: str, b: str) -> bool:
    """Exact numeric equality of two decimal strings as produced by ``extract_answer``."""
    if a == b:
        return True
    va, vb = _value(a), _value(b)
    return va is not None and vb is not None and va == vb


def score(response: str, ground_truth: str) -> float:
    """1.0 if the last number of ``response`` equals the reference answer in ``ground_truth``, else 0.0."""
    predicted = extract_answer(response)
    return float(predicted is not None and numbers_equal(predicted, reference_answer(ground_truth)))
