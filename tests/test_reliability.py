"""Exact resume after SIGKILL, atomic exports, RNG states in checkpoints, seed+epoch data order.

The multi-process tests run tests/reliability_worker.py (a plain LightningModule with dropout in the
base and in LoRA, a StatefulDataLoader, checkpoints every 4 steps, validation every 4 steps) and
`train.py`, kill them with SIGKILL mid-epoch, resume from last.ckpt in a fresh process, and compare
the final adapter with a run that was never interrupted. Each run is a new process forked from the fork server of
tests/helpers.py (`Forked`), which imported torch, Lightning and Hydra once.
"""

from __future__ import annotations

import json
import os
import random
import signal
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import Forked, quiet_trainer
from safetensors.torch import load_file

import lightning_peft as lp
from lightning_peft._files import atomic_folder
from lightning_peft.lightning import PEFTCallback
from lightning_peft.lightning.rng import (
    CHECKPOINT_KEY,
    SeedEpochSampler,
    TrainingRNG,
    capture_rng_state,
    restore_rng_state,
)
from lightning_peft.serialization import atomic_save_file

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
WORKER = TESTS / "reliability_worker.py"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------
def _worker(out: Path, *args: str) -> Forked:
    """`python reliability_worker.py --out OUT *args` in a new process (forked from the preloaded fork server,
    see tests/helpers.py: the same script run without paying its imports again), stderr into stdout."""
    return Forked([str(WORKER), "--out", str(out), *args], env=ENV, merge_stderr=True)


def _finish(proc: Forked, expect_rc: int = 0) -> str:
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == expect_rc, f"worker exited with {proc.returncode}, expected {expect_rc}:\n{out[-4000:]}"
    return out


def _adapter(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "adapter" / "adapter_model.safetensors")


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert sorted(a) == sorted(b)
    return max((a[k] - b[k]).abs().max().item() for k in a)


def _draws(folder: Path) -> dict:
    return json.loads((folder / "draws.json").read_text())


# ---------------------------------------------------------------------------------------------
# RNG capture / restore (in process)
# ---------------------------------------------------------------------------------------------
def _draw_all() -> tuple:
    return torch.rand(4).tolist(), np.random.rand(3).tolist(), [random.random() for _ in range(3)], random.gauss(0, 1)


def test_capture_restore_round_trip_for_torch_numpy_python():
    random.gauss(0, 1)  # leaves a cached gaussian in python's state
    np.random.standard_normal()  # and one in numpy's
    state = capture_rng_state()
    first = _draw_all()
    restore_rng_state(state)
    assert _draw_all() == first
    assert set(state) >= {"torch", "numpy", "python"}


def test_rng_states_load_with_weights_only(tmp_path):
    tracker = TrainingRNG()
    tracker.on_train_batch_start()
    torch.rand(2)
    checkpoint: dict = {}
    tracker.on_save_checkpoint(checkpoint)  # a save inside the batch's end: snapshot taken now
    torch.save(checkpoint, tmp_path / "c.ckpt")
    loaded = torch.load(tmp_path / "c.ckpt", weights_only=True)  # no pickled numpy arrays or other objects
    assert loaded[CHECKPOINT_KEY]["world_size"] == 1 and len(loaded[CHECKPOINT_KEY]["states"]) == 1
    torch.manual_seed(999), np.random.seed(999), random.seed(999)
    fresh = _draw_all()
    torch.manual_seed(999), np.random.seed(999), random.seed(999)
    other = TrainingRNG()
    assert other.on_load_checkpoint(loaded) is None
    assert _draw_all() == fresh  # nothing is restored at load time (the iterator would undo it) ...
    other.on_train_batch_start()
    resumed = _draw_all()
    other.on_train_batch_end()
    tracker.on_train_batch_start()  # the run that was never interrupted, at its next batch
    assert _draw_all() == resumed  # ... but at the first training batch


