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
    proc = _spawn("fsize", str(folder), "1", str(limit), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
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
        proc = _spawn("readonly", str(folder), "1", stdout=subprocess.PIPE, stderr=subprocess.PIPE)
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
        writers = [_spawn("save", str(folder), str(v), "10", str(start), stderr=subprocess.PIPE) for v in (0, 1)]
        start.touch()  # both begin together
        for proc in writers:
            assert proc.wait(timeout=300) == 0, proc.stderr.read()
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
    assert (folder / "README.md").read_text() == "mine" and (folder / "notes" / "a.txt").read_text() == "also mine"
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
def test_a_killed_exports_leftovers_are_removed_by_the_next_export(tmp_path):
    final = tmp_path / "merged"
    save_merged_model(w.Net(), str(final))
    for leftover in (".merged.tmp-ab12cd34", ".merged.new-ab12cd34", ".merged.prev-ab12cd34", ".merged.old-ab12cd34"):
        (tmp_path / leftover / "x").mkdir(parents=True)
        (tmp_path / leftover / "x" / "model.safetensors").write_bytes(b"half")
    (tmp_path / ".merged-other.tmp-ab12cd34").mkdir()  # not ours: another folder's name
    save_merged_model(w.Net(), str(final))
    assert _leftovers(tmp_path) == [".merged-other.tmp-ab12cd34"]
    assert sorted(os.listdir(final)) == ["model.safetensors"]


@pytest.mark.parametrize("kind", [".new-", ".prev-", ".old-"])
def test_a_save_killed_between_the_fallback_renames_is_repaired(tmp_path, kind):
    """Without RENAME_EXCHANGE, `final` is missing between two renames; the next save puts the complete
    folder back (the new one when it was complete, else the previous; `.old-*/x` is what 0.1 left)."""
    folder = tmp_path / "adapter"
    w.build(0).save_pretrained(folder)
    moved = tmp_path / f".adapter{kind}ab12cd34"
    if kind == ".old-":
        moved.mkdir()
        folder.rename(moved / "x")
    else:
        folder.rename(moved)
    (tmp_path / ".adapter.tmp-zz12cd34").mkdir()  # an incomplete one is never restored
    w.build(1).save_pretrained(folder, selected_adapters=["other"])  # keeps the restored folder's "default"
    model = lp.PeftModel.from_pretrained(w.Net(), folder)
    model.load_adapter(folder / "other", "other")
    assert model.peft_config["default"].lora_alpha == 8 and model.peft_config["other"].lora_alpha == 64
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
        inside == ["model.safetensors"] and visible == ["model.safetensors", "tokenizer.json"] and old_tokenizer == "v1"
    )
    assert sorted(os.listdir(final)) == ["model.safetensors", "tokenizer.json"]  # one listing: all of it
    assert (final / "tokenizer.json").read_text() == "v2"

    state = AdapterState(lp.LoraConfig(r=2, target_modules=["fc1"]))
    state.peft = w.build(0)  # as after injection
    adapter = tmp_path / "adapter"
    seen = []
    state.save_adapter(str(adapter), extras=lambda d: seen.append((os.path.exists(adapter), sorted(os.listdir(d)))))
    assert seen == [(False, ["adapter_config.json", "adapter_model.safetensors"])]  # not there before the extras
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
        trainer = pl.Trainer(
            max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
            enable_model_summary=False, default_root_dir=str(tmp_path), callbacks=[callback],
        )  # fmt: skip
        trainer.fit(Module())
        return callback

    fit()
    adapter, merged = tmp_path / "run" / "adapter", tmp_path / "run" / "merged"
    first = (adapter.stat().st_ino, merged.stat().st_ino)
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json"} == set(os.listdir(adapter))
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
    assert (adapter.stat().st_ino, merged.stat().st_ino) != first  # re-exported
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
        proc = subprocess.run(
            [sys.executable, str(REPO_ROOT / "train.py"), f"hydra.run.dir={run}", "trainer.max_steps=2", *FAST],
            cwd=tmp_path,
            env={**os.environ, "HF_HUB_OFFLINE": "1"},
            capture_output=True,
            text=True,
            timeout=600,
        )
    finally:
        observer.stop.set()
        observer.join()
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert observer.polls > 0 and observer.incomplete == []  # every listing, from the first, had the tokenizer
    assert "adapter_config.json" in os.listdir(run / "adapter") and "config.json" in os.listdir(run / "merged")
    assert [p for p in _leftovers(run) if ".tmp-" in p or ".lock" in p] == []
