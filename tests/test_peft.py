"""PEFT adapters on tiny random Hugging Face models, how people fine-tune today: LoRA, DoRA, IA³, LoRA on
embeddings, modules_to_save, LoHa, LoKr, VeRA, FourierFT, AdaLoRA, OFT, prefix and prompt tuning. Only the adapters'
parameters are trainable, so only they are tracked; their Ω against the float64 one-sample loop of tests/test_hf.py
(g-MAS) and the layer-by-layer oracle of tests/test_model_edge_cases.py (l-MAS), with no batch run one sample at a
time (prompt tuning excepted), and a fused AdamW step equal to torch's with the penalty as a loss.

Before: adapters whose factors sit in a ParameterDict that the wrapping layer's forward reads (IA³, embedding LoRA,
LoHa, LoKr, VeRA) and DoRA (its weight norm runs the LoRA layers on an identity matrix, then detaches the result) ran
every batch one sample at a time, exact and slower.
"""
import warnings

import pytest
import torch

import mas_ext
from test_hf import MODELS, V, T, assert_close, oracle, padded, perturbed
from test_model_edge_cases import oracle as layer_oracle, rel_errors

peft = pytest.importorskip("peft")
# transformers 5 deprecates a property that PEFT reads: a warning about the two libraries, not about us
# (and PEFT's prefix tuning passes past_key_values, which transformers 5 deprecates)
pytestmark = [pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning"),
              pytest.mark.filterwarnings("ignore:`past_key_values` is deprecated:FutureWarning")]


def adapted(base, config, seed=0):
    """``base`` (a key of test_hf.MODELS) with ``config``'s adapters, whose parameters are moved off their
    initial values (LoRA's B starts at zero, IA³'s scales at one: Ω of the other factor would be zero)."""
    model = peft.get_peft_model(perturbed(MODELS[base], seed), config)
    torch.manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()


CASES = {
    "lora": ("llama", lambda: peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"],
                                              lora_dropout=0.1, modules_to_save=["lm_head"])),
    "dora": ("llama", lambda: peft.LoraConfig(r=4, target_modules="all-linear", use_dora=True)),
    "dora-conv1d": ("gpt2", lambda: peft.LoraConfig(r=4, target_modules=["c_attn", "c_fc"], use_dora=True,
                                                    fan_in_fan_out=True)),
    "lora-embedding": ("gpt2", lambda: peft.LoraConfig(r=4, target_modules=["wte", "c_attn"], fan_in_fan_out=True)),
    "ia3": ("bert", lambda: peft.IA3Config(target_modules=["key", "value", "output.dense"],
                                           feedforward_modules=["output.dense"])),
    # the other adapters of PEFT's menu: their factors in ParameterDicts of the wrapping layer (the generic rule over
    # it), AdaLoRA's SVD triplets, OFT's rotation module, prefix tuning's per-sample past_key_values
    "loha": ("llama", lambda: peft.LoHaConfig(r=4, target_modules=["q_proj", "v_proj"])),
    "lokr": ("llama", lambda: peft.LoKrConfig(r=4, target_modules=["q_proj", "v_proj"])),
    "vera": ("llama", lambda: peft.VeraConfig(r=4, target_modules=["q_proj", "v_proj"])),
    "fourierft": ("llama", lambda: peft.FourierFTConfig(n_frequency=20, target_modules=["q_proj", "v_proj"])),
    "adalora": ("llama", lambda: peft.AdaLoraConfig(init_r=4, target_modules=["q_proj", "v_proj"], total_step=10)),
    "oft": ("llama", lambda: peft.OFTConfig(r=0, oft_block_size=8, target_modules=["q_proj", "v_proj"])),
    "prefix": ("llama", lambda: peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3)),
    # one prompt embedded once and repeated over the batch by PEFT's forward: no layer sees a sample's own rows
    # (expanding the call's input breaks that repeat), so the batches run one sample at a time, exact
    "prompt": ("llama", lambda: peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3)),
}
BY_SAMPLE = {"prompt"}


def _no_sample_by_sample(caught, expected=False):
    said = [str(w.message) for w in caught if "one sample at a time" in str(w.message)]
    assert bool(said) == expected, said


@pytest.mark.parametrize("cls", [mas_ext.ReferenceMAS, mas_ext.FusedMAS], ids=["reference", "fused"])
@pytest.mark.parametrize("case", list(CASES))
def test_adapters_against_a_float64_loop(case, cls):
    """g-MAS of the adapters on right-padded dict batches, equal to each sample run alone unpadded."""
    base, config = CASES[case]
    model = adapted(base, config())
    torch.manual_seed(2)
    sequences = [torch.randint(1, V, (length,)) for length in (T, 4, 7, 1, 6)]
    ids, mask = padded(sequences, "right")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mas = cls(model, show_progress=False).accumulate(
            [{"input_ids": ids[:2], "attention_mask": mask[:2]}, {"input_ids": ids[2:], "attention_mask": mask[2:]}])
    _no_sample_by_sample(caught, case in BY_SAMPLE)
    want = oracle(model, sequences)
    assert set(want) == {n for n, p in model.named_parameters() if p.requires_grad}
    assert_close(mas.task_importance, want)