def test_tracker_puts_back_the_end_of_batch_state_and_saves_the_last_finished_batch():
    tracker = TrainingRNG()
    tracker.on_train_batch_start()
    tracker.on_train_batch_start()  # a second caller (PEFTCallback and PEFTMixin) in the same batch: no-op
    torch.rand(2)
    end_of_batch = capture_rng_state()
    after_batch = _draw_all()  # what the next batch would draw with nothing in between ...
    restore_rng_state(end_of_batch)
    tracker.on_train_batch_end()
    between = _draw_all()  # ... validation, a new dataloader iterator, the next batch's collate:
    assert between != after_batch  # a stream of their own, not a copy of training's
    outside = capture_rng_state()
    next_outside = _draw_all()
    restore_rng_state(outside)
    tracker.on_train_batch_start()
    assert _draw_all() == after_batch  # ... which does not reach training
    saved: dict = {}
    tracker.on_save_checkpoint(saved)  # inside the batch: its end state is taken now, the outside one put back
    assert _draw_all() == next_outside  # the outside stream goes on where it stopped
    tracker.on_train_batch_end()  # a second snapshot for the same batch is not taken
    again: dict = {}
    tracker.on_save_checkpoint(again)
    assert torch.equal(saved[CHECKPOINT_KEY]["states"][0]["torch"], again[CHECKPOINT_KEY]["states"][0]["torch"])


def test_a_checkpoint_without_rng_states_says_what_it_means():
    message = TrainingRNG().on_load_checkpoint({"state_dict": {}})
    assert message == (
        "lightning_peft: this checkpoint holds no RNG states (written by another version or without "
        "PEFTCallback / PEFTMixin); training resumes, but dropout masks differ from an uninterrupted run"
    )


def test_states_of_another_world_size_are_used_with_a_warning():
    states = [capture_rng_state(), capture_rng_state()]
    message = TrainingRNG().on_load_checkpoint({CHECKPOINT_KEY: {"format": 1, "world_size": 2, "states": states}})
    assert message == (
        "lightning_peft: the checkpoint holds RNG states of 2 process(es), this run has 1; every "
        "process takes the state of rank 0, so random draws differ from the interrupted run"
    )


# ---------------------------------------------------------------------------------------------
# data order
# ---------------------------------------------------------------------------------------------
def test_seed_epoch_sampler_order_is_a_function_of_seed_plus_epoch():
    sampler = SeedEpochSampler(10, seed=3)
    orders = []
    for epoch in range(3):
        sampler.set_epoch(epoch)
        orders.append(list(sampler))
        assert orders[-1] == torch.randperm(10, generator=torch.Generator().manual_seed(3 + epoch)).tolist()
        assert list(sampler) == orders[-1]  # iterating again (a resumed run) gives the same order
    assert len({tuple(o) for o in orders}) == 3 and sorted(orders[0]) == list(range(10))
    fresh = SeedEpochSampler(list(range(10)), seed=3)
    fresh.set_epoch(2)
    assert list(fresh) == orders[2] and len(fresh) == 10


def test_seed_epoch_sampler_state_holds_epoch_and_position():
    sampler = SeedEpochSampler(10, seed=3)
    sampler.set_epoch(4)
    it = iter(sampler)
    head = [next(it) for _ in range(6)]
    fresh = SeedEpochSampler(10, seed=3)  # a new process: epoch 0 until told otherwise
    fresh.load_state_dict(sampler.state_dict())
    resumed = iter(fresh)
    resumed.load_state_dict(it.state_dict())
    assert head + list(resumed) == sampler.order() and fresh.epoch == 4
    with pytest.raises(ValueError) as err:
        SeedEpochSampler(10, seed=4).load_state_dict(sampler.state_dict())
    assert str(err.value) == (
        "this data loader state was saved for SeedEpochSampler(seed=3, 10 samples), not "
        "(seed=4, 10 samples); resume with the same seed and data"
    )


