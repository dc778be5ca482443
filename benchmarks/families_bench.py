"""FusedMAS's exact per-sample g-MAS pass / a plain forward+backward of Σ‖f(x)‖², on Hugging Face families whose
layers have an output that all samples share (T5's relative-position bias, the BART family's learned positions,
MPNet's bias, Swin's window bias, DeBERTa-v3's projected relative embeddings), which ran one sample at a time
before 2026-12-05; on ALBERT, whose layers, shared across depth, run several times per pass; and on models with
parameters of their own beside layers (ConvNeXt's and BEiT's layer scales, CLIP's logit_scale, wav2vec2's masked
embedding), whose layers took the generic rule with them until 2026-12-05 (see the README); on Mask2Former,
Wav2Vec2-BERT, LFM2 and Gemma3n, which ran one sample at a time until the evening of 2026-12-05; on the MoE layouts
of Llama 4, Switch Transformers and DBRX, which did until the night of 2026-12-05.

Random weights from configs (hidden 256, 8 × 128 tokens; images: 8 of 64 × 64, ConvNeXt 128 × 128; audio: 8 × 1 s
at 16 kHz), eval mode, paired timings
(plain and FusedMAS alternating in one process, the median of each), results as JSON and Markdown in
benchmarks/results/<device>-<date>-families.*.

    python -m benchmarks.families_bench [--device cpu|cuda] [--repeats 7] [--models t5,bart]
"""
import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import time
import warnings

import torch

import mas_ext

V = 2000


