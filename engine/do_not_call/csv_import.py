"""Do-not-call numbers from CSV text: the `phoneNumber` column (or the first), each line checked to E.164.

A line whose number is unusable is reported with its line number and reason; the others are listed. A header is
recognised when its first row is not itself a number; a `reason` column, when there is one, goes with each number.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field

from config.phone import InvalidPhoneNumber, e164
from engine.campaigns.recipients_csv import Columns, RecipientsFileError, csv_rows, sniff_dialect
from storage.do_not_call import ListedNumber

MAX_REPORTED_PROBLEMS = 1000
"""Invalid lines reported one by one at most; past this only their count grows."""


@dataclass(frozen=True, slots=True)
class LineProblem:
    """A line that was not listed, and why."""

    line: int
    value: str
    reason: str


@dataclass(slots=True)
class DoNotCallFile:
    """What a CSV text holds: the numbers to list (E.164, first occurrence) and the lines that were refused."""

    numbers: list[ListedNumber] = field(default_factory=list)
    problems: list[LineProblem] = field(default_factory=list)
    invalid: int = 0
    duplicates: int = 0
    rows: int = 0


def read_do_not_call(text: str, *, default_region: str | None = None, reason: str | None = None) -> DoNotCallFile:
    """Parse CSV text into numbers to list and problems by line; `reason` for rows without one of their own.

    RecipientsFileError if the text cannot be read as CSV (a field past the csv module's limit): nothing is listed.
    """
    text = text.removeprefix("\ufeff")
    result = DoNotCallFile()
    seen: set[str] = set()
    phone_column, reason_column = 0, None
    first = True
    for line, cells in csv_rows(io.StringIO(text), sniff_dialect(text[: 64 * 1024])):
        if not any(cell.strip() for cell in cells):
            continue
        if first:
            first = False
            header = _header_columns(cells, default_region)
            if header is not None:
                phone_column, reason_column = header
                continue
        result.rows += 1
        value = cells[phone_column].strip() if phone_column < len(cells) else ""
        try:
            number = e164(value, region=default_region)
        except InvalidPhoneNumber as exc:
            result.invalid += 1
            if len(result.problems) < MAX_REPORTED_PROBLEMS:
                why = exc.reason if value else "no phone number"
                result.problems.append(LineProblem(line, value[:64], why))
            continue
        if number in seen:
            result.duplicates += 1
            continue
        seen.add(number)
        own = cells[reason_column].strip() if reason_column is not None and reason_column < len(cells) else ""
        result.numbers.append(ListedNumber(number, own or reason))
    return result


def _header_columns(cells: list[str], default_region: str | None) -> tuple[int, int | None] | None:
    """The (phone, reason) columns when the row is a header; None when it is already a number to list."""
    try:
        e164(cells[0].strip(), region=default_region)
    except InvalidPhoneNumber:
        pass
    else:
        return None
    try:
        phone = Columns.from_header(cells).phone
    except RecipientsFileError:
        phone = 0  # a header without a phone column: the first column holds the numbers
    reasons = [index for index, cell in enumerate(cells) if cell.strip().lower() == "reason"]
    return phone, (reasons[0] if reasons else None)
