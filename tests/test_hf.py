"""Hugging Face decoders and encoders (tiny random-weight configurations, nothing downloaded) against a
float64 one-sample-at-a-time loop written from SPEC §1: each sample run alone, unpadded, ‖logits‖² summed
over its real positions.

Covers what those models do that ours don't: position ids of shape (1, T) broadcast over the batch
(any batch size, ragged last batches), dict batches with an attention_mask and labels, left and right
padding, ModelOutput logits, tied input/output embeddings, the families' RMSNorm classes, GPT-2's Conv1D,
BERT's aliased prediction-head bias, and observe() with keyword calls.
"""
import copy
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import mas_ext

transformers = pytest.importorskip("transformers")

V, T = 61, 9


def _llama(cls_name, config_name, **extra):
    def make():
        config = getattr(transformers, config_name)(
            vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, **extra)
        return getattr(transformers, cls_name)(config)
    return make


def _gpt2():
    config = transformers.GPT2Config(vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(config)


def _bert():
    config = transformers.BertConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=48, max_position_embeddings=64)
    return transformers.BertForMaskedLM(config)


MODELS = {
    "llama": _llama("LlamaForCausalLM", "LlamaConfig"),
    "qwen2-tied": _llama("Qwen2ForCausalLM", "Qwen2Config", tie_word_embeddings=True),
    "mistral": _llama("MistralForCausalLM", "MistralConfig", sliding_window=None),
    "gpt2": _gpt2,
    "bert": _bert,
}
CAUSAL = ("llama", "qwen2-tied", "mistral", "gpt2")  # left padding keeps a real token's output: RoPE is relative


def make_model(name, seed=0):
    return perturbed(MODELS[name], seed)


def perturbed(make, seed=0):
    """make() in eval mode, its random weights moved to a scale where every parameter's Ω is well above rounding."""
    torch.manual_seed(seed)
    model = make().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def oracle(model, samples, forward=lambda m, x: m(input_ids=x[None]).logits, dtype=torch.float64):
    """One unpadded sample at a time, on a copy of the model in `dtype` (float64 unless an op lacks it):
    (1/N) Σ_k |∂ ‖f(x_k)‖² / ∂θ| with f(x_k) = forward(copy, x_k), summed in float64."""
    # .double()/.float() cast only the floating tensors: .to(dtype) would cast a complex buffer (Llama 4's vision
    # rotary freqs_ci) to a real one, its imaginary part dropped
    m = copy.deepcopy(model)
    m = m.double() if dtype == torch.float64 else m.float()
    params = {k: p for k, p in m.named_parameters() if p.requires_grad}  # what MAS tracks
    om = {k: torch.zeros_like(p, dtype=torch.float64) for k, p in params.items()}
    for x in samples:
        grads = torch.autograd.grad(forward(m, x).pow(2).sum(), list(params.values()), allow_unused=True)
        for k, g in zip(params, grads):
            if g is not None:
                om[k] += g.double().abs()
    return {k: v / len(samples) for k, v in om.items()}


def assert_close(got, want, tol=2e-4):
    """Relative L2 error per parameter; an Ω that is zero in exact arithmetic (an attention key bias: softmax
    ignores a constant shift) is compared at the scale of the model's largest Ω."""
    assert set(got) == set(want), sorted(set(got) ^ set(want))[:5]
    floor = 1e-5 * max(w.norm().item() for w in want.values())
    bad = []
    for k in want:
        g, w = got[k].double(), want[k]
        err = ((g - w).norm() / w.norm().clamp_min(floor)).item()
        if err > tol:
            bad.append(f"{k}: {err:.2e}")
    assert not bad, "relative error above tolerance: " + ", ".join(bad[:6])


def padded(sequences, side):
    """input_ids and attention_mask for sequences of different lengths, padded on `side` with token 0."""
    width = max(len(s) for s in sequences)
    ids = torch.zeros(len(sequences), width, dtype=torch.long)
    mask = torch.zeros(len(sequences), width, dtype=torch.long)
    for i, s in enumerate(sequences):
        sl = slice(width - len(s), width) if side == "left" else slice(0, len(s))
        ids[i, sl], mask[i, sl] = s, 1
    return ids, mask


def _bf16_close(got, want, tol=5e-2):
    """bfloat16 against float64: each Ω of at least 1e-3 of the largest within ``tol`` (the rest is rounding)."""
    big = 1e-3 * max(w.norm().item() for w in want.values())
    bad = {k: ((got[k].double() - w).norm() / w.norm()).item() for k, w in want.items() if w.norm().item() >= big}
    assert max(bad.values()) < tol, sorted(bad.items(), key=lambda kv: -kv[1])[:4]


def _quiet(make, batches):
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        mas = make().accumulate(batches)
    assert not [str(w.message) for w in said if "one sample at a time" in str(w.message)]
    assert not mas._engine.by_sample and not mas._engine.pad_by_sample
    return mas


@pytest.mark.parametrize("cls", [mas_ext.ReferenceMAS, mas_ext.FusedMAS], ids=["reference", "fused"])
def test_t5_in_bfloat16_keeps_the_batched_path(cls):
    """T5's relative-position bias is an output all samples share, each sample's gradient at it told by its uses;
    the first batch's check runs the samples alone, where the bias's Embedding took the generic rule's gradient in
    bfloat16: its T² positions summed into 32 buckets in bfloat16 (16% off the float64 loop at T = 256, where the
    batch's pass was 2% off), and every batch ran one sample at a time. At T = 48 the check's 1% for told uses was
    below bfloat16's own 1-2% between the batch and a sample alone: the same. A whole call of a layer whose rule
    reads every dim before the last as positions now takes that rule, in float32; bfloat16 is held to 3e-2 alike."""
    torch.manual_seed(0)
    config = transformers.T5Config(vocab_size=V, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
                                   decoder_start_token_id=0)
    model = transformers.T5ForConditionalGeneration(config).eval().to(torch.bfloat16)
    ids, dec = torch.randint(1, V, (4, 256)), torch.randint(1, V, (4, 8))
    mas = _quiet(lambda: cls(model, show_progress=False), [{"input_ids": ids, "decoder_input_ids": dec}])
    want = oracle(model, list(zip(ids, dec)), forward=lambda m, x: m(input_ids=x[0][None],
                                                                       decoder_input_ids=x[1][None]).logits)
    _bf16_close(mas.task_importance, want)
    short = [torch.randint(1, V, (k,)) for k in (48, 30, 17, 41)]  # right padded, 48 tokens
    ids, mask = padded(short, "right")
    _quiet(lambda: cls(model, show_progress=False), [{"input_ids": ids, "attention_mask": mask,
                                                      "decoder_input_ids": dec}] * 2)


@pytest.mark.parametrize("cls", [mas_ext.ReferenceMAS, mas_ext.FusedMAS], ids=["reference", "fused"])
def test_bert_in_bfloat16_right_padded_keeps_the_batched_path(cls):
    """The padding check of a bfloat16 BERT compared its attention keys' biases, whose Ω is zero in exact arithmetic
    (softmax ignores a shift) and 2e-6 of the largest in bfloat16, 30% apart between the batch and its samples
    alone: every right-padded batch ran one sample at a time. Below 1e-4 of the largest Ω, half precision has
    nothing to tell. Batched, and within bfloat16's rounding of the float64 loop."""
    config = transformers.BertConfig(vocab_size=V, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=128, max_position_embeddings=64)
    model = perturbed(lambda: transformers.BertModel(config), seed=1).to(torch.bfloat16)
    samples = [torch.randint(1, V, (k,)) for k in (48, 13, 14, 13, 48, 29, 28, 40)]
    batches = [dict(zip(("input_ids", "attention_mask"), padded(samples[i:i + 4], "right"))) for i in (0, 4)]
    mas = _quiet(lambda: cls(model, output_fn=lambda out: out.last_hidden_state, show_progress=False), batches)
    _bf16_close(mas.task_importance, oracle(model, samples, forward=lambda m, x: m(input_ids=x[None]).last_hidden_state))


@pytest.mark.parametrize("cls", [mas_ext.ReferenceMAS, mas_ext.FusedMAS], ids=["reference", "fused"])
@pytest.mark.parametrize("name", list(MODELS))
def test_exact_on_ragged_batches(name, cls):
    """Unpadded batches of 3 then 4 (T = 9 divisible by neither... by 3 only), tensors and dict batches."""
    model = make_model(name)
    x = torch.randint(1, V, (7, T))
    mas = cls(model, show_progress=False)
    mas.accumulate([x[:3], {"input_ids": x[3:], "labels": x[3:]}])
    assert mas.num_samples == 7
    assert_close(mas.task_importance, oracle(model, list(x)))


@pytest.mark.parametrize("cls", [mas_ext.ReferenceMAS, mas_ext.FusedMAS], ids=["reference", "fused"])
@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("name", list(MODELS))
def test_padding_gives_the_unpadded_importance(name, side, cls):
    """Left padding too: with absolute position embeddings a left-padded sample is another input (unless position_ids
    are passed: test_gpt2_left_padding_with_position_ids), which the first padded batch's check against its samples
    run alone shows: such batches run one sample at a time, with a warning, and Ω is the unpadded samples'."""
    model = make_model(name, seed=1)
    torch.manual_seed(2)
    sequences = [torch.randint(1, V, (length,)) for length in (T, 4, 7, 1, 6)]
    ids, mask = padded(sequences, side)
    mas = cls(model, show_progress=False)
    mas.accumulate([{"input_ids": ids[:2], "attention_mask": mask[:2]},
                    {"input_ids": ids[2:], "attention_mask": mask[2:], "labels": ids[2:]}])
    assert_close(mas.task_importance, oracle(model, sequences))