@pytest.mark.parametrize(
    "args,error,message",
    [
        ((-1,), ValueError, "SeedEpochSampler needs a dataset or a number of samples >= 0, got -1"),
        ((5, "1"), TypeError, "SeedEpochSampler seed must be an integer, got '1'"),
    ],
)
def test_seed_epoch_sampler_bad_arguments(args, error, message):
    with pytest.raises(error) as err:
        SeedEpochSampler(*args)
    assert str(err.value) == message


def test_recipes_shuffle_with_the_seed_epoch_sampler():
    from lightning_peft.recipes.common import TextDataModule

    class Rows(TextDataModule):
        def collate(self, examples):
            return examples

    dm = Rows(path="unused.csv", seed=5, batch_size=4)
    loader = dm._loader(list(range(12)), 4, shuffle=True)
    assert isinstance(loader.sampler, SeedEpochSampler) and loader.sampler.seed == 5
    loader.sampler.set_epoch(1)
    assert [i for batch in loader for i in batch] == torch.randperm(
        12, generator=torch.Generator().manual_seed(6)
    ).tolist()
    assert [i for batch in dm._loader(list(range(6)), 4, shuffle=False) for i in batch] == list(range(6))


# ---------------------------------------------------------------------------------------------
# validation between batches does not reach training (in process)
# ---------------------------------------------------------------------------------------------
def _fit_in_process(tmp_path: Path, name: str, val_every: int | None, exact: bool) -> dict[str, torch.Tensor]:
    import lightning.pytorch as pl

    sys.path.insert(0, str(TESTS))
    import reliability_worker as w

    pl.seed_everything(5, verbose=False)
    module = w.Plain()
    callback = PEFTCallback(
        lp.LoraConfig(**w.LORA), export_dir=str(tmp_path / name), exact_resume=exact, merge_on_train_end=False
    )
    trainer = quiet_trainer(
        max_steps=12,
        callbacks=[callback],
        val_check_interval=val_every,
        limit_val_batches=1 if val_every else 0,
        num_sanity_val_steps=0,
        enable_checkpointing=False,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, datamodule=w.Data("sampler"))
    return _adapter(tmp_path / name)


def test_validation_in_between_leaves_training_draws_unchanged(tmp_path):
    without = _fit_in_process(tmp_path, "a", None, exact=True)
    with_val = _fit_in_process(tmp_path, "b", 3, exact=True)
    assert _max_diff(without, with_val) == 0.0
    # the control: without the snapshot, validation's draws change the dropout masks of training
    assert (
        _max_diff(_fit_in_process(tmp_path, "c", None, exact=False), _fit_in_process(tmp_path, "d", 3, exact=False))
        > 1e-3
    )


