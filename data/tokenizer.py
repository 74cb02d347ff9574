"""Sentencepiece tokenizer: load a `.model`, train one on a corpus sample, or build the cached default.

    python -m data.tokenizer train --input 'corpus/*.jsonl' --vocab-size 32000 --output tok.model
    python -m data.tokenizer train --input python_stdlib --vocab-size 2048 --output tok.model   # embedded corpus

Models are trained with byte fallback (any text encodes, nothing maps to <unk>), identity normalisation and
no whitespace collapsing, so decode(encode(text)) == text for code and prose alike. Ids: unk 0, bos 1, eos 2.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import logging
import os
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterable, Iterator, List, Optional, Sequence

import sentencepiece as spm

log = logging.getLogger(__name__)

DEFAULT_MAX_CHARS = 4_000_000
_TRAINER_VERSION = 1  # bump when training options change: part of the default tokenizer's cache key


class Tokenizer:
    """A sentencepiece model. Picklable (DataLoader workers under spawn get the serialized model)."""

    def __init__(self, path: Optional[str] = None, model_proto: Optional[bytes] = None):
        if model_proto is None:
            if path is None or not os.path.isfile(path):
                raise FileNotFoundError(f"data.tokenizer: no tokenizer model at {path!r}; train one with "
                                        f"`python -m data.tokenizer train --input FILES --vocab-size N --output "
                                        f"{path or 'tok.model'}` or set data.tokenizer=null for the default")
            model_proto = Path(path).read_bytes()
        self.path = path
        self._proto = model_proto
        self.sp = spm.SentencePieceProcessor(model_proto=model_proto)

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    @property
    def eos_id(self) -> int:
        return self.sp.eos_id()

    @property
    def bos_id(self) -> int:
        return self.sp.bos_id()

    def encode(self, text: str) -> List[int]:
        return self.sp.encode(text)

    def encode_batch(self, texts: Sequence[str]) -> List[List[int]]:
        return self.sp.encode(list(texts))

    def decode(self, ids: Iterable[int]) -> str:
        return self.sp.decode([int(i) for i in ids])

    def fingerprint(self) -> str:
        return hashlib.sha1(self._proto).hexdigest()[:16]

    def __getstate__(self):
        return {"path": self.path, "model_proto": self._proto}

    def __setstate__(self, st):
        self.__init__(st["path"], st["model_proto"])

    def __repr__(self) -> str:
        return f"Tokenizer(path={self.path!r}, vocab_size={self.vocab_size})"


def load_tokenizer(path_or_cfg) -> Tokenizer:
    """A path to a `.model` file, or a DataConfig (its `tokenizer`, or the cached default when None)."""
    if isinstance(path_or_cfg, (str, os.PathLike)):
        return Tokenizer(os.fspath(path_or_cfg))
    cfg = path_or_cfg
    if getattr(cfg, "tokenizer", None):
        return Tokenizer(os.fspath(cfg.tokenizer))
    return ensure_default_tokenizer(getattr(cfg, "tokenizer_cache_dir", None), getattr(cfg, "vocab_size", 2048))


# ---- training ---------------------------------------------------------------------------------------
def _lines(texts: Iterable[str], max_chars: int, max_line_chars: int = 4096) -> Iterator[str]:
    """Sentencepiece trains on lines: split documents into lines, drop blank ones, stop after max_chars."""
    total = 0
    for text in texts:
        for line in text.split("\n"):
            if not line.strip():
                continue
            line = line[:max_line_chars]
            yield line
            total += len(line)
            if total >= max_chars:
                return


def train_tokenizer(texts: Iterable[str], vocab_size: int, output: str, *, model_type: str = "bpe",
                    max_chars: int = DEFAULT_MAX_CHARS, num_threads: int = 1) -> Tokenizer:
    """Train a sentencepiece model on the first `max_chars` characters of `texts` (deterministic)."""
    if vocab_size < 260:
        raise ValueError(f"data.tokenizer: vocab_size={vocab_size} is too small; byte fallback needs 256 byte "
                         f"pieces + 3 specials: use at least 260 (e.g. 2048)")
    if model_type not in ("bpe", "unigram"):
        raise ValueError(f"data.tokenizer: model_type={model_type!r}; use 'bpe' or 'unigram'")
    out = Path(output)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        prefix = os.path.join(tmp, "tok")
        t0 = time.time()
        spm.SentencePieceTrainer.train(
            sentence_iterator=_lines(texts, max_chars), model_prefix=prefix, vocab_size=vocab_size,
            model_type=model_type, byte_fallback=True, character_coverage=0.9995,
            normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=False,
            allow_whitespace_only_pieces=True, split_digits=True, user_defined_symbols=["\n"],
            unk_id=0, bos_id=1, eos_id=2, pad_id=-1, shuffle_input_sentence=False,
            input_sentence_size=0, num_threads=num_threads, minloglevel=2)
        os.replace(prefix + ".model", out)
    log.info("trained a %s tokenizer (vocab %d) in %.1fs -> %s", model_type, vocab_size, time.time() - t0, out)
    return Tokenizer(str(out))


def default_cache_dir() -> str:
    return os.environ.get("JAMBA_CACHE_DIR", os.path.join(os.path.expanduser("~"), ".cache", "jamba-train"))


def ensure_default_tokenizer(cache_dir: Optional[str] = None, vocab_size: int = 2048) -> Tokenizer:
    """The default tokenizer: trained once on the embedded corpus (Python stdlib sources, train split),
    cached under cache_dir keyed by vocab size, Python version and trainer version. Concurrent processes
    (ranks) serialise on a file lock: the first trains, the others wait and load the same file."""
    from data.corpus import stdlib_documents

    cache = Path(cache_dir or default_cache_dir()) / "tokenizers"
    cache.mkdir(parents=True, exist_ok=True)
    from data.corpus import stdlib_fingerprint

    key = f"stdlib-py{sys.version_info[0]}{sys.version_info[1]}-{stdlib_fingerprint()}-bpe{vocab_size}-v{_TRAINER_VERSION}"
    path = cache / f"{key}.model"
    if path.is_file():
        return Tokenizer(str(path))
    with open(cache / f"{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # others block here until the first process has written the model
        try:
            if not path.is_file():
                log.info("training the default tokenizer (vocab %d) on the Python stdlib; cached at %s",
                         vocab_size, path)
                train_tokenizer(stdlib_documents("train"), vocab_size, str(path))
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return Tokenizer(str(path))


# ---- CLI ----------------------------------------------------------------------------------------------
def _expand(inputs: Sequence[str]) -> List[str]:
    """--input's files, as data.sources reads a path (a file, a directory's files, a glob's files)."""
    from data.sources import expand_path

    files: List[str] = []
    for item in inputs:
        hits = expand_path(item)
        if not hits:
            raise ValueError(f"--input {item!r} matches no file; give files, directories or globs ('**' is "
                             f"recursive, e.g. 'corpus/**/*.jsonl')")
        files += hits
    return files


