"""Registering users and their groups in bulk from a CSV file (deployments without single sign-on).

Pure core. `parse_csv` reads the file into a `Registration` or raises `RegistrationError` listing
every bad line with the field; `plan` compares it with the users and groups the hub has and says
what to create and whom to add to which group. Nothing is ever removed: a user or a membership
missing from the file stays as it is.

The file has a header row with a `username` column and, optionally, a `groups` column:

    username,groups
    ada,students ml-lab
    grace,staff

Groups in a cell are separated by spaces, `;` or `|` (or `,` when the file itself is separated by
`;` or tabs, as spreadsheets in some languages write it). User names are lower-cased, as
JupyterHub's default `normalize_username` does.
"""

from __future__ import annotations

import csv
import io
import re
import unicodedata
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

MAX_ROWS = 10_000
MAX_NAME = 255
USERNAME_COLUMNS = ("username", "user", "name")
GROUPS_COLUMNS = ("groups", "group")


@dataclass(frozen=True)
class LineError:
    line: int
    field: str
    message: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.field}: {self.message}"


class RegistrationError(ValueError):
    """The file cannot be used; `errors` lists every problem found (the first 50)."""

    def __init__(self, errors: list[LineError]) -> None:
        self.errors = errors
        shown = "; ".join(str(e) for e in errors[:5])
        more = f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""
        super().__init__(f"{shown}{more}")


@dataclass(frozen=True)
class NewUser:
    name: str
    groups: tuple[str, ...]
    line: int


@dataclass(frozen=True)
class Registration:
    users: tuple[NewUser, ...]

    @property
    def groups(self) -> dict[str, list[str]]:
        """Group -> the users the file puts in it, in file order."""
        out: dict[str, list[str]] = {}
        for user in self.users:
            for group in user.groups:
                out.setdefault(group, []).append(user.name)
        return out


def _bad_characters(text: str) -> bool:
    return any(unicodedata.category(ch) in ("Cc", "Cf", "Cs", "Zl", "Zp") for ch in text)


def check_username(raw: str) -> tuple[str | None, str | None]:
    """(normalised name, None) or (None, what is wrong)."""
    name = raw.strip().lower()
    if not name:
        return None, "is empty"
    if len(name) > MAX_NAME:
        return None, f"is longer than {MAX_NAME} characters"
    if _bad_characters(name) or re.search(r"[\s/]", name):
        return (
            None,
            f"{raw.strip()!r} is not a user name (no spaces, slashes or control characters)",
        )
    return name, None


def check_group(raw: str) -> tuple[str | None, str | None]:
    name = raw.strip()
    if not name:
        return None, "is empty"
    if len(name) > MAX_NAME:
        return None, f"is longer than {MAX_NAME} characters"
    if _bad_characters(name):
        return None, f"{name!r} is not a group name (no control characters)"
    return name, None


def _decode(data: bytes | str) -> str:
    if isinstance(data, str):
        return data.lstrip("\ufeff")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise RegistrationError(
            [LineError(data[: e.start].count(b"\n") + 1, "(file)", "is not UTF-8 text")]
        ) from e


def parse_csv(data: bytes | str, max_rows: int = MAX_ROWS) -> Registration:
    """Read a registration file; `RegistrationError` lists every bad line."""
    text = _decode(data)
    first = text.split("\n", 1)[0]
    delimiter = ";" if first.count(";") > first.count(",") else ","
    if "\t" in first and first.count("\t") > first.count(delimiter):
        delimiter = "\t"
    group_separators = r"[\s;|]+" if delimiter == "," else r"[\s,|]+"
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, strict=True)
    errors: list[LineError] = []
    try:
        header = next(reader, None)
    except csv.Error as e:
        raise RegistrationError([LineError(1, "(header)", f"is not CSV: {e}")]) from e
    if header is None or not any(cell.strip() for cell in header):
        raise RegistrationError([LineError(1, "(header)", "the file is empty")])
    columns = [cell.strip().lower() for cell in header]
    name_col = next((columns.index(c) for c in USERNAME_COLUMNS if c in columns), None)
    group_col = next((columns.index(c) for c in GROUPS_COLUMNS if c in columns), None)
    if name_col is None:
        raise RegistrationError(
            [LineError(1, "(header)", f"needs a 'username' column (found: {', '.join(columns)})")]
        )
    unknown = [
        c for i, c in enumerate(columns) if i not in (name_col, group_col) and c and c != "email"
    ]
    if unknown:
        errors.append(LineError(1, unknown[0], "unknown column (known: username, groups, email)"))

    users: list[NewUser] = []
    seen: dict[str, int] = {}
    rows = 0
    while True:
        try:
            row = next(reader)
        except StopIteration:
            break
        except csv.Error as e:
            errors.append(LineError(reader.line_num, "(row)", f"is not CSV: {e}"))
            break
        line = reader.line_num
        if not any(cell.strip() for cell in row):
            continue
        rows += 1
        if rows > max_rows:
            errors.append(LineError(line, "(file)", f"more than {max_rows} users in one file"))
            break
        if len(row) > len(columns):
            errors.append(LineError(line, "(row)", f"{len(row)} cells for {len(columns)} columns"))
            continue
        raw_name = row[name_col] if name_col < len(row) else ""
        name, problem = check_username(raw_name)
        if problem:
            errors.append(LineError(line, "username", problem))
            continue
        assert name is not None
        if name in seen:
            errors.append(LineError(line, "username", f"{name!r} is already on line {seen[name]}"))
            continue
        seen[name] = line
        groups: list[str] = []
        if group_col is not None and group_col < len(row):
            for raw_group in re.split(group_separators, row[group_col]):
                if not raw_group.strip():
                    continue
                group, problem = check_group(raw_group)
                if problem:
                    errors.append(LineError(line, "groups", problem))
                elif group not in groups:
                    groups.append(group)  # type: ignore[arg-type]
        users.append(NewUser(name, tuple(groups), line))
    if errors:
        raise RegistrationError(errors[:50])
    if not users:
        raise RegistrationError([LineError(2, "username", "the file lists no users")])
    return Registration(tuple(users))


@dataclass(frozen=True)
class Plan:
    """What registering a file changes in the hub."""

    create_users: tuple[str, ...]
    existing_users: tuple[str, ...]
    create_groups: tuple[str, ...]
    #: group -> users to add to it (not yet members), in file order
    add_members: Mapping[str, tuple[str, ...]] = field(default_factory=dict)

    @property
    def changes(self) -> int:
        return (
            len(self.create_users)
            + len(self.create_groups)
            + sum(len(v) for v in self.add_members.values())
        )

    def to_dict(self) -> dict[str, object]:
        return {
            "create_users": list(self.create_users),
            "existing_users": list(self.existing_users),
            "create_groups": list(self.create_groups),
            "add_members": {g: list(u) for g, u in self.add_members.items()},
        }


def plan(
    registration: Registration,
    existing_users: Iterable[str],
    existing_groups: Mapping[str, Iterable[str]],
) -> Plan:
    """Compare `registration` with the hub's users and groups (group -> member names)."""
    existing = set(existing_users)
    members = {g: set(users) for g, users in existing_groups.items()}
    names = [u.name for u in registration.users]
    add: dict[str, tuple[str, ...]] = {}
    for group, users in registration.groups.items():
        missing = tuple(u for u in users if u not in members.get(group, set()))
        if missing:
            add[group] = missing
    return Plan(
        create_users=tuple(n for n in names if n not in existing),
        existing_users=tuple(n for n in names if n in existing),
        create_groups=tuple(g for g in registration.groups if g not in members),
        add_members=add,
    )