def _collate_and_step_draws(out: Path, val_every: int | None) -> tuple[list[float], list[float]]:
    """torch.rand(1) drawn by a main-process collate_fn for every batch and by every training step."""
    import lightning.pytorch as pl

    sys.path.insert(0, str(TESTS))
    import reliability_worker as w

    collated: list[float] = []
    stepped: list[float] = []

    def collate(rows):
        collated.append(torch.rand(1).item())  # a random augmentation in the main process
        return torch.utils.data.default_collate(rows)

    class Drawing(w.Plain):
        def training_step(self, batch, batch_idx):
            stepped.append(torch.rand(1).item())  # what dropout would draw first
            return super().training_step(batch, batch_idx)

    class Loaders(w.Data):
        def train_dataloader(self):
            ds = torch.utils.data.TensorDataset(self.x, self.y)
            return torch.utils.data.DataLoader(
                ds, batch_size=w.BATCH, sampler=SeedEpochSampler(ds, seed=7), collate_fn=collate
            )

    pl.seed_everything(5, verbose=False)
    trainer = quiet_trainer(
        max_steps=12,
        callbacks=[
            PEFTCallback(lp.LoraConfig(**w.LORA), export_dir=str(out), exact_resume=True, merge_on_train_end=False)
        ],
        val_check_interval=val_every,
        limit_val_batches=1 if val_every else 0,
        num_sanity_val_steps=0,
        enable_checkpointing=False,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(Drawing(), datamodule=Loaders("sampler"))
    return collated, stepped


def test_main_process_collate_draws_are_independent_of_the_training_stream(tmp_path):
    collated, stepped = _collate_and_step_draws(tmp_path / "a", None)
    assert len(stepped) == 12 and len(collated) >= 12
    # Lightning fetches the next batch between the end of a training batch and the start of the next one.
    # When the training snapshot stayed in place in between, that collate drew from the very state the next
    # step then drew from again: the "random" augmentation was a copy of the dropout randomness
    # (collated[k] == stepped[k] for k >= 1 with this loader).
    assert not set(collated) & set(stepped)
    assert len(set(collated)) == len(collated)  # and the data stream does not repeat itself
    # the training stream is still that of the batches alone: validation in between changes no training draw
    assert _collate_and_step_draws(tmp_path / "b", 3)[1] == stepped


# ---------------------------------------------------------------------------------------------
# SIGKILL mid-epoch, resume from last.ckpt in a new process (plain LightningModule)
# ---------------------------------------------------------------------------------------------
class _References:
    """Uninterrupted worker runs, one per set of arguments, shared by the tests of this module: `start` launches
    one (at most once; it runs beside the test's own killed run), `path` waits for it."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.procs: dict[tuple[str, ...], tuple[Path, Forked]] = {}
        self.done: set[tuple[str, ...]] = set()

    def start(self, *args: str) -> None:
        if args not in self.procs:
            out = self.root / f"ref{len(self.procs)}"
            self.procs[args] = (out, _worker(out, *args))

    def path(self, *args: str) -> Path:
        self.start(*args)
        out, proc = self.procs[args]
        if args not in self.done:
            _finish(proc)
            self.done.add(args)
        return out


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    refs = _References(tmp_path_factory.mktemp("uninterrupted"))
    yield refs
    for _, proc in refs.procs.values():
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def _kill_and_resume(references: _References, run: Path, common: list[str], kill_at: int) -> tuple[Path, int]:
    """The reference run for `common` (shared), a run of it killed at `kill_at`, resumed from its last.ckpt."""
    references.start(*common)
    killed = _worker(run, *common, "--kill-at-step", str(kill_at))
    _finish(killed, expect_rc=-signal.SIGKILL)
    saved = kill_at // 4 * 4
    ckpts = sorted(p.name for p in (run / "ckpt").iterdir())
    assert ckpts == [f"epoch={(s - 1) // 8}-step={s}.ckpt" for s in range(4, saved + 1, 4)] + ["last.ckpt"]
    assert not (run / "adapter").exists()
    return references.path(*common), saved


def _resume_is_exact(full: Path, run: Path, saved: int) -> None:
    uninterrupted, resumed = _draws(full), _draws(run)
    assert uninterrupted["global_step"] == resumed["global_step"] == 24  # 3 epochs
    # the resumed steps drew the same numpy / python numbers (and saw the same data: the adapters agree)
    assert [d[0] for d in resumed["draws"]] == list(range(saved, 24))
    assert resumed["draws"] == uninterrupted["draws"][saved:]
    diff = _max_diff(_adapter(full), _adapter(run))
    assert diff <= 1e-6, f"resumed adapter differs from the uninterrupted one by {diff}"


@pytest.mark.slow
@pytest.mark.parametrize(
    "api,loader,kill_at",
    [
        ("callback", "sampler", 6),  # 8 steps per epoch: last.ckpt is step 4 (epoch 0)
        ("mixin", "sampler", 14),  # last.ckpt is step 12 (epoch 1)
        ("callback", "shuffle", 14),  # StatefulDataLoader(shuffle=True)
    ],
)
def test_sigkill_mid_epoch_then_resume_equals_an_uninterrupted_run(tmp_path, references, api, loader, kill_at):
    common = ["--api", api, "--loader", loader]
    full, saved = _kill_and_resume(references, tmp_path / "run", common, kill_at)
    checkpoint = torch.load(tmp_path / "run" / "ckpt" / "last.ckpt", weights_only=True)
    assert checkpoint["global_step"] == saved and len(checkpoint[CHECKPOINT_KEY]["states"]) == 1
    _finish(_worker(tmp_path / "run", *common, "--ckpt", str(tmp_path / "run" / "ckpt" / "last.ckpt")))
    _resume_is_exact(full, tmp_path / "run", saved)


@pytest.mark.slow
def test_without_the_rng_states_a_resume_differs(tmp_path, references):
    """The control for the test above: the same resume with exact_resume=False ends elsewhere."""
    common = ["--api", "callback", "--loader", "sampler"]  # the reference of the first case above
    full, _ = _kill_and_resume(references, tmp_path / "run", common, 6)
    _finish(
        _worker(tmp_path / "run", *common, "--no-exact-resume", "--ckpt", str(tmp_path / "run" / "ckpt" / "last.ckpt"))
    )
    assert _max_diff(_adapter(full), _adapter(tmp_path / "run")) > 1e-3
    assert _draws(tmp_path / "run")["draws"] != _draws(full)["draws"][4:]


def _find_key(tree, key: str) -> list:
    """Every value stored under `key` anywhere in nested dicts / lists."""
    if isinstance(tree, dict):
        return ([tree[key]] if key in tree else []) + [v for x in tree.values() for v in _find_key(x, key)]
    if isinstance(tree, (list, tuple)):
        return [v for x in tree for v in _find_key(x, key)]
    return []


# DataLoader worker processes with a random augmentation in `__getitem__` (torch, numpy and python noise):
# before WorkerSeeds the resumed adapter was 0.57 off (kill at step 6, 2 workers), now 0.0
@pytest.mark.slow
@pytest.mark.parametrize(
    "extra,kill_at",
    [
        ([], 6),  # epoch 0: the first iterator, rebuilt at on_train_start with WorkerSeeds
        ([], 14),  # epoch 1: the workers of a later epoch, mid-epoch
        (["--persistent"], 14),  # persistent workers resumed mid-epoch: still exact
    ],
)
def test_sigkill_with_augmenting_dataloader_workers_resumes_exactly(tmp_path, references, extra, kill_at):
    from lightning_peft.lightning.rng import WORKER_STATE_KEY

    common = ["--workers", "2", "--augment", *extra]
    full, saved = _kill_and_resume(references, tmp_path / "run", common, kill_at)
    checkpoint = torch.load(tmp_path / "run" / "ckpt" / "last.ckpt", weights_only=True)
    assert isinstance(checkpoint[CHECKPOINT_KEY]["worker_seed"], int)
    # each worker's RNG state rides in the loader's state (one per worker)
    assert len(_find_key(checkpoint["loops"], WORKER_STATE_KEY)) == 2
    out = _finish(_worker(tmp_path / "run", *common, "--ckpt", str(tmp_path / "run" / "ckpt" / "last.ckpt")))
    _resume_is_exact(full, tmp_path / "run", saved)
    assert "persistent_workers=True" not in out


@pytest.mark.slow
def test_persistent_workers_resumed_at_an_epoch_end_warn(tmp_path):
    """The one configuration where workers' streams are not restored: the uninterrupted run's persistent
    workers carry them over into the next epoch, a run resumed at the epoch's end starts new ones."""
    env = {**ENV, "PYTHONWARNINGS": "default"}
    common = ["--workers", "2", "--augment", "--epoch-end-ckpt"]

    def run(out: Path, *args: str) -> str:
        return _finish(Forked([str(WORKER), "--out", str(out), *common, *args], env=env, merge_stderr=True))

    for name, extra in (("persistent", ["--persistent"]), ("fresh", [])):
        run(tmp_path / name, "--epochs", "1", *extra)
        out = run(tmp_path / name, "--epochs", "2", "--ckpt", str(tmp_path / name / "ckpt" / "last.ckpt"), *extra)
        warned = "persistent_workers=True from a checkpoint that is not mid-epoch" in out
        assert warned == (name == "persistent"), out[-3000:]


def test_worker_seeds_are_a_function_of_seed_epoch_and_worker_id():
    from lightning_peft.lightning.rng import WorkerSeeds

    class Progress:  # Lightning's fit_loop.epoch_progress, as WorkerSeeds reads it
        def __init__(self, epoch: int) -> None:
            self.current = type("Current", (), {"processed": epoch})()

    calls = []

    def seeded(seed: int, epoch: int, worker: int, rank: int = 0) -> tuple:
        torch.manual_seed(999), np.random.seed(999), random.seed(999)  # whatever the state before
        WorkerSeeds(seed, Progress(epoch), 0, rank, inner=calls.append)(worker)
        return _draw_all()

    first = seeded(5, 1, 0)
    assert seeded(5, 1, 0) == first and calls == [0, 0]  # the loader's own worker_init_fn runs after
    others = [seeded(6, 1, 0), seeded(5, 2, 0), seeded(5, 1, 1), seeded(5, 1, 0, rank=1)]
    assert all(o[0] != first[0] and o[1] != first[1] and o[2] != first[2] for o in others)


# ---------------------------------------------------------------------------------------------
# SIGKILL during the export: the previous export stays whole
# ---------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("which", ["adapter", "merged"])
def test_sigkill_during_export_leaves_the_previous_export_whole(tmp_path, which):
    _finish(_worker(tmp_path, "--epochs", "1"))
    before_adapter = _adapter(tmp_path)
    before_merged = load_file(tmp_path / "merged" / "model.safetensors")
    # a longer run into the same folder, killed right after the first (adapter) / second (merged) file write
    _finish(
        _worker(tmp_path, "--epochs", "2", "--kill-in-export", "1" if which == "adapter" else "2"),
        expect_rc=-signal.SIGKILL,
    )
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(f".{which}.tmp-")]
    assert len(leftovers) == 1, sorted(p.name for p in tmp_path.iterdir())  # the kill came mid-export
    assert (tmp_path / leftovers[0]).is_dir()
    if which == "adapter":  # the old adapter is intact and loads
        assert _max_diff(_adapter(tmp_path), before_adapter) == 0.0
    else:  # the new adapter was completed and renamed into place before the merged export began
        assert _max_diff(_adapter(tmp_path), before_adapter) > 1e-3
    after_merged = load_file(tmp_path / "merged" / "model.safetensors")
    assert _max_diff(after_merged, before_merged) == 0.0
    sys.path.insert(0, str(TESTS))
    import reliability_worker as w

    loaded = lp.PeftModel.from_pretrained(w.Net(), tmp_path / "adapter")
    assert loaded.base_model.model.fc1.lora_A["default"].weight.shape == (4, 16)


