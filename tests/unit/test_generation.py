"""The one decode loop (``personalign.generation``) and the plain-model path through the entry point, on a
tiny random llama: seeding, end-of-sequence, stop strings, streaming, and equality with transformers'
``generate`` (greedy and sampled)."""

from __future__ import annotations

import pytest
import torch

from personalign.errors import ConfigError
from personalign.generation import (
    ModelStep,
    SamplingConfig,
    decode,
    encode_batch,
    eos_token_ids,
    penalize_repetition,
    sample_next,
)
from personalign.personalize import Method, MethodOptions, build_prompts, personalize, resolve
from personalign.preferences import parse_preference


def plain(model, tok):
    """The base model through the entry point (vanilla: texts are generated as formatted)."""
    return personalize(model, tok, resolve(None, MethodOptions(method="vanilla"), model=model.name_or_path))


def hf_generate(model, tok, texts, s: SamplingConfig) -> list[str]:
    """transformers' own generate with the same settings and seed, for comparison."""
    tok.padding_side = "left"
    enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    kw = {"do_sample": False} if s.temperature == 0 else {"do_sample": True, "temperature": s.temperature,
                                                          "top_p": s.top_p, "top_k": 0}
    torch.manual_seed(s.seed * 1_000_003)  # batch_seed(seed, 0)
    out = model.generate(**enc, max_new_tokens=s.max_new_tokens, repetition_penalty=s.repetition_penalty,
                         eos_token_id=eos_token_ids(model, tok), pad_token_id=tok.pad_token_id, **kw)
    return [t.strip() for t in tok.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)]


def test_sampling_config_validation():
    with pytest.raises(ConfigError, match="max_new_tokens"):
        SamplingConfig(max_new_tokens=0)
    with pytest.raises(ConfigError, match="temperature"):
        SamplingConfig(temperature=-1)
    with pytest.raises(ConfigError, match="top_p"):
        SamplingConfig(top_p=0)
    with pytest.raises(ConfigError, match="repetition_penalty"):
        SamplingConfig(repetition_penalty=0)


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
    (bare,) = build_prompts(tok, ["Explain rain."], pref, Method.VANILLA)
    assert "Generate a response" not in bare


def test_penalize_repetition_divides_positive_and_multiplies_negative():
    logits = torch.tensor([[2.0, -2.0, 1.0]])
    seen = torch.tensor([[True, True, False]])
    assert penalize_repetition(logits, seen, 2.0).tolist() == [[1.0, -4.0, 1.0]]
    experts = logits[:, None].expand(1, 3, 3)  # (B, K, V): the same mask for every expert
    assert penalize_repetition(experts, seen, 2.0)[0, 2].tolist() == [1.0, -4.0, 1.0]
    assert penalize_repetition(logits, seen, 1.0) is logits


def test_top_p_keeps_smallest_set_over_p_and_greedy_is_argmax():
    scores = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    gen = torch.Generator().manual_seed(0)
    drawn = {int(sample_next(scores, SamplingConfig(temperature=1.0, top_p=0.7), gen)) for _ in range(200)}
    assert drawn == {0, 1}  # 0.5 alone is under 0.7; 0.5 + 0.3 is over it
    assert int(sample_next(scores, SamplingConfig(temperature=0), gen)) == 0


def test_same_seed_same_output_and_other_seed_differs(tiny):
    model, tok = tiny
    pm = plain(model, tok)
    texts = build_prompts(tok, ["Explain rain.", "List painters."], parse_preference("1B"), Method.PROMPT)
    s = SamplingConfig(max_new_tokens=12, temperature=1.0, top_p=1.0, seed=3)
    a = pm.generate_texts(texts, s)
    assert a == pm.generate_texts(texts, s)
    assert a != pm.generate_texts(texts, SamplingConfig(max_new_tokens=12, temperature=1.0, top_p=1.0, seed=4))


@pytest.mark.parametrize("sampling", [
    SamplingConfig(max_new_tokens=10, temperature=0, repetition_penalty=1.0),
    SamplingConfig(max_new_tokens=10, temperature=0, repetition_penalty=1.3),
    SamplingConfig(max_new_tokens=16, temperature=0.8, top_p=0.9, repetition_penalty=1.1, seed=5),
    SamplingConfig(max_new_tokens=16, temperature=1.3, top_p=1.0, repetition_penalty=1.0, seed=2),
])
def test_decode_loop_equals_transformers_generate(tiny, sampling):
    model, tok = tiny
    texts = build_prompts(tok, ["Explain photosynthesis to me.", "Hi."], None, Method.VANILLA)
    assert plain(model, tok).generate_texts(texts, sampling, batch_size=2) == hf_generate(model, tok, texts, sampling)


def test_batched_equals_one_by_one_greedy(tiny):
    model, tok = tiny
    pm = plain(model, tok)
    texts = build_prompts(tok, ["Hi.", "Explain photosynthesis to me in detail please."], None, Method.VANILLA)
    s = SamplingConfig(max_new_tokens=8, temperature=0)
    assert pm.generate_texts(texts, s, batch_size=2) == [pm.generate_texts([t], s, batch_size=1)[0] for t in texts]


