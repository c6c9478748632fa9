"""Bad input, class by class and command by command: each ends in one ``error:`` line and exit status 2, never
a traceback, and what can be checked before a model loads is (the loader is made to fail in those tests)."""

from __future__ import annotations

import json
import socket

import pytest
from test_cli import _error_line, run

import personalign.generation
import personalign.models


@pytest.fixture
def no_model(monkeypatch):
    """Loading any model fails the test: the input must be refused before."""

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the bad input was refused")

    monkeypatch.setattr(personalign.models, "load_model", refuse)


@pytest.fixture
def no_generation(monkeypatch):
    """Decoding any token fails the test: the input must be refused before generation starts."""

    def refuse(*args, **kwargs):
        raise AssertionError("generation started before the bad input was refused")

    monkeypatch.setattr(personalign.generation, "decode", refuse)


def _one_line(res) -> str:
    line = _error_line(res)
    assert line.startswith("error: ") and "Traceback" not in res.output, res.output
    return line


@pytest.fixture
def files(tmp_path):
    """Bad files of each kind, and good ones to pair with them."""
    f = {
        "binary": tmp_path / "binary.jsonl",
        "latin1": tmp_path / "latin1.jsonl",
        "directory": tmp_path / "folder.jsonl",
        "empty": tmp_path / "empty.jsonl",
        "pairs": tmp_path / "pairs.jsonl",
    }
    f["binary"].write_bytes(bytes(range(256)) * 8)
    f["latin1"].write_bytes('{"prompt": "café"}\n'.encode("latin-1"))
    f["directory"].mkdir()
    f["empty"].write_bytes(b"")
    f["pairs"].write_text(json.dumps({"prompt": "Hi?", "a": "x", "b": "y", "response": "r", "side": "P1A"}) + "\n")
    return f


# -- class 1: files that are not UTF-8 text, or directories, given where a text file is read ------------------

READERS = {  # command line with {} where the bad file goes
    "generate --input": ["generate", "--prefs", "1A", "--input", "{}"],
    "generate --config": ["generate", "--prefs", "1A", "--config", "{}", "Hi"],
    "generate --dimensions": ["generate", "--prefs", "1A", "--dimensions", "{}", "Hi"],
    "prefs --dimensions": ["prefs", "--dimensions", "{}"],
    "rollout --prompts": ["rollout", "--prompts", "{}", "-o", "{out}/r.jsonl"],
    "judge --input": ["judge", "--side", "P1A", "--input", "{}"],
    "judge --labels": ["judge", "--side", "P1A", "--input", "{pairs}", "--judge", "human", "--labels", "{}"],
    "judge --judge-cache": ["judge", "--side", "P1A", "--input", "{pairs}", "--judge", "llm", "--base-url",
                            "http://127.0.0.1:9/v1", "--judge-model", "m", "--judge-cache", "{}"],
    "judge --set judge.cache": ["judge", "--side", "P1A", "--input", "{pairs}", "--judge", "llm", "--base-url",
                                "http://127.0.0.1:9/v1", "--judge-model", "m", "--set", "judge.cache={}"],
    "eval --set judge_options.cache": ["eval", "-o", "{out}/run", "--judge", "llm", "--set", "methods=[vanilla]",
                                       "--set", "judge_options.base_url=http://127.0.0.1:9/v1",
                                       "--set", "judge_options.model=m", "--set", "judge_options.cache={}"],
    "label --rollouts": ["label", "--rollouts", "{}", "-o", "{out}/p.jsonl"],
    "train-rm --pairs": ["train-rm", "--pairs", "{}", "-o", "{out}/rm", "--side", "P1A"],
    "train-multitask --pairs": ["train-multitask", "--pairs", "{}", "-o", "{out}/mt"],
    "train-expert --config": ["train-expert", "--config", "{}"],
    "score --input": ["score", "--reward-model", "{out}", "--input", "{}"],
    "pipeline --config": ["pipeline", "--config", "{}"],
    "eval --config": ["eval", "--config", "{}"],
    "serve --config": ["serve", "--config", "{}"],
}
KINDS = {"binary": "is not UTF-8 text", "latin1": "is not UTF-8 text", "directory": "is a directory"}


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("where", list(READERS))
def test_a_file_that_is_not_text_is_one_line(where, kind, files, tmp_path, no_model):
    bad = files[kind]
    args = [a.replace("{}", str(bad)).replace("{out}", str(tmp_path)).replace("{pairs}", str(files["pairs"]))
            for a in READERS[where]]
    line = _one_line(run(*args))
    assert KINDS[kind] in line and str(bad) in line, line