@pytest.mark.parametrize("cls", [mas_ext.ReferenceMAS, mas_ext.FusedMAS], ids=["reference", "fused"])
@pytest.mark.parametrize("first", ["unpadded", "padded"])
@pytest.mark.parametrize("family", ["bert", "llama"])
def test_a_classifier_whose_labels_are_as_many_as_the_probed_tokens(family, first, cls):
    """K = 3 labels, the first batch 3 tokens wide: its (n, K) logits looked like (n, T) positions. After an unpadded
    first batch, a right-padded batch 3 wide had its padded samples' logits masked (14-28% off without a warning);
    after a padded one, every padded batch ran one sample at a time (a warning blaming the position embeddings). A
    padded sample run alone once tells: its output's dim 1 is K again, not its own length."""
    torch.manual_seed(3)
    config = dict(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
                  pad_token_id=0, num_labels=3)
    model = perturbed(lambda: transformers.BertForSequenceClassification(transformers.BertConfig(
        max_position_embeddings=64, **config)) if family == "bert" else transformers.LlamaForSequenceClassification(
        transformers.LlamaConfig(num_key_value_heads=2, **config)), seed=4)
    short = [torch.randint(1, V, (k,)) for k in ((3, 3) if first == "unpadded" else (3, 2, 1))]
    longer = [torch.randint(1, V, (k,)) for k in (7, 5, 6)]
    last = [torch.randint(1, V, (k,)) for k in (1, 3, 2)]
    batches = [dict(zip(("input_ids", "attention_mask"), padded(b, "right"))) for b in (short, longer, last)]
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        mas = cls(model, show_progress=False).accumulate(batches)
    assert not [w for w in said if "one sample at a time" in str(w.message)]
    assert_close(mas.task_importance, oracle(model, short + longer + last, forward=lambda m, x: m(x[None]).logits))


def _multiple_choice(family, seed=5):
    config = dict(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
                  max_position_embeddings=64, pad_token_id=0)
    return perturbed(lambda: transformers.BertForMultipleChoice(transformers.BertConfig(**config)) if family == "bert"
                     else transformers.DebertaV2ForMultipleChoice(transformers.DebertaV2Config(**config)), seed=seed)


def _choices_padded(samples, side):
    """input_ids, token_type_ids and attention_mask (n, C, T) of samples that are lists of C token rows."""
    rows = [r for s in samples for r in s]
    ids, mask = padded(rows, side)
    shape = (len(samples), len(samples[0]), ids.shape[1])
    return {"input_ids": ids.view(shape), "token_type_ids": torch.zeros(shape, dtype=torch.long),
            "attention_mask": mask.view(shape)}


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("family", ["bert", "deberta-v2"])
def test_multiple_choice_padding(family, side):
    """A multiple-choice head's (n, C, T) attention_mask, whose C rows of tokens per sample each run as a sequence
    of their own, was not read as padding: under left padding Ω was the padded rows' (BERT 66-70%, DeBERTa-v2 380%
    off, no warning). It is read as (n, T)'s is: right padding batched, left padding (learned absolute positions)
    found by the first batch's check and run one sample at a time without the positions padded in all its rows.
    Rows of one sample of different lengths: right-padded, exact (their pads masked); otherwise a warning."""
    model = _multiple_choice(family)
    torch.manual_seed(6)
    equal = [[torch.randint(1, V, (k,)) for _ in range(3)] for k in (7, 4, 5, 2, 6)]
    ragged = [[torch.randint(1, V, (k,)) for k in ks] for ks in ((7, 3, 5), (2, 6, 4), (5, 5, 1))]

    def forward(m, sample):  # each choice runs alone: the sample's gradient sums its rows' (each a one-choice sample)
        return torch.cat([m(input_ids=r[None, None]).logits for r in sample], 1)

    want = oracle(model, equal, forward)
    want_ragged = oracle(model, ragged, forward) if side == "right" else None
    for cls in (mas_ext.ReferenceMAS, mas_ext.FusedMAS):
        with warnings.catch_warnings(record=True) as said:
            warnings.simplefilter("always")
            mas = cls(model, show_progress=False).accumulate([_choices_padded(equal[:2], side),
                                                              _choices_padded(equal[2:], side)])
        assert len([w for w in said if "one sample at a time" in str(w.message)]) == (side == "left")
        assert not mas._engine.by_sample and mas._engine.pad_by_sample == (side == "left")
        assert_close(mas.task_importance, want)
        if side == "left":  # after the batches that set pad_by_sample (its one-sample runs recursed once)
            with pytest.warns(UserWarning, match=r"rows of tokens .* padded on the left"):
                mas.accumulate([_choices_padded(ragged, side)])
        else:
            with warnings.catch_warnings():  # a later batch of the layout, its samples' rows ragged: still batched
                warnings.simplefilter("error")
                mas.accumulate([_choices_padded(ragged, side)])
            both = len(equal) + len(ragged)  # Ω_t is the mean over the task's samples
            assert_close(mas.task_importance, {k: (len(equal) * v + len(ragged) * want_ragged[k]) / both
                                               for k, v in want.items()})
            mas = cls(model, show_progress=False)
            assert_close(mas.accumulate([_choices_padded(ragged, side)]).task_importance, want_ragged)


@pytest.mark.parametrize("cls", [mas_ext.ReferenceMAS, mas_ext.FusedMAS], ids=["reference", "fused"])
def test_a_decoder_mask_that_is_the_encoders_tensor(cls):
    """A left-padded batch of one sample whose decoder_attention_mask is the attention_mask tensor itself: it was
    taken for a decoder-only model's, so the decoder's inputs were not cut (BART's learned positions shifted)."""
    model = perturbed(lambda: transformers.BartForConditionalGeneration(transformers.BartConfig(
        vocab_size=V, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=48, decoder_ffn_dim=48, max_position_embeddings=64)), seed=9)
    torch.manual_seed(10)
    sample = torch.randint(3, V, (5,))
    ids, mask = padded([sample, torch.randint(3, V, (8,))], "left")
    ids, mask = ids[:1], mask[:1]  # one tensor for both masks
    mas = cls(model, show_progress=False).accumulate([{"input_ids": ids, "attention_mask": mask,
                                                      "decoder_input_ids": ids, "decoder_attention_mask": mask}])
    assert_close(mas.task_importance, oracle(model, [sample], lambda m, x: m(
        input_ids=x[None], decoder_input_ids=x[None]).logits))


@pytest.mark.parametrize("cls", [mas_ext.ReferenceMAS, mas_ext.FusedMAS], ids=["reference", "fused"])
def test_an_attention_pattern_is_not_padding(cls):
    """An (n, T, T) attention_mask beside (n, T, D) inputs_embeds with D = T is a pattern, not a multiple-choice
    head's (n, C, T) padding: it was cut as one (l-MAS 58% off; a key-padding pattern crashed)."""
    class Attention(nn.Module):
        def __init__(self, d):
            super().__init__()
            self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))

        def forward(self, inputs_embeds, attention_mask):
            h = inputs_embeds
            a = F.scaled_dot_product_attention(self.q(h), self.k(h), self.v(h), attn_mask=attention_mask.bool())
            return self.o(torch.tanh(a)) + h

    torch.manual_seed(11)
    model = Attention(8).eval()
    x = torch.randn(4, 8, 8)
    mask = torch.stack([(torch.arange(8) < k).long().expand(8, 8) for k in (8, 5, 7, 6)])
    for mode in ("global", "local"):
        mas = cls(model, mode=mode, show_progress=False).accumulate([{"inputs_embeds": x, "attention_mask": mask}])
        want = {k: torch.zeros_like(p, dtype=torch.float64) for k, p in model.named_parameters()}
        m = copy.deepcopy(model).double()
        for i in range(4):
            m.zero_grad()
            if mode == "global":
                out = m(x[i:i + 1].double(), mask[i:i + 1])
                grads = torch.autograd.grad(out.pow(2).sum(), list(m.parameters()))
            else:  # each layer's own output as the gradient at it (SPEC §1): the four Linears' Hebbian products
                h, attn_mask = x[i].double(), mask[i].bool()
                q, k, v = m.q(h), m.k(h), m.v(h)
                a = torch.tanh(F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask))
                grads = [g for lin, inp in ((m.q, h), (m.k, h), (m.v, h), (m.o, a))
                         for g in (lin(inp).T @ inp, lin(inp).sum(0))]
                grads = dict(zip([f"{n}.{w}" for n in "qkvo" for w in ("weight", "bias")], grads))
                grads = [grads[k] for k in want]
            for k, g in zip(want, grads):
                want[k] += g.abs() / 4
        want.pop("k.bias")  # zero in exact arithmetic (softmax ignores a constant shift)
        assert_close({k: v for k, v in mas.task_importance.items() if k in want}, want)


def test_seq2seq_labels_without_decoder_inputs_are_named():
    """DataCollatorForSeq2Seq without model= gives {input_ids, attention_mask, labels}: MAS drops the labels, from
    which the model would make its decoder's inputs (BART made them from the input_ids instead: another f, 77% off
    without a warning; T5 failed with a message about input_ids). accumulate() names it; observe() skips such a
    call with a warning; with decoder_input_ids the batch is taken as before."""
    model = perturbed(lambda: transformers.BartForConditionalGeneration(transformers.BartConfig(
        vocab_size=V, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=48, decoder_ffn_dim=48, max_position_embeddings=64)), seed=12)
    torch.manual_seed(13)
    batch = {"input_ids": torch.randint(3, V, (2, 6)), "labels": torch.randint(3, V, (2, 5))}
    for cls in (mas_ext.ReferenceMAS, mas_ext.FusedMAS):
        mas = cls(model, show_progress=False)
        with pytest.raises(ValueError, match="labels but no decoder_input_ids"):
            mas.accumulate([batch])
        with pytest.warns(UserWarning, match="labels but no decoder_input_ids"), mas.observe():
            model(**batch)
        assert mas.num_samples == 0
        mas.accumulate([{**batch, "decoder_input_ids": batch["labels"]}])
        assert mas.num_samples == 2


@pytest.mark.parametrize("tied", [False, True])
def test_parameters_replaced_after_the_mas_was_built_are_named(tied):
    """resize_token_embeddings (task 2 adds tokens) resizes the input embedding in place and replaces an untied
    head: Ω of the old head was zero at its old shape and its penalty never reached the new one, without an error
    (penalty() raised a bare size mismatch). accumulate(), consolidate() and the penalty name what changed."""
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=tied)).eval()
    mas = mas_ext.FusedMAS(model, show_progress=False).accumulate([torch.randint(0, V, (2, 5))])
    mas.consolidate()
    model.resize_token_embeddings(V + 3)
    for call in (lambda: mas.accumulate([torch.randint(0, V, (2, 5))]), mas.penalty, mas.consolidate,
                 lambda: mas_ext.optim.SGD(model.parameters(), lr=0.1, mas=mas).step()):
        with pytest.raises(ValueError, match=r"changed since FusedMAS was built: 'model.embed_tokens.weight' has "
                                             rf"shape \({V + 3}, 32\) \(was \({V}, 32\)\)"):
            call()