def _force_eos_after(model, eos: int, steps: int):
    """Make the model emit EOS at decoding step ``steps`` (0-based); count forward calls."""
    calls = {"n": 0}

    def hook(_mod, _inp, out):
        calls["n"] += 1
        out = out.clone()
        if calls["n"] > steps:
            out[..., :] = -1e4
            out[..., eos] = 1e4
        else:
            out[..., eos] = -1e4
        return out

    return model.lm_head.register_forward_hook(hook), calls


def test_generation_stops_at_eos(tiny):
    model, tok = tiny
    (eos,) = eos_token_ids(model, tok)
    handle, calls = _force_eos_after(model, eos, steps=3)
    try:
        texts = build_prompts(tok, ["Explain rain."], None, Method.VANILLA)
        (resp,) = plain(model, tok).generate_texts(texts, SamplingConfig(max_new_tokens=50, temperature=0))
    finally:
        handle.remove()
    assert calls["n"] == 4  # three tokens, then EOS, then no further step
    assert len(tok(resp, add_special_tokens=False)["input_ids"]) <= 3
    assert "<|im_end|>" not in resp


def test_decode_marks_finished_rows_and_pads_them(tiny):
    model, tok = tiny
    (eos,) = eos_token_ids(model, tok)
    handle, _ = _force_eos_after(model, eos, steps=2)
    try:
        ids, mask = encode_batch(tok, build_prompts(tok, ["a", "bb"], None, Method.VANILLA))
        out = decode(ModelStep(model), ids, mask, SamplingConfig(max_new_tokens=9, temperature=0), eos=[eos],
                     pad=tok.pad_token_id, generator=torch.Generator().manual_seed(0))
    finally:
        handle.remove()
    assert out.reasons == ["stop", "stop"]
    assert out.tokens.shape[1] == 3 and out.mask.tolist() == [[1, 1, 1], [1, 1, 1]]
    assert out.tokens[:, -1].tolist() == [eos, eos]


def test_on_batch_reports_global_index(tiny):
    model, tok = tiny
    texts = build_prompts(tok, ["a", "b", "c"], None, Method.VANILLA)
    seen = []
    plain(model, tok).generate_texts(texts, SamplingConfig(max_new_tokens=2), batch_size=2, first_index=10,
                                     on_batch=lambda start, rs: seen.append((start, len(rs))))
    assert seen == [(10, 2), (12, 1)]


def test_resumed_batches_reproduce_full_run(tiny):
    model, tok = tiny
    pm = plain(model, tok)
    texts = build_prompts(tok, ["a", "b", "c", "d"], None, Method.VANILLA)
    s = SamplingConfig(max_new_tokens=6, temperature=1.0, seed=7)
    assert pm.generate_texts(texts, s, batch_size=2)[2:] == pm.generate_texts(texts[2:], s, batch_size=2,
                                                                                first_index=2)


def test_complete_cuts_at_stop_string_and_stream_joins_to_it(tiny):
    model, tok = tiny
    pm = plain(model, tok)
    text = pm.format("Explain photosynthesis to me.")
    s = SamplingConfig(max_new_tokens=24, temperature=1.0, top_p=1.0, seed=11)
    (full,) = pm.complete([text], s)
    assert full.finish_reason in ("stop", "length") and full.text
    assert "".join(pm.stream(text, s)) == full.text
    stop = full.text.strip()[3:6]  # a piece of the answer, so the cut is certain
    (cut,) = pm.complete([text], s, stop=[stop])
    assert cut.finish_reason == "stop" and stop not in cut.text and full.text.startswith(cut.text)
    assert "".join(pm.stream(text, s, stop=[stop])) == cut.text


def test_eos_ids_from_config_and_tokenizer(tiny):
    model, tok = tiny
    model.generation_config.eos_token_id = [tok.eos_token_id, 0]
    try:
        assert eos_token_ids(model, tok) == [tok.eos_token_id, 0]
    finally:
        model.generation_config.eos_token_id = tok.eos_token_id


class _Chars:
    """A tokenizer whose tokens are characters (id = code point), for streaming tests."""

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(i) for i in ids)


@pytest.mark.parametrize("stop", [("natural phenomenon",), ("Rain is a natural phenomenon that occurs",),
                                  ("is a n", "xyz"), ("\x00never",), ()])
@pytest.mark.parametrize("strip", [False, True])
def test_text_stream_never_sends_what_a_stop_string_cuts(stop, strip):
    from personalign.generation import TextStream

    answer = " Rain is a natural phenomenon that occurs when water falls. "
    stream = TextStream(_Chars(), eos=[0x10FFFF], stop=stop, strip=strip)
    sent = ""
    for ch in answer:
        sent += stream.push(ord(ch))
        assert stream.text.startswith(sent)  # nothing sent is ever taken back
        if stream.stopped:
            break
    sent += stream.finish()
    cuts = [answer.find(s) for s in stop if s in answer]
    whole = answer[: min(cuts)] if cuts else answer
    assert sent == (whole.strip() if strip else whole) == stream.text
    assert stream.stopped == bool(cuts)


def test_text_stream_holds_back_only_a_possible_start_of_a_stop_string():
    from personalign.generation import TextStream

    stream = TextStream(_Chars(), eos=[], stop=("natural phenomenon",))
    sent = "".join(stream.push(ord(ch)) for ch in "Rain is a nat")
    assert sent == "Rain is a "  # "nat" may begin the stop string
    assert stream.push(ord("s")) == "nats"  # it no longer can