@pytest.mark.parametrize("args, expected", [
    (["generate", "--prefs", "1A", "--input", "{}"], "holds no instructions"),
    (["judge", "--side", "P1A", "--input", "{}"], "is empty"),
    (["label", "--rollouts", "{}", "-o", "{out}/p.jsonl"], "is empty"),
    (["train-rm", "--pairs", "{}", "-o", "{out}/rm", "--side", "P1A"], "is empty"),
    (["prefs", "--dimensions", "{}"], "expected a mapping"),
])
def test_an_empty_file_is_one_line(args, expected, files, tmp_path, no_model):
    line = _one_line(run(*[a.replace("{}", str(files["empty"])).replace("{out}", str(tmp_path)) for a in args]))
    assert expected in line


def test_a_utf8_byte_order_mark_is_accepted(tmp_path):
    from personalign.data import load_prompts

    f = tmp_path / "bom.jsonl"
    f.write_bytes(b"\xef\xbb\xbf" + json.dumps({"prompt": "Hi?"}).encode() + b"\n")
    assert [i.prompt for i in load_prompts(f)] == ["Hi?"]


# -- class 2: oversized lines and prompts ---------------------------------------------------------------------

def test_a_huge_line_is_refused_at_that_line(tmp_path, no_model):
    from personalign.data import MAX_LINE_BYTES

    f = tmp_path / "in.jsonl"
    f.write_text(json.dumps({"prompt": "Hi?"}) + "\n" + json.dumps({"prompt": "x" * (MAX_LINE_BYTES + 10)}) + "\n")
    line = _one_line(run("generate", "--prefs", "1A", "--input", str(f)))
    assert f"{f}:2: line longer than 1 MiB" in line


