"""Which part of the 8da4w .pte generation step breaks SmolLM2 (docs/lm.md): eager torchao
modules against fp32, logits min cosine. Run: .venv/bin/python THIS_FILE (repo root)."""

import torch
from transformers import AutoTokenizer

from fedmobillm.export import generate as G
from fedmobillm.export.generate_pte import CachedDecoderStep, _quantized
from fedmobillm.export.models import model_dir

folder = model_dir("smollm2-135m")
model = G.load_causal_lm(folder)
tok = AutoTokenizer.from_pretrained(folder)
taps = [10, 20, 30]
step = G.DecoderStep(model, taps).eval()
shape = G.step_shape(model, step.depth)
texts = [
    "My favourite thing about living by the sea is that every morning I can walk",
    "The movie was a slow, beautiful meditation on grief and memory.",
]


def logits(cached, head, text):
    ids = torch.tensor([tok(text)["input_ids"]])
    with torch.no_grad():
        h, _ = cached(ids, torch.zeros(1, dtype=torch.int64))
        return head(h)[0]


def cos(a, b):
    a, b = a.double(), b.double()
    return float(((a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))).min())


c32 = CachedDecoderStep(step, shape, 64).eval()
h32 = G.LmHead(model)
cq = _quantized(CachedDecoderStep(step, shape, 64).eval(), "8da4w", head=False)
hq = _quantized(G.LmHead(model), "8da4w", head=True)
for t in texts:
    ref = logits(c32, h32, t)
    print("step q, head fp32", cos(logits(cq, h32, t), ref))
    print("step fp32, head q", cos(logits(c32, hq, t), ref))
    print("both q", cos(logits(cq, hq, t), ref))
c8 = _quantized(CachedDecoderStep(step, shape, 64).eval(), "int8", head=False)
for t in texts:
    ref = logits(c32, h32, t)
    print("step int8 (8da8w), head fp32", cos(logits(c8, h32, t), ref))
