"""A missing optional library is one line from every command: the extra that installs it and the command to
run, never a traceback."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap

import pytest
import typer
from typer.testing import CliRunner

from personalign import extras
from personalign.cli import _friendly_errors, app

runner = CliRunner()


def test_every_optional_library_maps_to_the_extra_that_lists_it():
    table = extras.extras()
    assert {"judges", "embed", "api", "serve"} <= set(table)
    for extra, dists in table.items():
        if extra == "dev":
            continue
        for dist in dists:
            module = dist.replace("-", "_")
            err = ModuleNotFoundError(f"No module named {module!r}", name=module)
            found = extras.missing_extra(err)
            assert found is not None and extra in {e for e, ds in table.items() if dist in ds}, (dist, found)
    assert extras.missing_extra(ModuleNotFoundError("No module named 'vaderSentiment'", name="vaderSentiment")) \
        == ("judges", "vaderSentiment")
    assert extras.missing_extra(ModuleNotFoundError("x", name="fastapi.responses")) == ("serve", "fastapi")
    # required or unknown libraries are not an extra: their error stays as it is
    assert extras.missing_extra(ModuleNotFoundError("x", name="torch")) is None
    assert extras.missing_extra(ModuleNotFoundError("x", name="no_such_module_anywhere")) is None
    assert extras.missing_extra(ValueError("x")) is None


def test_every_extra_has_words_for_its_message():
    assert set(extras.extras()) - {"dev"} <= set(extras.EXTRA_USES), set(extras.extras()) - set(extras.EXTRA_USES)


def test_an_import_error_raised_from_the_missing_module_names_its_extra():
    try:
        try:
            raise ModuleNotFoundError("No module named 'openai'", name="openai")
        except ImportError as exc:
            raise ImportError("the LLM judge cannot start") from exc
    except ImportError as outer:
        assert extras.missing_extra(outer) == ("api", "openai")


def test_the_hint_names_the_extra_and_the_install_command():
    line = extras.install_hint("judges", module="vaderSentiment")
    assert line == ("the offline judge needs the 'judges' extra (vaderSentiment is not installed): "
                    "pip install 'personalign[judges]'")


def _one_line(res) -> str:
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(lines) == 1, res.output
    return lines[0]


def test_judge_without_the_judges_extra_is_one_line(tmp_path, monkeypatch):
    from personalign.judges import offline

    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"prompt": "Explain rain.", "a": "Rain is water falling from clouds.",
                                 "b": "Water vapour condenses into droplets that grow and fall."}) + "\n")
    for fn in (offline._vader, offline._syllables, offline._zipf):
        fn.cache_clear()
    for name in ("vaderSentiment", "vaderSentiment.vaderSentiment", "textstat", "wordfreq"):
        monkeypatch.setitem(sys.modules, name, None)  # import of a None entry raises ModuleNotFoundError
    try:
        res = runner.invoke(app, ["judge", "--side", "P1A", "--input", str(pairs)])
    finally:
        for fn in (offline._vader, offline._syllables, offline._zipf):
            fn.cache_clear()
    line = _one_line(res)
    assert line.startswith("error: the offline judge needs the 'judges' extra")
    assert line.endswith("pip install 'personalign[judges]'")


@pytest.mark.parametrize(("module", "extra"), [("fastapi", "serve"), ("sentence_transformers", "embed"),
                                               ("openai", "api"), ("playwright", "browser")])
def test_any_command_that_meets_a_missing_extra_prints_one_line(module, extra):
    """Whatever command imports an optional library, the wrapper every command has turns it into the line."""
    cmd = typer.Typer()

    @cmd.command()
    @_friendly_errors
    def needs() -> None:
        __import__(module)

    sys_modules = dict(sys.modules)
    sys.modules[module] = None  # type: ignore[assignment]
    try:
        res = runner.invoke(cmd, [])
    finally:
        sys.modules.clear()
        sys.modules.update(sys_modules)
    if extra not in extras.extras():
        pytest.skip(f"this checkout has no {extra!r} extra")
    line = _one_line(res)
    assert f"needs the '{extra}' extra ({module} is not installed): pip install 'personalign[{extra}]'" in line


def test_debug_still_shows_the_traceback_and_other_import_errors_are_not_hidden():
    cmd = typer.Typer()

    @cmd.command()
    @_friendly_errors
    def broken() -> None:
        raise ModuleNotFoundError("No module named 'not_an_extra_at_all'", name="not_an_extra_at_all")

    res = runner.invoke(cmd, [])
    assert res.exit_code == 1 and isinstance(res.exception, ModuleNotFoundError)


def test_a_real_process_prints_no_traceback(tmp_path):
    """The installed command, in a fresh interpreter where the judges' libraries cannot be imported."""
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"prompt": "Explain rain.", "a": "Rain falls.", "b": "Droplets grow and fall."}) + "\n")
    code = textwrap.dedent(f"""
        import sys
        for name in ("vaderSentiment", "textstat", "wordfreq"):
            sys.modules[name] = None
        from personalign.cli import main
        main(["judge", "--side", "P1A", "--input", {str(pairs)!r}])
    """)
    res = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=300)
    assert res.returncode == 2, res.stderr
    assert "Traceback" not in res.stderr
    assert re.fullmatch(r"error: the offline judge needs the 'judges' extra \((vaderSentiment|textstat|wordfreq) "
                        r"is not installed\): pip install 'personalign\[judges\]'", res.stderr.strip()), res.stderr
