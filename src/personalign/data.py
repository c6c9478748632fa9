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
    "check_input_file",
    "check_prompt_size",
    "check_writable",
    "read_text",
]

BUILTIN_SPLITS = ("train", "eval")


@dataclass(frozen=True)
class Instruction:
    prompt: str
    id: str | None = None
    domain: str | None = None
    kind: str | None = None


# Limits on what a file may hold, checked while reading (a line is read at most this far, never whole), so a
# stray huge line or file fails at once with its name instead of exhausting memory in the tokenizer or model.
MAX_LINE_BYTES = 1 << 20  # one JSONL line, and one prompt from any source (1 MiB: far beyond any context)
MAX_FILE_BYTES = 256 << 20  # a file read whole: a config, a dimensions file, a JSON list of prompts


def _mib(n: int) -> str:
    return f"{n / (1 << 20):g} MiB"


def check_input_file(path: str | Path, what: str = "file", error: type[Exception] = DataError) -> Path:
    """``path`` if it names a regular file that can be opened; else one ``error`` naming the problem
    (missing, a directory, a device or pipe, unreadable)."""
    path = Path(path)
    if not path.exists():
        raise error(f"{what} {path} does not exist")
    if path.is_dir():
        raise error(f"{what} {path} is a directory, not a file")
    if not path.is_file():
        raise error(f"{what} {path} is not a regular file (a device or pipe?); give a file")
    try:
        with path.open("rb"):
            pass
    except OSError as exc:
        raise error(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    return path


def _decode(data: bytes, path: Path, what: str, error: type[Exception], lineno: int | None = None) -> str:
    """UTF-8 text (a leading byte-order mark dropped); binary or other encodings are refused with the line."""
    bad = data.find(b"\x00")
    try:
        if bad >= 0:
            raise UnicodeDecodeError("utf-8", data, bad, bad + 1, "NUL byte")
        return data.decode("utf-8-sig" if lineno in (None, 1) else "utf-8")
    except UnicodeDecodeError as exc:
        line = lineno if lineno is not None else data.count(b"\n", 0, exc.start) + 1
        raise error(f"{what} {path} is not UTF-8 text (line {line}: byte {data[exc.start]:#04x}; a binary file?); "
                    "give a UTF-8 text file") from None


def read_text(path: str | Path, what: str = "file", error: type[Exception] = DataError,
              limit: int = MAX_FILE_BYTES) -> str:
    """The UTF-8 text of a file read whole (a config, a dimensions or JSON file), or one ``error`` naming the
    problem: missing, a directory, unreadable, larger than ``limit`` bytes, binary or not UTF-8."""
    path = check_input_file(path, what, error)
    try:
        with path.open("rb") as fh:
            data = fh.read(limit + 1)
    except OSError as exc:
        raise error(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    if len(data) > limit:
        raise error(f"{what} {path} is larger than {_mib(limit)}; is it the right file?")
    return _decode(data, path, what, error)


def check_prompt_size(text: str, where: str) -> str:
    """``text`` if it fits :data:`MAX_LINE_BYTES`; a longer prompt would only fail in the model, slowly."""
    if len(text) > MAX_LINE_BYTES or len(text.encode("utf-8")) > MAX_LINE_BYTES:
        raise DataError(f"{where}: the prompt is longer than {_mib(MAX_LINE_BYTES)}, far more than a model's context; "
                        "shorten it")
    return text


def iter_jsonl(path: str | Path, what: str = "file") -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) for each non-blank line; a malformed line is an error naming file and line.

    Read line by line in bytes, each line at most :data:`MAX_LINE_BYTES`: a binary file, a line in another
    encoding or a huge line is refused at that line, without reading the rest."""
    path = check_input_file(path, what)
    try:
        fh = path.open("rb")
    except OSError as exc:
        raise DataError(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    with fh:
        lineno = 0
        while raw := fh.readline(MAX_LINE_BYTES + 1):
            lineno += 1
            if len(raw) > MAX_LINE_BYTES:
                raise DataError(f"{path}:{lineno}: line longer than {_mib(MAX_LINE_BYTES)}; one record per line, "
                                "each a JSON object of reasonable size")
            line = _decode(raw, path, what, DataError, lineno)
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{lineno}: malformed JSON ({exc.msg})") from None
            except RecursionError:
                raise DataError(f"{path}:{lineno}: JSON nested too deeply") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
            yield lineno, row


def read_jsonl(path: str | Path, what: str = "file") -> list[dict[str, Any]]:
    """Read a JSONL file; a malformed line is an error naming the file and line number."""
    return [row for _, row in iter_jsonl(path, what)]


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
    check_prompt_size(text, where)
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
    if not path.exists():
        raise DataError(f"prompt file {path} does not exist (or use builtin:train, builtin:eval, hf:NAME)")
    if path.suffix == ".json":
        try:
            doc = json.loads(read_text(path, "prompt file"))
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}: malformed JSON at line {exc.lineno} ({exc.msg})") from None
        except RecursionError:
            raise DataError(f"{path}: JSON nested too deeply") from None
        if isinstance(doc, dict):
            doc = doc.get("data", doc.get("instructions"))
        if not isinstance(doc, list):
            raise DataError(f"{path}: expected a list of records (or {{'data': [...]}})")
        rows = doc
    else:
        rows = read_jsonl(path, "prompt file")
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
    if not repo.strip():
        raise DataError("hf: needs a dataset name, as in hf:NAME or hf:NAME:SPLIT")
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


def check_writable(path: str | Path, what: str = "output", *, folder: bool = False,
                   error: type[Exception] = DataError) -> Path:
    """``path`` if a file (or, with ``folder``, a folder) can be written there; else one ``error`` naming why.

    Commands check their outputs with it before loading any model. Nothing is left behind: an existing file
    is opened for appending and closed; a new one is tried as a temporary file in the nearest existing
    folder above it, which must be a folder that can be written (the folders between are created later)."""
    path = Path(path)
    if not str(path).strip():
        raise error(f"{what} path is empty")
    kind = "folder" if folder else "file"
    if path.exists():
        if folder and not path.is_dir():
            raise error(f"{what} {path} is a file, not a folder; give a folder")
        if not folder and path.is_dir():
            raise error(f"{what} {path} is a directory; give a file path")
        if not folder and not path.is_file():
            raise error(f"{what} {path} is not a regular file (a device or pipe?); give a file path")
    parent = path if path.is_dir() else path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise error(f"{what} {path} cannot be created: {parent} is a file, not a folder")
    try:
        if path.is_file():
            with path.open("ab"):
                pass
        else:
            import tempfile

            with tempfile.TemporaryFile(dir=parent):
                pass
    except OSError as exc:
        where = path if path.exists() else parent
        raise error(f"{what} {path} cannot be written ({where}: {exc.strerror or exc}); choose another {kind}") from None
    return path


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


def resume_rows(path: str | Path, expected: Sequence[dict[str, Any]],
                recorded: Sequence[str] = ()) -> list[dict[str, Any]]:
    """Rows already written to ``path`` by this same run, checked against the rows it will write.

    ``expected[i]`` holds the identifying fields of output line ``i`` (prompt, preference, ...).
    Lines written by another run are refused, so resuming never mixes two runs in one file. The fields
    named in ``recorded`` are compared only on lines that have them (files written before they were).
    """
    path = Path(path)
    done = read_completed(path)
    if len(done) > len(expected):
        raise DataError(f"{path} already has {len(done)} lines, more than this run writes ({len(expected)}); "
                        "use another output or delete the file")
    for i, (row, want) in enumerate(zip(done, expected)):
        want = {k: v for k, v in want.items() if k not in recorded or k in row}
        if any(row.get(k) != v for k, v in want.items()):
            fields = ", ".join(_differences(k, row.get(k), v) for k, v in want.items() if row.get(k) != v)
            raise DataError(f"{path} line {i + 1} was written by a different run ({fields} differ); "
                            "use another output or delete the file")
    return done


def _differences(key: str, had: Any, want: Any) -> str:
    """``key``, or for settings the ones that differ with both values (``sampling.seed 3 -> 99``)."""
    if isinstance(had, dict) and isinstance(want, dict):
        return ", ".join(f"{key}.{k} {had.get(k)!r} -> {want.get(k)!r}" for k in sorted(set(had) | set(want))
                         if had.get(k) != want.get(k))
    return key


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
    rows = read_jsonl(path, what)
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
