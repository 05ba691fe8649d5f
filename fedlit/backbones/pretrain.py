"""Pretrain the embedded ``fedlit-toy`` CLIP on the procedural shapes world (``fedlit pretrain-toy``).

A 2+2-layer, 32 px open_clip model (``fedlit-toy.json``) is trained contrastively on images of the
``clean`` domain and captions that mention colour, shape, size, position and background
(:func:`fedlit.data.shapes.sample_pretraining_batch`). The 12 held-out colour×shape combinations are
never shown, so zero-shot accuracy on them measures compositional transfer; downstream datasets use
shifted domains (textured, noisy, dark, striped backgrounds), leaving room for prompt learning.

The loss is CLIP's symmetric InfoNCE with *label-aware* targets: captions of the same class in a batch
are all positives (with 48 classes and batch 64, plain InfoNCE would treat them as false negatives).

Deterministic given the seed (on one machine and torch build). Weights are written as fp16 safetensors
(no pickle), plus ``fedlit-toy.metrics.json`` with the zero-shot accuracies measured at the end.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..data import shapes

WEIGHTS_DIR = Path(__file__).parent / "weights"
WEIGHTS = WEIGHTS_DIR / "fedlit-toy.safetensors"
METRICS = WEIGHTS_DIR / "fedlit-toy.metrics.json"


def _images(x_uint8: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    return (x_uint8.float() / 255.0 - mean) / std


def pretrain_toy(steps: int = 800, batch_size: int = 64, lr: float = 2e-3, seed: int = 0,
                 out: str | Path = WEIGHTS, log_every: int = 100, threads: int | None = None) -> dict:
    """Train fedlit-toy from scratch; write weights + metrics; return the metrics dict."""
    import open_clip
    from safetensors.torch import save_file

    from . import register_toy_config

    if threads:
        torch.set_num_threads(threads)
    register_toy_config()
    torch.manual_seed(seed)
    model = open_clip.create_model("fedlit-toy", pretrained=None)
    tokenizer = open_clip.get_tokenizer("fedlit-toy")
    mean = torch.tensor(model.visual.image_mean or open_clip.OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(model.visual.image_std or open_clip.OPENAI_DATASET_STD).view(1, 3, 1, 1)
    model.train()
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.98), eps=1e-6)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    rng = np.random.default_rng(seed)
    t0 = time.time()
    for step in range(steps):
        imgs, caps, labels = shapes.sample_pretraining_batch(batch_size, rng)
        img_f = F.normalize(model.encode_image(_images(imgs, mean, std)), dim=-1)
        txt_f = F.normalize(model.encode_text(tokenizer(caps)), dim=-1)
        logits = model.logit_scale.exp().clamp(max=100) * img_f @ txt_f.t()
        lab = torch.as_tensor(labels)
        same = (lab[:, None] == lab[None, :]).float()
        target = same / same.sum(dim=1, keepdim=True)
        loss = 0.5 * (torch.sum(-target * logits.log_softmax(dim=1), dim=1).mean()
                      + torch.sum(-target * logits.t().log_softmax(dim=1), dim=1).mean())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, np.log(100))
        if log_every and (step % log_every == 0 or step == steps - 1):
            print(f"step {step:5d}/{steps}  loss {loss.item():.3f}  {time.time() - t0:6.1f}s", flush=True)
    train_s = time.time() - t0

    model.eval()
    metrics = {"steps": steps, "batch_size": batch_size, "seed": seed, "train_seconds": round(train_s, 1),
               "threads": torch.get_num_threads(), "zero_shot": zero_shot_report(model, tokenizer, mean, std, seed)}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()}
    tmp = out.with_suffix(".tmp")
    save_file(state, str(tmp), metadata={"model": "fedlit-toy", "seed": str(seed), "steps": str(steps)})
    tmp.replace(out)
    out.with_name(out.stem + ".metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics


@torch.no_grad()
def zero_shot_report(model, tokenizer, mean, std, seed: int = 0, per_class: int = 40) -> dict:
    """Zero-shot accuracy (percent, 48-way, "a photo of a {class}.") per domain, on seen and held-out combos."""
    names = shapes.class_names()
    txt = F.normalize(model.encode_text(tokenizer([f"a photo of a {c}." for c in names])).float(), dim=-1)
    labels = np.repeat(np.arange(len(names)), per_class)
    held = np.isin(labels, shapes.HELD_OUT_LABELS)
    report = {}
    for domain in shapes.DOMAINS:
        imgs, _ = shapes.render(labels // len(shapes.SHAPES), labels % len(shapes.SHAPES), domain, seed=10_000 + seed)
        feats = []
        for s in range(0, len(imgs), 512):
            feats.append(F.normalize(model.encode_image(_images(imgs[s:s + 512], mean, std)).float(), dim=-1))
        pred = (torch.cat(feats) @ txt.t()).argmax(dim=1).numpy()
        correct = pred == labels
        report[domain] = {"seen": round(100 * float(correct[~held].mean()), 1), "held_out": round(100 * float(correct[held].mean()), 1),
                          "all": round(100 * float(correct.mean()), 1)}
    return report
