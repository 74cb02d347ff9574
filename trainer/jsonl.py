"""Reading a run's JSONL files (metrics.jsonl, metrics.replayed.jsonl) that train.py may still be writing, or
was killed while writing. Standard library only: launch/ tools and trainer.plot read runs without torch."""

import json
from pathlib import Path
from typing import List


def read_jsonl(path, torn_anywhere: bool = False) -> List[dict]:
    """The JSON records of a JSONL file, in order; [] when it does not exist yet.

    A last line without its newline (being written, or torn by a kill -9) is skipped. Any other line that does
    not decode raises ValueError: in metrics.jsonl a torn line can only be the last one, since a resume sets it
    aside before appending. `torn_anywhere=True` skips undecodable lines everywhere: for metrics.replayed.jsonl,
    where every resume's set-aside adds the torn line it found, and for tools that show whatever a run
    directory holds."""
    path = Path(path)
    text = path.read_text() if path.is_file() else ""
    lines = text.splitlines()
    out = []
    for i, line in enumerate(lines):
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            if torn_anywhere or (i == len(lines) - 1 and not text.endswith("\n")):
                continue
            raise ValueError(f"{path}: line {i + 1} is not JSON and not a torn last line: {line!r}")
    return out
