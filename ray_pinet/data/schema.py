"""Canonical interaction-log schema (the ``canonical/`` part of the prepared-data contract)."""

from __future__ import annotations

import pyarrow as pa

USER, ITEM, TS, RATING, BEHAVIOR = "user_id", "item_id", "timestamp", "rating", "behavior"
REQUIRED = (USER, ITEM, TS)
OPTIONAL = (RATING, BEHAVIOR)
TYPES = {USER: pa.string(), ITEM: pa.string(), TS: pa.int64(), RATING: pa.float64(), BEHAVIOR: pa.string()}


def canonical_schema(columns: list[str] | tuple[str, ...]) -> pa.Schema:
    """Schema of the canonical columns in ``columns`` (always in canonical order)."""
    return pa.schema([(c, TYPES[c]) for c in (*REQUIRED, *OPTIONAL) if c in columns])
