"""Metrics as JSON lines: one object per line, appended and flushed as it is written.

Why JSON lines: a crashed run leaves every completed line readable, ``pandas.read_json(...,
lines=True)`` or ``jq`` read it as is, and a resumed run appends to the same file.
Rows keep plain Python scalars only (tensors are converted), so every line parses.
"""
from __future__ import annotations

import json
import math
import os
from typing import Any


def _plain(value: Any) -> Any:
    if hasattr(value, "item") and callable(value.item):      # torch / numpy scalars
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)                                     # JSON has no inf / nan
    return value


class MetricsLogger:
    """Append rows to ``path`` (a local file; ``None`` keeps them in memory only).

    Every row is also kept in ``self.rows`` so callers and tests can read them back.
    """

    def __init__(self, path: str | None = None, echo: bool = False):
        self.path = path
        self.echo = echo
        self.rows: list[dict] = []
        self._fh = None
        if path:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            self._fh = open(path, "a", encoding="utf-8")

    def log(self, row: dict[str, Any]) -> dict:
        row = {k: _plain(v) for k, v in row.items()}
        self.rows.append(row)
        if self._fh is not None:
            self._fh.write(json.dumps(row, sort_keys=False) + "\n")
            self._fh.flush()
        if self.echo:
            print(format_row(row), flush=True)
        return row

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


def format_row(row: dict[str, Any]) -> str:
    """One short human line for a metrics row (the JSON line stays the record)."""
    parts = [f"[{row.get('split', 'train')}] step {row.get('step', '?')}"]
    for key, fmt in (("loss", "loss {:.4f}"), ("perplexity", "ppl {:.2f}"), ("lr", "lr {:.2e}"),
                     ("grad_norm", "grad_norm {:.3f}"), ("tokens_per_s", "{:.0f} tok/s")):
        if isinstance(row.get(key), (int, float)):
            parts.append(fmt.format(row[key]))
    return " | ".join(parts)


def read_metrics(path: str) -> list[dict]:
    """Parse a JSON-lines metrics file back into rows."""
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]