def _models():
    import transformers as tf

    t5 = dict(vocab_size=V, d_model=256, d_kv=64, d_ff=1024, num_layers=4, num_heads=4)
    bart = dict(vocab_size=V, d_model=256, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                decoder_attention_heads=4, encoder_ffn_dim=1024, decoder_ffn_dim=1024, max_position_embeddings=256)
    # name: (make, input kind, what is shared)
    return {
        "t5-encoder": (lambda: tf.T5EncoderModel(tf.T5Config(**t5)), "encoder", "relative-position bias"),
        "t5": (lambda: tf.T5ForConditionalGeneration(tf.T5Config(**t5)), "seq2seq", "relative-position bias"),
        "bart": (lambda: tf.BartForConditionalGeneration(tf.BartConfig(**bart)), "seq2seq", "learned positions"),
        "mbart": (lambda: tf.MBartForConditionalGeneration(tf.MBartConfig(**bart)), "seq2seq", "learned positions"),
        "mpnet": (lambda: tf.MPNetForMaskedLM(tf.MPNetConfig(
            vocab_size=V, hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024,
            max_position_embeddings=256)), "tokens", "relative-position bias"),
        "swin": (lambda: tf.SwinForImageClassification(tf.SwinConfig(
            image_size=64, patch_size=4, num_channels=3, embed_dim=64, depths=[2, 2], num_heads=[2, 4], window_size=4,
            num_labels=10)), "images", "window bias"),
        "deberta-v3": (lambda: tf.DebertaV2ForMaskedLM(tf.DebertaV2Config(
            vocab_size=V, hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024,
            max_position_embeddings=256, relative_attention=True, position_buckets=64, pos_att_type=["p2c", "c2p"],
            norm_rel_ebd="layer_norm", share_att_key=True, position_biased_input=False)), "tokens",
            "projected relative embeddings"),
        "albert": (lambda: tf.AlbertForMaskedLM(tf.AlbertConfig(
            vocab_size=V, embedding_size=128, hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
            intermediate_size=1024, max_position_embeddings=256)), "tokens", "none (layers shared across depth)"),
        "convnext": (lambda: tf.ConvNextForImageClassification(tf.ConvNextConfig(
            num_channels=3, hidden_sizes=[48, 96, 192, 384], depths=[1, 1, 2, 1], image_size=128, num_labels=10)),
            "images-128", "none (a layer scale beside its layers)"),
        "beit": (lambda: tf.BeitForImageClassification(tf.BeitConfig(
            image_size=64, patch_size=8, hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
            intermediate_size=1024, use_relative_position_bias=True, layer_scale_init_value=0.1, num_labels=10)),
            "images", "window bias (layer scales beside its layers)"),
        "clip": (lambda: tf.CLIPModel(tf.CLIPConfig(
            text_config=dict(vocab_size=V, hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                             intermediate_size=1024, max_position_embeddings=64),
            vision_config=dict(image_size=64, patch_size=8, hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                               intermediate_size=1024))), "image-text",
            "none (logit_scale beside its towers; f = the vision tower's hidden states)"),
        "wav2vec2": (lambda: tf.Wav2Vec2ForCTC(tf.Wav2Vec2Config(
            vocab_size=32, hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024,
            conv_dim=(64, 64, 64), conv_stride=(5, 2, 2), conv_kernel=(10, 3, 3), num_conv_pos_embeddings=16,
            num_conv_pos_embedding_groups=4)), "audio", "none (a masked embedding beside its layers)"),
        "deberta-v1": (lambda: tf.DebertaForMaskedLM(tf.DebertaConfig(
            vocab_size=V, hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024,
            max_position_embeddings=256, relative_attention=True, max_relative_positions=64,
            pos_att_type=["c2p", "p2c"])), "tokens", "relative embeddings read as a weight, projected"),
        "longformer": (lambda: tf.LongformerForMaskedLM(tf.LongformerConfig(
            vocab_size=V, hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024,
            max_position_embeddings=256, attention_window=[32] * 4, pad_token_id=0)), "tokens",
            "none (projections on (T, n, D) hidden states)"),
        "mask2former": (lambda: tf.Mask2FormerForUniversalSegmentation(tf.Mask2FormerConfig(
            backbone_config=tf.SwinConfig(image_size=64, patch_size=4, embed_dim=64, depths=[1, 1, 2, 1],
                                          num_heads=[2, 2, 4, 4], window_size=4,
                                          out_features=["stage1", "stage2", "stage3", "stage4"]),
            feature_size=128, mask_feature_size=128, hidden_dim=128, num_queries=50, encoder_feedforward_dim=512,
            dim_feedforward=512, decoder_layers=4, encoder_layers=2, num_attention_heads=4, num_labels=10)),
            "segmentation", "learned queries repeated over dim 1 of (Q, n, D) (f = the mask logits)"),
        "wav2vec2-bert": (lambda: tf.Wav2Vec2BertForSequenceClassification(tf.Wav2Vec2BertConfig(
            hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024,
            feature_projection_input_dim=160, position_embeddings_type="relative_key", num_labels=10)), "features",
            "relative position embeddings met by the queries in einsum"),
        "lfm2": (lambda: tf.Lfm2ForCausalLM(tf.Lfm2Config(
            vocab_size=V, hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=4, max_position_embeddings=256, layer_types=["conv", "full_attention"] * 2,
            block_auto_adjust_ff_dim=False, block_ff_dim=1024)), "tokens",
            "none (a short conv hands its Conv1d's weight to a function)"),
        "gemma3n": (lambda: tf.Gemma3nForCausalLM(tf.Gemma3nTextConfig(
            vocab_size=V, vocab_size_per_layer_input=V, hidden_size=256, hidden_size_per_layer_input=64,
            intermediate_size=[1024] * 4, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4, head_dim=64,
            layer_types=["sliding_attention", "sliding_attention", "sliding_attention", "full_attention"],
            sliding_window=64, num_kv_shared_layers=0, activation_sparsity_pattern=[0.0] * 4, laurel_rank=16,
            max_position_embeddings=256)), "tokens",
            "none (AltUp's parameters read by the decoder layers, which own them)"),
        "llama4": (lambda: tf.Llama4ForCausalLM(tf.Llama4TextConfig(
            vocab_size=V, hidden_size=256, intermediate_size=512, intermediate_size_mlp=1024, num_hidden_layers=4,
            num_attention_heads=4, num_key_value_heads=4, head_dim=64, num_local_experts=8, num_experts_per_tok=1,
            interleave_moe_layer_step=1, max_position_embeddings=256, attention_chunk_size=64)), "tokens",
            "none (its experts run on every token: (E·n·T, D) rows, a block per expert and sample)"),
        "switch": (lambda: tf.SwitchTransformersForConditionalGeneration(tf.SwitchTransformersConfig(
            vocab_size=V, d_model=256, d_kv=64, d_ff=1024, num_layers=4, num_decoder_layers=4, num_heads=4,
            num_experts=8, expert_capacity=128, num_sparse_encoder_layers=2, num_sparse_decoder_layers=2)),
            "seq2seq", "none (experts of a list on the tokens routed to them: rows told by the graph)"),
        "dbrx": (lambda: tf.DbrxForCausalLM(tf.DbrxConfig(
            vocab_size=V, d_model=256, n_heads=4, n_layers=4, max_seq_len=256,
            attn_config=dict(kv_n_heads=4, rope_theta=10000.0, clip_qkv=8.0),
            ffn_config=dict(ffn_hidden_size=512, moe_num_experts=8, moe_top_k=2))), "tokens",
            "none (its experts' module on (n, T, D) tokens beside their (n·T, k) routing)"),
    }


