"""Log a message once per process: which kernel or code path runs is worth one line, not one per layer and step."""

from __future__ import annotations

import logging
from typing import Hashable


class LogOnce:
    """`log_once = LogOnce(logger)`, then `log_once(key, msg, *args, level=logging.INFO)` logs the first time it is
    given `key` and does nothing after that. An object holding its own set, not a function keyed by the logger:
    torch.compile traces these calls inside the model's layers, and once a key has been seen the check compiles
    to nothing (Dynamo cannot hash a logger's attributes, which would break the graph at every call)."""

    def __init__(self, logger: logging.Logger):
        self.logger = logger
        self.seen: set = set()

    def __call__(self, key: Hashable, msg: str, *args, level: int = logging.INFO) -> None:
        if key not in self.seen:
            self.seen.add(key)
            self.logger.log(level, msg, *args, stacklevel=2)  # the caller's file and line
