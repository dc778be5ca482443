"""The benchmark models and their inputs (full sizes and --quick sizes): four of ours and three Hugging Face
families (random weights from transformers configs, nothing downloaded).

Every model is built from a seed, so a worker subprocess can rebuild the exact same weights;
the parent also saves the state_dict and input to the case file, which is what workers load.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

MODELS = ("mlp", "cnn", "resnet18", "transformer", "llama", "gpt2", "bert")
HF = ("llama", "gpt2", "bert")

# name -> (batch, kwargs) at full size; the CPU run may shrink the batch of the two largest.
FULL = {
    "mlp": dict(batch=256, cfg=dict(sizes=(784, 1000, 1000, 10))),
    "cnn": dict(batch=128, cfg=dict(c1=32, c2=64, hidden=128, hw=28)),
    "resnet18": dict(batch=128, cfg=dict(width=64, hw=32)),
    "transformer": dict(batch=32, cfg=dict(vocab=1000, d_model=256, nhead=8, ff=1024, layers=4, seq=128)),
    "llama": dict(batch=8, cfg=dict(vocab=2000, hidden=256, layers=4, heads=8, ff=688, seq=64)),
    "gpt2": dict(batch=8, cfg=dict(vocab=2000, hidden=256, layers=4, heads=8, ff=1024, seq=64)),
    "bert": dict(batch=8, cfg=dict(vocab=2000, hidden=256, layers=4, heads=8, ff=1024, seq=64)),
}
# batches for the two largest models with --shrink-cpu (a busy or slow CPU: the whole run must stay
# < 30 min on 2 cores; at full batch it took 11 min on a 2-core EPYC)
CPU_BATCH = {"resnet18": 64, "transformer": 16}
# On a GPU the CPU sizes leave an H100 idle (a pass of the HF rows at 8 x 64 tokens is a few ms of kernel
# launches): `--device cuda` runs the same models at batches, and for the HF families widths and sequence
# lengths, where the GPU does the work. Every per-sample peer still fits (vmap's N x P per-sample gradients
# are at most ~12 GB here, ResNet-18 at 256).
CUDA = {
    "mlp": dict(batch=1024, cfg=FULL["mlp"]["cfg"]),
    "cnn": dict(batch=512, cfg=FULL["cnn"]["cfg"]),
    "resnet18": dict(batch=256, cfg=FULL["resnet18"]["cfg"]),
    "transformer": dict(batch=64, cfg=FULL["transformer"]["cfg"]),
    "llama": dict(batch=16, cfg=dict(vocab=8000, hidden=512, layers=4, heads=8, ff=1376, seq=256)),
    "gpt2": dict(batch=16, cfg=dict(vocab=8000, hidden=512, layers=4, heads=8, ff=2048, seq=256)),
    "bert": dict(batch=16, cfg=dict(vocab=8000, hidden=512, layers=4, heads=8, ff=2048, seq=256)),
}
QUICK = {
    "mlp": dict(batch=16, cfg=dict(sizes=(64, 32, 32, 10))),
    "cnn": dict(batch=8, cfg=dict(c1=4, c2=8, hidden=16, hw=12)),
    "resnet18": dict(batch=4, cfg=dict(width=4, hw=16)),
    "transformer": dict(batch=4, cfg=dict(vocab=50, d_model=16, nhead=2, ff=32, layers=2, seq=8)),
    **{m: dict(batch=3, cfg=dict(vocab=50, hidden=16, layers=1, heads=2, ff=32, seq=8)) for m in HF},
}
DESCRIPTION = {
    "mlp": "MLP {sizes}",
    "cnn": "CNN 2 conv + 2 linear, {hw}x{hw}x1 input",
    "resnet18": "ResNet-18 (CIFAR, BasicBlocks, BatchNorm), width {width}, {hw}x{hw}x3 input",
    "transformer": "{layers}-layer TransformerEncoder d_model {d_model}, {nhead} heads, ff {ff}, {seq} tokens, vocab {vocab}",
    "llama": "HF LlamaForCausalLM, tied embeddings, hidden {hidden}, {layers} layers, {heads} heads (2 KV), ff {ff}, "
             "{seq} tokens, vocab {vocab}",
    "gpt2": "HF GPT2LMHeadModel (tied), hidden {hidden}, {layers} layers, {heads} heads, {seq} tokens, vocab {vocab}",
    "bert": "HF BertForMaskedLM (tied), hidden {hidden}, {layers} layers, {heads} heads, ff {ff}, {seq} tokens, "
            "vocab {vocab}",
}


def mlp(sizes):
    layers = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def cnn(c1, c2, hidden, hw):
    return nn.Sequential(
        nn.Conv2d(1, c1, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(c1, c2, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(c2 * (hw // 4) * (hw // 4), hidden), nn.ReLU(), nn.Linear(hidden, 10),
    )


class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu2 = nn.ReLU()
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class ResNet18(nn.Module):
    """ResNet-18 for 32x32 CIFAR inputs (3x3 stem, no max-pool), BasicBlocks [2, 2, 2, 2]."""

    def __init__(self, width=64, hw=32, num_classes=10):
        super().__init__()
        w = width
        self.conv1 = nn.Conv2d(3, w, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(w)
        self.relu = nn.ReLU()
        blocks, cin = [], w
        for i, cout in enumerate((w, 2 * w, 4 * w, 8 * w)):
            for j in range(2):
                blocks.append(BasicBlock(cin, cout, 2 if (j == 0 and i > 0) else 1))
                cin = cout
        self.layers = nn.Sequential(*blocks)
        self.pool = nn.AvgPool2d(hw // 8)
        self.flatten = nn.Flatten()
        self.linear = nn.Linear(8 * w, num_classes)

    def forward(self, x):
        return self.linear(self.flatten(self.pool(self.layers(self.relu(self.bn1(self.conv1(x)))))))


class TransformerNet(nn.Module):
    """Embedding + fixed sinusoidal positions + nn.TransformerEncoder (batch_first) + per-token linear head."""

    def __init__(self, vocab, d_model, nhead, ff, layers, seq, num_classes=10):
        super().__init__()
        self.embed = nn.Embedding(vocab, d_model)
        pos = torch.arange(seq, dtype=torch.float32)[:, None]
        div = torch.exp(torch.arange(0, d_model, 2, dtype=torch.float32) * (-math.log(10000.0) / d_model))
        pe = torch.zeros(seq, d_model)
        pe[:, 0::2] = torch.sin(pos * div)
        pe[:, 1::2] = torch.cos(pos * div)
        self.register_buffer("pe", pe)
        layer = nn.TransformerEncoderLayer(d_model, nhead, ff, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d_model, num_classes)

    def forward(self, x):
        h = self.embed(x) + self.pe[: x.shape[1]].to(self.embed.weight.dtype)
        return self.head(self.encoder(h))


class Logits(nn.Module):
    """A Hugging Face model called on input_ids, returning its logits tensor (what every method here takes)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, ids):
        return self.model(input_ids=ids).logits


