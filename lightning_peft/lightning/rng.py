"""Exact resume: the random-number streams of training, saved with the checkpoint and put back.

Lightning saves the model, optimizer, loop position and (with a `StatefulDataLoader`) the data
position, but not the random-number generators, so after a resume dropout draws other masks than
the run that was never interrupted. `TrainingRNG` closes that gap; the `ExactResume` callback
(`exact_resume.py`, which PEFTCallback and PEFTMixin use) drives it from Lightning's hooks
(one tracker per LightningModule, see `training_rng`):

- two streams: at the end of every training batch it takes a snapshot of the torch (CPU and
  initialised CUDA), numpy (legacy global) and python `random` states (the training stream) and
  puts back the "outside" state it took at that batch's start; at the start of the next training
  batch it takes the outside state again and puts the training snapshot back. So the training
  stream is the same whatever ran between two batches (validation, creating a dataloader iterator
  at an epoch start, a checkpoint being written, Lightning fetching the next batch: a main-process
  collate / augmentation), which is what makes a resumed run equal to one that was never
  interrupted: those in-between draws differ between the two (a resumed run creates its iterator
  mid-epoch, skips the validation that was due) but never reach training. And they come from a
  stream of their own: with the snapshot left in place between batches, the collate of the next
  batch drew the very numbers the next step's dropout then drew again. At the first batch of a
  fit that does not resume both streams would start from the same state, so the outside one
  forks off it (generators seeded from a hash of that state);
- a checkpoint stores the snapshot of the last finished training batch (under
  `checkpoint["lightning_peft_rng"]`, one state per process), taken at once if the checkpoint is
  written inside that batch's `on_train_batch_end` before the snapshot was taken;
- after a restore the loaded snapshot is put back at the first `on_train_batch_start`; earlier
  would be undone (building the dataloader iterator draws from the global generator). The outside
  stream is not saved: after a resume, draws between batches (a main-process augmentation) are the
  resumed process's own.

Everything stored is a tensor or a plain Python value, so the checkpoint loads with
`torch.load(weights_only=True)`.

`SeedEpochSampler` is the other half for data order: a shuffle seeded by `seed + epoch`, so the
order of every epoch after a resume is the one the uninterrupted run saw.

DataLoader worker processes (`num_workers > 0`) draw from generators of their own, seeded by torch from a
base seed drawn in the main process when the iterator is built (from the outside stream, which is not
saved) and advanced by every `__getitem__` that augments at random. `prepare_train_loaders` (at
`on_train_start`, once per fit) wraps each train loader's `worker_init_fn` in `WorkerSeeds`: every worker is seeded
from (worker seed, epoch, loader, rank, worker id), the worker seed being saved in the checkpoint, and with
a torchdata `StatefulDataLoader` the worker's RNG state rides in the loader's per-worker state (the worker's
copy of the dataset reports it), so a worker resumed mid-epoch continues its stream where the
uninterrupted one was. The iterator Lightning built before `on_train_start` is rebuilt with the new
`worker_init_fn` (on resume from the checkpoint's loader states). Not exact, and warned about: a loader
with `persistent_workers=True` resumed from a checkpoint that is not mid-epoch (its workers would have
carried their streams over from the previous epoch).
"""

from __future__ import annotations

import hashlib
import random
from typing import Any, Iterator, Optional, Sized

import torch
from torch.utils.data import Sampler

from .._compat import (
    drop_persistent_iterator,
    fit_loop_data_fetcher,
    fit_loop_train_loaders,
    load_pending_loader_states,
    pending_loader_states,
    set_pending_loader_states,
)

CHECKPOINT_KEY = "lightning_peft_rng"
TRACKER_ATTR = "_lightning_peft_rng"
_FORMAT = 1


# ---------------------------------------------------------------------------------------------
# capture / restore
# ---------------------------------------------------------------------------------------------
# Two forms of one state: the raw one (what the generators' own getters return, cheap to take and
# put back, used between batches) and the checkpoint one (tensors and plain values only, for
# `torch.load(weights_only=True)`), converted only when a checkpoint is written or read.
def _get_raw_state() -> dict[str, Any]:
    """The torch (CPU, and CUDA when initialised), numpy and python `random` global states, as their getters
    return them."""
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy as np
    except ImportError:  # pragma: no cover - numpy comes with torch's usual installs
        return state
    state["numpy"] = np.random.get_state()
    return state


