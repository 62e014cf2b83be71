"""An adapter folder is one unit (`lightning_peft/_files.py::atomic_folder`): `save_pretrained`, the callback's
and the app's `adapter/` / `merged/` exports leave either the previous folder exactly as it was or the new one
whole, under SIGKILL, a full disk, a read-only parent and two writers at once; the folder's name never goes
missing; killed saves' leftovers are cleaned by the next save. Saving processes: tests/atomic_saves_worker.py."""

from __future__ import annotations

import errno
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import pytest
import torch
from helpers import Forked, quiet_trainer, run_forked

import lightning_peft as lp
from lightning_peft import _files
from lightning_peft._files import FolderLockTimeout, atomic_folder
from lightning_peft.lightning._state import AdapterState, save_merged_model

TESTS = Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS))
import atomic_saves_worker as w  # noqa: E402

WORKER = str(TESTS / "atomic_saves_worker.py")
KILLS = 200


def _spawn(*args: str, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, WORKER, *args], text=True, **kwargs)


def _fork(*args: str) -> Forked:
    """The worker in a new process forked from the preloaded fork server (tests/helpers.py), for the modes that
    talk to no pipe: the same run without paying the imports again; communicate() gives (stdout, stderr)."""
    return Forked([WORKER, *args])


def _expected() -> dict[int, dict[str, dict[str, torch.Tensor]]]:
    return {v: w.tensors(w.build(v)) for v in (0, 1)}


def _version_of(folder: Path, expected) -> int:
    """Load the folder as a user would; it must be exactly version 0 or 1, both adapters of the same version."""
    model = lp.PeftModel.from_pretrained(w.Net(), folder)
    model.load_adapter(folder / "other", "other")
    alphas = (model.peft_config["default"].lora_alpha, model.peft_config["other"].lora_alpha)
    versions = [v for v, a in w.ALPHAS.items() if a == alphas]
    assert len(versions) == 1, f"configs of two versions mixed: lora_alpha {alphas}"
    version = versions[0]
    loaded = w.tensors(model)
    for name in w.ADAPTERS:
        want = expected[version][name]
        assert set(loaded[name]) == set(want), name
        for key in want:
            assert torch.equal(loaded[name][key], want[key]), f"{name}.{key}: weights not of version {version}"
    return version


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


