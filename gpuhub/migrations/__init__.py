"""Alembic migrations of gpuhub's store (see gpuhub.schema, which runs them, and docs/upgrades.md).

One revision per schema change in `versions/`; `0001` is gpuhub 0.1.0's schema.
"""
