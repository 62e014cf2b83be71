"""Writes the two small datasets the app ships with, deterministically (seeded).

`reviews.csv`   (text,label,split)  binary sentiment of short reviews; label 1 = positive.
`aspects.jsonl` ({"source","target","split"})  review -> "aspect: polarity" list, for seq2seq.

What makes it worth learning: negation flips polarity ("not great"), contrast clauses put the
verdict after "but"/"although", and the validation split uses adjectives and products that
never occur in training, so only transfer from the pretrained encoder gets those right.
Run: python data/make_reviews.py   (rewrites both files in lightning_peft/app/data/; commit them)
"""

from __future__ import annotations

import csv
import json
import os
import random

HERE = os.path.dirname(os.path.abspath(__file__))
# the data files ship inside the package (the app's default job reads them from there)
DATA_DIR = os.path.join(os.path.dirname(HERE), "lightning_peft", "app", "data")

# (train words, held-out words for validation)
POSITIVE = (
    [
        "great",
        "excellent",
        "wonderful",
        "lovely",
        "fantastic",
        "delightful",
        "superb",
        "pleasant",
        "impressive",
        "enjoyable",
        "solid",
        "charming",
    ],
    ["outstanding", "brilliant", "terrific", "marvelous"],
)
NEGATIVE = (
    [
        "terrible",
        "awful",
        "horrible",
        "disappointing",
        "dreadful",
        "poor",
        "bland",
        "annoying",
        "mediocre",
        "unpleasant",
        "clumsy",
        "boring",
    ],
    ["atrocious", "abysmal", "dismal", "lousy"],
)
ASPECTS = {
    "a restaurant": (["food", "service", "dessert", "waiter", "menu", "pasta"], ["soup", "wine list"]),
    "a film": (["plot", "acting", "ending", "soundtrack", "script", "dialogue"], ["pacing", "cast"]),
    "a hotel": (["room", "staff", "breakfast", "view", "bed", "location"], ["pool", "lobby"]),
    "a phone": (["battery", "screen", "camera", "speaker", "keyboard", "case"], ["charger", "display"]),
}
INTENSIFIERS = ["", "", "really ", "very ", "quite ", "truly ", "rather "]
POS_VERDICTS = (
    ["i would recommend it", "worth every penny", "i will come back", "five stars"],
    ["a real gem", "exceeded my hopes"],
)
NEG_VERDICTS = (
    ["i would not recommend it", "a waste of money", "never again", "one star"],
    ["a total letdown", "avoid at all costs"],
)


def _pick(rng: random.Random, pools: tuple[list[str], list[str]], held_out: bool) -> str:
    return rng.choice(pools[1] if held_out else pools[0])


def _clause(rng: random.Random, aspect: str, polarity: int, held_out: bool) -> str:
    """One clause about `aspect` whose meaning has `polarity`; half of them via negation."""
    negate = rng.random() < 0.35
    surface = 1 - polarity if negate else polarity
    adj = _pick(rng, POSITIVE if surface else NEGATIVE, held_out)
    if negate:
        return f"the {aspect} was {rng.choice(['not', 'not', 'never', 'hardly'])} {adj}"
    return f"the {aspect} was {rng.choice(INTENSIFIERS)}{adj}"


def make_example(rng: random.Random, held_out: bool) -> tuple[str, int, list[tuple[str, int]]]:
    domain = rng.choice(sorted(ASPECTS))
    a1, a2 = rng.sample(ASPECTS[domain][0] + (ASPECTS[domain][1] if held_out else []), 2)
    label = rng.randint(0, 1)
    kind = rng.random()
    if kind < 0.4:  # one clause, maybe negated
        text = _clause(rng, a1, label, held_out)
        aspects = [(a1, label)]
    elif kind < 0.65:  # contrast: the verdict comes after "but"
        text = f"{_clause(rng, a1, 1 - label, held_out)}, but {_clause(rng, a2, label, held_out)}"
        aspects = [(a1, 1 - label), (a2, label)]
    elif kind < 0.8:  # concession: "although X, Y" -> Y decides
        text = f"although {_clause(rng, a1, 1 - label, held_out)}, {_clause(rng, a2, label, held_out)}"
        aspects = [(a1, 1 - label), (a2, label)]
    else:  # agreeing clauses plus an explicit verdict
        verdict = _pick(rng, POS_VERDICTS if label else NEG_VERDICTS, held_out)
        text = f"{_clause(rng, a1, label, held_out)} and {_clause(rng, a2, label, held_out)}; {verdict}"
        aspects = [(a1, label), (a2, label)]
    return f"{text} ({domain}).", label, aspects


def main(out_dir: str = DATA_DIR, n_train: int = 1600, n_val: int = 400, seed: int = 0) -> None:
    rng = random.Random(seed)
    rows, seen = [], set()
    for split, n in (("train", n_train), ("val", n_val)):
        made = 0
        while made < n:
            text, label, aspects = make_example(rng, held_out=split == "val")
            if text in seen:  # no duplicates, and no train/val leakage
                continue
            seen.add(text)
            rows.append((text, label, aspects, split))
            made += 1
    with open(os.path.join(out_dir, "reviews.csv"), "w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["text", "label", "split"])
        for text, label, _, split in rows:
            w.writerow([text, label, split])
    with open(os.path.join(out_dir, "aspects.jsonl"), "w") as f:
        for text, _, aspects, split in rows:
            target = ", ".join(f"{a}: {'positive' if p else 'negative'}" for a, p in aspects)
            f.write(json.dumps({"source": text, "target": target, "split": split}) + "\n")


if __name__ == "__main__":
    main()
