"""Instruction sets (built-in and users'), JSONL helpers, and chat formatting.

Sources a user can name wherever a command takes prompts:

* ``builtin:train`` / ``builtin:eval``: the instructions written for this project (package data);
* a ``.jsonl`` or ``.json`` file whose records have ``prompt``, or alpaca-style ``instruction`` plus
  optional ``input``;
* ``hf:NAME`` or ``hf:NAME:SPLIT``: a Hugging Face dataset (needs network or a local cache), whose
  records use the same fields.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from personalign.errors import DataError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = [
    "Instruction",
    "load_builtin",
    "load_prompts",
    "iter_jsonl",
    "read_jsonl",
    "JsonlWriter",
    "build_user_message",
    "format_chat",
    "read_pairs",
    "read_records",
    "split_by_prompt",
]

BUILTIN_SPLITS = ("train", "eval")


@dataclass(frozen=True)
class Instruction:
    prompt: str
    id: str | None = None
    domain: str | None = None
    kind: str | None = None


def iter_jsonl(path: str | Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) for each non-blank line; a malformed line is an error naming file and line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"file {path} does not exist")
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{lineno}: malformed JSON ({exc.msg})") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
            yield lineno, row


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Read a JSONL file; a malformed line is an error naming the file and line number."""
    return [row for _, row in iter_jsonl(path)]


def _record_to_instruction(row: dict[str, Any], where: str) -> Instruction:
    if isinstance(row.get("prompt"), str) and row["prompt"].strip():
        text = row["prompt"].strip()
    elif isinstance(row.get("instruction"), str) and row["instruction"].strip():
        text = row["instruction"].strip()
        extra = row.get("input")
        if isinstance(extra, str) and extra.strip():
            text = f"{text}\n\n{extra.strip()}"
    else:
        raise DataError(f"{where}: record has no non-empty 'prompt' (or alpaca-style 'instruction') field")
    opt = {k: (str(row[k]) if row.get(k) is not None else None) for k in ("id", "domain", "kind")}
    return Instruction(text, **opt)


def load_builtin(split: str = "train") -> list[Instruction]:
    """The built-in instructions: ``train`` (for rollouts and training) or ``eval`` (held out)."""
    if split not in BUILTIN_SPLITS:
        raise DataError(f"unknown built-in split {split!r}; choose one of {', '.join(BUILTIN_SPLITS)}")
    ref = resources.files("personalign") / "data" / "instructions" / f"{split}.jsonl"
    with resources.as_file(ref) as path:
        rows = read_jsonl(path)
    return [_record_to_instruction(r, f"builtin:{split}[{i}]") for i, r in enumerate(rows)]


def load_prompts(source: str | Path, limit: int | None = None) -> list[Instruction]:
    """Instructions from a built-in split, a JSON/JSONL file, or a Hugging Face dataset."""
    src = str(source)
    if src.startswith("builtin:"):
        items = load_builtin(src.split(":", 1)[1])
    elif src.startswith("hf:"):
        items = _load_hf(src[3:])
    else:
        items = _load_file(Path(src))
    if not items:
        raise DataError(f"{src} holds no instructions")
    if limit is not None:
        if limit < 1:
            raise DataError(f"limit must be at least 1, got {limit}")
        items = items[:limit]
    return items


def _load_file(path: Path) -> list[Instruction]:
    if not path.is_file():
        raise DataError(f"prompt file {path} does not exist (or use builtin:train, builtin:eval, hf:NAME)")
    if path.suffix == ".json":
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}: malformed JSON at line {exc.lineno} ({exc.msg})") from None
        if isinstance(doc, dict):
            doc = doc.get("data", doc.get("instructions"))
        if not isinstance(doc, list):
            raise DataError(f"{path}: expected a list of records (or {{'data': [...]}})")
        rows = doc
    else:
        rows = read_jsonl(path)
    out = []
    for i, row in enumerate(rows):
        if isinstance(row, str):
            row = {"prompt": row}
        if not isinstance(row, dict):
            raise DataError(f"{path}: record {i + 1} is not an object")
        out.append(_record_to_instruction(row, f"{path}: record {i + 1}"))
    return out


def _load_hf(name: str) -> list[Instruction]:
    try:
        import datasets
    except ImportError:  # pragma: no cover - datasets is a core dependency
        raise DataError("loading hf: sources needs the 'datasets' package: pip install datasets") from None
    repo, _, split = name.partition(":")
    try:
        ds = datasets.load_dataset(repo, split=split or "train")
    except Exception as exc:  # noqa: BLE001 - network, missing dataset, bad split: one clear line
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(f"could not load Hugging Face dataset {repo!r} (split {split or 'train'!r}): {first}") from None
    return [_record_to_instruction(dict(r), f"hf:{name}[{i}]") for i, r in enumerate(ds)]