@pytest.mark.parametrize("source", ["json", "argument"])
def test_a_huge_prompt_from_any_source_is_refused(source, tmp_path, no_model):
    from personalign.data import MAX_LINE_BYTES

    text = "word " * (MAX_LINE_BYTES // 5 + 10)
    if source == "json":
        f = tmp_path / "in.json"
        f.write_text(json.dumps([{"prompt": text}]))
        args = ["--input", str(f)]
    else:
        args = [text]
    line = _one_line(run("generate", "--prefs", "1A", *args))
    assert "the prompt is longer than 1 MiB" in line


@pytest.mark.parametrize("command", ["generate", "rollout"])
def test_a_prompt_longer_than_the_context_is_refused_before_generation(command, tmp_path, tiny_model_dir,
                                                                       no_generation):
    f = tmp_path / "in.jsonl"
    f.write_text(json.dumps({"prompt": "Hi?"}) + "\n" + json.dumps({"prompt": "Explain rain. " * 600}) + "\n")
    out = tmp_path / "out.jsonl"
    if command == "generate":
        args = ["generate", "--prefs", "1A", "--input", str(f), "--output", str(out)]
    else:
        args = ["rollout", "--prompts", str(f), "--sides", "P1A", "-n", "1", "--output", str(out)]
    line = _one_line(run(*args, "--model", str(tiny_model_dir), "--max-new-tokens", "8"))
    assert "prompt 2 has" in line and "exceeds the model's context of 1024 tokens" in line, line
    assert not out.exists() or not out.read_text()


# -- class 3: weights that are zero, non-finite or overflow when normalised, for every method -----------------

WEIGHTS = {
    "concise=0,friendly=0": "has all weights zero",
    "concise=0": "has all weights zero",
    "concise=1e308,friendly=1e308": "their sum overflows",
    "concise=inf": "must be finite",
    "concise=nan,friendly=1": "must be finite",
}


@pytest.mark.parametrize("method", ["prompt", "vanilla", "expert", "soup", "mope"])
@pytest.mark.parametrize("prefs", list(WEIGHTS))
def test_bad_weights_are_refused_by_every_method(method, prefs, tiny_model_dir, no_model):
    line = _one_line(run("generate", "--prefs", prefs, "--method", method, "--model", str(tiny_model_dir), "Hi"))
    assert WEIGHTS[prefs] in line


@pytest.mark.parametrize("prefs", ["concise=0,friendly=0", "concise=1e308,friendly=1e308"])
@pytest.mark.parametrize("command", ["merge", "prefs"])
def test_bad_weights_are_refused_by_every_command(command, prefs, tmp_path, no_model):
    args = ["merge", "--prefs", prefs, "-o", str(tmp_path / "m")] if command == "merge" else ["prefs", "--parse", prefs]
    assert WEIGHTS[prefs] in _one_line(run(*args))


# -- class 4: outputs that cannot be written, found before any model loads -----------------------------------

def _bad_output(tmp_path, kind: str, folder: bool):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    if kind == "directory-for-file":
        (tmp_path / "a-dir").mkdir()
        return tmp_path / "a-dir", "is a directory"
    if kind == "file-for-folder":
        return blocker, "is a file, not a folder"
    if kind == "under-a-file":
        return blocker / "out", "a-file is a file, not a folder"
    return "/proc/personalign-no-such/out", "cannot be written"  # nothing can be created in /proc


WRITERS = {  # (command line, the output's flag, a folder?)
    "generate": (["generate", "--prefs", "1A", "--input", "{pairs}"], "--output", False),
    "rollout": (["rollout", "--prompts", "{pairs}"], "--output", False),
    "judge": (["judge", "--side", "P1A", "--input", "{pairs}"], "--output", False),
    "label": (["label", "--rollouts", "{pairs}"], "--output", False),
    "score": (["score", "--reward-model", "{tmp}", "--input", "{pairs}"], "--output", False),
    "serve": (["serve"], "--db", False),
    "train-rm": (["train-rm", "--pairs", "{pairs}", "--side", "P1A"], "--output-dir", True),
    "train-expert": (["train-expert", "--side", "P1A"], "--output-dir", True),
    "train-pcm": (["train-pcm"], "--output-dir", True),
    "train-multitask": (["train-multitask", "--pairs", "{pairs}"], "--output-dir", True),
    "train-pmorl": (["train-pmorl"], "--output-dir", True),
    "merge": (["merge", "--prefs", "1A"], "--output", True),
    "eval": (["eval"], "--run-dir", True),
    "pareto": (["pareto"], "--run-dir", True),
    "demo": (["demo"], "--output-dir", True),
}


@pytest.mark.parametrize("kind", ["wrong-kind", "under-a-file", "unwritable"])
@pytest.mark.parametrize("command", list(WRITERS))
def test_an_output_that_cannot_be_written_is_refused_before_the_model_loads(command, kind, files, tmp_path,
                                                                            tiny_model_dir, no_model):
    args, flag, folder = WRITERS[command]
    kind = ("file-for-folder" if folder else "directory-for-file") if kind == "wrong-kind" else kind
    path, expected = _bad_output(tmp_path, kind, folder)
    argv = [a.replace("{pairs}", str(files["pairs"])).replace("{tmp}", str(tmp_path)) for a in args]
    if command not in ("score", "label", "judge", "prefs"):
        argv += ["--model", str(tiny_model_dir)]
    line = _one_line(run(*argv, flag, str(path)))
    assert flag in line and expected in line, line


def test_a_writable_output_leaves_nothing_behind(tmp_path):
    from personalign.data import check_writable

    assert check_writable(tmp_path / "new" / "deeper" / "o.jsonl") == tmp_path / "new" / "deeper" / "o.jsonl"
    assert list(tmp_path.iterdir()) == []
    existing = tmp_path / "o.jsonl"
    existing.write_text("kept\n")
    check_writable(existing)
    assert existing.read_text() == "kept\n"


# -- class 5: adapters of another base model, for every method that loads them -------------------------------

@pytest.fixture(scope="module")
def foreign(tmp_path_factory):
    """Experts of a wider tiny llama: once recording their base (refused by name) and once recording none
    (refused by shape, when the base model is at hand)."""
    import shutil

    from conftest import build_tiny_tokenizer, save_side_experts
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("foreign")
    tok = build_tiny_tokenizer()
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                      tie_word_embeddings=False)
    LlamaForCausalLM(cfg).save_pretrained(root / "wide")
    tok.save_pretrained(root / "wide")
    named = save_side_experts(root / "wide", root / "named", ["P1A", "P2A"])
    unnamed = root / "unnamed"
    shutil.copytree(named, unnamed)
    for f in unnamed.glob("*/adapter/adapter_config.json"):
        doc = json.loads(f.read_text())
        doc["base_model_name_or_path"] = None
        f.write_text(json.dumps(doc))
    return {"named": named, "unnamed": unnamed}


def _adapter_args(method: str, experts):
    if method == "adapter":
        return ["--prefs", "1A", "--method", "adapter", "--adapter", str(experts / "P1A")]
    return ["--prefs", "1A" if method == "expert" else "1A,2A", "--method", method, "--experts", str(experts)]