def test_multiple_choice_local_mode_leaves_the_padding_out():
    """l-MAS of a multiple-choice head with right padding: the layers' outputs at the padded positions of its
    (n·C, T) rows stay out, as for the samples alone, unpadded."""
    model = _multiple_choice("bert", seed=7)
    torch.manual_seed(8)
    samples = [[torch.randint(1, V, (k,)) for _ in range(2)] for k in (6, 3, 4)]
    alone = mas_ext.FusedMAS(model, mode="local", show_progress=False)
    for sample in samples:
        alone.accumulate([_choices_padded([sample], "right")])
    for cls in (mas_ext.ReferenceMAS, mas_ext.FusedMAS):
        mas = cls(model, mode="local", show_progress=False).accumulate([_choices_padded(samples, "right")])
        assert_close(mas.task_importance, {k: v.double() for k, v in alone.task_importance.items()}, tol=1e-5)


@pytest.mark.parametrize("cls", [mas_ext.ReferenceMAS, mas_ext.FusedMAS], ids=["reference", "fused"])
def test_rotary_positions_that_ignore_the_mask_under_left_padding(cls):
    """RoFormer's rotary positions count the pads of a left-padded sample, and no layer with parameters shows it: Ω
    was that of the padded samples, 16% off the unpadded ones with no warning. The first padded batch of a layout is
    checked against its samples run alone: padded batches then run one sample at a time, with a warning."""
    torch.manual_seed(5)
    model = transformers.RoFormerModel(transformers.RoFormerConfig(
        vocab_size=V, hidden_size=16, embedding_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=32)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    sequences = [torch.randint(1, V, (length,)) for length in (5, 3, 4)]
    ids, mask = padded(sequences, "left")
    with pytest.warns(UserWarning, match="than with its samples run alone"):
        mas = cls(model, show_progress=False, output_fn=lambda out: out.last_hidden_state).accumulate(
            [{"input_ids": ids, "attention_mask": mask}])
    assert_close(mas.task_importance,
                 oracle(model, sequences, forward=lambda m, x: m(input_ids=x[None]).last_hidden_state))


def test_gpt2_left_padding_with_position_ids():
    model = make_model("gpt2", seed=3)
    sequences = [torch.randint(1, V, (length,)) for length in (5, 8, 2)]
    ids, mask = padded(sequences, "left")
    position_ids = (mask.cumsum(1) - 1).clamp_min(0)
    mas = mas_ext.FusedMAS(model, show_progress=False)
    mas.accumulate([{"input_ids": ids, "attention_mask": mask, "position_ids": position_ids}])
    assert_close(mas.task_importance, oracle(model, sequences))


@pytest.mark.parametrize("name", list(MODELS))
def test_local_mode_fused_equals_reference(name):
    model = make_model(name, seed=4)
    sequences = [torch.randint(1, V, (length,)) for length in (T, 3, 6)]
    ids, mask = padded(sequences, "right")
    batches = [{"input_ids": ids, "attention_mask": mask}, torch.randint(1, V, (2, 5))]
    ref = mas_ext.ReferenceMAS(model, mode="local", show_progress=False).accumulate(batches).task_importance
    fused = mas_ext.FusedMAS(model, mode="local", show_progress=False).accumulate(batches).task_importance
    for k, v in ref.items():
        assert torch.isfinite(v).all() and v.abs().sum() > 0, k
    assert_close(fused, {k: v.double() for k, v in ref.items()}, tol=1e-5)


def test_local_mode_padding_is_excluded():
    model = make_model("llama", seed=5)
    sequences = [torch.randint(1, V, (length,)) for length in (T, 4)]
    alone = mas_ext.FusedMAS(model, mode="local", show_progress=False)
    for s in sequences:
        alone.accumulate([s.unsqueeze(0)])
    for side in ("left", "right"):
        ids, mask = padded(sequences, side)
        mas = mas_ext.FusedMAS(model, mode="local", show_progress=False)
        mas.accumulate([{"input_ids": ids, "attention_mask": mask}])
        assert_close(mas.task_importance, {k: v.double() for k, v in alone.task_importance.items()}, tol=1e-5)


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_observe_keyword_and_positional_calls(name):
    model = make_model(name, seed=6)
    x = torch.randint(1, V, (5, T))
    mas = mas_ext.FusedMAS(model, show_progress=False)
    with mas.observe():
        out = model(input_ids=x[:2], labels=x[:2])
        model(x[2:])
    assert out.loss is not None and mas.num_samples == 5
    assert_close(mas.task_importance, oracle(model, list(x)))


@pytest.mark.parametrize("name", ["llama", "gpt2"])
@pytest.mark.parametrize("cache", [True, False], ids=["cache", "no-cache"])
def test_observe_generate_takes_the_prompts(name, cache):
    """Deployment traffic is generate(): its first call (the left-padded prompts, an empty cache, logits of the last
    position only) is observed as accumulate() takes the prompts, so Ω is the prompts' own, each unpadded; the calls
    that follow (one token each on the filled cache) are skipped, with one warning. Before, every call of generate()
    was skipped. generate(use_cache=False) runs the whole prefix at every step (its last logits only): Ω was that of
    each prefix's last logits; its first call is observed as the prefill is, the steps after it skipped. The
    generated tokens are those of a run outside observe()."""
    model = make_model(name, seed=8)
    torch.manual_seed(9)
    prompts = [torch.randint(1, V, (length,)) for length in (T, 5, 7)]
    ids, mask = padded(prompts, "left")
    args = dict(input_ids=ids, attention_mask=mask, max_new_tokens=3, do_sample=False, pad_token_id=0,
                use_cache=cache)
    plain = model.generate(**args)
    mas = mas_ext.FusedMAS(model, show_progress=False)
    with mas.observe(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = model.generate(**args)
    assert torch.equal(out, plain) and mas.num_samples == 3
    assert len([w for w in caught if "skipped" in str(w.message)]) == 1, [str(w.message) for w in caught]
    assert_close(mas.task_importance, oracle(model, prompts))


@pytest.mark.parametrize("name", ["llama", "bert"])
def test_observe_and_accumulate_under_inference_mode(name):
    """Served traffic runs under torch.inference_mode (as pipelines do), its inputs made there too: observe() skipped
    every call ("Inference tensors cannot be saved for backward") and accumulate() raised. The pass runs outside it,
    on normal copies of such inputs."""
    model = make_model(name, seed=10)
    torch.manual_seed(11)
    prompts = [torch.randint(1, V, (length,)) for length in (T, 5, 7)]
    with torch.inference_mode():
        ids, mask = padded(prompts, "right")
    for cls in (mas_ext.ReferenceMAS, mas_ext.FusedMAS):
        observed, accumulated = cls(model, show_progress=False), cls(model, show_progress=False)
        with torch.inference_mode(), warnings.catch_warnings():
            warnings.simplefilter("error")
            with observed.observe():
                model(input_ids=ids, attention_mask=mask)
            accumulated.accumulate([{"input_ids": ids, "attention_mask": mask}])
        assert observed.num_samples == accumulated.num_samples == 3
        for mas in (observed, accumulated):
            assert_close(mas.task_importance, oracle(model, prompts))


def test_observe_generate_of_an_encoder_decoder_skips_its_calls():
    """T5's generate() runs the encoder itself, without gradients, and passes its output to every decoder call: a pass
    on those calls cannot reach the encoder (its Ω was 0, the samples counted). They are skipped, with a warning."""
    config = transformers.T5Config(vocab_size=V, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4,
                                   decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    model = perturbed(lambda: transformers.T5ForConditionalGeneration(config))
    ids, mask = padded([torch.randint(3, V, (length,)) for length in (9, 5)], "right")
    mas = mas_ext.FusedMAS(model, show_progress=False)
    with mas.observe(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=2, do_sample=False)
    assert mas.num_samples == 0 and all(v.abs().sum() == 0 for v in mas.task_importance.values())
    assert any("encoder_outputs" in str(w.message) for w in caught), [str(w.message) for w in caught]


def test_observe_skips_an_unusable_call_with_a_warning():
    model = make_model("gpt2", seed=7)
    mas = mas_ext.FusedMAS(model, output_fn=lambda out: out.past_key_values, show_progress=False)
    x = torch.randint(1, V, (2, T))
    with mas.observe(), pytest.warns(UserWarning, match="skipped"):
        out = model(input_ids=x)
    assert out.logits.shape == (2, T, V) and mas.num_samples == 0
    assert all(v.abs().sum() == 0 for v in mas.task_importance.values())


def test_output_without_logits_names_output_fn():
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=V, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                     intermediate_size=48)
    model = transformers.BertModel(config).eval()
    with pytest.raises(TypeError, match="output_fn"):
        mas_ext.ReferenceMAS(model, show_progress=False).accumulate([torch.randint(0, V, (2, 5))])
    mas = mas_ext.FusedMAS(model, output_fn=lambda out: out.last_hidden_state, show_progress=False)
    mas.accumulate([torch.randint(0, V, (2, 5))])
    assert mas.num_samples == 2


def test_fused_rules_cover_the_families_without_the_generic_path():
    """RMSNorm classes, GPT-2's Conv1D and BERT's head are rules of the table, not torch.func units; the
    tied embedding is one group that FusedMAS runs through the tied kernel."""
    for name in MODELS:
        mas = mas_ext.FusedMAS(make_model(name), show_progress=False)
        generic = [u.name for u in mas._engine.units if u.rule.grads is mas_ext._rules.generic_grads]
        assert not generic, f"{name}: generic units {generic}"


@pytest.mark.parametrize("family", ["T5", "UMT5", "LongT5"])
def test_t5_layer_norms_take_the_rms_norm_rule(family):
    """T5's RMS norm and its copies are classes named *LayerNorm: they took the generic rule (a torch.func rerun per
    call, a warning that no fused kernel applies). They are RMS norms of the table now (the class checked against
    the formula once, as any *RMSNorm): no generic unit, exact against the float64 loop, padding and all."""
    config = getattr(transformers, f"{family}Config")(vocab_size=V, d_model=32, d_kv=8, d_ff=64, num_layers=2,
                                                       num_heads=4, decoder_start_token_id=0)
    model = perturbed(lambda: getattr(transformers, f"{family}ForConditionalGeneration")(config), seed=3)
    torch.manual_seed(0)
    seqs, dec = [torch.randint(1, V, (k,)) for k in (9, 5, 7, 3)], torch.randint(1, V, (4, 6))
    ids, mask = padded(seqs, "right")
    want = oracle(model, list(zip(seqs, dec)), forward=lambda m, x: m(input_ids=x[0][None],
                                                                       decoder_input_ids=x[1][None]).logits)
    for cls in (mas_ext.ReferenceMAS, mas_ext.FusedMAS):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            mas = cls(model, show_progress=False)
            mas.accumulate([{"input_ids": ids, "attention_mask": mask, "decoder_input_ids": dec}])
        assert not [u.name for u in mas._engine.units if u.rule.grads is mas_ext._rules.generic_grads]
        assert_close(mas.task_importance, want)


def _mixing_models():
    """Families whose layers take inputs that are no sample's own rows: T5's relative-position bias Embedding on
    (T, T) buckets shared by all samples, and the MoE routers and experts on the batch's tokens flattened to
    (n·T, D). Each: (model, output_fn, oracle dtype: float32 where grouped_mm has no float64)."""
    moe = dict(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=64)
    return {
        "t5-encoder": (lambda: transformers.T5EncoderModel(transformers.T5Config(
            vocab_size=V, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4)),
            lambda o: o.last_hidden_state, torch.float64),
        "mixtral": (lambda: transformers.MixtralForCausalLM(transformers.MixtralConfig(
            num_local_experts=4, num_experts_per_tok=2, **moe)), None, torch.float32),
        "opt": (lambda: transformers.OPTForCausalLM(transformers.OPTConfig(  # fc1/fc2 on (n·T, D) tokens
            vocab_size=V, hidden_size=32, ffn_dim=48, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=64, word_embed_proj_dim=32)), None, torch.float64),
        "bart": (lambda: transformers.BartForConditionalGeneration(transformers.BartConfig(  # positions (T, D)
            vocab_size=V, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
            decoder_attention_heads=4, encoder_ffn_dim=48, decoder_ffn_dim=48, max_position_embeddings=64)),
            None, torch.float64),
        # relative embeddings (1, 2k, D) repeated by the batch size, their weight read outside the Embedding, through
        # position projections of their own (share_att_key=False), beside learned absolute positions
        "deberta-v2": (lambda: transformers.DebertaV2ForMaskedLM(transformers.DebertaV2Config(
            vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
            max_position_embeddings=64, relative_attention=True, position_buckets=8, pos_att_type=["p2c", "c2p"])),
            None, torch.float64),
        "qwen2-moe": (lambda: transformers.Qwen2MoeForCausalLM(transformers.Qwen2MoeConfig(
            num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, shared_expert_intermediate_size=24,
            **moe)), None, torch.float32),
        # relative-position bias Embedding on (T, T) buckets, as T5's
        "mpnet": (lambda: transformers.MPNetForMaskedLM(transformers.MPNetConfig(
            vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
            max_position_embeddings=64)), None, torch.float64),
        # positions from the batch's shape (a tuple): a layer whose rerun on one sample's inputs is the batch's again
        "prophetnet": (lambda: transformers.ProphetNetForConditionalGeneration(transformers.ProphetNetConfig(
            vocab_size=V, hidden_size=32, encoder_ffn_dim=48, decoder_ffn_dim=48, num_encoder_layers=1,
            num_decoder_layers=1, num_encoder_attention_heads=4, num_decoder_attention_heads=4, ngram=2,
            num_buckets=8, relative_max_distance=16, max_position_embeddings=64, pad_token_id=0)),
            None, torch.float64),
        # sliding-window attention on (T, n, D) hidden states: its projections hold the batch in dim 1
        "longformer": (lambda: transformers.LongformerForMaskedLM(transformers.LongformerConfig(
            vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
            max_position_embeddings=64, attention_window=[4, 4], pad_token_id=0)), None, torch.float64),
        # DeBERTa v1: its relative embeddings' weight read outside the Embedding (never called), sliced, projected by
        # the attention's own Linears, whose outputs it scales in place
        "deberta": (lambda: transformers.DebertaForMaskedLM(transformers.DebertaConfig(
            vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
            max_position_embeddings=64, relative_attention=True, max_relative_positions=16,
            pos_att_type=["c2p", "p2c"])), None, torch.float64),
        # fairseq's layout: (T, n, D) hidden states throughout. use_cache=False: with the cache on and the whole
        # decoder_input_ids given, its decoder takes no causal mask (the pass turns the cache off, as training does);
        # float32: its causal mask cannot be built in float64
        "fsmt": (lambda: transformers.FSMTForConditionalGeneration(transformers.FSMTConfig(
            src_vocab_size=V, tgt_vocab_size=V, d_model=32, encoder_layers=1, decoder_layers=1,
            encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=48, decoder_ffn_dim=48,
            max_position_embeddings=64, pad_token_id=1, langs=["en", "de"], use_cache=False)), None, torch.float32),
        "led": (lambda: transformers.LEDForConditionalGeneration(transformers.LEDConfig(
            vocab_size=V, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
            decoder_attention_heads=4, encoder_ffn_dim=48, decoder_ffn_dim=48, max_encoder_position_embeddings=64,
            max_decoder_position_embeddings=64, attention_window=[4], pad_token_id=0)), None, torch.float64),
        # relative attention, a layer of its own (the generic rule) reading (T', D) positions shared by the samples
        "funnel": (lambda: transformers.FunnelForMaskedLM(transformers.FunnelConfig(
            vocab_size=V, d_model=32, n_head=4, d_head=8, d_inner=48, block_sizes=[1, 1], num_decoder_layers=1)),
            None, torch.float64),
    }


@pytest.mark.parametrize("n", [4, 8], ids=["n4", "n-equals-T"])
@pytest.mark.parametrize("name", ["t5-encoder", "mixtral", "qwen2-moe", "opt", "bart", "deberta-v2", "mpnet", "funnel",
                                  "prophetnet", "longformer", "led", "fsmt", "deberta"])
def test_families_whose_layers_mix_the_samples(name, n):
    """T = 8 tokens in batches of n: the (T, T) buckets or BART's (T, D) positions reshaped by sample would give a
    wrong Ω, DeBERTa would fail; where n = T, the buckets, the positions and Funnel's (T', D) relative positions look
    like n rows, and gave a wrong Ω without an error (37%, 34%, 100%). T5's and MPNet's bias and BART's positions
    are outputs all samples share, and the ops that broadcast them over the batch tell each sample's gradient;
    OPT's feed-forward and the MoE routers and experts on (n·T, D) tokens are confirmed as n blocks of rows on the
    first batch, and Funnel's attention reads its positions as shared: they keep the fast path. So does DeBERTa-v2
    (it failed once its (1, 2k, D) relative embeddings were expanded, and then ran one sample at a time): the
    outputs of its position projections on them are shared, their weight read directly a leaf whose samples'
    gradients come back through them. Longformer's and LED's projections on (T, n, D) hidden states (the batch in
    dim 1), and FSMT's, time-major throughout, ran every batch one sample at a time: the batch dim is moved in front
    for their rule. So did DeBERTa v1, which reads its relative embeddings' weight outside the Embedding: that
    weight is read as a shared tensor from the pass's start, after a first try. ProphetNet, whose
    positions come from the batch's shape (it raised), runs one sample at a time, with one warning, exact."""
    make, output_fn, dtype = _mixing_models()[name]
    model = perturbed(make)
    x = torch.randint(1, V, (n + 2, 8))
    pick = output_fn or (lambda o: o.logits)
    seq2seq = model.config.is_encoder_decoder and output_fn is None

    class Call(torch.nn.Module):  # BART: the decoder reads the same tokens
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids):
            return self.inner(input_ids=input_ids, **({"decoder_input_ids": input_ids} if seq2seq else {}))

    if seq2seq:
        model = Call(model)
    want = oracle(model, x, lambda m, ids: pick(m(input_ids=ids[None])), dtype)
    for cls in (mas_ext.ReferenceMAS, mas_ext.FusedMAS):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            got = cls(model, output_fn=output_fn, show_progress=False).accumulate([x[:n], x[n:]]).task_importance
        said = [w for w in caught if "one sample at a time" in str(w.message)]
        assert len(said) == (1 if name == "prophetnet" else 0), [str(w.message) for w in caught]
        # Funnel's key biases have Ω 0 in exact arithmetic (softmax ignores a shift): float32 rounding, at 1e-9 of
        # the largest Ω, is 3e-4 of the floor there
        assert_close(got, want, tol=1e-3 if name == "funnel" else 2e-4 if dtype == torch.float64 else 1e-4)


def _shared_output_models():
    """Families with a layer whose output all samples share, broadcast over the batch by the model: T5's and its
    kin's relative-position bias (an Embedding on (T, T) buckets; in sdpa, the attn_mask), the BART family's learned
    positions (a (T, D) or (1, T, D) output of the tokens' shape), Swin's window bias over n blocks of windows.
    DeBERTa-v3's relative embeddings, projected by the layers' own Linears and repeated to the batch's size. Each:
    (model, (encoder-)decoder, relative positions: left padding gives the unpadded Ω)."""
    seq2seq = dict(vocab_size=V, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
                   decoder_attention_heads=4, encoder_ffn_dim=48, decoder_ffn_dim=48, max_position_embeddings=64)
    t5 = dict(vocab_size=V, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4)
    return {
        "t5": (lambda: transformers.T5ForConditionalGeneration(transformers.T5Config(**t5)), True, True),
        "t5-eager": (lambda: transformers.T5ForConditionalGeneration(transformers.T5Config(
            **t5, attn_implementation="eager")), True, True),
        "umt5": (lambda: transformers.UMT5ForConditionalGeneration(transformers.UMT5Config(**t5)), True, True),
        "longt5": (lambda: transformers.LongT5ForConditionalGeneration(transformers.LongT5Config(**t5)), True, True),
        "mbart": (lambda: transformers.MBartForConditionalGeneration(transformers.MBartConfig(**seq2seq)), True, False),
        "blenderbot": (lambda: transformers.BlenderbotForConditionalGeneration(transformers.BlenderbotConfig(
            **seq2seq)), True, False),
        "mpnet": (lambda: transformers.MPNetForMaskedLM(transformers.MPNetConfig(
            vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
            max_position_embeddings=64)), False, False),
        "swin": (lambda: transformers.SwinForImageClassification(transformers.SwinConfig(
            image_size=16, patch_size=2, num_channels=3, embed_dim=16, depths=[1, 1], num_heads=[2, 2],
            window_size=4, num_labels=3)), None, False),
        # DeBERTa-v3's config in small: relative embeddings read as a weight, normed by a LayerNorm, projected by the
        # layers' own query_proj and key_proj, repeated by the batch size; log buckets, no absolute positions
        "deberta-v3": (lambda: transformers.DebertaV2ForMaskedLM(transformers.DebertaV2Config(
            vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
            max_position_embeddings=64, relative_attention=True, position_buckets=4, pos_att_type=["p2c", "c2p"],
            norm_rel_ebd="layer_norm", share_att_key=True, position_biased_input=False)), False, True),
    }


@pytest.mark.parametrize("side", [None, "right", "left"], ids=["unpadded", "right", "left"])
@pytest.mark.parametrize("name", list(_shared_output_models()))
def test_families_whose_outputs_all_samples_share(name, side):
    """Each sample's gradient at the shared output is told by the ops that broadcast it over the batch: the batches
    keep the batched path, exact against a float64 loop over the unpadded samples, both classes. With left padding
    learned absolute positions are another input (mBART, Blenderbot, MPNet): the first batch, run again one sample
    at a time, shows it, and padded batches run so from then on (one warning; an unpadded one keeps the batched
    path), exact; relative ones give the unpadded Ω batched. Swin: two batches of images."""
    make, seq2seq, relative = _shared_output_models()[name]
    if seq2seq is None and side is not None:
        pytest.skip("images: no padding")
    model = perturbed(make)
    torch.manual_seed(3)
    if seq2seq is None:
        x = torch.randn(7, 3, 16, 16)
        samples, batches = list(x), [{"pixel_values": x[:4]}, {"pixel_values": x[4:]}]
        want = oracle(model, samples, lambda m, s: m(pixel_values=s[None].double()).logits)
    else:
        samples = [torch.randint(1, V, (k,)) for k in ((8, 5, 7, 3, 6, 8, 2) if side else (8,) * 7)]
        ids, mask = padded(samples, side or "right")
        batches = [{"input_ids": ids[:4], "attention_mask": mask[:4]},
                   {"input_ids": ids[4:], "attention_mask": mask[4:]}]
        if seq2seq:
            for b in batches:
                b.update(decoder_input_ids=b["input_ids"], decoder_attention_mask=b["attention_mask"])
        want = oracle(model, samples, lambda m, s: m(input_ids=s[None], **(
            {"decoder_input_ids": s[None]} if seq2seq else {})).logits)
    by_sample = side == "left" and not relative
    for cls in (mas_ext.ReferenceMAS, mas_ext.FusedMAS):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            mas = cls(model, show_progress=False).accumulate(batches)
        said = [str(w.message) for w in caught if "one sample at a time" in str(w.message)]
        assert len(said) == by_sample and mas._engine.pad_by_sample == by_sample and not mas._engine.by_sample, said
        assert_close(mas.task_importance, want)


def _conv_models():
    """Vision and audio families whose convolutions take the compiled conv op (each has convs of at least 32 columns
    C·K, the register kernel's, and smaller ones or grouped ones, the GEMM path's): (model, input, output_fn)."""
    return {
        "resnet": (lambda: transformers.ResNetForImageClassification(transformers.ResNetConfig(
            num_channels=3, embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1], layer_type="basic",
            num_labels=5)), lambda n: torch.randn(n, 3, 20, 20), None),
        "convnext": (lambda: transformers.ConvNextForImageClassification(transformers.ConvNextConfig(
            num_channels=3, num_stages=2, hidden_sizes=[16, 32], depths=[1, 1], patch_size=2, num_labels=5)),
            lambda n: torch.randn(n, 3, 16, 16), None),
        "vit": (lambda: transformers.ViTForImageClassification(transformers.ViTConfig(
            image_size=16, patch_size=4, num_channels=3, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
            intermediate_size=48, num_labels=5)), lambda n: torch.randn(n, 3, 16, 16), None),
        "wav2vec2": (lambda: transformers.Wav2Vec2Model(transformers.Wav2Vec2Config(
            hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=48,
            conv_dim=(16, 16, 16), conv_stride=(5, 2, 2), conv_kernel=(10, 3, 3), num_conv_pos_embeddings=8,
            num_conv_pos_embedding_groups=4, do_stable_layer_norm=True, feat_extract_norm="layer")),
            lambda n: torch.randn(n, 400), lambda o: o.last_hidden_state),
    }


