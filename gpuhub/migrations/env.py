"""Alembic's environment for gpuhub's store: always run through `gpuhub.schema`, which hands in an
open connection (`config.attributes["connection"]`) and holds the upgrade lock."""

from __future__ import annotations

from alembic import context

from gpuhub.schema import configure_context

configure_context(context, context.config.attributes["connection"])
with context.begin_transaction():
    context.run_migrations()
