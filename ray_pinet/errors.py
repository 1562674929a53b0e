"""Errors about input data (as opposed to ``ConfigError`` about settings).

Every ``DataError`` names where the problem is: the file, the column, the 1-based row (the line
number for text files, the row number for Parquet) and the offending value. Fields that do not
apply (a corrupt file has no row) are ``None`` and print as ``-``.
"""

from __future__ import annotations

from typing import Any

_MAX_VALUE_CHARS = 200


class DataError(ValueError):
    """Bad input data: ``str(err)`` shows the reason and all of file, column, row and value."""

    def __init__(self, reason: str, *, file: str | None = None, column: str | None = None,
                 row: int | None = None, value: Any = None) -> None:
        self.reason = reason
        self.file = None if file is None else str(file)
        self.column = column
        self.row = row
        self.value = value
        super().__init__(self._message())

    def _message(self) -> str:
        value = "-" if self.value is None else repr(self.value)
        if len(value) > _MAX_VALUE_CHARS:
            value = value[:_MAX_VALUE_CHARS] + "..."
        dash = "-"
        return (f"{self.reason} [file: {self.file or dash}, column: {self.column or dash}, "
                f"row: {dash if self.row is None else self.row}, value: {value}]")

    def __reduce__(self):  # keeps the fields when Ray ships the error from a worker
        return (_rebuild, (self.reason, self.file, self.column, self.row, self.value))


def _rebuild(reason, file, column, row, value) -> DataError:
    return DataError(reason, file=file, column=column, row=row, value=value)