@pytest.mark.parametrize("mode", ["global", "local"])
@pytest.mark.parametrize("name", ["resnet", "convnext", "vit", "wav2vec2"])
def test_vision_and_audio_families_against_a_float64_loop(name, mode):
    """The conv op (register kernel and GEMM path) inside models nobody here wrote: ResNet's BatchNorm convs,
    ConvNeXt's depthwise convs (groups = C), ViT's patch conv (stride = kernel), wav2vec2's strided conv1d feature
    extractor and its weight-normed grouped positional conv. Ω of every parameter against a float64 loop of one
    sample at a time (g-MAS: ∂‖f(x_k)‖²; l-MAS: each layer's own output as its gradient, from ReferenceMAS in
    float64, itself checked against that loop in tests/test_importance.py)."""
    make, inputs, output_fn = _conv_models()[name]
    model = perturbed(make)
    x = inputs(5)
    pick = output_fn or (lambda o: o.logits)
    if mode == "global":
        want = oracle(model, x, lambda m, xk: pick(m(xk[None].double())))
    else:
        want = mas_ext.ReferenceMAS(copy.deepcopy(model).double(), mode="local", output_fn=output_fn,
                                    show_progress=False).accumulate([x.double()[:3], x.double()[3:]]).task_importance
    for cls in (mas_ext.ReferenceMAS, mas_ext.FusedMAS):
        mas = cls(model, mode=mode, output_fn=output_fn, show_progress=False)
        assert_close(mas.accumulate([x[:3], x[3:]]).task_importance, want, tol=1e-4)
        if name == "convnext":  # its LayerNorm subclass (channels first and last) takes the LayerNorm rule
            assert {type(u.module).__name__ for u in mas._engine.units
                    if u.rule.grads is mas_ext._rules.generic_grads} == {"ConvNextLayer"}


