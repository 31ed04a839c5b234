"""A user's files are never deleted or overwritten; an interrupted save leaves a loadable checkpoint.

Each case states the promise (docs/reliability.md) and checks it the way a user would: the files
that survive (by content hash), the permissions of the directory, and outputs after reload.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
import torch

import quantization_wrapper as qw
from quantization_wrapper.checkpoint import files as checkpoint_dir
from reliability.common import leftovers, logits, quantized_model, tree

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(scope="module")
def model():
    return quantized_model()


@pytest.fixture(scope="module")
def reference(model):
    return logits(model)


def user_project(path: Path) -> dict[str, str]:
    path.mkdir(parents=True)
    (path / "train.py").write_text("print('my training script')\n")
    (path / "notes.txt").write_text("do not lose me\n")
    (path / "data").mkdir()
    (path / "data" / "rows.jsonl").write_text('{"x": 1}\n')
    os.chmod(path, 0o750)
    return tree(path)


def test_foreign_directory_is_refused_and_left_untouched(model, tmp_path):
    project = tmp_path / "project"
    before = user_project(project)
    with pytest.raises(FileExistsError, match=r"not empty and not a quantization-wrapper checkpoint.*train\.py.*overwrite=True"):
        qw.save_quantized_model(model, project)
    assert tree(project) == before
    assert stat.S_IMODE(os.stat(project).st_mode) == 0o750
    assert leftovers(tmp_path) == []


def test_overwrite_keeps_every_file_the_package_did_not_write(model, reference, tmp_path):
    project = tmp_path / "project"
    before = user_project(project)
    qw.save_quantized_model(model, project, overwrite=True)
    after = tree(project)
    assert {k: after[k] for k in before} == before  # every user file, same bytes
    assert {"model.safetensors", "quantization_config.json", "config.json"} <= set(after)
    assert stat.S_IMODE(os.stat(project).st_mode) == 0o750  # the directory keeps its permissions
    assert torch.equal(logits(qw.load_quantized_model(project)), reference)
    # Saving again (now it is our checkpoint) still keeps them, without overwrite.
    qw.save_quantized_model(model, project)
    assert {k: tree(project)[k] for k in before} == before
    assert leftovers(tmp_path) == []


def test_files_added_to_our_checkpoint_survive_a_resave(model, reference, tmp_path):
    path = tmp_path / "ckpt"
    qw.save_quantized_model(model, path, max_shard_size="100KB")
    shards = sorted(p.name for p in path.glob("model-*.safetensors"))
    assert len(shards) > 1
    (path / "tokenizer.json").write_text("{}")
    (path / "README.md").write_text("# my model\n")
    qw.save_quantized_model(model, path)  # one file now: the old shards were ours and go
    names = set(os.listdir(path))
    assert {"tokenizer.json", "README.md", "model.safetensors"} <= names
    assert not names & set(shards) and "model.safetensors.index.json" not in names
    assert (path / "README.md").read_text() == "# my model\n"
    assert torch.equal(logits(qw.load_quantized_model(path)), reference)


def test_a_user_file_named_like_ours_in_our_checkpoint_needs_overwrite(model, tmp_path):
    path = tmp_path / "ckpt"
    qw.save_quantized_model(model, path)
    (path / "quantization_map.json").write_text('{"mine": true}')  # not in the description
    with pytest.raises(FileExistsError, match="quantization_map.json"):
        qw.save_quantized_model(model, path)
    assert (path / "quantization_map.json").read_text() == '{"mine": true}'


def test_new_directory_gets_the_usual_permissions(model, tmp_path):
    qw.save_quantized_model(model, tmp_path / "new")
    os.mkdir(tmp_path / "plain")
    assert stat.S_IMODE(os.stat(tmp_path / "new").st_mode) == stat.S_IMODE(os.stat(tmp_path / "plain").st_mode)
    want = stat.S_IMODE(os.stat(tmp_path / "plain").st_mode) & 0o666
    for f in (tmp_path / "new").iterdir():
        assert stat.S_IMODE(f.stat().st_mode) == want, f.name


def test_empty_directory_and_symlinked_target(model, reference, tmp_path):
    (tmp_path / "empty").mkdir()
    qw.save_quantized_model(model, tmp_path / "empty")
    assert torch.equal(logits(qw.load_quantized_model(tmp_path / "empty")), reference)
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "link").symlink_to(real)
    qw.save_quantized_model(model, tmp_path / "link")
    assert (tmp_path / "link").is_symlink()  # the user's link stays a link
    assert (real / "model.safetensors").is_file()


def test_never_written_into_the_source_checkpoint(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    from reliability.common import CFG

    src = tmp_path / "hf"
    LlamaForCausalLM(LlamaConfig(**CFG)).save_pretrained(src)
    before = tree(src)
    model = qw.load_and_quantize(src, qw.QuantizationConfig(method="hqq", bits=4, group_size=32),
                                 backend="cpu", progress=False)
    for overwrite in (False, True):
        with pytest.raises(ValueError, match="the model was read from"):
            qw.save_quantized_model(model, src, overwrite=overwrite)
    assert tree(src) == before


def test_working_directory_is_refused_with_a_clear_message(model, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mine.txt").write_text("x")
    for target in (".", str(tmp_path), ".."):
        with pytest.raises(ValueError, match="current working directory"):
            qw.save_quantized_model(model, target, overwrite=True)
    assert os.listdir(tmp_path) == ["mine.txt"]


def test_single_file_rules(model, reference, tmp_path):
    foreign = tmp_path / "weights.safetensors"
    foreign.write_bytes(b"not ours")
    with pytest.raises(FileExistsError, match="not written by quantization-wrapper"):
        qw.save_quantized_model(model, foreign, single_file=True)
    assert foreign.read_bytes() == b"not ours"
    qw.save_quantized_model(model, foreign, single_file=True, overwrite=True)
    qw.save_quantized_model(model, foreign, single_file=True)  # ours now
    assert torch.equal(logits(qw.load_quantized_model(foreign)), reference)
    assert stat.S_IMODE(foreign.stat().st_mode) == 0o666 & ~_umask()
    assert leftovers(tmp_path) == []


def _umask() -> int:
    probe = Path(os.path.realpath(os.getcwd()))  # read the umask without changing it
    out = subprocess.run(["sh", "-c", "umask"], capture_output=True, text=True, cwd=probe)
    return int(out.stdout.strip(), 8)


def test_full_disk_leaves_the_previous_checkpoint(model, reference, tmp_path, monkeypatch):
    import errno

    from quantization_wrapper.checkpoint import safetensors_io

    path = tmp_path / "ckpt"
    qw.save_quantized_model(model, path)
    before = tree(path)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safetensors_io, "pwrite_all", full)  # where every tensor byte is written
    with pytest.raises(OSError, match="no space left .* nothing was changed"):
        qw.save_quantized_model(model, path)
    assert tree(path) == before and leftovers(tmp_path) == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_read_only_parent_is_a_clear_error(model, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    os.chmod(ro, 0o555)
    try:
        with pytest.raises(PermissionError):
            qw.save_quantized_model(model, ro / "ckpt")
    finally:
        os.chmod(ro, 0o755)


# ------------------------------------------------------------------------ crashes in a child
CHILD = textwrap.dedent("""
    import os, sys, time, warnings
    warnings.simplefilter("ignore")
    sys.path.insert(0, {root!r} + "/tests")
    from reliability.common import quantized_model
    import quantization_wrapper as qw
    from quantization_wrapper.checkpoint import files as checkpoint_dir
    model = quantized_model(seed={seed})
    mode = {mode!r}
    if mode == "between_renames":
        checkpoint_dir._exchange = lambda a, b: False     # the fallback commit: rename aside, then in
        real_rename = os.rename
        def rename(src, dst):
            real_rename(src, dst)
            if os.fspath(src) == {path!r}:
                os._exit(9)                               # killed after the first rename
        os.rename = rename
        qw.save_quantized_model(model, {path!r})
    elif mode == "before_commit":
        qw.save_quantized_model(model, {path!r}, _before_commit=lambda staging: os._exit(9))
    elif mode == "loop":
        print("ready", flush=True)
        while True:
            qw.save_quantized_model(model, {path!r})