def _set_raw_state(state: dict[str, Any]) -> None:
    """Put back what `_get_raw_state` returned (the parts it holds)."""
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    cuda = state.get("cuda")
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    npy = state.get("numpy")
    if npy is not None:
        import numpy as np

        np.random.set_state(npy)


def _python_state_dict(py_state: tuple) -> dict[str, Any]:
    version, internal, gauss_next = py_state
    return {"version": version, "state": torch.tensor(internal, dtype=torch.int64), "gauss_next": gauss_next}


def _numpy_state_dict(np_state: tuple) -> dict[str, Any]:
    import numpy as np

    name, keys, pos, has_gauss, cached = np_state
    return {
        "name": str(name),
        "keys": torch.from_numpy(keys.astype(np.int64)),
        "pos": int(pos),
        "has_gauss": int(has_gauss),
        "cached_gaussian": float(cached),
    }


def _to_checkpoint_form(raw: dict[str, Any]) -> dict[str, Any]:
    state: dict[str, Any] = {"torch": raw["torch"], "python": _python_state_dict(raw["python"])}
    if "cuda" in raw:
        state["cuda"] = raw["cuda"]
    if "numpy" in raw:
        state["numpy"] = _numpy_state_dict(raw["numpy"])
    return state


def _from_checkpoint_form(state: dict[str, Any]) -> dict[str, Any]:
    py = state["python"]
    raw: dict[str, Any] = {
        "torch": state["torch"],
        "python": (py["version"], tuple(int(v) for v in py["state"].tolist()), py["gauss_next"]),
    }
    if "cuda" in state:
        raw["cuda"] = state["cuda"]
    npy = state.get("numpy")
    if npy is not None:
        import numpy as np

        raw["numpy"] = (
            npy["name"],
            npy["keys"].numpy().astype(np.uint32),
            npy["pos"],
            npy["has_gauss"],
            npy["cached_gaussian"],
        )
    return raw


def capture_rng_state() -> dict[str, Any]:
    """The torch (CPU, and CUDA when initialised), numpy and python `random` global states, weights-only safe."""
    return _to_checkpoint_form(_get_raw_state())


def restore_rng_state(state: dict[str, Any]) -> None:
    """Put back what `capture_rng_state` returned (the parts it holds)."""
    _set_raw_state(_from_checkpoint_form(state))


def _fork_rng_state(state: dict[str, Any]) -> dict[str, Any]:
    """A raw state of the same parts as the raw `state`, for generators seeded from a hash of it (a stream of its
    own)."""
    import numpy as np

    digest = hashlib.sha256()
    digest.update(state["torch"].numpy().tobytes())
    digest.update(np.asarray(state["python"][1], dtype=np.int64).tobytes())
    if "numpy" in state:
        digest.update(state["numpy"][1].astype(np.int64).tobytes() + int(state["numpy"][2]).to_bytes(4, "little"))
    for device_state in state.get("cuda", ()):
        digest.update(device_state.numpy().tobytes())
    seed = digest.digest()
    forked: dict[str, Any] = {
        "torch": torch.Generator().manual_seed(int.from_bytes(seed[:8], "little")).get_state(),
        "python": random.Random(int.from_bytes(seed, "little")).getstate(),  # noqa: S311  (dropout / data, not secrets)
    }
    if "cuda" in state:
        forked["cuda"] = [
            torch.Generator(device=f"cuda:{i}")
            .manual_seed((int.from_bytes(seed[8:16], "little") + i) % 2**64)
            .get_state()
            for i in range(len(state["cuda"]))
        ]
    if "numpy" in state:
        forked["numpy"] = np.random.RandomState(np.frombuffer(seed[16:32], dtype=np.uint32)).get_state()
    return forked


