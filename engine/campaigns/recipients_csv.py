"""Campaign recipients from a CSV file: dialect sniffed, headers matched by alias, numbers checked to E.164.

Rows stream through one at a time, so a large file never sits in memory. A row whose number is unusable is
kept as an ERROR recipient with the reason, never dropped: one that is not a number, or one the organization's dial
policy does not dial (storage.dial_policies, e.g. premium-rate); extra columns become the recipient's variables,
and a file with a column named like a built-in prompt variable (`today`, `customer`) is refused whole.
Duplicates (the same E.164 number twice) are merged by the import that stores the rows.
"""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from config.phone import InvalidPhoneNumber, e164
from engine.campaigns.windows import recipient_timezone
from engine.twilio.outbound_calls import InvalidVariables, checked_variables
from pipelines.llm.prompt import variable_name_refusal
from storage.campaigns import NewRecipient, recipient_variables
from storage.dial_policies import OutboundDialPolicy
from storage.enums import RecipientStatus

_SAMPLE_CHARS = 64 * 1024
_DELIMITERS = ",;\t"
# Header cells compared lower-case with spaces, dashes and underscores removed: "Phone Number" == "phone_number".
_NAME_ALIASES = frozenset({"name", "fullname", "contact", "contactname"})
_PHONE_ALIASES = frozenset({"phone", "phonenumber", "number", "mobile", "telephone", "tel", "msisdn", "to"})
_NOTES_ALIASES = frozenset({"notes", "note", "comment", "comments"})
_VARIABLE_NAME = re.compile(r"[^0-9A-Za-z_]+")


class RecipientsFileError(ValueError):
    """A recipients file that cannot be read at all (no phone column, not text); no row was imported."""


@dataclass(frozen=True, slots=True)
class Columns:
    """Where a file keeps each recipient field; every other column is a variable, under its header's name."""

    phone: int
    name: int | None
    notes: int | None
    variables: tuple[tuple[int, str], ...]

    @classmethod
    def from_header(cls, header: list[str]) -> Columns:
        """Match header cells to fields by alias (case, spaces, dashes ignored); RecipientsFileError without phone,
        or for a column named like a built-in prompt variable, or two that would be one variable."""
        phone = name = notes = None
        variables: list[tuple[int, str]] = []
        columns_by_variable: dict[str, int] = {}
        for index, cell in enumerate(header):
            key = _normalise_header(cell)
            if phone is None and key in _PHONE_ALIASES:
                phone = index
            elif name is None and key in _NAME_ALIASES:
                name = index
            elif notes is None and key in _NOTES_ALIASES:
                notes = index
            elif cell.strip():
                variable = _variable_name(cell)
                refusal = variable_name_refusal(variable)
                if refusal is not None:
                    raise RecipientsFileError(
                        f"column {index + 1} ({cell.strip()!r}): {refusal}; rename the column (nothing was imported)"
                    )
                if (first := columns_by_variable.setdefault(variable, index)) != index:
                    # One would silently overwrite the other's value in every row.
                    raise RecipientsFileError(
                        f"columns {first + 1} ({header[first].strip()!r}) and {index + 1} ({cell.strip()!r}) would "
                        f"both be the variable {{{{{variable}}}}}; rename one (nothing was imported)"
                    )
                variables.append((index, variable))
        if phone is None:
            shown = ", ".join(repr(cell) for cell in header) or "nothing"
            raise RecipientsFileError(
                f"no phone number column: the header has {shown}; name one of phone, phone_number or phoneNumber"
            )
        return cls(phone=phone, name=name, notes=notes, variables=tuple(variables))


def _normalise_header(cell: str) -> str:
    return re.sub(r"[\s\-_]+", "", cell.strip().lower())


def _variable_name(cell: str) -> str:
    return _VARIABLE_NAME.sub("_", cell.strip()).strip("_") or "column"


@dataclass(frozen=True, slots=True)
class ParsedRow:
    """One data row: its 1-based line in the file (the header is line 1) and the recipient it becomes."""

    line: int
    recipient: NewRecipient


def sniff_dialect(sample: str) -> type[csv.Dialect] | csv.Dialect:
    """The sample's dialect among ',', ';' and tab; plain comma-separated when the sample is inconclusive."""
    try:
        return csv.Sniffer().sniff(sample, delimiters=_DELIMITERS)
    except csv.Error:
        return csv.excel


def read_recipients(
    stream: TextIO, *, policy: OutboundDialPolicy, default_region: str | None = None
) -> Iterator[ParsedRow]:
    """Parse an open text stream row by row, each number judged by the organization's dial `policy`;
    RecipientsFileError if it has no phone column.

    An ERROR row's reason starts with its line in the file (the header is line 1), for the operator to fix it.
    """
    sample = stream.read(_SAMPLE_CHARS).removeprefix("\ufeff")
    rest = _Chained(sample, stream)
    rows = csv_rows(rest, sniff_dialect(sample))
    _, header = next(rows, (0, None))
    if header is None:
        raise RecipientsFileError("the file is empty: expected a header row naming at least a phone number column")
    columns = Columns.from_header(header)
    for line, cells in rows:
        if not any(cell.strip() for cell in cells):
            continue  # blank lines carry no recipient
        yield ParsedRow(line=line, recipient=_recipient(line, cells, columns, policy, default_region))