@pytest.mark.parametrize("method", ["expert", "soup", "mope", "adapter"])
def test_adapters_recording_another_base_are_refused_before_the_model_loads(method, foreign, tiny_model_dir,
                                                                            no_model):
    line = _one_line(run("generate", *_adapter_args(method, foreign["named"]), "--model", str(tiny_model_dir), "Hi"))
    assert "was trained on base model" in line and "wide" in line


@pytest.mark.parametrize("method", ["expert", "soup", "mope", "adapter", "merge --full-model"])
def test_adapters_that_do_not_fit_the_base_are_refused_before_generation(method, foreign, tiny_model_dir, tmp_path,
                                                                         no_generation):
    if method.startswith("merge"):
        args = ["merge", "--prefs", "1A,2A", "--experts", str(foreign["unnamed"]), "--full-model",
                "-o", str(tmp_path / "m")]
    else:
        args = ["generate", *_adapter_args(method, foreign["unnamed"]), "Hi"]
    line = _one_line(run(*args, "--model", str(tiny_model_dir), "--device", "cpu"))
    assert "does not fit this base model" in line and "48 in the adapter" in line, line


# -- class 6: an address the server cannot listen on, found before the model loads ---------------------------

@pytest.fixture
def busy_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(1)
        yield sock.getsockname()[1]


@pytest.mark.parametrize("args, expected", [
    (["--port", "70000"], "port must be between 0 and 65535, got 70000"),
    (["--port", "-1"], "port must be between 0 and 65535, got -1"),
    (["--host", " "], "host must be an address"),
    (["--host", "127.0.0.1", "--port", "{busy}"], "cannot listen on 127.0.0.1:"),
])
def test_serve_refuses_an_address_before_the_model_loads(args, expected, busy_port, tiny_model_dir, no_model):
    argv = [a.replace("{busy}", str(busy_port)) for a in args]
    assert expected in _one_line(run("serve", "--model", str(tiny_model_dir), *argv))


def test_serve_refuses_a_profile_store_that_is_not_a_database(tmp_path, tiny_model_dir, no_model):
    db = tmp_path / "p.sqlite"
    db.write_bytes(bytes(range(256)) * 8)
    assert "not a usable profile database" in _one_line(run("serve", "--model", str(tiny_model_dir), "--db", str(db)))


def test_a_profile_store_that_is_a_directory_is_named_so(tmp_path, no_model):
    line = _one_line(run("generate", "--prefs", "profile:ana", "--db", str(tmp_path), "Hi"))
    assert f"profile store {tmp_path} is a directory" in line


def test_a_cache_folder_that_is_a_file_is_one_line(tmp_path, monkeypatch):
    """The cache folder cannot be created (a file is in the way): one line naming it and the setting."""
    blocker = tmp_path / "cache-is-a-file"
    blocker.write_text("")
    monkeypatch.setenv("PERSONALIGN_CACHE", str(blocker))
    line = _one_line(run("generate", "--method", "vanilla", "--max-new-tokens", "2", "Hi"))
    assert str(blocker) in line and "set PERSONALIGN_CACHE" in line
    assert "NOT USABLE" in run("env").stdout


def test_max_new_tokens_past_the_context_is_refused_before_the_model_loads(tiny_model_dir, no_model):
    import json as _json

    context = _json.loads((tiny_model_dir / "config.json").read_text())["max_position_embeddings"]
    line = _one_line(run("generate", "--prefs", "1A", "--model", str(tiny_model_dir), "--max-new-tokens",
                         str(context), "Hi"))
    assert f"leaves no room for a prompt in the model's context of {context} tokens" in line


def test_score_checks_the_side_and_batch_size_before_the_model_loads(tmp_path, no_model):
    rm = tmp_path / "rm"
    rm.mkdir()
    (rm / "reward_config.json").write_text(json.dumps({"kind": "reward_model", "sides": ["P2A"],
                                                        "base": {"name": "tiny"}}))
    (rm / "reward_model.safetensors").write_bytes(b"")
    responses = tmp_path / "r.jsonl"
    responses.write_text(json.dumps({"prompt": "Why?", "response": "Because."}) + "\n")
    base = ["score", "--reward-model", str(rm), "--input", str(responses)]
    assert "scores side(s) P2A, not P2B" in _one_line(run(*base, "--side", "P2B"))
    assert "--batch-size must be at least 1, got 0" in _one_line(run(*base, "--batch-size", "0"))
    with pytest.raises(AssertionError, match="a model was loaded"):  # a side's name is read as elsewhere
        run(*base, "--side", "concise")
