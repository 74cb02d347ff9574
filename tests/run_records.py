"""Reading a run's metrics.jsonl while train.py (another process) may be writing it, or was killed mid-write."""

import json
from pathlib import Path
from typing import List


def read_records(path) -> List[dict]:
    """The JSON records of a JSONL file, in order; [] when it does not exist yet. A line that does not decode
    (torn by a kill -9, or read while its write was in progress) is skipped: the trainer sets such a line aside
    when it resumes, so it is never a step's record."""
    path = Path(path)
    out = []
    for line in (path.read_text().splitlines() if path.is_file() else []):
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out
