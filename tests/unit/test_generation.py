from __future__ import annotations

import pytest
import torch

import personalign
from personalign.errors import ConfigError
from personalign.generation import (
    Method,
    SamplingConfig,
    build_prompts,
    eos_token_ids,
    generate_texts,
)
from personalign.preferences import parse_preference


def test_sampling_config_validation():
    with pytest.raises(ConfigError, match="max_new_tokens"):
        SamplingConfig(max_new_tokens=0)
    with pytest.raises(ConfigError, match="temperature"):
        SamplingConfig(temperature=-1)
    with pytest.raises(ConfigError, match="top_p"):
        SamplingConfig(top_p=0)
    assert SamplingConfig(temperature=0).generate_kwargs()["do_sample"] is False


def test_method_parse():
    assert Method.parse("prompt") is Method.PROMPT
    with pytest.raises(ConfigError, match="unknown method 'soupz'; choose one of vanilla, prompt"):
        Method.parse("soupz")


def test_build_prompts_appends_preference(tiny):
    _, tok = tiny
    pref = parse_preference("1A,2A,3A")
    (text,) = build_prompts(tok, ["Explain rain."], pref, Method.PROMPT)
    assert f"Explain rain. {pref.prompt()}<|im_end|>" in text
    assert text.endswith("<|im_start|>assistant\n")
    (plain,) = build_prompts(tok, ["Explain rain."], pref, Method.VANILLA)
    assert "Generate a response" not in plain


def test_same_seed_same_output_and_other_seed_differs(tiny):
    model, tok = tiny
    texts = build_prompts(tok, ["Explain rain.", "List painters."], parse_preference("1B"), Method.PROMPT)
    s = SamplingConfig(max_new_tokens=12, temperature=1.0, top_p=1.0, seed=3)
    a = generate_texts(model, tok, texts, s)
    b = generate_texts(model, tok, texts, s)
    c = generate_texts(model, tok, texts, SamplingConfig(max_new_tokens=12, temperature=1.0, top_p=1.0, seed=4))
    assert a == b
    assert a != c


def test_greedy_matches_plain_transformers(tiny):
    model, tok = tiny
    texts = build_prompts(tok, ["Explain photosynthesis to me."], None, Method.VANILLA)
    ours = generate_texts(model, tok, texts, SamplingConfig(max_new_tokens=10, temperature=0, repetition_penalty=1.0))
    enc = tok(texts, return_tensors="pt", add_special_tokens=False)
    out = model.generate(**enc, max_new_tokens=10, do_sample=False, pad_token_id=tok.pad_token_id)
    plain = tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip()
    assert ours == [plain]


def test_batched_equals_one_by_one_greedy(tiny):
    model, tok = tiny
    texts = build_prompts(tok, ["Hi.", "Explain photosynthesis to me in detail please."], None, Method.VANILLA)
    s = SamplingConfig(max_new_tokens=8, temperature=0)
    together = generate_texts(model, tok, texts, s, batch_size=2)
    apart = [generate_texts(model, tok, [t], s, batch_size=1)[0] for t in texts]
    assert together == apart


def _force_eos_after(model, eos: int, steps: int):
    """Make the model emit EOS at decoding step ``steps`` (0-based); count forward calls."""
    calls = {"n": 0}

    def hook(_mod, _inp, out):
        calls["n"] += 1
        if calls["n"] > steps:
            out = out.clone()
            out[..., :] = -1e4
            out[..., eos] = 1e4
        else:
            out = out.clone()
            out[..., eos] = -1e4
        return out

    return model.lm_head.register_forward_hook(hook), calls


def test_generation_stops_at_eos(tiny):
    model, tok = tiny
    (eos,) = eos_token_ids(model, tok)
    handle, calls = _force_eos_after(model, eos, steps=3)
    try:
        texts = build_prompts(tok, ["Explain rain."], None, Method.VANILLA)
        (resp,) = generate_texts(model, tok, texts, SamplingConfig(max_new_tokens=50, temperature=0))
    finally:
        handle.remove()
    assert calls["n"] == 4  # three tokens, then EOS, then no further step
    assert len(tok(resp, add_special_tokens=False)["input_ids"]) <= 3
    assert "<|im_end|>" not in resp


def test_on_batch_reports_global_index(tiny):
    model, tok = tiny
    texts = build_prompts(tok, ["a", "b", "c"], None, Method.VANILLA)
    seen = []
    generate_texts(model, tok, texts, SamplingConfig(max_new_tokens=2), batch_size=2, first_index=10,
                   on_batch=lambda start, rs: seen.append((start, len(rs))))
    assert seen == [(10, 2), (12, 1)]


def test_resumed_batches_reproduce_full_run(tiny):
    model, tok = tiny
    texts = build_prompts(tok, ["a", "b", "c", "d"], None, Method.VANILLA)
    s = SamplingConfig(max_new_tokens=6, temperature=1.0, seed=7)
    full = generate_texts(model, tok, texts, s, batch_size=2)
    tail = generate_texts(model, tok, texts[2:], s, batch_size=2, first_index=2)
    assert full[2:] == tail


def test_public_generate(tiny):
    model, tok = tiny
    out = personalign.generate(model, tok, "Explain rain.", prefs="1A,2A,3A",
                               sampling=SamplingConfig(max_new_tokens=4, temperature=0))
    assert isinstance(out, str)
    with pytest.raises(personalign.PreferenceError):
        personalign.generate(model, tok, "x", prefs=None, method="prompt")


def test_eos_ids_from_config_and_tokenizer(tiny):
    model, tok = tiny
    model.generation_config.eos_token_id = [tok.eos_token_id, 0]
    try:
        assert eos_token_ids(model, tok) == [tok.eos_token_id, 0]
    finally:
        model.generation_config.eos_token_id = tok.eos_token_id
    assert torch.is_tensor(next(model.parameters()))
