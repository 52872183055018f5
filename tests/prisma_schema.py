"""Parser of the Prisma schema subset storage/schema.prisma uses; the rest (@map, views...) raises PrismaSyntaxError."""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

SCHEMA_PATH = Path(__file__).resolve().parents[1] / "storage" / "schema.prisma"

_BLOCK = re.compile(r"^(?P<kind>model|enum|generator|datasource)\s+(?P<name>\w+)\s*\{(?P<body>.*?)^\}", re.M | re.S)
_FIELD = re.compile(r"(?P<name>\w+)\s+(?P<type>\w+)(?P<list>\[\])?(?P<optional>\?)?\s*(?P<attributes>.*)")
_ATTRIBUTE = re.compile(r"(?P<name>@@?[\w.]+)(?:\((?P<arguments>.*)\))?", re.S)
_NAMED_ARGUMENT = re.compile(r"(?P<key>\w+)\s*:\s*(?P<value>.+)", re.S)
_INDEX_FIELD = re.compile(r"(?P<name>\w+)(?:\(\s*sort\s*:\s*(?P<sort>Asc|Desc)\s*\))?")
_ATTRIBUTES = {"@id", "@unique", "@default", "@updatedAt", "@relation", "@@id", "@@unique", "@@index"}


class PrismaSyntaxError(ValueError):
    """Schema text outside the subset this parser understands."""


@dataclass(frozen=True, slots=True)
class Relation:
    """The foreign key a field declares with @relation(fields: [...], references: [...], onDelete: ...)."""

    fields: tuple[str, ...]
    references: tuple[str, ...]
    on_delete: str | None
    on_update: str | None


@dataclass(frozen=True, slots=True)
class IndexField:
    """One column of @@id, @@unique or @@index, e.g. `timestamp(sort: Desc)`."""

    name: str
    descending: bool = False


@dataclass(frozen=True, slots=True)
class Field:
    """A field of a model: a scalar column, or a relation to another model (`is_relation`)."""

    name: str
    type: str
    optional: bool
    is_list: bool
    is_relation: bool
    attributes: frozenset[str]  # the attributes present, e.g. {"@id", "@default", "@db.Timestamptz"}
    default: str | None  # @default's argument as written: `now()`, `"UTC"`, `free`
    native_type: str | None  # @db.X as written, without "@db.": `Timestamptz(3)`, `Date`
    relation: Relation | None  # the foreign key @relation(fields: ..., references: ...) declares


@dataclass(frozen=True, slots=True)
class Model:
    """A model: fields in order, primary key (@id or @@id), unique keys (@unique, @@unique) and @@index."""

    name: str
    fields: tuple[Field, ...]
    primary_key: tuple[str, ...]
    unique_keys: tuple[tuple[str, ...], ...]
    indexes: tuple[tuple[IndexField, ...], ...]

    @property
    def scalar_fields(self) -> tuple[Field, ...]:
        """The fields that are columns (not relations)."""
        return tuple(f for f in self.fields if not f.is_relation)


@dataclass(frozen=True, slots=True)
class PrismaSchema:
    """The enums (name → values in order) and models (by name) of a schema."""

    enums: dict[str, tuple[str, ...]]
    models: dict[str, Model]


def load_schema(path: Path = SCHEMA_PATH) -> PrismaSchema:
    """Parse the schema file at `path` (storage/schema.prisma by default)."""
    return parse_schema(path.read_text(encoding="utf-8"))


def parse_schema(text: str) -> PrismaSchema:
    """Parse schema text; PrismaSyntaxError quotes what this parser does not understand."""
    text = "\n".join(_without_comment(line) for line in text.splitlines())
    if leftover := _BLOCK.sub("", text).strip():
        raise PrismaSyntaxError(f"expected a model, enum, generator or datasource block at: {leftover.splitlines()[0]}")
    blocks = [
        (b["kind"], b["name"], [s for s in map(str.strip, b["body"].splitlines()) if s]) for b in _BLOCK.finditer(text)
    ]
    model_names = {name for kind, name, _ in blocks if kind == "model"}
    return PrismaSchema(
        enums={name: tuple(lines) for kind, name, lines in blocks if kind == "enum"},
        models={name: _model(name, lines, model_names) for kind, name, lines in blocks if kind == "model"},
    )


