from __future__ import annotations

import json
import re
from collections import Counter

import pytest

from personalign.data import (
    JsonlWriter,
    batched,
    build_user_message,
    format_chat,
    load_builtin,
    load_prompts,
    read_completed,
    read_jsonl,
)
from personalign.errors import DataError

DOMAINS = {"science", "history", "health", "money", "law", "technology", "cooking", "travel",
           "relationships", "arts", "sport", "maths", "programming"}
KINDS = {"explain", "how-to", "compare", "list", "advise", "opinion", "creative", "short-factual"}


def _norm(text: str) -> str:
    return re.sub(r"[^a-z0-9 ]", "", text.lower()).strip()


def test_builtin_sets_sizes_coverage_and_no_overlap():
    train, ev = load_builtin("train"), load_builtin("eval")
    assert len(train) >= 600 and len(ev) >= 120
    for items in (train, ev):
        assert {i.domain for i in items} == DOMAINS
        assert {i.kind for i in items} == KINDS
        assert len({i.id for i in items}) == len(items)
        assert min(Counter(i.domain for i in items).values()) >= len(items) // 20
    train_norm = {_norm(i.prompt) for i in train}
    eval_norm = {_norm(i.prompt) for i in ev}
    assert len(train_norm) == len(train) and len(eval_norm) == len(ev)
    assert not train_norm & eval_norm


def test_unknown_builtin_split():
    with pytest.raises(DataError, match="unknown built-in split 'test'"):
        load_builtin("test")


def test_load_prompt_and_alpaca_jsonl(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text('{"prompt": "A?"}\n\n{"instruction": "Summarise", "input": "text here"}\n{"instruction": "B", "input": ""}\n')
    items = load_prompts(f)
    assert [i.prompt for i in items] == ["A?", "Summarise\n\ntext here", "B"]


def test_load_json_list_and_limit(tmp_path):
    f = tmp_path / "p.json"
    f.write_text(json.dumps([{"prompt": "a", "id": 7}, "b", {"instruction": "c"}]))
    items = load_prompts(f, limit=2)
    assert [i.prompt for i in items] == ["a", "b"]
    assert items[0].id == "7"
    assert len(load_prompts("builtin:eval", limit=5)) == 5


@pytest.mark.parametrize(
    "content, fragment",
    [
        ("", "holds no instructions"),
        ('{"prompt": "a"}\n{"prompt": \n', ":2: malformed JSON"),
        ('{"text": "a"}\n', "no non-empty 'prompt'"),
        ('[1, 2]\n', "expected a JSON object"),
    ],
)
def test_bad_files(tmp_path, content, fragment):
    f = tmp_path / "bad.jsonl"
    f.write_text(content)
    with pytest.raises(DataError) as err:
        load_prompts(f)
    assert fragment in str(err.value)


def test_missing_file_and_bad_limit(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_prompts(tmp_path / "none.jsonl")
    with pytest.raises(DataError, match="limit must be at least 1"):
        load_prompts("builtin:eval", limit=0)


def test_hf_source_from_local_folder(tmp_path):
    folder = tmp_path / "ds"
    folder.mkdir()
    (folder / "train.jsonl").write_text('{"instruction": "x", "input": "y"}\n{"prompt": "z"}\n')
    items = load_prompts(f"hf:{folder}")
    assert [i.prompt for i in items] == ["x\n\ny", "z"]


def test_hf_source_unavailable_is_one_line():
    with pytest.raises(DataError) as err:
        load_prompts("hf:no-such-user/no-such-dataset-xyz")
    assert "could not load Hugging Face dataset 'no-such-user/no-such-dataset-xyz'" in str(err.value)


def test_writer_and_read_completed_drop_torn_last_line(tmp_path):
    out = tmp_path / "o.jsonl"
    with JsonlWriter(out) as w:
        w.write_many([{"i": 0}, {"i": 1}])
    with out.open("a") as fh:
        fh.write('{"i": 2, "respo')  # interrupted mid-line
    rows = read_completed(out)
    assert rows == [{"i": 0}, {"i": 1}]
    assert out.read_text() == '{"i": 0}\n{"i": 1}\n'
    assert read_jsonl(out) == rows


def test_read_completed_rejects_foreign_file(tmp_path):
    out = tmp_path / "o.jsonl"
    out.write_text("not json\n{}\n")
    with pytest.raises(DataError, match="line is not JSON"):
        read_completed(out)
    assert read_completed(tmp_path / "absent.jsonl") == []


def test_user_message_and_chat_format(tiny):
    _, tok = tiny
    assert build_user_message("  Hi. ", "Be brief.") == "Hi. Be brief."
    assert build_user_message("Hi.") == "Hi."
    text = format_chat(tok, "Hi.", system="S")
    assert text == "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nHi.<|im_end|>\n<|im_start|>assistant\n"


def test_format_without_template(tiny):
    _, tok = tiny
    saved = tok.chat_template
    tok.chat_template = None
    try:
        assert format_chat(tok, "Hi.") == "Hi.\n"
    finally:
        tok.chat_template = saved


def test_batched():
    assert list(batched([1, 2, 3], 2)) == [(0, [1, 2]), (2, [3])]
    with pytest.raises(DataError):
        list(batched([1], 0))


@pytest.mark.parametrize("source", ["hf:", "hf::test", "hf: "])
def test_hf_source_without_a_name(source):
    with pytest.raises(DataError, match="hf: needs a dataset name, as in hf:NAME or hf:NAME:SPLIT"):
        load_prompts(source)