# ---------------------------------------------------------------------------------------------
# save_pretrained under SIGKILL, a full disk, a read-only parent, two writers
# ---------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_sigkill_at_random_moments_leaves_the_old_or_the_new_adapter_whole(tmp_path):
    folder = tmp_path / "adapter"
    w.build(1).save_pretrained(folder)
    expected = _expected()
    rng = random.Random(0)
    server = _spawn("serve", str(folder), stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    seen = {0: 0, 1: 0}
    mid_save = 0  # kills that left a temporary folder behind: the kill came while a save was writing
    try:
        for _ in range(KILLS):
            server.stdin.write("go\n")
            server.stdin.flush()
            pid = int(server.stdout.readline())
            threading.Event().wait(rng.uniform(0.0, 0.12))  # one save takes a few tens of ms here
            os.kill(pid, 9)
            assert server.stdout.readline().strip() == "reaped"
            mid_save += any(".tmp-" in name for name in _leftovers(tmp_path))
            seen[_version_of(folder, expected)] += 1
    finally:
        server.stdin.close()
        server.wait(timeout=60)
    print(f"\n{KILLS} kills: version 0 {seen[0]}, version 1 {seen[1]}, {mid_save} in the middle of a save")
    assert seen[0] and seen[1]  # saves completed between kills, in both directions
    assert mid_save > 0
    w.build(0).save_pretrained(folder)  # the next save removes what the killed ones left
    assert _leftovers(tmp_path) == []
    assert _version_of(folder, expected) == 0


def test_disk_full_between_the_weights_and_the_config_keeps_the_old_folder(tmp_path):
    folder = tmp_path / "adapter"
    w.build(0).save_pretrained(folder)
    before = _snapshot(tmp_path)
    weights, config = (os.path.getsize(folder / n) for n in ("adapter_model.safetensors", "adapter_config.json"))
    limit = (weights + config) // 2
    assert weights < limit < config  # the weights file is written, then the config fails
    proc = _fork("fsize", str(folder), "1", str(limit))
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 3, err
    assert f"OSError errno={errno.EFBIG}" in out  # the error reached the caller
    assert _snapshot(tmp_path) == before  # bit for bit, and no temporary folder or lock left
    assert _version_of(folder, _expected()) == 0


def test_read_only_parent_is_a_clear_error_and_nothing_changes():
    parent = Path(tempfile.mkdtemp(dir="/tmp"))  # not under pytest's private tmp_path: the worker may run as nobody
    try:
        folder = parent / "adapter"
        w.build(0).save_pretrained(folder)
        before = _snapshot(parent)
        os.chmod(parent, 0o555)  # noqa: S103 - read-only, the point of the test
        proc = _fork("readonly", str(folder), "1")
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 3, err
        assert "PermissionError" in out and f"cannot save {folder}" in out and "is not writable" in out
        assert "Nothing was changed" in out
        assert _snapshot(parent) == before
    finally:
        os.chmod(parent, 0o755)  # noqa: S103 - back to mkdtemp's owner-only + read for rmtree
        shutil.rmtree(parent)


@pytest.mark.slow
def test_two_processes_saving_at_once_leave_one_whole_adapter(tmp_path):
    folder, start = tmp_path / "adapter", tmp_path / "start"
    expected = _expected()
    results = []
    for round_ in range(2):
        writers = [_fork("save", str(folder), str(v), "10", str(start)) for v in (0, 1)]
        start.touch()  # both begin together
        for proc in writers:
            _, err = proc.communicate(timeout=300)
            assert proc.returncode == 0, err
        start.unlink()
        results.append(_version_of(folder, expected))
        assert _leftovers(tmp_path) == []
    print(f"\nlast writer per round: {results}")


def test_a_second_writer_waits_for_the_lock_then_a_clear_error(tmp_path):
    folder = tmp_path / "adapter"
    w.build(0).save_pretrained(folder)
    holder = _spawn("hold", str(folder), stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(FolderLockTimeout, match=f"{folder} is being saved by another process"):
            with atomic_folder(folder, lock_timeout=0.2):
                pass
        saver = threading.Thread(target=w.build(1).save_pretrained, args=(folder,))
        saver.start()
        saver.join(0.5)
        assert saver.is_alive()  # waiting for the holder
        assert _version_of(folder, _expected()) == 0
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)
    saver.join(60)
    assert not saver.is_alive()
    assert _version_of(folder, _expected()) == 1
    assert _leftovers(tmp_path) == []


# ---------------------------------------------------------------------------------------------
# the folder's other files, symlinks, the current directory
# ---------------------------------------------------------------------------------------------
def test_save_pretrained_keeps_other_files_in_the_folder_like_hf_peft(tmp_path):
    folder = tmp_path / "adapter"
    (folder / "notes").mkdir(parents=True)
    (folder / "README.md").write_text("mine")
    (folder / "notes" / "a.txt").write_text("also mine")
    w.build(0).save_pretrained(folder)
    w.build(1).save_pretrained(folder, selected_adapters=["default"])  # "other" stays version 0's
    card = (folder / "README.md").read_text()  # the user's text stays, the model card's fields are added (as HF's)
    assert card.startswith("---\nlibrary_name: peft\n") and "\nmine\n" in card
    assert (folder / "notes" / "a.txt").read_text() == "also mine"
    model = lp.PeftModel.from_pretrained(w.Net(), folder)
    model.load_adapter(folder / "other", "other")
    assert model.peft_config["default"].lora_alpha == 32 and model.peft_config["other"].lora_alpha == 16
    assert _leftovers(tmp_path) == []


def test_a_symlinked_folder_is_saved_where_it_points_and_the_current_folder_stays_usable(tmp_path, monkeypatch):
    real, link = tmp_path / "real", tmp_path / "link"
    w.build(0).save_pretrained(real)
    link.symlink_to(real, target_is_directory=True)
    w.build(1).save_pretrained(link)
    assert link.is_symlink() and _version_of(real, _expected()) == 1
    monkeypatch.chdir(real)
    w.build(0).save_pretrained(".")
    assert os.path.samefile(os.getcwd(), real)  # not the swapped-out previous folder
    assert _version_of(Path("."), _expected()) == 0


# ---------------------------------------------------------------------------------------------
# leftovers of killed saves, and the fallback swap (no RENAME_EXCHANGE)
# ---------------------------------------------------------------------------------------------
def _mark(folder: Path, token: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / _files.MARKER).write_text(token)
    return folder


def test_a_killed_exports_leftovers_are_removed_by_the_next_export_and_only_they(tmp_path):
    final = tmp_path / "merged"
    save_merged_model(w.Net(), str(final))
    _mark(tmp_path / ".merged.tmp-ab12cd34", "ab12cd34")  # killed while filling
    _mark(tmp_path / ".merged.new-cd34ab12", "cd34ab12")  # killed in the fallback swap: the pair of
    (tmp_path / ".merged.prev-cd34ab12").mkdir()  # previous folder, moved away before it was marked
    (tmp_path / ".merged.tmp-ef56ab12").mkdir()  # killed right after an exchange: the previous folder, paired
    (final / _files.MARKER).write_text("ef56ab12")  # to the new one through the marker still in it
    for leftover in tmp_path.glob(".merged.*-*"):
        (leftover / "model.safetensors").write_bytes(b"half")
    (tmp_path / ".merged.tmp-00aa11bb").mkdir()  # killed before its marker was written (or after it was removed)
    (tmp_path / ".merged.tmp-11bb22cc").mkdir()  # killed while writing its marker
    (tmp_path / ".merged.tmp-11bb22cc" / _files.MARKER).write_text("")
    users = [".merged.old-20240101", ".merged.prev-backup01", ".merged.tmp-zz99zz99", ".merged-other.tmp-ab12cd34"]
    for name in users:  # named like leftovers, but no marker: a user's folders, never touched
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.safetensors").write_bytes(b"mine")
    (tmp_path / ".merged.new-aa11bb22").mkdir()  # a marker with another token does not make it ours
    (tmp_path / ".merged.new-aa11bb22" / _files.MARKER).write_text("ab12cd34")
    (tmp_path / ".merged.new-aa11bb22" / "model.safetensors").write_bytes(b"mine")
    users.append(".merged.new-aa11bb22")
    save_merged_model(w.Net(), str(final))
    assert _leftovers(tmp_path) == sorted(users)
    assert all((tmp_path / name / "model.safetensors").read_bytes() == b"mine" for name in users[:4])
    assert sorted(os.listdir(final)) == ["model.safetensors"]


def test_a_folder_the_user_deleted_is_not_brought_back(tmp_path):
    """A stale `.prev-` (a save killed after its swap, before removing the previous folder) is not restored
    when the user removes the folder: the next save starts a fresh one, and removes the stale folder."""
    folder = tmp_path / "adapter"
    w.build(0).save_pretrained(folder)
    stale = tmp_path / ".adapter.prev-ab12cd34"
    shutil.copytree(folder, stale)
    _mark(stale, "ab12cd34")
    shutil.rmtree(folder)  # rm -rf adapter: the user wants a fresh folder
    w.build(1).save_pretrained(folder, selected_adapters=["default"])
    assert sorted(os.listdir(folder)) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]  # no "other"
    assert _leftovers(tmp_path) == []