class JsonlWriter:
    """Append JSON lines durably (flush + fsync per batch), so an interruption loses at most the
    batch in flight."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = self.path.open("a", encoding="utf-8")

    def write_many(self, rows: Iterable[dict[str, Any]]) -> None:
        for row in rows:
            self._fh.write(json.dumps(row, ensure_ascii=False) + "\n")
        self._fh.flush()
        os.fsync(self._fh.fileno())

    def close(self) -> None:
        self._fh.close()

    def __enter__(self) -> JsonlWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_completed(path: str | Path) -> list[dict[str, Any]]:
    """Rows already written to an output file, for resuming.

    A last line cut off by an interruption (no newline, or not valid JSON) is removed from the file,
    so the run can append cleanly; a malformed line elsewhere is an error (the file is not ours).
    """
    path = Path(path)
    if not path.exists():
        return []
    data = path.read_bytes()
    if not data:
        return []
    keep = data if data.endswith(b"\n") else data[: data.rfind(b"\n") + 1]
    rows: list[dict[str, Any]] = []
    lines = keep.decode("utf-8", errors="replace").splitlines()
    for lineno, line in enumerate(lines, 1):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if lineno == len(lines):  # a torn last line (rare: fsync per batch)
                keep = keep[: keep.rstrip(b"\n").rfind(b"\n") + 1]
                break
            raise DataError(f"{path}:{lineno}: existing output line is not JSON; use another --output") from None
    if len(keep) != len(data):
        with path.open("r+b") as fh:
            fh.truncate(len(keep))
    return rows


def resume_rows(path: str | Path, expected: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows already written to ``path`` by this same run, checked against the rows it will write.

    ``expected[i]`` holds the identifying fields of output line ``i`` (prompt, preference, ...).
    Lines written by another run are refused, so resuming never mixes two runs in one file.
    """
    path = Path(path)
    done = read_completed(path)
    if len(done) > len(expected):
        raise DataError(f"{path} already has {len(done)} lines, more than this run writes ({len(expected)}); "
                        "use another output or delete the file")
    for i, (row, want) in enumerate(zip(done, expected)):
        if any(row.get(k) != v for k, v in want.items()):
            fields = ", ".join(k for k, v in want.items() if row.get(k) != v)
            raise DataError(f"{path} line {i + 1} was written by a different run ({fields} differ); "
                            "use another output or delete the file")
    return done


def build_user_message(instruction: str, preference_prompt: str = "") -> str:
    """The instruction with the preference prompt appended after a single space (P-SOUPS wording)."""
    instruction = instruction.strip()
    return f"{instruction} {preference_prompt}" if preference_prompt else instruction


def format_chat(tokenizer: PreTrainedTokenizerBase, user_message: str, system: str | None = None) -> str:
    """Render one user turn with the model's chat template, ready for generation.

    Models without a chat template get the plain message followed by a newline.
    """
    if getattr(tokenizer, "chat_template", None):
        messages = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": user_message}
        ]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return user_message + "\n"


def batched(items: Sequence[Any], size: int) -> Iterator[tuple[int, Sequence[Any]]]:
    """(start index, slice) pairs of at most ``size`` items."""
    if size < 1:
        raise DataError(f"batch size must be at least 1, got {size}")
    for start in range(0, len(items), size):
        yield start, items[start : start + size]


# -- preference pairs (rollouts labelled one criterion at a time) ------------------------------------

PAIR_FIELDS = ("prompt", "chosen", "rejected", "side")


def read_records(path: str | Path, fields: Sequence[str], what: str = "file") -> list[dict[str, Any]]:
    """The rows of a JSONL file, each checked to hold every one of ``fields`` as a string; an empty file
    or a row that lacks one is refused with the line number."""
    rows = read_jsonl(path)
    if not rows:
        raise DataError(f"{what} {path} is empty")
    for i, row in enumerate(rows):
        missing = [k for k in fields if not isinstance(row.get(k), str)]
        if missing:
            raise DataError(f"{path}: line {i + 1} lacks string field(s) {', '.join(missing)} "
                            f"(needs {', '.join(fields)})")
    return rows


def read_pairs(path: str | Path, sides: set[str] | None = None) -> list[dict[str, Any]]:
    """Preference pairs (``prompt``, ``chosen``, ``rejected``, ``side``), of ``sides`` if given."""
    return [r for r in read_records(path, PAIR_FIELDS, "pairs file") if sides is None or r["side"] in sides]


def split_by_prompt(rows: list[dict[str, Any]], eval_fraction: float, seed: int) -> tuple[list, list]:
    """Held-out pairs are those of the first ``eval_fraction`` of the instructions present, in a seeded
    hash order: no instruction is on both sides of the split, and models trained on the same pairs with
    the same seed hold out the same pairs."""
    prompts = sorted({r["prompt"] for r in rows}, key=lambda p: hashlib.sha1(f"{seed}:{p}".encode()).hexdigest())
    n_eval = max(1, round(len(prompts) * eval_fraction)) if eval_fraction > 0 else 0
    held = set(prompts[:n_eval])
    return [r for r in rows if r["prompt"] not in held], [r for r in rows if r["prompt"] in held]
