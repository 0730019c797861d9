"""The SQL store: one interface over SQLite (default) and PostgreSQL."""

from bridge.store.db import (
    Batch,
    BatchResult,
    DeadLetterIn,
    Store,
    StoredReading,
    make_engine,
)

__all__ = [
    "Batch",
    "BatchResult",
    "DeadLetterIn",
    "Store",
    "StoredReading",
    "make_engine",
]