def test_atomic_folder_keeps_the_old_folder_when_writing_fails(tmp_path):
    final = tmp_path / "adapter"
    with atomic_folder(str(final)) as tmp:
        Path(tmp, "a.txt").write_text("old")
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic_folder(str(final)) as tmp:
            Path(tmp, "a.txt").write_text("new, half")
            raise RuntimeError("disk full")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]  # no temporary folder left behind
    assert (final / "a.txt").read_text() == "old"
    with atomic_folder(str(final)) as tmp:
        Path(tmp, "b.txt").write_text("new")
    assert sorted(p.name for p in final.iterdir()) == ["b.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


def test_atomic_save_file_keeps_the_old_file_when_writing_fails(tmp_path, monkeypatch):
    path = tmp_path / "adapter_model.safetensors"
    atomic_save_file({"w": torch.ones(2)}, str(path))
    import lightning_peft.serialization as serialization

    def broken(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\x00" * 5)  # half a file, then a failure
        raise OSError("No space left on device")

    monkeypatch.setattr(serialization, "save_file", broken)
    with pytest.raises(OSError, match="No space left on device"):
        atomic_save_file({"w": torch.zeros(2)}, str(path))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_model.safetensors"]
    assert torch.equal(load_file(path)["w"], torch.ones(2))


# ---------------------------------------------------------------------------------------------
# `python train.py ... ckpt_path=last` after a SIGKILL
# ---------------------------------------------------------------------------------------------
# tiny BERT (dropout 0.1 in the base, 0.05 in LoRA), 96 rows in batches of 16: 6 steps per epoch, 3 epochs,
# validation (and so a checkpoint of the best and of the last) every 4 steps
TRAIN = [
    "model=tiny_bert",
    "data.limit_train_rows=96",
    "data.limit_val_rows=16",
    "data.batch_size=16",
    "trainer.max_epochs=3",
    "trainer.val_check_interval=4",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
    "merge=false",
]
KILL = "+trainer.callbacks=[{_target_: reliability_worker.Kill, step: 5}]"


def _train(run: Path, *args: str) -> Forked:
    """`python train.py hydra.run.dir=RUN *TRAIN *args` from RUN's parent, in a new (forked) process."""
    env = {**ENV, "PYTHONPATH": os.pathsep.join([str(REPO), str(TESTS)])}
    return Forked(
        [str(REPO / "train.py"), f"hydra.run.dir={run}", *TRAIN, *args], cwd=run.parent, env=env, merge_stderr=True
    )


@pytest.mark.slow
def test_train_py_killed_mid_epoch_resumes_with_ckpt_path_last(tmp_path):
    full = _train(tmp_path / "full")
    killed = _train(tmp_path / "run", KILL)
    _finish(full)
    _finish(killed, expect_rc=-signal.SIGKILL)
    checkpoint = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["global_step"] == 4 and checkpoint["epoch"] == 0  # mid-epoch (step 4 of 6)
    assert not (tmp_path / "run" / "adapter").exists()
    out = _finish(_train(tmp_path / "run", "ckpt_path=last"))
    assert "Restoring states from the checkpoint path" in out and "last.ckpt" in out
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert m["global_step"] == 18 and m["resumed_from"] == "last"
    diff = _max_diff(_adapter(tmp_path / "full"), _adapter(tmp_path / "run"))
    assert diff <= 1e-6, f"resumed adapter differs from the uninterrupted one by {diff}"


# ---------------------------------------------------------------------------------------------
# no code execution from files
# ---------------------------------------------------------------------------------------------
def _call_text(text: str, start: int) -> str:
    """The source of the call whose '(' is at text[start] (to its matching ')')."""
    depth = 0
    for i in range(start, len(text)):
        depth += {"(": 1, ")": -1}.get(text[i], 0)
        if depth == 0:
            return text[start : i + 1]
    return text[start:]


def test_no_unsafe_loading_in_the_package():
    """Every torch.load in the package and the recipes is weights-only and nothing enables remote code (ruff has no
    rule for either; pickle and exec are ruff's S301 / S403 / S102 in CI)."""
    offenders = []
    for folder in ("lightning_peft",):  # the recipes and the app's configs are package data in there
        assert (REPO / folder).is_dir(), folder
        for path in sorted((REPO / folder).rglob("*")):
            if path.suffix not in (".py", ".yaml"):
                continue
            text = path.read_text()
            where = path.relative_to(REPO)
            for i in [i for i in range(len(text)) if text.startswith("torch.load(", i)]:
                call = _call_text(text, i + len("torch.load"))
                if "weights_only=True" not in call:
                    offenders.append(f"{where}: torch.load{call}")
            for number, line in enumerate(text.splitlines(), 1):
                code = line.split("#", 1)[0]
                if "trust_remote_code" in code and ("True" in code or "true" in code):
                    offenders.append(f"{where}:{number}: {line.strip()}")
    assert offenders == []