def _more_families():
    """Decoder families beyond the benchmark's, each with what it does that the others don't: (make, oracle dtype
    (float32 where grouped_mm has no float64), the module classes FusedMAS leaves to the generic rule)."""
    dec = dict(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
               max_position_embeddings=64)
    return {
        # tied embeddings read through GemmaTextScaledWordEmbedding (rows × √D), (1 + w) RMSNorm
        "gemma": (lambda: transformers.GemmaForCausalLM(transformers.GemmaConfig(
            num_key_value_heads=2, head_dim=8, **dec)), torch.float64, set()),
        # sliding-window layers beside global ones, q/k RMSNorms on (n, T, heads, d)
        "gemma3": (lambda: transformers.Gemma3ForCausalLM(transformers.Gemma3TextConfig(
            num_key_value_heads=2, head_dim=8, sliding_window=4, **dec)), torch.float64, set()),
        "qwen3": (lambda: transformers.Qwen3ForCausalLM(transformers.Qwen3Config(
            num_key_value_heads=2, head_dim=8, **dec)), torch.float64, set()),
        # fused qkv and gate_up projections
        "phi3": (lambda: transformers.Phi3ForCausalLM(transformers.Phi3Config(
            num_key_value_heads=2, pad_token_id=0, **dec)), torch.float64, set()),
        "gpt-neox": (lambda: transformers.GPTNeoXForCausalLM(transformers.GPTNeoXConfig(**dec)), torch.float64,
                     set()),
        # nn.Linear subclass with a forward of its own (the Linear rule once checked), its MLP output added into in
        # place
        "falcon": (lambda: transformers.FalconForCausalLM(transformers.FalconConfig(
            vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4)), torch.float64, set()),
        # a cache made by the model (use_cache) that the mixer updates in place; the mixer's A_log and D: generic
        "mamba": (lambda: transformers.MambaForCausalLM(transformers.MambaConfig(
            vocab_size=V, hidden_size=32, state_size=4, num_hidden_layers=2, expand=2, conv_kernel=4)),
            torch.float64, {"MambaMixer"}),
        # RG-LRU: its last recurrent state kept on the module, an autograd.Function torch.func cannot transform
        "recurrent-gemma": (lambda: transformers.RecurrentGemmaForCausalLM(transformers.RecurrentGemmaConfig(
            vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=1, lru_width=32, attention_window_size=8, conv1d_width=4, pad_token_id=0)),
            torch.float64, {"RecurrentGemmaRglru"}),
        # the router takes (n, T, D) and returns (n·T, E) logits
        "deepseek-v3": (lambda: transformers.DeepseekV3ForCausalLM(transformers.DeepseekV3Config(
            num_key_value_heads=4, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
            first_k_dense_replace=1, kv_lora_rank=8, q_lora_rank=16, qk_rope_head_dim=4, qk_nope_head_dim=4,
            v_head_dim=8, n_group=1, topk_group=1, **dec)), torch.float32,
            {"DeepseekV3TopkRouter", "DeepseekV3Experts"}),
        # a short conv without parameters of its own that hands its Conv1d's weight to a function: it owns them
        "lfm2": (lambda: transformers.Lfm2ForCausalLM(transformers.Lfm2Config(
            num_key_value_heads=2, layer_types=["conv", "full_attention"], conv_L_cache=3, block_ff_dim=48,
            block_auto_adjust_ff_dim=False, **dec)), torch.float64, {"Lfm2ShortConv"}),
        # AltUp's parameters read by the decoder layer outside their module's forward, on (2, n, T, D) hidden states:
        # the layers own them
        "gemma3n": (lambda: transformers.Gemma3nForCausalLM(transformers.Gemma3nTextConfig(
            num_key_value_heads=2, head_dim=8, vocab_size_per_layer_input=V, hidden_size_per_layer_input=8,
            intermediate_size=[48, 48], layer_types=["sliding_attention", "full_attention"], sliding_window=4,
            num_kv_shared_layers=0, activation_sparsity_pattern=[0.0, 0.0], altup_num_inputs=2, laurel_rank=4,
            **{k: v for k, v in dec.items() if k != "intermediate_size"})), torch.float64,
            {"Gemma3nTextDecoderLayer"}),
        # attention and feed-forward blocks with parameters of their own, a recurrent state in the model's cache
        "rwkv": (lambda: transformers.RwkvForCausalLM(transformers.RwkvConfig(
            vocab_size=V, hidden_size=32, num_hidden_layers=2, attention_hidden_size=32, intermediate_size=48,
            context_length=64)), torch.float64, {"RwkvSelfAttention", "RwkvFeedForward"}),
    }