@pytest.mark.parametrize("case", ["lora", "ia3", "lora-embedding"])
def test_adapters_local_mode(case):
    """l-MAS: each adapter layer's own output is its gradient (an IA³ layer, whose scale its ParameterDict holds,
    is the layer, not the dict). DoRA's identity-matrix call is a call of its LoRA layers there, so DoRA runs one
    sample at a time in l-MAS, exact (not checked here)."""
    base, config = CASES[case]
    model = adapted(base, config())
    x = torch.randint(1, V, (5, 7))
    want = layer_oracle(model, [x[:3], x[3:]], mode="local")
    for cls in (mas_ext.ReferenceMAS, mas_ext.FusedMAS):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            got = cls(model, mode="local", show_progress=False).accumulate([x[:3], x[3:]]).task_importance
        _no_sample_by_sample(caught)
        errs = rel_errors(got, want)
        assert max(errs.values()) < 1e-5, errs


def test_fused_adamw_step_on_adapters_equals_torch_with_the_penalty_as_a_loss():
    """After a consolidated task, mas_ext.optim.AdamW over the trainable parameters takes the step that
    torch.optim.AdamW takes on loss + R(θ); the frozen base model does not move."""
    model = adapted("llama", CASES["dora"][1]())
    twin = adapted("llama", CASES["dora"][1]())
    x = torch.randint(1, V, (4, T))
    states = []
    for m in (model, twin):
        mas = mas_ext.FusedMAS(m, lam=20.0, show_progress=False)
        mas.accumulate([x])
        mas.consolidate()
        with torch.no_grad():  # away from θ*, so that the penalty has a gradient
            for p in m.parameters():
                if p.requires_grad:
                    p.add_(0.05 * torch.randn_like(p, generator=torch.Generator().manual_seed(p.numel())))
        states.append(mas)
    frozen = {n: p.clone() for n, p in model.named_parameters() if not p.requires_grad}
    trainable = [[p for p in m.parameters() if p.requires_grad] for m in (model, twin)]
    fused = mas_ext.optim.AdamW(trainable[0], lr=1e-2, weight_decay=0.1, mas=states[0])
    plain = torch.optim.AdamW(trainable[1], lr=1e-2, weight_decay=0.1)
    y = torch.randint(1, V, (4, T))
    for _ in range(3):
        fused.zero_grad()
        model(input_ids=y, labels=y).loss.backward()
        fused.step()
        plain.zero_grad()
        (twin(input_ids=y, labels=y).loss + states[1].penalty()).backward()
        plain.step()
    torch.testing.assert_close(dict(model.named_parameters()), dict(twin.named_parameters()), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close({n: p for n, p in model.named_parameters() if n in frozen}, frozen, rtol=0, atol=0)


def test_dora_takes_its_rule_also_at_peft_initialisation():
    """As PEFT makes it, a DoRA layer adds zero (m is the weight norm, B is zero): its output tells nothing about
    the rule's formula, its base output does. Ω exact, and FusedMAS takes the DoRA rule (no generic rerun)."""
    model = peft.get_peft_model(perturbed(MODELS["llama"]), CASES["dora"][1]()).eval()
    x = torch.randint(1, V, (5, T))
    mas = mas_ext.FusedMAS(model, show_progress=False).accumulate([x[:3], x[3:]])
    assert_close(mas.task_importance, oracle(model, list(x)))
    dora = [u for u in mas._engine.units if type(u.module).__name__ == "DoraLinearLayer"]
    assert dora and all(u.rule.fused is mas_ext._rules.adapters.dora_fused for u in dora)
    assert type(dora[0].module) in mas_ext._rules.base._VERIFIED


def test_observe_a_peft_models_generate():
    """A PEFT model's generate() calls the model it wraps, not its own forward: observe() saw nothing, and said
    nothing. A module holding every tracked parameter, called on its own, is observed as the model: Ω of the prompts
    (generate's first call), equal to the float64 loop."""
    model = adapted("llama", CASES["lora"][1]())
    torch.manual_seed(10)
    prompts = [torch.randint(1, V, (length,)) for length in (T, 4, 6)]
    ids, mask = padded(prompts, "left")
    mas = mas_ext.FusedMAS(model, show_progress=False)
    with mas.observe(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the later calls of generate(), on a filled cache, are skipped so
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=2, do_sample=False, pad_token_id=0)
        model(input_ids=ids[:1, -T:])  # a call of the PEFT model itself: once, not also as its wrapped model's
    assert mas.num_samples == 4
    assert_close(mas.task_importance, oracle(model, prompts + [ids[0, -T:]]))


@pytest.mark.parametrize("case", ["prompt", "prefix"])
def test_observe_a_prompt_tuned_models_generate(case):
    """PEFT's prompt and prefix tuning run their prompt encoder on its own in generate(), then the wrapped model,
    neither of them the model's own forward: the prompt encoder, which holds every tracked parameter, was observed as
    the model (Ω 2.5-3× off). Neither is observed now (the wrapped model lacks the prompt encoder's parameters), and
    observe() says that no call of the model was seen."""
    model = adapted("llama", CASES[case][1]())
    ids, mask = padded([torch.randint(1, V, (length,)) for length in (T, 5)], "left")
    mas = mas_ext.FusedMAS(model, show_progress=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with mas.observe():
            model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=2, do_sample=False, pad_token_id=0)
    assert mas.num_samples == 0
    assert any("no call of the model was seen" in str(w.message) for w in caught), [str(w.message) for w in caught]