# ---------------------------------------------------------------------------------------------
# the per-module tracker
# ---------------------------------------------------------------------------------------------
def _rank_and_world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class TrainingRNG:
    """Snapshot at each training batch's end, put back at the next one's start; saved in checkpoints.
    In between, the outside stream (taken at the batch start, put back at its end) is in place.

    Every method is idempotent within one batch, so several `ExactResume` callbacks (e.g. two PEFTCallbacks on one
    module) may all call it.
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Forget everything (a new `fit` that does not resume must not inherit the last one's state)."""
        # raw states (`_get_raw_state`); converted for checkpoints only in on_save / on_load_checkpoint
        self.snapshot: Optional[dict[str, Any]] = None  # state at the end of the last finished training batch,
        # put back at the next on_train_batch_start
        self.outside: Optional[dict[str, Any]] = None  # the state outside training batches, during one
        self.batch_open = False  # a training batch started and its snapshot is not taken yet
        self.worker_seed: Optional[int] = None  # DataLoader workers' seeds derive from it (WorkerSeeds); saved
        self.loader_states: Optional[list[Any]] = None  # the checkpoint's train loader states (prepare_train_loaders)
        self.loaders_prepared = False  # prepare_train_loaders ran in this fit

    # ---- per batch ------------------------------------------------------------------------------
    def on_train_batch_start(self) -> None:
        if self.batch_open:  # the second caller (PEFTCallback and PEFTMixin) within the same batch
            return
        self.outside = _get_raw_state()
        if self.snapshot is not None:
            _set_raw_state(self.snapshot)
        else:  # training goes on from the current state: the outside stream forks off it
            self.outside = _fork_rng_state(self.outside)
        self.batch_open = True

    def on_train_batch_end(self) -> None:
        if self.batch_open:
            self.snapshot = _get_raw_state()
            self.batch_open = False
            if self.outside is not None:
                _set_raw_state(self.outside)
                self.outside = None

    # ---- checkpoints ----------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Store the last finished batch's snapshot (one per process) in `checkpoint`. Runs on every rank."""
        self.on_train_batch_end()  # a save inside on_train_batch_end, before our own hook ran
        state = _to_checkpoint_form(self.snapshot) if self.snapshot is not None else capture_rng_state()
        rank, world = _rank_and_world()
        states: list[Optional[dict[str, Any]]] = [state]
        if world > 1:
            import torch.distributed as dist

            states = [None] * world
            dist.all_gather_object(states, state)
        checkpoint[CHECKPOINT_KEY] = {"format": _FORMAT, "world_size": world, "states": states}
        if self.worker_seed is not None:
            checkpoint[CHECKPOINT_KEY]["worker_seed"] = self.worker_seed

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> Optional[str]:
        """Take this process's state from `checkpoint`, to be put back at the first training batch.

        Returns a warning (or None): a checkpoint without RNG states, or from another number of processes.
        """
        saved = checkpoint.get(CHECKPOINT_KEY)
        if saved is None:
            return (
                "lightning_peft: this checkpoint holds no RNG states (written by another version or without "
                "PEFTCallback / PEFTMixin); training resumes, but dropout masks differ from an uninterrupted run"
            )
        rank, world = _rank_and_world()
        states = saved["states"]
        warning = None
        if len(states) != world:
            warning = (
                f"lightning_peft: the checkpoint holds RNG states of {len(states)} process(es), this run has "
                f"{world}; every process takes the state of rank {min(rank, len(states) - 1)}, so random draws "
                "differ from the interrupted run"
            )
        self.snapshot = _from_checkpoint_form(states[min(rank, len(states) - 1)])
        self.outside = None
        self.batch_open = False
        self.worker_seed = saved.get("worker_seed")
        loops = checkpoint.get("loops")
        fit_loop = loops.get("fit_loop") if isinstance(loops, dict) else None
        if isinstance(fit_loop, dict) and isinstance(fit_loop.get("state_dict"), dict):
            self.loader_states = fit_loop["state_dict"].get("combined_loader") or None
        return warning


def training_rng(module: Any) -> TrainingRNG:
    """The one `TrainingRNG` of a LightningModule (created on first use)."""
    tracker = module.__dict__.get(TRACKER_ATTR)
    if tracker is None:
        tracker = module.__dict__[TRACKER_ATTR] = TrainingRNG()
    return tracker