def _batch(kind, device):
    if kind.startswith("images") or kind == "segmentation":
        side = 128 if kind == "images-128" else 64
        return {"pixel_values": torch.randn(8, 3, side, side, device=device)}
    if kind == "image-text":
        return {"pixel_values": torch.randn(8, 3, 64, 64, device=device),
                "input_ids": torch.randint(1, V, (8, 32), device=device)}
    if kind == "audio":
        return {"input_values": torch.randn(8, 16000, device=device)}
    if kind == "features":  # 8 × 1 s of 80 log-mel bins stacked in pairs, as its feature extractor gives
        return {"input_features": torch.randn(8, 50, 160, device=device)}
    ids = torch.randint(1, V, (8, 128), device=device)
    return {"input_ids": ids, **({"decoder_input_ids": ids} if kind == "seq2seq" else {})}


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def measure(name, device, repeats):
    """{name, plain_s, fused_s, ratio, by_sample}: the medians of ``repeats`` alternating timings after a warm-up
    (whose first batch confirms the shared outputs' uses)."""
    make, kind, shared = _models()[name]
    torch.manual_seed(0)
    model = make().to(device).eval()
    batch = _batch(kind, device)
    pick = ((lambda o: o.last_hidden_state) if kind == "encoder" else
            (lambda o: o.vision_model_output.last_hidden_state) if kind == "image-text" else
            (lambda o: o.masks_queries_logits) if kind == "segmentation" else (lambda o: o.logits))
    params = [p for p in model.parameters() if p.requires_grad]

    def plain():
        torch.autograd.grad(pick(model(**batch)).pow(2).sum(), params, allow_unused=True)

    mas = mas_ext.FusedMAS(model, output_fn=pick, show_progress=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mas.accumulate([batch])  # warm-up; confirms the uses once

    def fused():
        mas.accumulate([batch])

    times = {plain: [], fused: []}
    for f in (plain, fused):
        f()
    for _ in range(repeats):
        for f in (plain, fused):
            _sync(device)
            t = time.perf_counter()
            f()
            _sync(device)
            times[f].append(time.perf_counter() - t)
    p, q = statistics.median(times[plain]), statistics.median(times[fused])
    return {"model": name, "shared": shared, "plain_s": p, "fused_s": q, "ratio": q / p,
            "by_sample": mas._engine.by_sample,
            "warnings": [str(w.message)[:200] for w in caught if "one sample at a time" in str(w.message)]}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--models", default=",".join(_models()))
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = ap.parse_args(argv)
    rows = [measure(m, args.device, args.repeats) for m in args.models.split(",")]
    device = torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or platform.machine()
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=os.path.dirname(__file__)).stdout.strip()
    except OSError:
        commit = ""
    date = datetime.date.today().isoformat()
    meta = {"device": device, "torch": torch.__version__, "date": date, "git": commit,
            "threads": torch.get_num_threads(), "backend": mas_ext.backend()}
    stem = os.path.join(args.out, f"{args.device}-{date}-families")
    os.makedirs(args.out, exist_ok=True)
    runs = 1
    while os.path.exists(stem + ".json"):  # a later run the same day: its own files, beside the earlier ones
        runs += 1
        stem = os.path.join(args.out, f"{args.device}-{date}-families-{runs}")
    with open(stem + ".json", "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    lines = [f"# FusedMAS / plain forward+backward on families with shared outputs or layers ({args.device})", "",
             f"{device}; torch {meta['torch']}; {meta['threads']} threads; {date}; git {commit}; "
             f"`python -m benchmarks.families_bench --device {args.device}`, median of {args.repeats}.", "",
             "| model | shared output | plain | FusedMAS | ratio | one sample at a time |",
             "| --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {r['model']} | {r['shared']} | {r['plain_s'] * 1e3:.0f} ms | {r['fused_s'] * 1e3:.0f} ms | "
              f"{r['ratio']:.2f} | {'yes' if r['by_sample'] else 'no'} |" for r in rows]
    with open(stem + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
