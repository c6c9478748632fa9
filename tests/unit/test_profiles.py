"""Profiles in SQLite: saved and read back by a new store on the same file, picks kept under concurrent
writes, exported as human preference pairs the pipeline reads; bad input refused with one line."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from personalign.data import read_pairs
from personalign.errors import ConfigError, PreferenceError
from personalign.profiles import Profiles


def test_a_profile_survives_a_new_store_on_the_same_file(tmp_path):
    db = tmp_path / "p.sqlite"
    Profiles(db).save("ana", {"P1A": 0.5, "P2A": 1.0}, "soup", {"merge": "exact"})
    again = Profiles(db).get("ana")
    assert again.weights == {"P1A": 0.5, "P2A": 1.0} and again.method == "soup" and again.options == {"merge": "exact"}
    assert again.spec() == "P1A=0.5,P2A=1"
    Profiles(db).save("ana", {"P2B": 1.0})
    assert Profiles(db).get("ana").weights == {"P2B": 1.0} and Profiles(db).names() == ["ana"]


def test_concurrent_picks_are_all_kept_and_export_as_human_pairs(tmp_path):
    store = Profiles(tmp_path / "p.sqlite")
    store.save("ana", {"P2A": 1.0})
    store.save("ben", {"P2B": 1.0})

    def pick(i: int) -> int:
        name = "ana" if i % 2 else "ben"
        return Profiles(store.path).add_pick(name, f"q{i}", f"short {i}", f"long answer {i}", ("a", "b", "equal")[i % 3],
                                             side="P2A" if i % 5 == 0 else None, features_a=[0.1, i], features_b=[0.2, 0])

    with ThreadPoolExecutor(8) as pool:
        ids = list(pool.map(pick, range(60)))
    assert len(set(ids)) == 60 and len(store.picks()) == 60 and len(store.picks("ana")) == 30
    assert store.picks("ana")[0].features_a is not None
    out = tmp_path / "pairs.jsonl"
    n = store.export_pairs(out)
    rows = read_pairs(out)
    assert n == len(rows) == 40  # the 20 "equal" picks say nothing about which is better
    assert all(r["judge"] == "human" for r in rows)
    assert {r["side"] for r in rows} == {"P2A", "profile:ana", "profile:ben"}
    first = next(r for r in rows if r["prompt"] == "q1")  # ana picked b
    assert first["chosen"] == "long answer 1" and first["rejected"] == "short 1"


def test_bad_input_is_refused_with_one_line(tmp_path):
    (tmp_path / "a-file").write_text("")
    with pytest.raises(ConfigError, match=r"cannot be created: .*a-file is a file, not a folder"):
        Profiles(tmp_path / "a-file" / "p.sqlite")
    store = Profiles(tmp_path / "p.sqlite")
    with pytest.raises(PreferenceError, match="unknown profile 'nobody'; known profiles: none"):
        store.get("nobody")
    with pytest.raises(ConfigError, match="profile name must be"):
        store.save("../etc", {"P1A": 1.0})
    store.save("ana", {"P1A": 1.0})
    with pytest.raises(ConfigError, match="choice must be one of a, b, equal"):
        store.add_pick("ana", "q", "x", "y", "left")
    with pytest.raises(ConfigError, match="needs answer_b"):
        store.add_pick("ana", "q", "x", None, "a")
    with pytest.raises(ConfigError, match="non-empty question"):
        store.add_pick("ana", " ", "x", "y", "a")
    assert store.add_pick("ana", "q", "x", "", "a")  # an empty answer is still an answer
    with pytest.raises(PreferenceError, match="unknown profile 'bob'; known profiles: ana"):
        store.add_pick("bob", "q", "x", "y", "a")
    bad = tmp_path / "bad.sqlite"
    bad.write_text("not a database")
    with pytest.raises(ConfigError, match="not a usable profile database"):
        Profiles(bad)


def test_train_rm_trains_a_personal_reward_model_on_exported_picks(tmp_path, tiny_model_dir):
    from personalign.recipes import train_rm

    store = Profiles(tmp_path / "p.sqlite")
    store.save("ana", {"P2A": 1.0})
    for i in range(12):  # ana always prefers the short answer
        store.add_pick("ana", f"question {i}?", f"Short {i}.", "A much longer answer with many words " * 3, "a")
    pairs = tmp_path / "pairs.jsonl"
    assert store.export_pairs(pairs, "ana") == 12
    result = train_rm.main(train_rm.TrainRMConfig(output_dir=str(tmp_path / "rm"), pairs=str(pairs),
                                                  model=str(tiny_model_dir), lr=5e-3, epochs=2, batch_size=4,
                                                  progress=False, eval_fraction=0.25))
    assert result["eval/accuracy"] == result["eval/accuracy"]  # trained and evaluated on the person's side
    assert "profile:ana" in (tmp_path / "rm" / "data.json").read_text()
