"""jamba.log_once.LogOnce: one line per key, at the level asked for; under torch.compile a key already logged
adds no graph break (the model's layers call it inside compiled code)."""

import logging

import torch

from jamba.log_once import LogOnce


def test_each_key_logs_once_at_its_level(caplog):
    a, b = LogOnce(logging.getLogger("jamba.test_a")), LogOnce(logging.getLogger("jamba.test_b"))
    with caplog.at_level(logging.INFO):
        for _ in range(3):
            a("k", "a says %s", "hello")
            b("k", "b says hello")  # another module's instance: its own keys
            a(("op", False), "slow path", level=logging.WARNING)
    got = [(r.name, r.levelno, r.getMessage()) for r in caplog.records]
    assert got == [("jamba.test_a", logging.INFO, "a says hello"), ("jamba.test_b", logging.INFO, "b says hello"),
                   ("jamba.test_a", logging.WARNING, "slow path")]
    assert {r.filename for r in caplog.records} == {"test_log_once.py"}  # the caller's place, not log_once.py's


def test_a_logged_key_compiles_to_nothing():
    once = LogOnce(logging.getLogger("jamba.test_compile"))

    def f(x):
        once("path", "taking the %s path", "fast")
        return x * 2

    f(torch.ones(2))  # logged eagerly first, as the first (uncompiled) call of a layer does
    torch._dynamo.reset()
    out = torch.compile(f, backend="eager", fullgraph=True)(torch.ones(3))  # fullgraph: a graph break would raise
    assert out.tolist() == [2.0, 2.0, 2.0]