def csv_rows(lines: Iterable[str], dialect: type[csv.Dialect] | csv.Dialect) -> Iterator[tuple[int, list[str]]]:
    """Each row of CSV `lines` with the line it starts on (the first is line 1; a quoted field may hold newlines, so a
    row can span several); RecipientsFileError naming the line where the text stops being CSV the csv module reads
    (a field past its limit of 131,072 characters, say)."""
    reader = csv.reader(lines, dialect)
    try:
        while True:
            starts = reader.line_num + 1  # every line is read into some row, blank ones included
            cells = next(reader, None)
            if cells is None:
                return
            yield starts, cells
    except csv.Error as exc:
        raise RecipientsFileError(f"line {reader.line_num}: not readable as CSV ({exc}); nothing imported") from None


def _recipient(
    line: int, cells: list[str], columns: Columns, policy: OutboundDialPolicy, default_region: str | None
) -> NewRecipient:
    def cell(index: int | None) -> str | None:
        if index is None or index >= len(cells):
            return None
        return cells[index].strip() or None

    variables = {name: value for index, name in columns.variables if (value := cell(index)) is not None}
    return make_recipient(
        f"line {line}",
        cell(columns.phone) or "",
        name=cell(columns.name),
        notes=cell(columns.notes),
        variables=variables,
        policy=policy,
        default_region=default_region,
    )


def make_recipient(
    where: str,
    raw_phone: str,
    *,
    name: str | None,
    notes: str | None,
    variables: dict[str, str],
    policy: OutboundDialPolicy,
    default_region: str | None,
) -> NewRecipient:
    """A recipient from its fields: E.164 with its timezone, or an ERROR one whose reason starts with `where`.

    `default_region` (e.g. "US") reads numbers written without a country code; config.phone decides validity, the
    organization's dial `policy` whether it may be called, and checked_variables whether its calls could carry its
    name, notes and columns (the rules `place_call` applies again at the dial).
    """
    problem, phone = "no phone number", raw_phone
    if raw_phone.strip():
        try:
            number = e164(raw_phone, region=default_region)
        except InvalidPhoneNumber as exc:
            problem = str(exc)
        else:
            refusal = policy.refusal(number) or _variables_refusal(name, notes, variables)
            if refusal is None:
                timezone = recipient_timezone(number)
                return NewRecipient(phone_number=number, name=name, notes=notes, variables=variables, timezone=timezone)
            problem, phone = refusal, number  # a number, but not one the organization dials, or not with these fields
    return NewRecipient(
        phone_number=phone,
        name=name,
        notes=notes,
        status=RecipientStatus.ERROR,
        error_reason=f"{where}: {problem}",
        variables=variables,
    )


def _variables_refusal(name: str | None, notes: str | None, variables: dict[str, str]) -> str | None:
    try:
        checked_variables(recipient_variables(name=name, notes=notes, variables=variables))
    except InvalidVariables as exc:
        return str(exc)
    return None


@dataclass(frozen=True, slots=True)
class ImportLineError:
    """Where an ERROR recipient came from in its import, and what was wrong (make_recipient's reason, read back)."""

    at: str
    """`line 7` (a CSV file's line, the header being line 1) or `recipients[3]` (an index in a JSON list)."""
    line: int | None
    """The CSV line, when it came from a file."""
    reason: str


_WHERE = re.compile(r"^(line (?P<line>\d+)|recipients\[\d+\]): (?P<reason>.*)$", re.DOTALL)


def import_error(error_reason: str) -> ImportLineError:
    """The location and reason of an ERROR recipient's stored reason; a reason of another form is all reason."""
    match = _WHERE.match(error_reason)
    if match is None:
        return ImportLineError(at="", line=None, reason=error_reason)
    line = match.group("line")
    return ImportLineError(at=match.group(1), line=int(line) if line else None, reason=match.group("reason"))


class _Chained:
    """The sniffed sample followed by the rest of the stream, read line by line (csv.reader's need)."""

    def __init__(self, head: str, tail: TextIO) -> None:
        self._head: TextIO | None = io.StringIO(head)
        self._tail = tail

    def __iter__(self) -> Iterator[str]:
        return self

    def __next__(self) -> str:
        if self._head is not None:
            line = self._head.readline()
            if line.endswith("\n"):
                return line
            self._head = None
            line += self._tail.readline()  # the sample may end mid-line
            if line:
                return line
            raise StopIteration
        line = self._tail.readline()
        if not line:
            raise StopIteration
        return line


def not_utf8(path: Path) -> RecipientsFileError:
    """The refusal of a file that does not decode as UTF-8, naming the line and byte offset where it stops doing so.

    A decode error met while reading counts its offset from the start of the decoder's chunk, not of the file: the
    file is read again, a line at a time (UTF-8 never hides a newline byte inside a character), to say where.
    """
    offset = 0
    with path.open("rb") as stream:
        for line_number, line in enumerate(stream, start=1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as exc:
                return RecipientsFileError(
                    f"{path}: not UTF-8 text at line {line_number} (byte offset {offset + exc.start:,}: {exc.reason}); "
                    'save it as UTF-8 ("CSV UTF-8" in Excel); nothing imported'
                )
            offset += len(line)
    return RecipientsFileError(f"{path}: not UTF-8 text; save it as UTF-8; nothing imported")


def open_recipients_file(path: Path) -> TextIO:
    """Open a CSV for read_recipients: UTF-8 with or without a BOM, newlines left to the csv module."""
    try:
        return path.open("r", encoding="utf-8-sig", newline="")
    except OSError as exc:
        raise RecipientsFileError(f"{path}: {exc.strerror or exc}") from None
