"""How a benchmark script hands back its result: one JSON line on stdout (a driver's last line to parse) and,
with --json PATH, the same result indented in a file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional


def report_json(result: Any, path: Optional[str], echo: bool = True) -> None:
    """Print `result` as one JSON line (unless echo=False) and write it, indented by 1, to `path` if given."""
    if echo:
        print(json.dumps(result), flush=True)
    if path:
        Path(path).write_text(json.dumps(result, indent=1))