def _cli_texts(files: Optional[List[str]], text_field: str) -> Iterator[str]:
    """The documents of `files` (None: the embedded corpus's train split)."""
    from data.corpus import stdlib_documents
    from data.sources import iter_file_documents

    if files is None:
        yield from stdlib_documents("train")
        return
    for f in files:
        for _, text in iter_file_documents(f, text_field=text_field):
            if text is not None:
                yield text


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m data.tokenizer", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="train a sentencepiece model on a corpus sample")
    t.add_argument("--input", nargs="+", required=True,
                   help="files, globs or directories (.txt/.py/.md: one document per file; .jsonl/.json; "
                        ".parquet), or the word python_stdlib for the embedded corpus")
    t.add_argument("--vocab-size", type=int, required=True)
    t.add_argument("--output", required=True, help="PATH.model")
    t.add_argument("--max-chars", type=int, default=DEFAULT_MAX_CHARS, help="characters sampled (in order)")
    t.add_argument("--model-type", default="bpe", choices=["bpe", "unigram"])
    t.add_argument("--text-field", default="text", help="field of JSONL/Parquet records holding the text")
    t.add_argument("--threads", type=int, default=max(1, min(8, os.cpu_count() or 1)))
    e = sub.add_parser("encode", help="print the ids of a string (a quick check of a model)")
    e.add_argument("--model", required=True)
    e.add_argument("text")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.cmd == "train":
            # expanded first: a path that matches nothing fails here, not inside sentencepiece's reader
            files = None if args.input == ["python_stdlib"] else _expand(args.input)
            tok = train_tokenizer(_cli_texts(files, args.text_field), args.vocab_size, args.output,
                                  model_type=args.model_type, max_chars=args.max_chars, num_threads=args.threads)
            print(f"wrote {args.output}: vocab_size={tok.vocab_size} eos_id={tok.eos_id} bos_id={tok.bos_id}")
        else:
            tok = Tokenizer(args.model)
            ids = tok.encode(args.text)
            print(ids)
            print(repr(tok.decode(ids)))
    except (ValueError, OSError, RuntimeError) as e:  # a user's input: one line, not a traceback
        print(f"python -m data.tokenizer: error: {_explain(e, args)}", file=sys.stderr)
        return 2
    return 0


def _explain(e: BaseException, args) -> str:
    text = " ".join(str(e).split())
    m = re.search(r"Vocabulary size too high \((\d+)\)\. Please set it to a value <= (\d+)", text)
    if m:  # sentencepiece's message names neither the cause nor our flags
        return (f"--vocab-size {m.group(1)}: this text (its first --max-chars={args.max_chars:,} characters) gives "
                f"at most {m.group(2)} pieces; lower --vocab-size, or give more text (--input, --max-chars)")
    m = re.search(r"Vocabulary size is smaller than required_chars\. (\d+) vs (\d+)", text)
    if m:
        return (f"--vocab-size {m.group(1)}: this text needs at least {m.group(2)} pieces (its distinct characters, "
                f"the byte pieces and the specials); raise --vocab-size")
    if args.cmd == "encode" and not os.path.isfile(args.model):
        return f"--model {args.model!r}: no such file"
    return text


if __name__ == "__main__":
    sys.exit(main())
