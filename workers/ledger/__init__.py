"""The usage ledger: its schema and rows, the Redis spool the workers fill, the writer
that drains it into SQLite or PostgreSQL, and `fleet usage`."""
