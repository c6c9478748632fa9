"""Merge rules checked on delta weights of LoRA experts on a tiny random llama (nothing downloaded)."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.utils import merge_utils
from transformers import LlamaConfig, LlamaForCausalLM

from personalign.errors import ConfigError, ModelError
from personalign.adapters import (
    LoraAdapter,
    adapter_from_model,
    adapter_from_state_dict,
    delta_weights,
    load_adapter,
    save_adapter,
)
from personalign.merging import compress_adapter, merge_adapters

TARGETS = ["q_proj", "v_proj"]
TOL = 1e-5


def tiny_base(seed: int = 0) -> LlamaForCausalLM:
    cfg = LlamaConfig(
        vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg).eval()


def tiny_experts(seed: int = 1):
    """A peft model with four experts: ea, eb (r=4, alpha=8), ec (r=2, rsLoRA), ed (r=4, alpha=16).
    (peft warns about adapter names that are substrings of "lora_", hence the "e" prefix.)

    peft starts B at zero, which would make every merge trivially equal; all factors are randomised."""
    first = LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS)
    model = get_peft_model(tiny_base(), first, adapter_name="ea")
    model.add_adapter("eb", LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    model.add_adapter("ec", LoraConfig(r=2, lora_alpha=4, target_modules=TARGETS, use_rslora=True))
    model.add_adapter("ed", LoraConfig(r=4, lora_alpha=16, target_modules=TARGETS))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(0.2 * torch.randn(p.shape, generator=gen))
    return model


@pytest.fixture(scope="module")
def experts() -> dict[str, LoraAdapter]:
    model = tiny_experts()
    return {name: adapter_from_model(model, "e" + name) for name in "abcd"}


def weighted_sum(adapters, weights):
    deltas = [delta_weights(a) for a in adapters]
    return {m: sum(w * d[m] for w, d in zip(weights, deltas)) for m in deltas[0]}


def assert_deltas_close(got: dict, want: dict, tol: float = TOL) -> None:
    assert got.keys() == want.keys()
    for m, value in want.items():
        torch.testing.assert_close(got[m], value, atol=tol, rtol=tol, msg=m)


# ---------------------------------------------------------------- the adapter record


def test_adapter_fields_and_scales(experts):
    a, c = experts["a"], experts["c"]
    assert (a.r, a.lora_alpha, a.scale, a.use_rslora) == (4, 8, 2.0, False)
    assert c.use_rslora and c.scale == pytest.approx(4 / math.sqrt(2))
    assert a.target_modules == ("q_proj", "v_proj")
    assert len(a.modules) == 4 and all(m.startswith("base_model.model.model.layers.") for m in a.modules)


def test_delta_weights_equal_peft_delta():
    model = tiny_experts()
    for name in ("ea", "ec"):
        deltas = delta_weights(adapter_from_model(model, name))
        for module, delta in deltas.items():
            layer = model.get_submodule(module)
            torch.testing.assert_close(delta, layer.get_delta_weight(name), atol=TOL, rtol=TOL)


def test_save_load_round_trip(experts, tmp_path):
    c = experts["c"]
    folder = save_adapter(c, tmp_path / "c")
    back = load_adapter(folder)
    assert (back.r, back.lora_alpha, back.use_rslora, back.target_modules, back.base_model) == (
        c.r, c.lora_alpha, c.use_rslora, c.target_modules, c.base_model
    )
    assert back.tensors.keys() == c.tensors.keys()
    for k in c.tensors:
        assert torch.equal(back.tensors[k], c.tensors[k])
    assert LoraConfig.from_pretrained(str(folder)).use_rslora is True


# ---------------------------------------------------------------- invariances of every rule


@pytest.mark.parametrize(
    "method,opts",
    [
        ("psoups", {}),
        ("exact", {}),
        ("exact", {"rank": 4}),
        ("ties", {"density": 1.0}),
        ("dare", {"density": 1.0}),
        ("dare_ties", {"density": 1.0}),
    ],
)
def test_single_adapter_at_weight_one_is_that_adapter(experts, method, opts):
    merged, report = merge_adapters([experts["a"]], [1.0], method, **opts)
    assert_deltas_close(delta_weights(merged), delta_weights(experts["a"]))
    assert max(report.deviation.values()) < TOL
    assert all(e < TOL for e in report.svd_error.values())


@pytest.mark.parametrize("method", ["psoups", "exact"])
def test_single_adapter_weight_is_linear_including_negative(experts, method):
    merged, _ = merge_adapters([experts["c"]], [-0.5], method)
    want = {m: -0.5 * d for m, d in delta_weights(experts["c"]).items()}
    assert_deltas_close(delta_weights(merged), want)


# ---------------------------------------------------------------- psoups


def test_psoups_uniform_is_mean_b_times_mean_a(experts):
    a, b = experts["a"], experts["b"]
    merged, report = merge_adapters([a, b])  # default: psoups, weights 1/2 each
    for m in a.modules:
        (a1, b1), (a2, b2) = a.factors(m), b.factors(m)
        want = a.scale * ((b1 + b2) / 2) @ ((a1 + a2) / 2)
        torch.testing.assert_close(delta_weights(merged)[m], want, atol=TOL, rtol=TOL)
        # Paper-faithful tensors: the stored factors are the plain averages, rank and alpha unchanged.
        torch.testing.assert_close(merged.factors(m)[0], (a1 + a2) / 2)
    assert (merged.r, merged.lora_alpha) == (4, 8)
    # The cross terms make psoups differ from the average of the deltas.
    assert min(report.deviation.values()) > 0.1


def test_psoups_weights_sign_on_b_magnitude_on_a(experts):
    a, b = experts["a"], experts["b"]
    merged, _ = merge_adapters([a, b], [0.7, -0.3], "psoups")
    for m in a.modules:
        (a1, b1), (a2, b2) = a.factors(m), b.factors(m)
        want = a.scale * (0.7 * b1 - 0.3 * b2) @ (0.7 * a1 + 0.3 * a2)
        torch.testing.assert_close(delta_weights(merged)[m], want, atol=TOL, rtol=TOL)


def test_psoups_equals_exact_when_experts_share_a(experts):
    a, b = experts["a"], experts["b"]
    shared = dict(b.tensors)
    shared.update({k: v for k, v in a.tensors.items() if ".lora_A." in k})
    b_shared = dataclasses.replace(b, tensors=shared)
    w = [0.8, -1.3]
    psoups, _ = merge_adapters([a, b_shared], w, "psoups")
    assert_deltas_close(delta_weights(psoups), weighted_sum([a, b_shared], w))


def test_psoups_folds_different_scales_into_b(experts):
    a, d = experts["a"], experts["d"]  # scales 2 and 4
    merged, _ = merge_adapters([a, d], [0.5, 0.5], "psoups")
    assert merged.scale == 1.0
    for m in a.modules:
        (a1, b1), (a2, b2) = a.factors(m), d.factors(m)
        want = (0.5 * 2 * b1 + 0.5 * 4 * b2) @ (0.5 * a1 + 0.5 * a2)
        torch.testing.assert_close(delta_weights(merged)[m], want, atol=TOL, rtol=TOL)


# ---------------------------------------------------------------- exact and compression


def test_exact_is_weighted_sum_of_deltas_any_ranks_and_signs(experts):
    adapters = [experts["a"], experts["b"], experts["c"], experts["d"]]
    w = [0.7, -0.3, 1.5, -2.0]
    merged, report = merge_adapters(adapters, w, "exact")
    assert merged.r == 4 + 4 + 2 + 4 and merged.scale == 1.0
    assert_deltas_close(delta_weights(merged), weighted_sum(adapters, w))
    assert max(report.deviation.values()) < TOL and report.svd_error == {}


def test_exact_leaves_out_zero_weight_experts(experts):
    merged, _ = merge_adapters([experts["a"], experts["c"]], [0.0, 2.0], "exact")
    assert merged.r == 2
    assert_deltas_close(delta_weights(merged), weighted_sum([experts["c"]], [2.0]))


def test_exact_matches_peft_cat():
    model = tiny_experts()
    names, w = ["ea", "eb", "ec"], [0.7, -0.3, 1.5]
    model.add_weighted_adapter(names, w, "cat", combination_type="cat")
    merged, _ = merge_adapters([adapter_from_model(model, n) for n in names], w, "exact")
    for module, delta in delta_weights(merged).items():
        peft_delta = model.get_submodule(module).get_delta_weight("cat")
        torch.testing.assert_close(delta, peft_delta, atol=TOL, rtol=TOL)


def test_compression_error_zero_at_true_rank_and_positive_below(experts):
    a, b = experts["a"], experts["b"]
    full, _ = merge_adapters([a, b], [0.6, 0.4], "exact")  # rank 8
    same, errors = compress_adapter(full, 8)
    assert same.r == 8 and max(errors.values()) < TOL
    assert_deltas_close(delta_weights(same), delta_weights(full))

    small, report = merge_adapters([a, b], [0.6, 0.4], "exact", rank=3)
    assert small.r == 3 and min(report.svd_error.values()) > 0.01
    dense, approx = delta_weights(full), delta_weights(small)
    for m, err in report.svd_error.items():
        measured = float(torch.linalg.norm(approx[m] - dense[m]) / torch.linalg.norm(dense[m]))
        assert measured == pytest.approx(err, rel=1e-4)
        assert report.deviation[m] == pytest.approx(err, rel=1e-4)
    assert report.summary()["merge/svd_error_max"] == max(report.svd_error.values())


def test_compression_finds_true_rank_below_stored_rank(experts):
    a, b = experts["a"], experts["b"]
    shared = dict(b.tensors)
    shared.update({k: v for k, v in a.tensors.items() if ".lora_A." in k})
    full, _ = merge_adapters([a, dataclasses.replace(b, tensors=shared)], [1.0, 1.0], "exact")
    assert full.r == 8  # stored rank 8, true rank 4 (both experts share A)
    small, errors = compress_adapter(full, 4)
    assert max(errors.values()) < TOL
    assert_deltas_close(delta_weights(small), delta_weights(full))


# ---------------------------------------------------------------- TIES and DARE


@pytest.mark.parametrize("method", ["ties", "dare_ties"])
def test_ties_is_peft_merge_on_deltas(experts, method):
    adapters, w, density = [experts["a"], experts["d"]], [0.6, 0.4], 0.5
    seed = 3 if "dare" in method else None
    merged, report = merge_adapters(adapters, w, method, density=density, rank=32, seed=seed)
    deltas = [delta_weights(a) for a in adapters]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        for m in adapters[0].modules:  # sorted: the order the merge draws DARE masks in
            fn = merge_utils.ties if method == "ties" else merge_utils.dare_ties
            want = fn([d[m] for d in deltas], torch.tensor(w), density, "total")
            torch.testing.assert_close(delta_weights(merged)[m], want, atol=TOL, rtol=TOL)
    assert max(report.svd_error.values()) < TOL  # rank 32 >= every module's full rank
    assert min(report.deviation.values()) > 0.01  # pruning moves it away from the exact sum


def test_ties_default_rank_is_largest_expert_rank_with_reported_error(experts):
    merged, report = merge_adapters([experts["a"], experts["c"]], [1.0, 1.0], "ties", density=0.5)
    assert merged.r == 4 and report.rank == 4
    assert min(report.svd_error.values()) > 0  # a pruned delta is not rank 4


def test_dare_is_reproducible_and_leaves_global_rng_alone(experts):
    adapters = [experts["a"], experts["b"]]
    state = torch.get_rng_state()
    one, _ = merge_adapters(adapters, [0.5, 0.5], "dare", density=0.3, seed=7)
    assert torch.equal(torch.get_rng_state(), state)
    two, _ = merge_adapters(adapters, [0.5, 0.5], "dare", density=0.3, seed=7)
    other, _ = merge_adapters(adapters, [0.5, 0.5], "dare", density=0.3, seed=8)
    for k in one.tensors:
        assert torch.equal(one.tensors[k], two.tensors[k])
    assert any(not torch.allclose(one.tensors[k], other.tensors[k]) for k in one.tensors)


# ---------------------------------------------------------------- serving a merged adapter


@torch.no_grad()
def test_saved_merge_loads_in_peft_and_logits_equal_base_plus_delta(experts, tmp_path):
    adapters, w = [experts["a"], experts["c"], experts["d"]], [0.5, -1.0, 0.75]
    merged, _ = merge_adapters(adapters, w, "exact")
    folder = save_adapter(merged, tmp_path / "merged")
    ids = torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(0))

    served = PeftModel.from_pretrained(tiny_base(), str(folder)).eval()
    logits = served(input_ids=ids).logits

    by_hand = tiny_base()
    params = dict(by_hand.named_parameters())
    for module, delta in weighted_sum(adapters, w).items():
        params[module.removeprefix("base_model.model.") + ".weight"].add_(delta)
    torch.testing.assert_close(logits, by_hand(input_ids=ids).logits, atol=1e-4, rtol=1e-4)

    merged_in = served.merge_and_unload()
    torch.testing.assert_close(merged_in(input_ids=ids).logits, logits, atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------- refusals


def _drop_module(adapter: LoraAdapter) -> LoraAdapter:
    gone = adapter.modules[0]
    kept = {k: v for k, v in adapter.tensors.items() if not k.startswith(gone)}
    return dataclasses.replace(adapter, tensors=kept)


def _reshape_module(adapter: LoraAdapter) -> LoraAdapter:
    key = adapter.modules[0] + ".lora_A.weight"
    return dataclasses.replace(adapter, tensors={**adapter.tensors, key: torch.zeros(adapter.r, 48)})


def test_an_adapter_with_no_recorded_base_merges_with_any(experts):
    """Loading an adapter that records no base model is not refused; merging it is not either."""
    unknown = dataclasses.replace(experts["a"], base_model=None)
    merged, _ = merge_adapters([unknown, dataclasses.replace(experts["b"], base_model="tiny/model")], None,
                               method="exact")
    reference, _ = merge_adapters([experts["a"], experts["b"]], None, method="exact")
    assert all(torch.equal(x, y) for x, y in zip(merged.tensors.values(), reference.tensors.values()))


@pytest.mark.parametrize(
    "case,args,kwargs,error,words",
    [
        ("empty", lambda e: ([], None), {}, ConfigError, "no adapters"),
        ("length", lambda e: ([e["a"], e["b"]], [1.0]), {}, ConfigError,
         "1 merge weights for 2 adapters"),
        ("zero", lambda e: ([e["a"], e["b"]], [0.0, 0.0]), {}, ConfigError, "all zero"),
        ("nan", lambda e: ([e["a"], e["b"]], [float("nan"), 1.0]), {}, ConfigError, "finite"),
        ("text", lambda e: ([e["a"]], ["much"]), {}, ConfigError, "real numbers"),
        ("method", lambda e: ([e["a"]], None), {"method": "soup"}, ConfigError,
         "unknown merge method 'soup'"),
        ("base", lambda e: ([dataclasses.replace(e["a"], base_model="tiny/model"),
                             dataclasses.replace(e["b"], base_model="other/model")], None), {},
         ModelError, "base model 'other/model' but adapter 0 on 'tiny/model'"),
        ("base_after_unknown", lambda e: ([e["c"], dataclasses.replace(e["a"], base_model="tiny/model"),
                                           dataclasses.replace(e["b"], base_model="other/model")], None), {},
         ModelError, "adapter 2 was trained on base model 'other/model' but adapter 1 on 'tiny/model'"),
        ("targets", lambda e: ([e["a"], dataclasses.replace(e["b"], target_modules=("q_proj",))], None), {},
         ModelError, "targets ('q_proj',)"),
        ("modules", lambda e: ([e["a"], _drop_module(e["b"])], None), {}, ModelError,
         "different modules"),
        ("shape", lambda e: ([e["a"], _reshape_module(e["b"])], None), {}, ModelError,
         "different base models"),
        ("ranks", lambda e: ([e["a"], e["c"]], None), {}, ModelError, "equal ranks, got r=[4, 2]"),
        ("density", lambda e: ([e["a"]], None), {"method": "ties"}, ConfigError, "needs density"),
        ("density0", lambda e: ([e["a"]], None), {"method": "dare", "density": 0.0}, ConfigError, "(0, 1]"),
        ("density_exact", lambda e: ([e["a"]], None), {"method": "exact", "density": 0.5}, ConfigError,
         "density applies only"),
        ("seed", lambda e: ([e["a"]], None), {"method": "ties", "density": 0.5, "seed": 1}, ConfigError,
         "seed applies only"),
        ("rank_psoups", lambda e: ([e["a"]], None), {"rank": 2}, ConfigError,
         "rank does not apply to psoups"),
        ("rank0", lambda e: ([e["a"]], None), {"method": "exact", "rank": 0}, ConfigError, "rank=0"),
        ("sign", lambda e: ([e["a"]], None),
         {"method": "ties", "density": 0.5, "majority_sign_method": "vote"},
         ConfigError, "majority_sign_method='vote'"),
    ],
)
def test_merge_refuses_with_named_problem(experts, case, args, kwargs, error, words):
    adapters, weights = args(experts)
    with pytest.raises(error) as info:
        merge_adapters(adapters, weights, **kwargs)
    assert words in str(info.value), case
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "change,words",
    [
        ({"use_dora": True}, "DoRA"),
        ({"rank_pattern": {"q_proj": 8}}, "rank_pattern"),
        ({"peft_type": "IA3"}, "only LoRA"),
        ({"init_lora_weights": "pissa"}, "rewrites the base weights"),
    ],
)
def test_adapter_config_refusals(experts, change, words):
    a = experts["a"]
    with pytest.raises(ModelError, match=words):
        adapter_from_state_dict(a.tensors, {**a.config, **change})


def test_adapter_tensor_refusals(experts):
    a = experts["a"]
    m = a.modules[0]
    with pytest.raises(ModelError, match="DoRA"):
        dataclasses.replace(a, tensors={**a.tensors, m + ".lora_magnitude_vector": torch.ones(32)})
    with pytest.raises(ModelError, match="lacks lora_B"):
        dataclasses.replace(a, tensors={k: v for k, v in a.tensors.items() if k != m + ".lora_B.weight"})
    with pytest.raises(ModelError, match="r=8"):
        dataclasses.replace(a, r=8)


def test_load_refuses_pickle_and_missing_files(tmp_path):
    with pytest.raises(ModelError, match="no adapter_config.json"):
        load_adapter(tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4}))
    (tmp_path / "adapter_model.bin").write_bytes(b"not loaded")
    with pytest.raises(ModelError, match="pickle"):
        load_adapter(tmp_path)