def _model(name: str, lines: list[str], model_names: set[str]) -> Model:
    fields = [_field(line, model_names) for line in lines if not line.startswith("@@")]
    primary_key = tuple(f.name for f in fields if "@id" in f.attributes)
    unique_keys: list[tuple[str, ...]] = [(f.name,) for f in fields if "@unique" in f.attributes]
    indexes: list[tuple[IndexField, ...]] = []
    for line in (line for line in lines if line.startswith("@@")):
        attribute, arguments, named = _attribute(line)
        matches = [_INDEX_FIELD.fullmatch(item) for item in _list(arguments[0])] if len(arguments) == 1 else [None]
        if named or not all(matches):
            raise PrismaSyntaxError(f"model {name}: only {attribute}([a, b(sort: Desc), ...]) is supported: {line}")
        columns = tuple(IndexField(m["name"], descending=m["sort"] == "Desc") for m in matches if m)
        if attribute == "@@id":
            primary_key = tuple(c.name for c in columns)
        elif attribute == "@@unique":
            unique_keys.append(tuple(c.name for c in columns))
        else:
            indexes.append(columns)
    return Model(name, tuple(fields), primary_key, tuple(unique_keys), tuple(indexes))


def _field(line: str, model_names: set[str]) -> Field:
    match = _FIELD.fullmatch(line)
    if match is None:
        raise PrismaSyntaxError(f"field not supported: {line}")
    names: set[str] = set()
    default: str | None = None
    native_type: str | None = None
    relation: Relation | None = None
    for text in _split(match["attributes"], separator=" "):
        name, arguments, named = _attribute(text)
        names.add(name)
        if name == "@default":
            default = arguments[0]
        elif name.startswith("@db."):
            native_type = text.removeprefix("@db.")
        elif name == "@relation" and "fields" in named:
            fields, references = _list(named["fields"]), _list(named["references"])
            relation = Relation(fields, references, named.get("onDelete"), named.get("onUpdate"))
    return Field(
        name=match["name"],
        type=match["type"],
        optional=bool(match["optional"]),
        is_list=bool(match["list"]),
        is_relation=match["type"] in model_names,
        attributes=frozenset(names),
        default=default,
        native_type=native_type,
        relation=relation,
    )


def _attribute(text: str) -> tuple[str, list[str], dict[str, str]]:
    """The name, positional and named (`key: value`) arguments of `@name(...)`, as written."""
    match = _ATTRIBUTE.fullmatch(text)
    if match is None or not (match["name"] in _ATTRIBUTES or match["name"].startswith("@db.")):
        raise PrismaSyntaxError(f"attribute not supported: {text}")
    arguments = _split(match["arguments"] or "")
    named = {m["key"]: m["value"].strip() for a in arguments if (m := _NAMED_ARGUMENT.fullmatch(a))}
    if named and (
        match["name"] != "@relation" or set(named) - {"name", "fields", "references", "onDelete", "onUpdate"}
    ):
        raise PrismaSyntaxError(f"attribute arguments not supported: {text}")
    return match["name"], [a for a in arguments if not _NAMED_ARGUMENT.fullmatch(a)], named


def _list(text: str) -> tuple[str, ...]:
    if not (text.startswith("[") and text.endswith("]")):
        raise PrismaSyntaxError(f"expected a list like [a, b]: {text}")
    return tuple(_split(text[1:-1]))


def _split(text: str, separator: str = ",") -> list[str]:
    """The items between separators outside brackets and strings; separator " " stands for any whitespace."""
    cuts = [i for i, char in _top_level(text) if char == separator or (separator == " " and char.isspace())]
    items = [text[start + 1 : end].strip() for start, end in zip([-1, *cuts], [*cuts, len(text)], strict=True)]
    return [item for item in items if item]


def _without_comment(line: str) -> str:
    return line[: next((i for i, char in _top_level(line) if line.startswith("//", i)), len(line))]


def _top_level(text: str) -> Iterator[tuple[int, str]]:
    """(index, character) of each character outside brackets and string literals."""
    depth, in_string, escaped = 0, False, False
    for index, char in enumerate(text):
        if escaped:
            escaped = False
        elif in_string:
            escaped, in_string = char == "\\", char != '"'
        elif char == '"':
            in_string = True
        elif char in "([{":
            depth += 1
        elif char in ")]}":
            depth -= 1
        elif depth == 0:
            yield index, char
