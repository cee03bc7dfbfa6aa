"""The revisions of gpuhub's store, oldest first (docs/upgrades.md: adding one)."""
