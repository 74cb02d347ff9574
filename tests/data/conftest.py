"""Small generated corpora and a tiny tokenizer (trained once per session) for the data tests."""

import json
import random

import pytest

from data.tokenizer import train_tokenizer

WORDS = ("alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma tau "
         "upsilon phi chi psi omega def return import class self print for while if else").split()


def make_docs(n, seed=0, prefix="doc"):
    """n distinct documents; each starts with its unique id `prefix<i>:` so tests can tell them apart."""
    rng = random.Random(seed)
    return [f"{prefix}{i}: " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 60))) for i in range(n)]


def write_jsonl(path, docs, field="text"):
    with open(path, "w") as f:
        for d in docs:
            f.write(json.dumps({field: d}) + "\n")
    return path


@pytest.fixture(scope="session")
def tok(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    text = make_docs(400, seed=123) + ["".join(chr(c) for c in range(32, 127))]
    return train_tokenizer(text, 320, str(d / "tiny.model"))


@pytest.fixture
def corpus(tmp_path):
    """A small corpus in two formats: several epochs fit in a few dozen batches."""
    write_jsonl(tmp_path / "a.jsonl", make_docs(25, seed=1, prefix="a"))
    write_jsonl(tmp_path / "b.jsonl", make_docs(15, seed=2, prefix="b"))
    for i, d in enumerate(make_docs(6, seed=3, prefix="t")):
        (tmp_path / f"t{i}.txt").write_text(d)
    return tmp_path