def hf_model(name, vocab, hidden, layers, heads, ff, seq):
    import transformers

    if name == "llama":
        config = transformers.LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=ff,
                                          num_hidden_layers=layers, num_attention_heads=heads,
                                          num_key_value_heads=max(1, heads // 4), max_position_embeddings=seq,
                                          tie_word_embeddings=True)
        model = transformers.LlamaForCausalLM(config)
    elif name == "gpt2":
        config = transformers.GPT2Config(vocab_size=vocab, n_embd=hidden, n_layer=layers, n_head=heads, n_inner=ff,
                                         n_positions=seq, bos_token_id=0, eos_token_id=0)
        model = transformers.GPT2LMHeadModel(config)
    else:
        config = transformers.BertConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers,
                                         num_attention_heads=heads, intermediate_size=ff, max_position_embeddings=seq)
        model = transformers.BertForMaskedLM(config)
    return Logits(model)


def build(name, cfg):
    if name in HF:
        return hf_model(name, **cfg)
    if name == "mlp":
        return mlp(tuple(cfg["sizes"]))
    if name == "cnn":
        return cnn(**cfg)
    if name == "resnet18":
        return ResNet18(**cfg)
    if name == "transformer":
        return TransformerNet(**cfg)
    raise ValueError(f"unknown model {name!r}")


def make_input(name, cfg, batch, seed=1):
    g = torch.Generator().manual_seed(seed)
    if name == "mlp":
        return torch.randn(batch, cfg["sizes"][0], generator=g)
    if name == "cnn":
        return torch.randn(batch, 1, cfg["hw"], cfg["hw"], generator=g)
    if name == "resnet18":
        return torch.randn(batch, 3, cfg["hw"], cfg["hw"], generator=g)
    if name == "transformer" or name in HF:
        return torch.randint(0, cfg["vocab"], (batch, cfg["seq"]), generator=g)
    raise ValueError(f"unknown model {name!r}")


def make_model(name, cfg, seed=0):
    torch.manual_seed(seed)
    model = build(name, cfg)
    if name == "resnet18":  # non-trivial BatchNorm running stats, as after training
        g = torch.Generator().manual_seed(seed + 7)
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(0.1 * torch.randn(m.num_features, generator=g))
                m.running_var.copy_(1.0 + 0.2 * torch.rand(m.num_features, generator=g))
                m.weight.data.copy_(1.0 + 0.1 * torch.randn(m.num_features, generator=g))
                m.bias.data.copy_(0.1 * torch.randn(m.num_features, generator=g))
    return model.eval()


def describe(name, cfg):
    c = dict(cfg)
    if "sizes" in c:
        c["sizes"] = "-".join(str(s) for s in c["sizes"])
    return DESCRIPTION[name].format(**c)


def num_params(model):
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