# ---------------------------------------------------------------------------------------------
# data order
# ---------------------------------------------------------------------------------------------
class SeedEpochSampler(Sampler[int]):
    """A shuffle whose order depends only on `seed + epoch` (Lightning calls `set_epoch` each epoch).

    With a `StatefulDataLoader`, a resumed run continues the interrupted epoch at the same position and
    sees the same order in every later epoch; `StatefulDataLoader(shuffle=True)` does not reproduce the
    later epochs' order after a resume. The sampler and its iterator are `Stateful` (torchdata's protocol):
    the loader's state holds the epoch and the position, because Lightning calls `set_epoch` only after
    it has built (and prefetched from) the resumed iterator.
    """

    def __init__(self, data_source: Sized | int, seed: int = 0) -> None:
        n = data_source if isinstance(data_source, int) else len(data_source)
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"SeedEpochSampler needs a dataset or a number of samples >= 0, got {data_source!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"SeedEpochSampler seed must be an integer, got {seed!r}")
        self.num_samples = n
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def order(self) -> list[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return torch.randperm(self.num_samples, generator=generator).tolist()

    def __iter__(self) -> Iterator[int]:
        return _SeedEpochIterator(self.order())

    def __len__(self) -> int:
        return self.num_samples

    def state_dict(self) -> dict[str, int]:
        return {"seed": self.seed, "epoch": self.epoch, "num_samples": self.num_samples}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state["seed"] != self.seed or state["num_samples"] != self.num_samples:
            raise ValueError(
                f"this data loader state was saved for SeedEpochSampler(seed={state['seed']}, "
                f"{state['num_samples']} samples), not (seed={self.seed}, {self.num_samples} samples); "
                "resume with the same seed and data"
            )
        self.epoch = int(state["epoch"])


class _SeedEpochIterator:
    """One epoch's order and the position in it (restored by `load_state_dict`)."""

    def __init__(self, order: list[int]) -> None:
        self.order = order
        self.position = 0

    def __iter__(self) -> "_SeedEpochIterator":
        return self

    def __next__(self) -> int:
        if self.position >= len(self.order):
            raise StopIteration
        self.position += 1
        return self.order[self.position - 1]

    def state_dict(self) -> dict[str, int]:
        return {"position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.position = int(state["position"])


def reload_pending_dataloader_states(trainer: Any) -> bool:
    """Work around Lightning issue #20550 (open in 2.6): when `configure_optimizers` reads
    `trainer.estimated_stepping_batches` (as LR schedules do), the train dataloader is built before the
    checkpoint's loop states are restored, and its saved position is then never loaded: a resumed run
    starts the interrupted epoch from its first batch. Call at `on_train_start`: loads the pending states
    and rebuilds the fetcher's iterator. Returns True when it had to."""
    fit_loop = getattr(trainer, "fit_loop", None)
    if not pending_loader_states(trainer) or not getattr(fit_loop, "restarting", False):
        return False
    fetcher = fit_loop_data_fetcher(trainer)
    if not fit_loop_train_loaders(trainer) or fetcher is None or not load_pending_loader_states(trainer):
        return False
    iter(fetcher)  # a new iterator from the loaded states (the old one prefetched the epoch's first batch)
    return True


# ---------------------------------------------------------------------------------------------
# DataLoader worker processes
# ---------------------------------------------------------------------------------------------
WORKER_STATE_KEY = "lightning_peft_worker_rng"


def _worker_seed(*parts: int) -> int:
    """A 63-bit seed from (worker seed, epoch, loader, rank, worker id)."""
    digest = hashlib.sha256(":".join(str(int(p)) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def _seed_this_process(seed: int) -> None:
    """Seed torch, python `random` and numpy as torch seeds a DataLoader worker, from `seed` alone."""
    torch.manual_seed(seed)
    random.seed(seed)
    try:
        import numpy as np
    except ImportError:  # pragma: no cover
        return
    np.random.seed([(seed >> (32 * i)) & 0xFFFFFFFF for i in range(2)])


def _carry_rng_in_worker_state(dataset: Any) -> None:
    """Make this worker's copy of `dataset` report (and take back) the worker's RNG states as its torchdata
    state: a `StatefulDataLoader` keeps each worker's last state per yielded batch in its own `state_dict`,
    and on resume hands it to the worker before its first fetch. A dataset with a `state_dict` of its own keeps
    it, nested under "dataset". Only this worker's copy is touched, and only in the worker process."""
    if getattr(dataset, "_lightning_peft_carries_rng", False):
        return
    own_save, own_load = getattr(dataset, "state_dict", None), getattr(dataset, "load_state_dict", None)
    own = callable(own_save) and callable(own_load)

    def state_dict() -> dict[str, Any]:
        return {WORKER_STATE_KEY: capture_rng_state(), "dataset": own_save() if own else None}  # type: ignore[misc]

    def load_state_dict(state: Any) -> None:
        if isinstance(state, dict) and WORKER_STATE_KEY in state:
            restore_rng_state(state[WORKER_STATE_KEY])
            state = state.get("dataset")
        if own and state is not None:
            own_load(state)  # type: ignore[misc]

    try:
        dataset.state_dict = state_dict
        dataset.load_state_dict = load_state_dict
        dataset._lightning_peft_carries_rng = True
    except (AttributeError, TypeError):  # __slots__ or a read-only object: the worker's stream is not saved
        pass


class WorkerSeeds:
    """A DataLoader `worker_init_fn` that seeds each worker from (worker seed, epoch, loader index, rank,
    worker id), calls the loader's own `worker_init_fn` (Lightning's `pl_worker_init_function` derives its
    seeds from the one set here), and lets the worker's RNG state ride in a `StatefulDataLoader`'s state.

    `epoch_progress` is Lightning's `fit_loop.epoch_progress`, read when a worker starts (the iterator of
    epoch e is built after `current.processed` became e)."""

    def __init__(self, seed: int, epoch_progress: Any, loader_index: int, rank: int, inner: Any = None) -> None:
        self.seed, self.epoch_progress, self.loader_index, self.rank = seed, epoch_progress, loader_index, rank
        self.inner = inner

    def epoch(self) -> int:
        return int(self.epoch_progress.current.processed)

    def __call__(self, worker_id: int) -> None:
        _seed_this_process(_worker_seed(self.seed, self.epoch(), self.loader_index, self.rank, worker_id))
        if self.inner is not None:
            self.inner(worker_id)
        from torch.utils.data import get_worker_info

        info = get_worker_info()
        if info is not None:
            _carry_rng_in_worker_state(info.dataset)


PERSISTENT_WORKERS_WARNING = (
    "lightning_peft: this run resumes a train DataLoader with persistent_workers=True from a checkpoint that "
    "is not mid-epoch: the uninterrupted run's workers carried their random streams over from the previous "
    "epoch, the resumed run's start new ones, so random augmentation in the workers differs (exact resume "
    "holds mid-epoch, or with persistent_workers=False)"
)


def prepare_train_loaders(trainer: Any, module: Any) -> None:
    """At `on_train_start`: reload the loader position Lightning dropped (#20550), and for train loaders with
    worker processes install `WorkerSeeds` and rebuild the iterator Lightning built before this hook (on
    resume, from the checkpoint's loader states) so that its workers start with it."""
    fit_loop = getattr(trainer, "fit_loop", None)
    loaders = fit_loop_train_loaders(trainer)
    with_workers = [
        (i, dl)
        for i, dl in enumerate(loaders)
        if (getattr(dl, "num_workers", 0) or 0) > 0 and hasattr(dl, "worker_init_fn")
    ]
    fetcher = fit_loop_data_fetcher(trainer)
    if not with_workers or fetcher is None or fit_loop is None:
        reload_pending_dataloader_states(trainer)
        return
    tracker = training_rng(module)
    if tracker.worker_seed is None:
        tracker.worker_seed = int(torch.initial_seed())
    restarting = bool(getattr(fit_loop, "restarting", False))
    resuming = getattr(trainer, "ckpt_path", None) is not None  # also a resume at an epoch's end (not "restarting")
    for i, dl in with_workers:
        if isinstance(dl.worker_init_fn, WorkerSeeds):
            dl.worker_init_fn = dl.worker_init_fn.inner
        dl.worker_init_fn = WorkerSeeds(
            tracker.worker_seed, fit_loop.epoch_progress, i, int(getattr(trainer, "global_rank", 0)), dl.worker_init_fn
        )
        if getattr(dl, "persistent_workers", False):
            if resuming and not getattr(fit_loop, "restarted_mid_epoch", False):
                from lightning.pytorch.utilities.rank_zero import rank_zero_warn

                rank_zero_warn(PERSISTENT_WORKERS_WARNING)
            drop_persistent_iterator(dl)  # a persistent loader reuses its iterator (and workers) otherwise
    if restarting and tracker.loader_states and not pending_loader_states(trainer):
        set_pending_loader_states(trainer, tracker.loader_states)  # Lightning loaded and used them already
    if not reload_pending_dataloader_states(trainer):
        iter(fetcher)  # a new iterator: its workers start with WorkerSeeds
