"""The SQLite state store (SPEC §5): connection, migrations, one method per domain operation."""