@pytest.mark.parametrize("name", ["gemma", "gemma3", "qwen3", "phi3", "gpt-neox", "falcon", "mamba", "recurrent-gemma",
                                  "deepseek-v3", "rwkv", "lfm2", "gemma3n"])
def test_more_decoder_families_against_a_float64_loop(name):
    """Ω of every parameter against a one-sample float64 loop, ReferenceMAS and FusedMAS, in batches of 3 and 2, with
    no batch run one sample at a time; FusedMAS leaves only the listed classes to the generic rule. Before: Mamba and
    RecurrentGemma crashed (the rerun of the mixer advanced the model's cache; the RG-LRU's rerun started from the
    state the batch left on it), DeepSeek-V3 ran every batch one sample at a time, Gemma's embedding and the tied head
    took the generic rule (N × V × D per-sample gradients), and so did Falcon's every Linear (N × out × in); LFM2 and
    Gemma3n ran every batch one sample at a time until 2026-12-05."""
    make, dtype, generic = _more_families()[name]
    model = perturbed(make)
    x = torch.randint(1, V, (5, 8))
    # RWKV's backward fails where its forward updates the cache's state in place
    want = oracle(model, x, lambda m, ids: m(input_ids=ids[None], use_cache=False).logits, dtype)
    for cls in (mas_ext.ReferenceMAS, mas_ext.FusedMAS):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            mas = cls(model, show_progress=False)
            got = mas.accumulate([x[:3], x[3:]]).task_importance
        assert not [w for w in caught if "one sample at a time" in str(w.message)], [str(w.message) for w in caught]
        assert_close(got, want, tol=2e-4 if dtype == torch.float64 else 1e-4)
    assert {type(u.module).__name__ for u in mas._engine.units
            if u.rule.grads is mas_ext._rules.generic_grads} == generic
    assert model.config.use_cache is not False  # turned off for the pass only


@pytest.mark.parametrize("name", ["mamba", "recurrent-gemma"])
def test_use_cache_in_a_batch_is_turned_off(name):
    """A dict batch that asks for the cache (use_cache=True) gets none in the pass, as the configs' use_cache is off
    there: Mamba's mixer and RecurrentGemma's RG-LRU, rerun by the generic rule, crashed on the batch's cache."""
    make, dtype, _ = _more_families()[name]
    model = perturbed(make)
    x = torch.randint(1, V, (5, 8))
    want = oracle(model, x, lambda m, ids: m(input_ids=ids[None], use_cache=False).logits, dtype)
    batches = [{"input_ids": x[:3], "use_cache": True}, {"input_ids": x[3:], "use_cache": True}]
    assert_close(mas_ext.FusedMAS(model, show_progress=False).accumulate(batches).task_importance, want)


def test_no_pass_outlives_a_model_that_keeps_its_graph():
    """RecurrentGemma's RG-LRU keeps its last recurrent state on itself, graph and all: through the taps' backward
    that graph kept the whole pass (its Ω buffers, its calls' activations) until the next forward. A pass lets go of
    its taps, its calls and its shared sites when it ends."""
    import gc

    make, _, _ = _more_families()["recurrent-gemma"]
    model = perturbed(make)
    mas = mas_ext.FusedMAS(model, show_progress=False).accumulate([torch.randint(1, V, (3, 8))])
    gc.collect()
    kept = [o for o in gc.get_objects() if isinstance(o, (mas_ext._engine._Pass, mas_ext._rules.Call))]
    assert not kept and mas.num_samples == 3


def test_moe_top1_keeps_the_batched_path():
    """Mixtral routing each token to one expert with its weight normalised to 1: the router's Ω is zero in exact
    arithmetic, and the first batch's check of the n blocks compared rounding noise on both sides (every batch then
    ran one sample at a time). It now compares at the scale of the batch's largest Ω."""
    model = perturbed(lambda: transformers.MixtralForCausalLM(transformers.MixtralConfig(
        vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, num_local_experts=4, num_experts_per_tok=1)))
    x = torch.randint(1, V, (6, 8))
    want = oracle(model, x, dtype=torch.float32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = mas_ext.FusedMAS(model, show_progress=False).accumulate([x[:4], x[4:]]).task_importance
    assert not [w for w in caught if "one sample at a time" in str(w.message)], [str(w.message) for w in caught]
    assert_close(got, want, tol=1e-4)


_IMAGE, _START, _END = 70, 71, 72


def _qwen_vl(family):
    """A tiny Qwen2-VL or Qwen2.5-VL with random weights."""
    text = dict(vocab_size=80, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=256,
                rope_scaling={"type": "mrope", "mrope_section": [1, 1, 2]})
    vision = dict(depth=1, hidden_size=32, num_heads=2, in_channels=3, patch_size=2, spatial_merge_size=2,
                  temporal_patch_size=2, **({"embed_dim": 16, "mlp_ratio": 2} if family == "Qwen2VL" else
                                            {"intermediate_size": 32, "out_hidden_size": 32, "window_size": 8,
                                             "fullatt_block_indexes": [0]}))
    config = getattr(transformers, f"{family}Config")(text_config=text, vision_config=vision, image_token_id=_IMAGE,
                                                      vision_start_token_id=_START, vision_end_token_id=_END)
    return perturbed(lambda: getattr(transformers, f"{family}ForConditionalGeneration")(config))


def _vl_batch(grids, length=22):
    """A batch whose sample k has images of the (t, h, w) patch grids grids[k] (none where empty), laid out as
    Qwen2-VL's processor does (all patches in one tensor), and each sample alone: (batch, [sample k's call])."""
    ids, pixels, rows = [], [], []
    for sample in grids:
        row, pos = torch.randint(1, 60, (length,)), 1
        for t, h, w in sample:
            tokens = t * h * w // 4
            row[pos], row[pos + 1:pos + 1 + tokens], row[pos + 1 + tokens] = _START, _IMAGE, _END
            pos += tokens + 3
            pixels.append(torch.randn(t * h * w, 3 * 2 * 2 * 2))
            rows.append((t, h, w))
        ids.append(row)
    ids = torch.stack(ids)
    types, grid = (ids == _IMAGE).int(), torch.tensor(rows)
    batch = dict(input_ids=ids, mm_token_type_ids=types, pixel_values=torch.cat(pixels), image_grid_thw=grid)
    alone, first = [], 0
    for k, sample in enumerate(grids):
        mine = slice(first, first + len(sample))
        first += len(sample)
        images = {"pixel_values": torch.cat(pixels[mine]).double(), "image_grid_thw": grid[mine]} if sample else {}
        alone.append(dict(input_ids=ids[k:k + 1], mm_token_type_ids=types[k:k + 1], **images))
    return batch, alone


@pytest.mark.parametrize("images", ["mixed", "equal", "equal-then-unequal", "one-without"])
@pytest.mark.parametrize("family", ["Qwen2VL", "Qwen2_5_VL"])
def test_vision_language_model_with_flattened_patches(family, images):
    """Qwen2-VL and Qwen2.5-VL take the patches of all the batch's images in one (patches, features) tensor, with an
    image_grid_thw row per image and mm_token_type_ids marking each image's tokens: the one-sample runs cut neither
    (it crashed), and a sample without an image crashed its run alone. Each sample alone gets its own images'
    patches and grid rows. With images of one size in every sample, the vision tower (its patch-embedding conv too)
    reads the patches as n blocks of rows and keeps the batched path; a batch whose samples have different patch
    counts runs one sample at a time, with one warning (equal-then-unequal: a later batch whose 48 patches split
    evenly into 2 samples of 16 and 32 was read as 24 + 24, Ω 17-23% off without a warning). Ω against a float64
    loop over the samples run alone."""
    model = _qwen_vl(family)
    torch.manual_seed(5)
    small, wide, tall = (1, 4, 4), (1, 4, 8), (1, 8, 4)
    grids = {"mixed": [[[small, wide], [small], [tall]]], "equal": [[[small]] * 3],
             "equal-then-unequal": [[[small]] * 3, [[wide], [small]]], "one-without": [[[small], [], [small, small]]]}
    batches, alone = zip(*(_vl_batch(g) for g in grids[images]))
    _check_vl(model, batches, alone, by_sample=images != "equal")


def _check_vl(model, batches, alone, by_sample):
    """Ω of both classes on ``batches`` against a float64 loop over the samples ``alone``, and one warning that the
    batches run one sample at a time where ``by_sample``, else none."""
    want = oracle(model, [a for sample in alone for a in sample], lambda m, a: m(**a).logits)
    for cls in (mas_ext.ReferenceMAS, mas_ext.FusedMAS):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            got = cls(model, show_progress=False).accumulate(list(batches)).task_importance
        assert_close(got, want, tol=1e-4)
        said = [w for w in caught if "one sample at a time" in str(w.message)]
        assert len(said) == int(by_sample), [str(w.message) for w in caught]


def _padded_vl_batch(grids, lengths, side, length=22):
    """:func:`_vl_batch` with sample k's text cut to lengths[k] tokens (its images stay at the start) and padded on
    ``side`` to ``length``, with its attention_mask; each sample alone unpadded."""
    batch, alone = _vl_batch(grids, length)
    ids, types = torch.zeros_like(batch["input_ids"]), torch.zeros_like(batch["mm_token_type_ids"])
    mask = torch.zeros_like(ids)
    for k, keep in enumerate(lengths):
        at = slice(0, keep) if side == "right" else slice(length - keep, length)
        own = {key: alone[k][key][:, :keep] for key in ("input_ids", "mm_token_type_ids")}
        ids[k, at], types[k, at], mask[k, at] = own["input_ids"][0], own["mm_token_type_ids"][0], 1
        alone[k].update(own)
    batch.update(input_ids=ids, mm_token_type_ids=types, attention_mask=mask)
    return batch, alone


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("family", ["Qwen2VL", "Qwen2_5_VL"])
def test_padded_vision_language_batches_keep_the_batched_path(family, side):
    """A processor's batch is padded: with an attention_mask, the vision tower's (patches, ·) rows were not taken as
    n blocks (only the batch's (n, T) positions were, lest tokens packed by the mask be), and every batch ran one
    sample at a time. The rows of the batch's flattened patches, merged or not, are now read as n blocks where the
    samples have as many patches (confirmed on the first batch). Two batches, Ω against a float64 loop."""
    model = _qwen_vl(family)
    torch.manual_seed(7)
    small = (1, 4, 4)
    batches, alone = zip(_padded_vl_batch([[small]] * 3, [22, 17, 12], side),
                         _padded_vl_batch([[small, small]] * 2, [22, 19], side))
    _check_vl(model, batches, alone, by_sample=False)


def test_qwen3_vl_videos_with_a_run_of_tokens_per_frame():
    """Qwen3-VL marks each frame of a video as its own run of video tokens (timestamp text between them), with one
    video_grid_thw row per video: a sample's videos are told by the frames its runs count (it crashed: the runs did
    not match the grid's rows). Two samples with one video each, of different sizes; against a float64 loop."""
    video, start, end = 73, 71, 72
    text = dict(vocab_size=80, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
                num_key_value_heads=2, head_dim=8, max_position_embeddings=256,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [1, 1, 2],
                                 "mrope_interleaved": True})
    vision = dict(depth=1, hidden_size=32, num_heads=2, intermediate_size=32, in_channels=3, patch_size=2,
                  spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=32, num_position_embeddings=16,
                  deepstack_visual_indexes=[0])
    config = transformers.Qwen3VLConfig(text_config=text, vision_config=vision, image_token_id=70, video_token_id=video,
                                        vision_start_token_id=start, vision_end_token_id=end)
    model = perturbed(lambda: transformers.Qwen3VLForConditionalGeneration(config))
    torch.manual_seed(6)
    ids, types = torch.randint(1, 60, (2, 34)), torch.zeros(2, 34, dtype=torch.int)
    grids, clips = [(2, 4, 4), (2, 4, 8)], []
    for k, (t, h, w) in enumerate(grids):
        tokens, pos = h * w // 4, 1
        for _ in range(t):  # a frame: start, its tokens, end, then two timestamp tokens
            ids[k, pos], ids[k, pos + 1:pos + 1 + tokens], ids[k, pos + 1 + tokens] = start, video, end
            types[k, pos + 1:pos + 1 + tokens] = 2
            pos += tokens + 4
        clips.append(torch.randn(t * h * w, 3 * 2 * 2 * 2))
    batch = dict(input_ids=ids, mm_token_type_ids=types, pixel_values_videos=torch.cat(clips),
                 video_grid_thw=torch.tensor(grids))

    def alone(m, k):
        return m(input_ids=ids[k:k + 1], mm_token_type_ids=types[k:k + 1], pixel_values_videos=clips[k].double(),
                 video_grid_thw=torch.tensor(grids[k:k + 1])).logits

    want = oracle(model, range(2), alone)
    for cls in (mas_ext.ReferenceMAS, mas_ext.FusedMAS):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            assert_close(cls(model, show_progress=False).accumulate([batch]).task_importance, want, tol=1e-4)


