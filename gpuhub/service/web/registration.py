"""Registering users and groups through the hub's REST API, from the admin page and from
`gpuhub users import FILE.csv`.

The file is read and checked first (`core.registration`); nothing is changed if a line is bad.
Then the hub's users and groups are read, and only what is missing is created: users
(`POST /users`, `admin:users`), groups (`POST /groups`, `admin:groups`) and memberships
(`POST /groups/{name}/users`, `groups`). Nothing is removed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
from collections.abc import Iterable
from typing import Any
from urllib.parse import quote

from ...core.registration import Plan, Registration, RegistrationError, parse_csv, plan
from ..hubapi import PAGINATION, HubAPIError, HubClient

log = logging.getLogger("gpuhub.service")

BATCH = 200


async def _all(hub: HubClient, path: str) -> list[dict[str, Any]]:
    """Every item of a paginated hub list (users or groups)."""
    items: list[dict[str, Any]] = []
    offset = 0
    while True:
        response = await hub.api(
            "GET",
            path,
            params={"offset": offset, "limit": hub.page_size},
            headers={"Accept": PAGINATION},
        )
        body = response.body
        if isinstance(body, list):  # a hub without pagination
            return body
        page = body.get("items") if isinstance(body, dict) else None
        if not isinstance(page, list):
            raise HubAPIError("GET", hub.hub_url(path), 502, "unexpected list from the hub")
        items.extend(page)
        next_page = (body.get("_pagination") or {}).get("next")
        if not next_page or not page:
            return items
        offset = int(next_page.get("offset") or offset + len(page))


async def hub_users_and_groups(hub: HubClient) -> tuple[list[str], dict[str, list[str]]]:
    users = [u["name"] for u in await _all(hub, "/users") if isinstance(u.get("name"), str)]
    groups = {
        g["name"]: list(g.get("users") or [])
        for g in await _all(hub, "/groups")
        if isinstance(g.get("name"), str)
    }
    return users, groups


async def apply(hub: HubClient, todo: Plan) -> None:
    names = list(todo.create_users)
    for i in range(0, len(names), BATCH):
        try:
            await hub.api("POST", "/users", body={"usernames": names[i : i + BATCH]}, retries=0)
        except HubAPIError as e:
            if e.status != 409:  # 409: all of them exist already (created meanwhile)
                raise
    if todo.create_groups:
        for group in todo.create_groups:
            try:
                await hub.api("POST", f"/groups/{quote(group, safe='')}", body={}, retries=0)
            except HubAPIError as e:
                if e.status != 409:
                    raise
    for group, members in todo.add_members.items():
        await hub.api(
            "POST",
            f"/groups/{quote(group, safe='')}/users",
            body={"users": list(members)},
            retries=0,
        )


#: Roles every user holds: a group bound to one of them gives nothing more.
UNPRIVILEGED_ROLES = frozenset({"user"})


async def privileged_groups(
    hub: HubClient, registration: Registration, configured: Iterable[str]
) -> dict[str, str]:
    """The groups of the file that give their members rights, and why: listed in `configured`,
    or bound to a hub role other than `user` (the group model's `roles`, read with
    `read:roles`; without it, the listed ones only)."""
    wanted = set(registration.groups)
    found = {g: "a privileged group of this site" for g in sorted(wanted & set(configured))}
    try:
        groups = await _all(hub, "/groups")
    except HubAPIError as e:
        log.warning("gpuhub: cannot read the hub's groups (%s %s)", e.status, e.message)
        groups = []
    for group in groups:
        name = group.get("name")
        if name not in wanted:
            continue
        roles = [r for r in group.get("roles") or () if r not in UNPRIVILEGED_ROLES]
        if roles:
            found[name] = f"bound to the hub role {', '.join(map(repr, sorted(roles)))}"
    return dict(sorted(found.items()))


def privileged_refusal(found: dict[str, str]) -> str:
    listed = "; ".join(f"{group} ({why})" for group, why in found.items())
    return (
        f"groups: the file adds users to privileged groups: {listed}. Nothing was changed; "
        "confirm with allow_privileged_groups to register them anyway"
    )


def summary(todo: Plan, dry_run: bool) -> str:
    memberships = sum(len(m) for m in todo.add_members.values())
    verb = "would create" if dry_run else "created"
    return (
        f"{verb} {len(todo.create_users)} user(s) and {len(todo.create_groups)} group(s), "
        f"{'would add' if dry_run else 'added'} {memberships} group membership(s); "
        f"{len(todo.existing_users)} user(s) existed already"
    )


async def register(hub: HubClient, registration: Registration, *, dry_run: bool) -> dict[str, Any]:
    users, groups = await hub_users_and_groups(hub)
    todo = plan(registration, users, groups)
    if not dry_run:
        await apply(hub, todo)
    return {"dry_run": dry_run, "summary": summary(todo, dry_run), **todo.to_dict()}


# -- gpuhub users import FILE.csv ----------------------------------------------------------------

CLI_PRIVILEGED_GROUPS = ("gpuhub-admins", "hub-admins", "admins")


class PrivilegedGroups(Exception):
    def __init__(self, found: dict[str, str]) -> None:
        self.found = found
        super().__init__(privileged_refusal(found))


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="gpuhub users",
        description="Register users and their groups in a JupyterHub from a CSV file "
        "(columns: username, groups). Nothing is removed.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    imp = sub.add_parser("import", help="register the users and groups of a CSV file")
    imp.add_argument("file", help="CSV file with a header row: username,groups")
    imp.add_argument(
        "--hub-api",
        default=os.environ.get("JUPYTERHUB_API_URL", "http://127.0.0.1:8081/hub/api"),
        help="the hub's REST API (default: $JUPYTERHUB_API_URL or http://127.0.0.1:8081/hub/api)",
    )
    imp.add_argument(
        "--token-env",
        default="JUPYTERHUB_API_TOKEN",
        help="environment variable holding a hub token with admin:users, admin:groups, groups, "
        "list:users, read:users, list:groups and read:groups (default: JUPYTERHUB_API_TOKEN)",
    )
    imp.add_argument("--dry-run", action="store_true", help="say what would change, change nothing")
    imp.add_argument(
        "--allow-privileged-groups",
        action="store_true",
        help="also add users to groups that give rights (bound to a hub role other than `user`, "
        "or named gpuhub-admins, hub-admins, admins); refused without it",
    )
    imp.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(argv)

    token = os.environ.get(args.token_env, "")
    if not token:
        print(f"gpuhub users: set {args.token_env} to a hub token (see --help)", file=sys.stderr)
        return 2
    try:
        with open(args.file, "rb") as f:
            data = f.read()
    except OSError as e:
        print(f"gpuhub users: {args.file}: {e.strerror or e}", file=sys.stderr)
        return 2
    try:
        registration = parse_csv(data)
    except RegistrationError as e:
        for error in e.errors:
            print(f"{args.file}: {error}", file=sys.stderr)
        return 1

    async def run() -> dict[str, Any]:
        hub = HubClient(args.hub_api, token)
        try:
            found = await privileged_groups(hub, registration, CLI_PRIVILEGED_GROUPS)
            if found and not args.dry_run and not args.allow_privileged_groups:
                raise PrivilegedGroups(found)
            report = await register(hub, registration, dry_run=args.dry_run)
            return {**report, "privileged_groups": found}
        finally:
            hub.close()

    try:
        report = asyncio.run(run())
    except HubAPIError as e:
        print(f"gpuhub users: the hub refused: {e}", file=sys.stderr)
        return 1
    except PrivilegedGroups as e:
        print(
            f"gpuhub users: {privileged_refusal(e.found)} (--allow-privileged-groups)",
            file=sys.stderr,
        )
        return 1
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        print(report["summary"])
        for key in ("create_users", "create_groups"):
            if report[key]:
                print(f"  {key.replace('_', ' ')}: {', '.join(report[key])}")
        for group, why in report["privileged_groups"].items():
            print(f"  privileged group {group}: {why}")
    return 0
