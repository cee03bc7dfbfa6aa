"""Registering users and groups from a CSV file: parsing and what it changes."""

from __future__ import annotations

import pytest

from gpuhub.core.registration import RegistrationError, parse_csv, plan


def names_and_groups(registration):
    return [(u.name, u.groups) for u in registration.users]


def test_users_and_groups_from_a_plain_file():
    reg = parse_csv(b"username,groups\nAda,students ml-lab\ngrace,staff\n\nlin,\n")
    assert names_and_groups(reg) == [
        ("ada", ("students", "ml-lab")),
        ("grace", ("staff",)),
        ("lin", ()),
    ]
    assert reg.groups == {"students": ["ada"], "ml-lab": ["ada"], "staff": ["grace"]}


def test_spreadsheet_flavours_bom_semicolons_quotes_and_email():
    text = "\ufeffName;Email;Groups\r\nada;ada@example.org;students,ml-lab\r\n"
    assert names_and_groups(parse_csv(text.encode())) == [("ada", ("students", "ml-lab"))]
    quoted = 'username,groups\n"ada","students; ml-lab | students"\n'
    assert names_and_groups(parse_csv(quoted)) == [("ada", ("students", "ml-lab"))]
    tabs = "username\tgroups\nada\tstudents\n"
    assert names_and_groups(parse_csv(tabs)) == [("ada", ("students",))]


def test_a_hostile_group_name_is_kept_as_data():
    reg = parse_csv("username,groups\nada,<script>alert(1)</script>\n")
    assert reg.users[0].groups == ("<script>alert(1)</script>",)


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"", ["line 1: (header): the file is empty"]),
        (b"email,groups\na@b,c\n", ["line 1: (header): needs a 'username' column"]),
        (b"username,colour\nada,red\n", ["line 1: colour: unknown column"]),
        (b"username\n", ["line 2: username: the file lists no users"]),
        (b"username\n\xff\xfe\n", ["line 2: (file): is not UTF-8 text"]),
        (
            b"username,groups\nada,x\n,y\nbo b,z\nADA,w\na/b,\n",
            [
                "line 3: username: is empty",
                "line 4: username: 'bo b' is not a user name",
                "line 5: username: 'ada' is already on line 2",
                "line 6: username: 'a/b' is not a user name",
            ],
        ),
        (b"username,groups\nada,x,extra\n", ["line 2: (row): 3 cells for 2 columns"]),
        (b"username,groups\nada,bad\x07group\n", ["line 2: groups: 'bad\\x07group' is not"]),
        (b'username\n"unterminated\n', ["line 2: (row): is not CSV"]),
    ],
)
def test_every_bad_line_is_reported_with_its_field(data, expected):
    with pytest.raises(RegistrationError) as info:
        parse_csv(data)
    got = [str(e) for e in info.value.errors]
    assert len(got) == len(expected), got
    for line, prefix in zip(got, expected, strict=True):
        assert line.startswith(prefix), (line, prefix)


def test_row_limit():
    data = "username\n" + "".join(f"u{i}\n" for i in range(11))
    with pytest.raises(RegistrationError, match="more than 10 users"):
        parse_csv(data, max_rows=10)
    assert len(parse_csv(data, max_rows=11).users) == 11


def test_plan_creates_only_what_is_missing_and_removes_nothing():
    reg = parse_csv("username,groups\nada,students staff\ngrace,staff\nlin,\n")
    p = plan(reg, existing_users=["grace", "zoe"], existing_groups={"staff": ["grace", "zoe"]})
    assert p.create_users == ("ada", "lin")
    assert p.existing_users == ("grace",)
    assert p.create_groups == ("students",)
    assert dict(p.add_members) == {"students": ("ada",), "staff": ("ada",)}
    assert p.changes == 5
    again = plan(
        reg,
        existing_users=["ada", "grace", "lin", "zoe"],
        existing_groups={"staff": ["ada", "grace", "zoe"], "students": ["ada"]},
    )
    assert again.changes == 0
    assert again.to_dict()["create_users"] == []