def _dual_encoders():
    """Models whose own parameter beside their towers (CLIP's logit_scale, SigLIP's logit_scale and logit_bias)
    makes the whole model one layer of the generic rule in g-MAS, and whose (n, n) image-text logits all samples
    share."""
    text = dict(vocab_size=V, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=48,
                max_position_embeddings=16)
    vision = dict(image_size=16, patch_size=8, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                  intermediate_size=48)
    return {
        "clip": lambda: transformers.CLIPModel(transformers.CLIPConfig(text_config=text, vision_config=vision)),
        "siglip": lambda: transformers.SiglipModel(transformers.SiglipConfig(text_config=text, vision_config=vision)),
    }


@pytest.mark.parametrize("tower", ["vision", "text"])
@pytest.mark.parametrize("name", list(_dual_encoders()))
def test_dual_encoders_with_one_tower_as_the_output(name, tower):
    """With one tower's hidden states as f(x) (its normalised embeddings have a constant norm: Ω 0), the (n, n)
    logits that all samples share get a zero gradient, which adds nothing to any sample's: the generic rule leaves
    them out and the batch stays batched (it ran one sample at a time, 22× a plain pass on a CLIP of hidden 256),
    exact against the float64 loop, both classes."""
    model = perturbed(_dual_encoders()[name])
    torch.manual_seed(4)
    ids, pixels = torch.randint(1, V, (5, 7)), torch.randn(5, 3, 16, 16)

    def pick(o):
        return getattr(o, f"{tower}_model_output").last_hidden_state

    want = oracle(model, list(zip(ids, pixels)),
                  lambda m, s: pick(m(input_ids=s[0][None], pixel_values=s[1][None].double())))
    for cls in (mas_ext.ReferenceMAS, mas_ext.FusedMAS):
        mas = cls(model, output_fn=pick, show_progress=False)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            mas.accumulate([{"input_ids": ids[:3], "pixel_values": pixels[:3]},
                            {"input_ids": ids[3:], "pixel_values": pixels[3:]}])
        said = [str(w.message) for w in caught if "one sample at a time" in str(w.message)]
        assert not said and not mas._engine.by_sample, said
        # the key biases' Ω is 0 in exact arithmetic (softmax ignores a shift): rounding, a few 1e-9 of the largest
        assert_close(mas.task_importance, want, tol=1e-3)


@pytest.mark.parametrize("att", ["c2p", "p2c"])
def test_deberta_with_one_relative_term(att):
    """DeBERTa-v3 with c2p or p2c alone: the layers' query_proj (key_proj) still project the relative embeddings, and
    that output reaches nothing: its call's gradient never arrives. Exact and batched against the float64 loop, and
    ReferenceMAS's Ω holds no autograd graph (the calls processed after the backward recorded one: penalty().backward()
    raised 'backward through the graph a second time')."""
    model = perturbed(lambda: transformers.DebertaV2ForMaskedLM(transformers.DebertaV2Config(
        vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
        max_position_embeddings=64, relative_attention=True, position_buckets=4, pos_att_type=[att],
        norm_rel_ebd="layer_norm", share_att_key=True, position_biased_input=False)))
    torch.manual_seed(5)
    x = torch.randint(1, V, (7, 8))
    want = oracle(model, x)
    for cls in (mas_ext.ReferenceMAS, mas_ext.FusedMAS):
        mas = cls(model, show_progress=False).accumulate([x[:4], x[4:]])
        assert not mas._engine.by_sample
        assert not [k for k, v in mas.task_importance.items() if v.requires_grad]
        assert_close(mas.task_importance, want)
        mas.consolidate()
        mas.penalty().backward()


@pytest.mark.parametrize("cls", [mas_ext.ReferenceMAS, mas_ext.FusedMAS], ids=["reference", "fused"])
def test_a_classifier_whose_labels_number_the_padded_length(cls):
    """A sequence classifier's (n, 3) logits in a padded batch of 3 tokens: the padding mask (n, T) has their shape,
    and the padded sample's last logit was masked as a padded position (DeBERTa-v2: 5% off, no warning). An output
    whose dim 1 was none of the sample's input lengths in the one-sample run holds no positions."""
    torch.manual_seed(3)
    model = perturbed(lambda: transformers.BertForSequenceClassification(transformers.BertConfig(
        vocab_size=V, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=48,
        max_position_embeddings=64, num_labels=3)))
    first = [torch.randint(1, V, (length,)) for length in (7, 5, 7)]
    second = [torch.randint(1, V, (length,)) for length in (3, 3, 2)]
    batches = [dict(zip(("input_ids", "attention_mask"), padded(s, "right"))) for s in (first, second)]
    want = oracle(model, first + second)
    got = cls(model, show_progress=False).accumulate(batches).task_importance
    assert_close(got, want)


@pytest.mark.parametrize("cls", [mas_ext.ReferenceMAS, mas_ext.FusedMAS], ids=["reference", "fused"])
def test_mask2former_masked_attention_and_time_major_queries(cls):
    """Mask2Former's decoder: its queries are Embedding weights read outside the (never called) Embedding and
    repeated over the batch in dim 1 of (Q, n, D) time-major hidden states; nn.MultiheadAttention's attn_mask is
    per sample, (n·heads, Q, HW). Batched (no sample-by-sample fallback, and ReferenceMAS's generic rule on the
    attention once crashed on the mask), against a float64 loop."""
    swin = transformers.SwinConfig(image_size=64, patch_size=4, num_channels=3, embed_dim=16, depths=[1, 1, 1, 1],
                                   num_heads=[1, 1, 1, 1], window_size=2,
                                   out_features=["stage1", "stage2", "stage3", "stage4"])
    model = perturbed(lambda: transformers.Mask2FormerModel(transformers.Mask2FormerConfig(
        backbone_config=swin, feature_size=32, mask_feature_size=32, hidden_dim=16, num_queries=4,
        encoder_feedforward_dim=16, dim_feedforward=16, decoder_layers=3, encoder_layers=1, num_attention_heads=2,
        num_labels=3, common_stride=4, use_auxiliary_loss=False))).eval()
    pick = lambda o: o.transformer_decoder_last_hidden_state  # noqa: E731
    x = torch.randn(5, 3, 64, 64)
    want = oracle(model, x, lambda m, xk: pick(m(pixel_values=xk[None].double())))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mas = cls(model, output_fn=pick, show_progress=False)
        got = mas.accumulate([{"pixel_values": x[:3]}, {"pixel_values": x[3:]}]).task_importance
    assert not [w for w in caught if "one sample at a time" in str(w.message)], [str(w.message) for w in caught]
    # the biases of convs before a GroupNorm of one channel per group have Ω 0 in exact arithmetic: float32
    # rounding there (as a float32 loop's) is ~1e-8 of the largest Ω
    top = max(w.norm().item() for w in want.values())
    zero = {k for k, w in want.items() if w.norm().item() < 1e-12 * top}
    assert all(got[k].norm().item() < 1e-6 * top for k in zero)
    assert_close({k: v for k, v in got.items() if k not in zero}, {k: v for k, v in want.items() if k not in zero})


def test_wav2vec2_bert_relative_positions_in_einsum():
    """Wav2Vec2-BERT (w2v-BERT 2.0) with relative_key positions: its distance Embedding's (T, T, d) output, all
    samples' alike, meets the queries in torch.einsum("bhld,lrd->bhlr"): batched (it ran every batch one sample at
    a time), both classes exact against a float64 loop."""
    model = perturbed(lambda: transformers.Wav2Vec2BertForSequenceClassification(transformers.Wav2Vec2BertConfig(
        vocab_size=12, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
        feature_projection_input_dim=16, conv_depthwise_kernel_size=3, num_labels=3, classifier_proj_size=16,
        position_embeddings_type="relative_key", left_max_position_embeddings=8, right_max_position_embeddings=4)))
    x = torch.randn(5, 10, 16)
    want = oracle(model, x, lambda m, xk: m(input_features=xk[None].double()).logits)
    for cls in (mas_ext.ReferenceMAS, mas_ext.FusedMAS):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            mas = cls(model, show_progress=False)
            got = mas.accumulate([{"input_features": x[:3]}, {"input_features": x[3:]}]).task_importance
        assert not [w for w in caught if "one sample at a time" in str(w.message)], [str(w.message) for w in caught]
        assert_close(got, want)


