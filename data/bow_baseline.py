"""Bag-of-words logistic regression on the shipped reviews.csv (in lightning_peft/app/data/): what word
counting alone achieves.

Near chance on the validation split (negation and "but" clauses flip meanings, and the validation
adjectives never occur in training), which is why the default run's accuracy measures transfer
from the pretrained encoder. Run: python data/bow_baseline.py
"""

from __future__ import annotations

import csv
import os
import re

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
# the data files ship inside the package (the app's default job reads them from there)
DATA_DIR = os.path.join(os.path.dirname(HERE), "lightning_peft", "app", "data")


def words(text: str) -> list[str]:
    return re.findall(r"[a-z]+", text.lower())


def bow_accuracy(
    path: str = os.path.join(DATA_DIR, "reviews.csv"), steps: int = 500, seed: int = 0
) -> dict[str, float]:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    train = [r for r in rows if r["split"] == "train"]
    val = [r for r in rows if r["split"] == "val"]
    vocab = {w: i for i, w in enumerate(sorted({w for r in train for w in words(r["text"])}))}

    def featurize(rs: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.zeros(len(rs), len(vocab))
        for i, r in enumerate(rs):
            for w in words(r["text"]):
                if w in vocab:
                    x[i, vocab[w]] = 1.0
        return x, torch.tensor([int(r["label"]) for r in rs])

    (xt, yt), (xv, yv) = featurize(train), featurize(val)
    torch.manual_seed(seed)
    linear = torch.nn.Linear(len(vocab), 2)
    opt = torch.optim.Adam(linear.parameters(), lr=1e-2)
    for _ in range(steps):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(linear(xt), yt) + 1e-4 * linear.weight.pow(2).sum()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return {
            "train_acc": (linear(xt).argmax(1) == yt).float().mean().item(),
            "val_acc": (linear(xv).argmax(1) == yv).float().mean().item(),
        }


if __name__ == "__main__":
    print({k: round(v, 4) for k, v in bow_accuracy().items()})