def _killed_swap(folder: Path, version: int, step: int, exchange: bool) -> None:
    """Save `version` into `folder` in a forked child that is killed (`os._exit`) right after step `step` of
    the swap (a rename / the exchange, marking the previous folder, unmarking the new one)."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            done = [0]  # steps of the swap so far; it starts with the first rename / the exchange

            def counted(fn, starts: bool):
                def inner(*args):
                    out = fn(*args)
                    if starts or done[0]:
                        done[0] += 1
                        if done[0] == step:
                            os._exit(9)
                    return out

                return inner

            _files._exchange = counted(_files._exchange, True) if exchange else (lambda a, b: False)
            if not exchange:
                os.rename = counted(os.rename, True)
            _files._mark, _files._unmark = counted(_files._mark, False), counted(_files._unmark, False)
            w.build(version).save_pretrained(folder)
        finally:
            os._exit(1)  # all steps done without the kill
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 9, "the child was not killed at that step"


@pytest.mark.parametrize(
    "exchange, step", [(True, 1), (True, 2), (True, 3), (False, 1), (False, 2), (False, 3), (False, 4), (False, 5)]
)
def test_a_save_killed_at_any_step_of_the_swap_is_repaired_by_the_next_save(tmp_path, exchange, step):
    """Killed at each step of the swap (exchange: exchange, mark previous, unmark new; fallback: new folder to
    `.new-`, folder to `.prev-`, `.new-` to the folder, mark, unmark): the folder is the old or the new version
    whole; missing only between the fallback's renames, when a reader's error names the complete folder; the
    next save restores it and leaves nothing beside it."""
    folder = tmp_path / "adapter"
    w.build(0).save_pretrained(folder)
    _killed_swap(folder, 1, step, exchange)
    expected = _expected()
    if not exchange and step == 2:  # between the two renames
        assert not folder.exists()
        with pytest.raises(FileNotFoundError, match="a save into it was interrupted between its two renames"):
            lp.PeftModel.from_pretrained(w.Net(), folder)
    else:
        assert _version_of(folder, expected) == (0 if not exchange and step == 1 else 1)
    w.build(0).save_pretrained(folder, selected_adapters=["other"])  # keeps the folder's "default"
    model = lp.PeftModel.from_pretrained(w.Net(), folder)
    model.load_adapter(folder / "other", "other")
    default_alpha = 8 if not exchange and step == 1 else 32  # the new version from the step it was complete
    assert model.peft_config["default"].lora_alpha == default_alpha and model.peft_config["other"].lora_alpha == 16
    assert _files.MARKER not in os.listdir(folder)
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize("after", [1, 2, 3])
def test_an_exception_between_the_fallback_renames_keeps_the_folder(tmp_path, monkeypatch, after):
    """Ctrl-C (or any exception) inside the fallback swap: the folder is never left missing; before the new one
    is in place the previous one is put back."""
    folder = tmp_path / "adapter"
    w.build(0).save_pretrained(folder)
    monkeypatch.setattr(_files, "_exchange", lambda a, b: False)
    real, calls = os.rename, []

    def rename(a, b):
        real(a, b)
        calls.append(b)
        if len(calls) == after:
            raise KeyboardInterrupt

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(KeyboardInterrupt):
        w.build(1).save_pretrained(folder)
    monkeypatch.setattr(os, "rename", real)
    assert _version_of(folder, _expected()) == (1 if after == 3 else 0)
    assert _files.MARKER not in os.listdir(folder)
    assert _leftovers(tmp_path) == []


def test_the_fallback_swap_replaces_the_folder_whole(tmp_path, monkeypatch):
    monkeypatch.setattr(_files, "_exchange", lambda a, b: False)
    folder = tmp_path / "adapter"
    for version in (0, 1, 0):
        w.build(version).save_pretrained(folder)
        assert _version_of(folder, _expected()) == version
    assert _leftovers(tmp_path) == []


def test_a_folder_from_an_older_version_is_replaced_by_exchange(tmp_path):
    folder = tmp_path / "adapter"
    folder.mkdir()
    (folder / "stale.bin").write_bytes(b"old")
    inode = folder.stat().st_ino
    with atomic_folder(folder) as tmp:
        Path(tmp, "new.txt").write_text("new")
    assert sorted(os.listdir(folder)) == ["new.txt"] and folder.stat().st_ino != inode and not folder.is_symlink()


# ---------------------------------------------------------------------------------------------
# exports: extras (the app's tokenizer) go in before the swap; the name never goes missing
# ---------------------------------------------------------------------------------------------
def test_export_extras_are_written_before_the_folder_is_put_in_place(tmp_path):
    final = tmp_path / "merged"
    save_merged_model(w.Net(), str(final), extras=lambda d: Path(d, "tokenizer.json").write_text("v1"))
    calls = []

    def extras(folder: str) -> None:
        calls.append(
            (folder, sorted(os.listdir(folder)), sorted(os.listdir(final)), (final / "tokenizer.json").read_text())
        )
        Path(folder, "tokenizer.json").write_text("v2")

    save_merged_model(w.Net(), str(final), extras=extras)
    [(folder, inside, visible, old_tokenizer)] = calls
    assert Path(folder).parent == tmp_path and Path(folder) != final  # the temporary folder, not the export
    assert (
        inside == [_files.MARKER, "model.safetensors"]
        and visible == ["model.safetensors", "tokenizer.json"]
        and old_tokenizer == "v1"
    )
    assert sorted(os.listdir(final)) == ["model.safetensors", "tokenizer.json"]  # one listing: all of it
    assert (final / "tokenizer.json").read_text() == "v2"

    state = AdapterState(lp.LoraConfig(r=2, target_modules=["fc1"]))
    state.peft = w.build(0)  # as after injection
    adapter = tmp_path / "adapter"
    seen = []
    state.save_adapter(str(adapter), extras=lambda d: seen.append((os.path.exists(adapter), sorted(os.listdir(d)))))
    # not there before the extras; the marker (taken out once the folder is in place) says the folder is ours
    assert seen == [(False, [_files.MARKER, "README.md", "adapter_config.json", "adapter_model.safetensors"])]
    assert _leftovers(tmp_path) == []


class _Observer(threading.Thread):
    """Lists the folders in a loop. Counts listings, a folder missing, and listings without `required` of a
    folder that still was the current one right after the listing (`incomplete`). A reader that opened the
    previous folder just before a swap may list it while it is being removed (`old_being_removed`): that is
    the previous export going away, not the new one appearing."""

    def __init__(self, folders: list[Path], required: set[str]) -> None:
        super().__init__(daemon=True)
        self.folders, self.required = folders, required
        self.stop, self.polls, self.missing, self.incomplete = threading.Event(), 0, 0, []
        self.old_being_removed = 0

    def run(self) -> None:
        while not self.stop.is_set():
            for folder in self.folders:
                try:
                    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
                except FileNotFoundError:
                    self.missing += 1
                    continue
                try:
                    listing = set(os.listdir(fd))  # one folder, whatever renames happen meanwhile
                    self.polls += 1
                    if self.required <= listing:
                        continue
                    try:
                        current = os.path.samestat(os.fstat(fd), os.stat(folder))
                    except FileNotFoundError:
                        current = False
                        self.missing += 1
                    if current:
                        self.incomplete.append(sorted(listing))
                    else:
                        self.old_being_removed += 1
                finally:
                    os.close(fd)


def test_callback_re_export_never_leaves_adapter_missing_and_extras_are_always_inside(tmp_path):
    import lightning.pytorch as pl

    from lightning_peft.lightning import PEFTCallback

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.model = w.Net()

        def training_step(self, batch, batch_idx):
            return self.model(batch[0]).pow(2).mean()

        def configure_optimizers(self):
            return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=0.1)

        def train_dataloader(self):
            return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(8, 16)), batch_size=4)

    def tokenizer(folder: str) -> None:
        Path(folder, "tokenizer.json").write_text("{}")

    def fit() -> PEFTCallback:
        callback = PEFTCallback(
            lp.LoraConfig(r=2, target_modules=["fc1"]), export_dir=str(tmp_path / "run"), export_extras=tokenizer
        )
        trainer = quiet_trainer(
            max_steps=2, enable_checkpointing=False, default_root_dir=str(tmp_path), callbacks=[callback]
        )
        trainer.fit(Module())
        return callback

    fit()
    adapter, merged = tmp_path / "run" / "adapter", tmp_path / "run" / "merged"
    first = (adapter.stat().st_ino, merged.stat().st_ino)
    # held open, the first folders' inodes stay allocated: a later folder cannot get their numbers back (ext4 reused
    # the freed ones, and the re-export check below failed now and then)
    held = [os.open(folder, os.O_RDONLY) for folder in (adapter, merged)]
    assert {"README.md", "adapter_config.json", "adapter_model.safetensors", "tokenizer.json"} == set(
        os.listdir(adapter)
    )
    assert {"model.safetensors", "tokenizer.json"} == set(os.listdir(merged))
    observer = _Observer([adapter, merged], {"tokenizer.json"})
    observer.start()
    try:
        fit()
        state = AdapterState(lp.LoraConfig(r=2, target_modules=["fc1"]))
        state.peft = w.build(0)
        for _ in range(30):
            state.save_adapter(str(adapter), extras=tokenizer)
            save_merged_model(w.Net(), str(merged), extras=tokenizer)
    finally:
        observer.stop.set()
        observer.join()
    try:
        assert adapter.stat().st_ino != first[0] and merged.stat().st_ino != first[1]  # both re-exported
    finally:
        for fd in held:
            os.close(fd)
    print(f"\n{observer.polls} listings, {observer.old_being_removed} of a previous export being removed")
    assert observer.polls > 0 and observer.missing == 0 and observer.incomplete == []
    assert _leftovers(tmp_path / "run") == []


@pytest.mark.slow
def test_the_apps_exports_hold_the_tokenizer_the_moment_they_appear(tmp_path):
    from test_app import FAST, REPO_ROOT

    run = tmp_path / "run"
    observer = _Observer([run / "adapter", run / "merged"], {"tokenizer.json", "tokenizer_config.json"})
    observer.start()
    try:
        proc = run_forked(  # `python train.py ...` forked from the preloaded fork server (tests/helpers.py)
            [str(REPO_ROOT / "train.py"), f"hydra.run.dir={run}", "trainer.max_steps=2", *FAST],
            cwd=tmp_path,
            env={**os.environ, "HF_HUB_OFFLINE": "1"},
            timeout=600,
        )
    finally:
        observer.stop.set()
        observer.join()
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert observer.polls > 0 and observer.incomplete == []  # every listing, from the first, had the tokenizer
    assert "adapter_config.json" in os.listdir(run / "adapter") and "config.json" in os.listdir(run / "merged")
    assert [p for p in _leftovers(run) if ".tmp-" in p or ".lock" in p] == []


# ---------------------------------------------------------------------------------------------
# targets that cannot be replaced whole; what the folder holds; the folder's mode; nested saves
# ---------------------------------------------------------------------------------------------
def test_a_mount_point_is_a_clear_error_and_nothing_changes(tmp_path, monkeypatch):
    """A Docker / Kubernetes volume cannot be renamed (EBUSY): refused up front (`os.path.ismount`), and an
    EBUSY / EXDEV from the swap itself (a bind mount `ismount` misses) gives the same error."""
    folder = tmp_path / "adapter"
    w.build(0).save_pretrained(folder)
    before = _snapshot(tmp_path)
    real_ismount = os.path.ismount
    monkeypatch.setattr(os.path, "ismount", lambda p: os.fspath(p) == str(folder) or real_ismount(p))
    with pytest.raises(OSError, match=f"cannot save {folder}: it is a mount point; save into a sub-folder of it"):
        w.build(1).save_pretrained(folder)
    monkeypatch.setattr(os.path, "ismount", real_ismount)

    def busy(a, b):
        raise OSError(errno.EBUSY, f"cannot swap {a} into {b}: {os.strerror(errno.EBUSY)}")

    monkeypatch.setattr(_files, "_exchange", busy)
    with pytest.raises(OSError, match=r"it is a mount point \(Device or resource busy\); save into a sub-folder"):
        w.build(1).save_pretrained(folder)
    monkeypatch.setattr(_files, "_exchange", lambda a, b: False)
    real_rename = os.rename

    def rename(a, b):
        if os.fspath(a) == str(folder):
            raise OSError(errno.EBUSY, os.strerror(errno.EBUSY), a)
        real_rename(a, b)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(OSError, match="it is a mount point .*save into a sub-folder of it"):
        w.build(1).save_pretrained(folder)
    assert _snapshot(tmp_path) == before


def test_fifos_sockets_and_many_files_in_the_folder(tmp_path, monkeypatch):
    """keep_existing links FIFOs and sockets like any file and flushes only the files this save wrote (it hung
    opening a FIFO, holding the lock, failed on a socket, and flushed every file of a big folder again)."""
    import socket
    import stat

    folder = tmp_path / "adapter"
    w.build(0).save_pretrained(folder)
    os.mkfifo(folder / "pipe")
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(folder / "s.sock"))
    (folder / "many").mkdir()
    for i in range(300):
        (folder / "many" / f"f{i}").write_text("x")
    users = {(s.st_dev, s.st_ino) for s in (p.lstat() for p in folder.rglob("*")) if stat.S_ISREG(s.st_mode)}
    flushed = []
    real_fsync = os.fsync

    def fsync(fd):
        st = os.fstat(fd)
        if stat.S_ISREG(st.st_mode):
            flushed.append((st.st_dev, st.st_ino))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    saver = threading.Thread(target=w.build(1).save_pretrained, args=(folder,), daemon=True)
    saver.start()
    saver.join(60)
    sock.close()
    assert not saver.is_alive(), "the save hangs"
    assert stat.S_ISFIFO((folder / "pipe").lstat().st_mode) and stat.S_ISSOCK((folder / "s.sock").lstat().st_mode)
    assert len(os.listdir(folder / "many")) == 300 and _version_of(folder, _expected()) == 1
    assert flushed and not users & set(flushed)  # the save's own files, none of the user's
    assert _leftovers(tmp_path) == []

    def no_link(src, dst, **kwargs):
        raise OSError(errno.EPERM, os.strerror(errno.EPERM))

    monkeypatch.setattr(os, "link", no_link)  # e.g. fs.protected_hardlinks: a FIFO cannot be copied
    with pytest.raises(OSError, match=f"cannot keep {folder / 'pipe'} \\(a FIFO\\) in the new folder.*move it out"):
        w.build(0).save_pretrained(folder)
    assert _version_of(folder, _expected()) == 1 and _leftovers(tmp_path) == []


def _as_nobody(parent: Path, folder: Path, prepare) -> str:
    """Save version 1 into `folder` as uid 65534 (tests/atomic_saves_worker.py readonly); the OSError it prints."""
    os.chmod(parent, 0o755)  # noqa: S103 - the unprivileged worker must reach the folder
    prepare()
    proc = _fork("readonly", str(folder), "1")
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 3, err
    return out


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to hand files to another user")
def test_an_unreadable_file_in_the_folder_is_named_and_a_read_only_folder_is_refused():
    parent = Path(tempfile.mkdtemp(dir="/tmp"))  # not under pytest's private tmp_path: the worker runs as nobody
    try:
        folder = parent / "adapter"
        w.build(0).save_pretrained(folder)
        secret = folder / "secret"

        def unreadable() -> None:  # the folder is nobody's, one file in it root's, write-only
            os.chmod(parent, 0o777)  # noqa: S103
            shutil.chown(folder, 65534, 65534)
            secret.write_text("x")
            os.chmod(secret, 0o200)

        out = _as_nobody(parent, folder, unreadable)
        assert (
            f"PermissionError: [Errno 13] cannot keep {secret} in the new folder: it can be neither hard-linked" in out
        )
        assert "make it readable or move it out" in out and "Nothing was changed" in out
        secret.unlink()
        before = _snapshot(parent)

        def read_only() -> None:  # nobody's folder, mode 555: kept as it is, not replaced by a 755 one
            os.chmod(folder, 0o555)  # noqa: S103

        out = _as_nobody(parent, folder, read_only)
        assert f"PermissionError: [Errno 13] cannot save {folder}: the folder is not writable (mode 555)" in out
        assert _snapshot(parent) == before and stat_mode(folder) == 0o555
    finally:
        os.chmod(parent, 0o755)  # noqa: S103
        shutil.rmtree(parent)


def stat_mode(path: Path) -> int:
    return path.stat().st_mode & 0o7777


def test_the_folders_mode_is_kept(tmp_path):
    folder = tmp_path / "adapter"
    w.build(0).save_pretrained(folder)
    os.chmod(folder, 0o2750)  # noqa: S103 - a shared group folder
    with atomic_folder(folder) as tmp:
        Path(tmp, "f").write_text("x")
    assert stat_mode(folder) == 0o2750
    w.build(1).save_pretrained(folder)
    assert stat_mode(folder) == 0o2750


def test_saving_the_folder_being_saved_from_inside_its_save_is_an_error_at_once(tmp_path):
    """e.g. `export_extras` calling save_pretrained on the export's own folder: it waited for its own lock (10
    minutes), then timed out. Another thread waits for the lock as another process does."""
    import time

    final = tmp_path / "merged"
    started = time.monotonic()
    with pytest.raises(RuntimeError, match=f"already saving {final} in this process; write into the folder you"):
        save_merged_model(w.Net(), str(final), extras=lambda d: save_merged_model(w.Net(), str(final)))
    assert time.monotonic() - started < 30 and not final.exists() and _leftovers(tmp_path) == []
    other = threading.Thread(target=save_merged_model, args=(w.Net(), str(final)))
    with atomic_folder(final) as tmp:
        Path(tmp, "first").write_text("1")
        other.start()
        other.join(0.5)
        assert other.is_alive()  # waits, no error
    other.join(60)
    assert sorted(os.listdir(final)) == ["model.safetensors"] and _leftovers(tmp_path) == []


def test_a_lock_file_removed_during_the_save_is_no_error(tmp_path):
    folder = tmp_path / "adapter"
    with atomic_folder(folder) as tmp:
        (tmp_path / ".adapter.lock").unlink()  # e.g. a cleanup job
        Path(tmp, "f").write_text("x")
    assert os.listdir(folder) == ["f"]


def test_symlink_targets_and_long_names_are_clear_errors(tmp_path, monkeypatch):
    dangling = tmp_path / "link"
    dangling.symlink_to(tmp_path / "nowhere" / "deep" / "adapter")
    with pytest.raises(ValueError, match=f"cannot save {dangling}: it is a symlink to .*, which does not exist"):
        w.build(0).save_pretrained(dangling)
    assert not (tmp_path / "nowhere").exists()
    a, b = tmp_path / "a", tmp_path / "b"
    a.symlink_to(b)
    b.symlink_to(a)
    with pytest.raises(ValueError, match=f"cannot save {a}: it is a symlink loop"):
        w.build(0).save_pretrained(a)
    with pytest.raises(ValueError, match="its name is 241 bytes; at most 240 bytes fit"):
        w.build(0).save_pretrained(tmp_path / ("n" * 241))
    longest = tmp_path / ("n" * 240)
    w.build(0).save_pretrained(longest)
    monkeypatch.setattr(_files, "_exchange", lambda a, b: False)  # the fallback's `.prev-` name fits too
    w.build(1).save_pretrained(longest)
    assert _version_of(longest, _expected()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "link", longest.name]