def _padded_mask_families():
    """Families whose layers take a mask in a padded batch and none for a sample alone: (make, oracle dtype)."""
    return {
        "gemma3n": _more_families()["gemma3n"][:2],  # its sliding-window layers
        "mamba2": (lambda: transformers.Mamba2ForCausalLM(transformers.Mamba2Config(  # its mixers, at batch size > 1
            vocab_size=V, hidden_size=32, num_hidden_layers=2, num_heads=8, head_dim=8, expand=2, n_groups=1,
            state_size=8, chunk_size=4, pad_token_id=0)), torch.float64),
    }


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("name", list(_padded_mask_families()))
def test_a_mask_only_padded_batches_take_keeps_the_batched_path(name, side):
    """Gemma3n's sliding-window layers, and Mamba-2's mixers (Jamba, Zamba, Bamba, Falcon-H1, Qwen3-Next alike), get
    an attention mask in a padded batch and none for a sample alone: their calls differed in structure from the
    one-sample run's, and padded batches ran one sample at a time. With padding, an input that only the batch's call
    has is read from its shape (n in dim 0), which the first padded batch's check confirms: batched, both classes
    exact against the unpadded samples alone."""
    make, dtype = _padded_mask_families()[name]
    model = perturbed(make)
    torch.manual_seed(4)
    sequences = [torch.randint(1, V, (length,)) for length in (8, 5, 6, 3, 8)]
    ids, mask = padded(sequences, side)
    want = oracle(model, sequences, dtype=dtype)
    for cls in (mas_ext.ReferenceMAS, mas_ext.FusedMAS):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            mas = cls(model, show_progress=False)
            got = mas.accumulate([{"input_ids": ids[:3], "attention_mask": mask[:3]},
                                  {"input_ids": ids[3:], "attention_mask": mask[3:]}]).task_importance
        assert not [w for w in caught if "one sample at a time" in str(w.message)], [str(w.message) for w in caught]
        assert_close(got, want)


def _moe_layouts():
    """MoE families whose experts take the batch's tokens in a layout of their own: (make, oracle dtype)."""
    seq2seq = dict(vocab_size=V, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                   decoder_attention_heads=4, encoder_ffn_dim=48, decoder_ffn_dim=48, max_position_embeddings=64)
    return {
        # every expert on every token: (E·n·T, D) rows, expert-major, each block of experts the batch's tokens
        "llama4": (lambda: transformers.Llama4ForCausalLM(transformers.Llama4TextConfig(
            vocab_size=V, hidden_size=32, intermediate_size=32, intermediate_size_mlp=48, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_local_experts=4, num_experts_per_tok=1,
            interleave_moe_layer_step=1, max_position_embeddings=64, attention_chunk_size=4,
            no_rope_layers=[1, 0])), torch.float64),
        # experts held as a list of MLPs, each on the tokens routed to it: hidden_states[None, top_x]
        "switch": (lambda: transformers.SwitchTransformersForConditionalGeneration(
            transformers.SwitchTransformersConfig(vocab_size=V, d_model=32, d_kv=8, d_ff=48, num_layers=2,
                                                  num_decoder_layers=2, num_heads=4, num_experts=4, expert_capacity=64,
                                                  num_sparse_encoder_layers=1, num_sparse_decoder_layers=1,
                                                  decoder_start_token_id=0)), torch.float64),
        # the same, top-2, its routers on the tokens flattened (the decoder's: n·T' rows beside the inputs' padding)
        "nllb-moe": (lambda: transformers.NllbMoeForConditionalGeneration(transformers.NllbMoeConfig(
            num_experts=4, expert_capacity=64, encoder_sparse_step=1, decoder_sparse_step=1, decoder_start_token_id=2,
            pad_token_id=0, **seq2seq)), torch.float64),  # its positions count the tokens that are not padding
        # a norm after the experts on the top-k copies of each token, (n·T·k, D) rows: with padding, k copies of the
        # (n, T) positions, which the tokens packed by the mask could not make as many of
        "ergo": (lambda: transformers.ErgoForCausalLM(transformers.ErgoConfig(
            vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            first_dense_intermediate_size=48, moe_intermediate_size=32, shared_intermediate_size=32, num_experts=4,
            num_experts_per_tok=2, max_position_embeddings=64, sliding_window=4, global_attention_every_n_layers=2,
            layer_types=["sliding_attention", "full_attention"], mlp_layer_types=["dense", "sparse"])),
            torch.float32),  # grouped_mm has no float64
        # (n, T, D) tokens beside their (n·T, k) routing: DBRX's experts (which own their weights, read outside the
        # experts' own calls), Inkling's shared experts (their gammas): the routing read as n blocks of rows
        "dbrx": (lambda: transformers.DbrxForCausalLM(transformers.DbrxConfig(
            vocab_size=V, d_model=32, n_heads=4, n_layers=2, max_seq_len=64,
            attn_config=dict(kv_n_heads=2, rope_theta=10000.0, clip_qkv=8.0),
            ffn_config=dict(ffn_hidden_size=32, moe_num_experts=4, moe_top_k=2))), torch.float64),
        "inkling": (lambda: transformers.InklingForCausalLM(transformers.InklingTextConfig(
            vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            head_dim=8, swa_num_attention_heads=4, swa_num_key_value_heads=2, swa_head_dim=8, sliding_window_size=4,
            d_rel=4, rel_extent=8, layer_types=["hybrid_sliding", "hybrid"], max_position_embeddings=64,
            mlp_layer_types=["sparse", "sparse"], intermediate_size=48, moe_intermediate_size=32, n_routed_experts=4,
            num_experts_per_tok=2, n_shared_experts=1)), torch.float32),
    }


@pytest.mark.parametrize("side", [None, "right", "left"], ids=["unpadded", "right", "left"])
@pytest.mark.parametrize("name", list(_moe_layouts()))
def test_moe_families_whose_experts_take_their_own_layout(name, side):
    """Llama 4's experts run on the tokens repeated once per expert, (E·n·T, D) rows: read as n blocks they were no
    sample's. Switch Transformers' and NLLB-MoE's experts, a list of MLPs, each run on the tokens routed to it: no
    shape tells their samples (the graph does: :mod:`mas_ext._gathered`). Every batch ran one sample at a time,
    padded or not; so did Ergo's padded ones (its experts' norm on (n·T·k, D) rows), and DBRX's and Inkling's (their
    experts' modules take (n, T, D) tokens beside their (n·T, k) routing). Batched now, both classes exact against a
    float64 loop over the unpadded samples alone (float32 where grouped_mm runs)."""
    make, dtype = _moe_layouts()[name]
    model = perturbed(make)
    torch.manual_seed(5)
    sequences = [torch.randint(1, V, (length,)) for length in ((8, 5, 6, 3, 8) if side else (8,) * 5)]
    ids, mask = padded(sequences, side or "right")
    decoder = torch.randint(1, V, (5, 4)) if model.config.is_encoder_decoder else None
    batches = [{"input_ids": ids[s], **({"attention_mask": mask[s]} if side else {}),
                **({"decoder_input_ids": decoder[s]} if decoder is not None else {})} for s in (slice(3), slice(3, 5))]
    if decoder is None:
        want = oracle(model, sequences, dtype=dtype)
    else:
        want = oracle(model, list(zip(sequences, decoder)), lambda m, s: m(
            input_ids=s[0][None], decoder_input_ids=s[1][None]).logits, dtype)
    for cls in (mas_ext.ReferenceMAS, mas_ext.FusedMAS):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            got = cls(model, show_progress=False).accumulate(batches).task_importance
        assert not [w for w in caught if "one sample at a time" in str(w.message)], [str(w.message) for w in caught]
        assert_close(got, want)


def _norm_families():
    """Families whose RMSNorm classes a call's rows do not tell from the rule's formula: (make, output_fn)."""
    return {
        # an input-scaled norm, rms((1 + w)·x), its weight 0 at init
        "muse-spark": (lambda: transformers.MuseSparkTextModel(transformers.MuseSparkTextConfig(
            vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=8, max_position_embeddings=64, sliding_window=4, moe_intermediate_size=32,
            num_local_experts=4, num_experts_per_tok=2, moe_hidden_size=32)), lambda o: o.last_hidden_state),
        # grouped hyper-connection norms beside ungrouped ones of the same class, on a state repeated per group
        "qwen4-exp": (lambda: transformers.Qwen4ExpForCausalLM(transformers.Qwen4ExpTextConfig(
            vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            head_dim=8, max_position_embeddings=64, linear_key_head_dim=8, linear_value_head_dim=8,
            linear_num_key_heads=2, linear_num_value_heads=4, moe_intermediate_size=32,
            shared_expert_intermediate_size=32, num_experts=4, num_experts_per_tok=2,
            layer_types=["linear_attention", "indexed_attention"], indexer_n_heads=2, indexer_kv_heads=1,
            indexer_head_dim=8, indexer_budget=4, indexer_compress_ratio=2, ngram_vocab_size_base=100,
            make_ngram_vocab_size_divisible_by=4, split_ngram_parts=2, heads_per_ngram=2, ple_embed_dim=32,
            hc_lowrank=8, pad_token_id=0)), lambda o: o.logits),
    }


@pytest.mark.parametrize("name", list(_norm_families()))
def test_rmsnorm_classes_a_calls_rows_do_not_tell(name):
    """MuseSpark's input-scaled norm (5-13% off) and Qwen4Exp's grouped hyper-connection norms (0.1-0.4% off) were
    taken by the Hugging Face RMSNorm rule, without a warning: the check of a call's row passed. Both classes exact
    now against a float32 loop (their experts' grouped_mm has no float64), both classes of MAS."""
    make, pick = _norm_families()[name]
    model = perturbed(make)
    x = torch.randint(1, V, (5, 8))
    want = oracle(model, x, lambda m, ids: pick(m(input_ids=ids[None])), torch.float32)
    for cls in (mas_ext.ReferenceMAS, mas_ext.FusedMAS):
        got = cls(model, output_fn=pick, show_progress=False).accumulate([x[:3], x[3:]]).task_importance
        assert_close(got, want, tol=1e-4)