""")


def run_child(path: Path, mode: str, seed: int = 1, **kwargs) -> subprocess.Popen:
    root = str(Path(__file__).resolve().parents[2])
    code = CHILD.format(root=root, seed=seed, mode=mode, path=str(path))
    return subprocess.Popen([sys.executable, "-c", code], cwd=root, **kwargs)


def test_kill_between_the_two_renames_is_recovered_by_load(model, reference, tmp_path):
    path = tmp_path / "ckpt"
    qw.save_quantized_model(model, path)
    assert run_child(path, "between_renames").wait(120) == 9
    assert not path.exists()  # the window the fallback commit has
    assert [n for n in os.listdir(tmp_path) if ".qw-old-" in n]
    assert torch.equal(logits(qw.load_quantized_model(path)), reference)  # the load puts it back
    qw.save_quantized_model(model, path)  # and the next save clears the rest
    assert leftovers(tmp_path) == []


def test_killed_save_leaves_staging_that_the_next_load_removes(model, reference, tmp_path):
    path = tmp_path / "ckpt"
    qw.save_quantized_model(model, path)
    assert run_child(path, "before_commit").wait(120) == 9
    assert [n for n in os.listdir(tmp_path) if ".qw-staging-" in n]
    assert torch.equal(logits(qw.load_quantized_model(path)), reference)
    assert leftovers(tmp_path) == []


def test_exchange_commit_has_no_window(model, tmp_path, monkeypatch):
    """With renameat2 the path always holds a checkpoint: watch it from another thread."""
    path = tmp_path / "ckpt"
    qw.save_quantized_model(model, path)
    seen_missing = []
    stop = threading.Event()

    def watch():
        while not stop.is_set():
            if not (path / "quantization_config.json").exists():
                seen_missing.append(1)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        for _ in range(5):
            qw.save_quantized_model(model, path)
    finally:
        stop.set()
        watcher.join()
    (tmp_path / "probe-a").mkdir()
    (tmp_path / "probe-b").mkdir()
    if checkpoint_dir._exchange(tmp_path / "probe-a", tmp_path / "probe-b") is False:
        pytest.skip("this file system has no atomic exchange")
    assert seen_missing == []


def test_kill_9_at_random_points_leaves_old_or_new(model, reference, tmp_path):
    path = tmp_path / "ckpt"
    qw.save_quantized_model(model, path)
    other = logits(quantized_model(seed=1))
    child = run_child(path, "loop", stdout=subprocess.PIPE)
    assert child.stdout.readline().strip() == b"ready"
    import random
    import time

    time.sleep(random.uniform(0.2, 1.5))
    child.kill()
    child.wait()
    out = logits(qw.load_quantized_model(path))
    assert torch.equal(out, reference) or torch.equal(out, other)
    qw.save_quantized_model(model, path)
    assert leftovers(tmp_path) == []


def test_concurrent_saves_to_one_path(model, reference, tmp_path):
    path = tmp_path / "ckpt"
    models = [model, quantized_model(seed=1)]
    barrier = threading.Barrier(4)
    errors = []

    def save(i):
        barrier.wait()
        try:
            qw.save_quantized_model(models[i % 2], path)
        except Exception as e:  # pragma: no cover - the assertion below shows it
            errors.append(e)

    threads = [threading.Thread(target=save, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    out = logits(qw.load_quantized_model(path))
    assert torch.equal(out, reference) or torch.equal(out, logits(models[1]))
    assert leftovers(tmp_path) == []


def test_recover_never_deletes_foreign_files_left_in_a_staging_directory(tmp_path):
    path = tmp_path / "ckpt"
    stray = tmp_path / f".ckpt{checkpoint_dir._STAGING}12345-dead"
    stray.mkdir()
    (stray / checkpoint_dir._LOCK_NAME).write_bytes(b"")  # a save that died while writing (lock free)
    (stray / "model.safetensors").write_bytes(b"partial")
    (stray / "my-notes.txt").write_text("keep")
    with pytest.warns(UserWarning, match="did not write"):
        checkpoint_dir.recover(path)
    assert not (stray / "model.safetensors").exists()
    assert (stray / "my-notes.txt").read_text() == "keep"


def test_max_shard_size_must_be_positive(model, tmp_path):
    for bad in ("-5MB", 0, "0.5B", "nanGB", "lots"):
        with pytest.raises(ValueError, match="max_shard_size"):
            qw.save_quantized_model(model, tmp_path / "x", max_shard_size=bad)
    assert not (tmp_path / "x").exists()


def test_description_is_written_last_and_lists_every_file(model, tmp_path):
    path = qw.save_quantized_model(model, tmp_path / "ckpt", max_shard_size="100KB")
    info = json.loads((path / "quantization_config.json").read_text())
    assert set(info["files"]) == set(os.listdir(path)) - {"quantization_config.json"}


def test_overwrite_replaces_same_named_files_and_leaves_nothing_behind(model, reference, tmp_path):
    project = tmp_path / "project"
    project.mkdir()
    (project / "config.json").write_text('{"model_type": "mine"}')
    (project / "keep.txt").write_text("keep")
    qw.save_quantized_model(model, project, overwrite=True)
    assert json.loads((project / "config.json").read_text())["model_type"] == "llama"
    assert (project / "keep.txt").read_text() == "keep"
    assert leftovers(tmp_path) == []
    assert torch.equal(logits(qw.load_quantized_model(project)), reference)


def test_a_foreign_file_named_like_our_description_makes_nothing_ours(model, tmp_path):
    """Another tool's quantization_config.json (or a crafted one listing the user's files) does not
    make the directory ours: the save refuses, and nothing listed in it is deleted."""
    project = tmp_path / "project"
    project.mkdir()
    (project / "notes.txt").write_text("mine")
    (project / "quantization_config.json").write_text(json.dumps({"bits": 4, "files": {"notes.txt": {"size": 4}}}))
    with pytest.raises(FileExistsError, match="not a quantization-wrapper checkpoint"):
        qw.save_quantized_model(model, project)
    crafted = {"format": "quantization-wrapper", "files": {"notes.txt": {"size": 4}}}
    (project / "quantization_config.json").write_text(json.dumps(crafted))
    (project / "notes.txt").write_text("mine, edited")  # its size no longer matches the record
    qw.save_quantized_model(model, project)
    assert (project / "notes.txt").read_text() == "mine, edited"


def test_recover_puts_back_a_renamed_aside_directory_of_any_content(tmp_path):
    """A fallback commit killed between its renames, over a directory of the user's files."""
    path = tmp_path / "project"
    aside = tmp_path / f".project{checkpoint_dir._OLD}999-dead"
    aside.mkdir()
    (aside / "train.py").write_text("x")
    checkpoint_dir.recover(path)
    assert (path / "train.py").read_text() == "x" and not aside.exists()


def test_a_user_file_named_like_our_temporaries_stays_in_place(model, tmp_path):
    path = tmp_path / "ckpt"
    qw.save_quantized_model(model, path)
    (path / ".qw-mine").write_text("keep")
    qw.save_quantized_model(model, path)
    assert (path / ".qw-mine").read_text() == "keep" and leftovers(tmp_path) == []
