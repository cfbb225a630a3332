"""Malformed and hostile checkpoints (tests/hostile.py): each is one named CheckpointError, and the CLI
prints one line and exits with its input-error code, never a traceback."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from cli_runner import run_cli
from hostile import HEADER_CASES, index_cases, write_corpus
from models import write_model
from nufilt_daemon.cli import main

from nufilt_core.checkpoint import Checkpoint
from nufilt_core.errors import CheckpointError, NufiltError
from nufilt_core.merge import MergeRequest, merge_step

# entries whose only fault is a link or a FIFO beside valid weights: `nufilt merge` follows the
# links a user gives it (like cp); the daemon's inbox and `nufilt submit` refuse them (strict)
LINK_ONLY = {"outside-link.safetensors", "config-link", "weights-link", "tokenizer-link", "fifo-inside",
             "dir-link-inside", "idx-shard-link", "etc-link", "hardlink-inside"}


@pytest.fixture
def corpus(tiny: dict[str, Path], tmp_path: Path) -> tuple[Path, dict[str, str]]:
    folder = tmp_path / "corpus"
    return folder, write_corpus(folder, tiny["t1"], tmp_path / "outside")


def test_the_corpus_is_big_enough():
    assert len(HEADER_CASES) + len(index_cases(Path("/x"))) >= 30


def test_every_entry_is_one_checkpoint_error_naming_the_file(corpus: tuple[Path, dict[str, str]]):
    folder, expect = corpus
    assert set(expect) == {p.name for p in folder.iterdir()}
    for name, fragment in expect.items():
        with pytest.raises(CheckpointError) as info:
            Checkpoint.open(folder / name, strict=True)
        message = str(info.value)
        assert name in message and fragment.lower() in message.lower(), (name, message)
        if name.startswith(("dtype-", "shape-", "entry-", "no-", "offsets-")) and name != "offsets-overlap.safetensors":
            assert "tensor 't'" in message, message  # the tensor is named where there is one
    # without strict, only links to regular files are followed; FIFOs, devices and sockets never are
    for name in sorted(set(expect) - LINK_ONLY):
        with pytest.raises(CheckpointError):
            Checkpoint.open(folder / name)


def test_nufilt_merge_and_submit_print_one_line_for_each(corpus: tuple[Path, dict[str, str]], tiny: dict[str, Path],
                                                         tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                         monkeypatch: pytest.MonkeyPatch):
    folder, expect = corpus
    inbox = tmp_path / "inbox"
    for k in [k for k in os.environ if k.startswith("NUFILT_")]:
        monkeypatch.delenv(k)
    monkeypatch.setenv("NUFILT_WATCH_DIR", str(inbox))
    for name in expect:
        commands = [["submit", str(folder / name)]]
        if name not in LINK_ONLY:
            commands.append(["merge", "--base", str(tiny["base"]), "--checkpoint", str(folder / name),
                             "--output", str(tmp_path / "out"), "--quiet"])
        for argv in commands:
            rc = main(argv)
            err = capsys.readouterr().err
            assert rc == 1, (argv, err)
            lines = err.strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith("nufilt: error: ") and name in lines[0], (argv, err)
    assert not (tmp_path / "out").exists()
    assert not inbox.exists() or list(inbox.iterdir()) == []  # nothing submitted, no temporary copy left
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # main() installed its handler in this process


def test_the_real_command_never_prints_a_traceback(corpus: tuple[Path, dict[str, str]], tiny: dict[str, Path],
                                                   tmp_path: Path):
    folder, _ = corpus
    for name in ("dtype-list.safetensors", "nested.safetensors", "fifo.safetensors", "idx-int-name"):
        proc = run_cli("merge", "--base", tiny["base"], "--checkpoint", folder / name, "--output",
                       tmp_path / "out", check=False)
        assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
        assert proc.stderr.count("\n") == 1 and name in proc.stderr
    proc = run_cli("inspect", folder / "devzero.safetensors", check=False)
    assert proc.returncode == 1 and "character device" in proc.stderr and "Traceback" not in proc.stderr


def test_valid_inputs_still_open_the_same_way(tiny: dict[str, Path], tmp_path: Path):
    from models import base_state

    sharded = write_model(base_state(seed=3), tmp_path / "sharded", shards=3)
    for path in (tiny["t1"], tiny["t1"] / "model.safetensors", sharded, sharded / "model.safetensors.index.json"):
        assert Checkpoint.open(path, strict=True).tensors.keys() == Checkpoint.open(path).tensors.keys()
    # the CLI, unlike the inbox, still follows a link the user names (e.g. the Hugging Face cache)
    os.symlink(tiny["t1"] / "model.safetensors", tmp_path / "linked.safetensors")
    assert len(Checkpoint.open(tmp_path / "linked.safetensors").tensors) == len(Checkpoint.open(tiny["t1"]).tensors)
    with pytest.raises(CheckpointError, match="symbolic link"):
        Checkpoint.open(tmp_path / "linked.safetensors", strict=True)


def test_a_shard_outside_the_index_folder_is_never_read(tiny: dict[str, Path], tmp_path: Path):
    """Path traversal in model.safetensors.index.json: refused before any shard is opened."""
    import json

    d = tmp_path / "traversal"
    d.mkdir()
    names = list(Checkpoint.open(tiny["t1"]).tensors)
    assert (d / "../t1/model.safetensors").is_file()  # a valid shard really is there
    (d / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {n: "../t1/model.safetensors" for n in names}}))
    with pytest.raises(NufiltError, match="not a plain file name"):
        merge_step(MergeRequest(base=tiny["base"], checkpoint=d, output=tmp_path / "out"))


def test_sigterm_during_nufilt_merge_leaves_no_temporary_folder(tmp_path: Path):
    g = torch.Generator().manual_seed(0)
    base = {f"layers.{i}.attn.q_proj.weight": torch.randn(256, 256, generator=g) for i in range(6)}
    b = write_model(base, tmp_path / "base")
    t1, t2 = (write_model({k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in base.items()}, tmp_path / n)
              for n in ("t1", "t2"))
    m1, out = tmp_path / "m1", tmp_path / "work" / "m2"
    exe = Path(sys.executable).parent / "nufilt"
    # SIGTERM during step 2: step 1 only copies the checkpoint, so it can finish before the poll sees it
    subprocess.run([str(exe), "merge", "--base", str(b), "--checkpoint", str(t1), "--output", str(m1), "--quiet"],
                   check=True)
    proc = subprocess.Popen([str(exe), "merge", "--base", str(b), "--previous", str(m1), "--checkpoint", str(t2),
                             "--output", str(out), "--iters", "100000"], stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONFAULTHANDLER": "1"})
    deadline = time.monotonic() + 120
    while not (out.parent.is_dir() and any(".tmp-" in p.name for p in out.parent.iterdir())):
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.1)
    # at this moment SciPy's first import used to swallow the signal now and then (nufilt_core/interrupts.py)
    proc.send_signal(signal.SIGTERM)
    try:
        _, err = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGABRT)  # faulthandler prints where every thread is
        pytest.fail("no exit within 120 s of SIGTERM:\n" + proc.communicate()[1][-6000:])
    assert proc.returncode == 130 and "interrupted" in err
    assert list(out.parent.iterdir()) == []  # neither the output nor its hidden temporary


def test_a_malformed_lineage_record_of_previous_is_one_line(tiny: dict[str, Path], tmp_path: Path):
    from nufilt_core.checkpoint import LINEAGE_NAME

    for i, text in enumerate(("[1, 2]", "[" * 100_000 + "]" * 100_000, '{"format": 1, "base": 3}')):
        prev = tmp_path / f"prev{i}"
        prev.mkdir()
        (prev / "model.safetensors").write_bytes((tiny["t1"] / "model.safetensors").read_bytes())
        (prev / LINEAGE_NAME).write_text(text)
        rc = main(["merge", "--base", str(tiny["base"]), "--previous", str(prev), "--checkpoint", str(tiny["t2"]),
                   "--output", str(tmp_path / "out"), "--quiet"])
        assert rc == 1 and not (tmp_path / "out").exists()
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def test_sigterm_during_nufilt_submit_leaves_no_temporary_copy(tiny: dict[str, Path], tmp_path: Path):
    import shutil

    src = tmp_path / "many"
    shutil.copytree(tiny["t1"], src)
    for i in range(3000):  # a copy that takes a while
        (src / f"extra-{i:04d}.txt").write_bytes(b"x" * 2048)
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("NUFILT_")}
    exe = Path(sys.executable).parent / "nufilt"
    proc = subprocess.Popen([str(exe), "submit", str(src)], stderr=subprocess.PIPE, text=True,
                            env={**env, "NUFILT_WATCH_DIR": str(inbox)})
    deadline = time.monotonic() + 60
    while not any(p.name.startswith("tmp-") for p in inbox.iterdir()):
        assert proc.poll() is None and time.monotonic() < deadline, "the copy ended before it could be interrupted"
        time.sleep(0.005)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "interrupted" in err
    assert list(inbox.iterdir()) == []  # no hidden half copy for the daemon to trip over


def test_an_invalid_include_pattern_is_one_line_with_the_settings(tiny: dict[str, Path], tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]):
    rc = main(["merge", "--base", str(tiny["base"]), "--checkpoint", str(tiny["t1"]), "--output",
               str(tmp_path / "out"), "--include", "(", "--quiet"])
    err = capsys.readouterr().err
    assert rc == 1 and err.count("\n") == 1 and "not a valid regular expression" in err and "'('" in err
    assert not (tmp_path / "out").exists()


def test_a_reader_that_closes_the_pipe_gets_no_traceback(tiny: dict[str, Path]):
    exe = Path(sys.executable).parent / "nufilt"
    proc = subprocess.Popen([str(exe), "inspect", str(tiny["t1"])], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # as `nufilt ... | head -0` would: every write meets a closed pipe
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 0 and err == ""


def test_submit_refuses_a_pickle_at_once_with_the_conversion_command(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                                      monkeypatch: pytest.MonkeyPatch):
    for k in [k for k in os.environ if k.startswith("NUFILT_")]:
        monkeypatch.delenv(k)
    monkeypatch.setenv("NUFILT_WATCH_DIR", str(tmp_path / "inbox"))
    folder = tmp_path / "hf-folder"
    folder.mkdir()
    (folder / "pytorch_model.bin").write_bytes(b"not unpickled")
    (folder / "config.json").write_text("{}")
    for path in (folder, folder / "pytorch_model.bin"):
        rc = main(["submit", str(path)])
        err = capsys.readouterr().err
        assert rc == 1 and "pickle" in err and "safetensors.torch as st; st.save_file(" in err, err
    assert not (tmp_path / "inbox").exists() or list((tmp_path / "inbox").iterdir()) == []
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # main() installed its handler in this process


def test_two_submits_under_one_name_never_lose_a_checkpoint(tiny: dict[str, Path], tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str],
                                                            monkeypatch: pytest.MonkeyPatch):
    """Two trainers submit a `model.safetensors` each: the second one to finish its copy finds the name taken
    and fails, instead of its rename silently replacing the first one's checkpoint. The interleaving is made
    for real: while this process's submit has copied and not yet renamed, another `nufilt submit` runs."""
    import nufilt_daemon.submit as submit

    for k in [k for k in os.environ if k.startswith("NUFILT_")]:
        monkeypatch.delenv(k)
    inbox = tmp_path / "inbox"
    monkeypatch.setenv("NUFILT_WATCH_DIR", str(inbox))
    copied = submit._fsync_tree

    def then_another_submit(path: Path) -> None:
        copied(path)
        run_cli("submit", tiny["t2"] / "model.safetensors")  # the other trainer, done first

    monkeypatch.setattr(submit, "_fsync_tree", then_another_submit)
    rc = main(["submit", str(tiny["t1"] / "model.safetensors")])
    err = capsys.readouterr().err
    assert rc == 1 and "already in the inbox" in err, err
    assert sorted(p.name for p in inbox.iterdir()) == ["model.safetensors"]  # no temporary copy left
    assert (inbox / "model.safetensors").read_bytes() == (tiny["t2"] / "model.safetensors").read_bytes()
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # main() installed its handler in this process


def test_submit_hands_the_daemon_group_readable_copies(tiny: dict[str, Path], tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch):
    """safetensors saves 0600 and a trainer's umask may be 077: the copy `submit` puts in a shared inbox is
    readable by the daemon's group anyway, and its folder writable by it (to move it out once journaled)."""
    for k in [k for k in os.environ if k.startswith("NUFILT_")]:
        monkeypatch.delenv(k)
    monkeypatch.setenv("NUFILT_WATCH_DIR", str(tmp_path / "inbox"))
    private = Path(shutil.copytree(tiny["t1"], tmp_path / "private"))
    for p in private.iterdir():
        p.chmod(0o600)
    private.chmod(0o700)
    assert main(["submit", str(private), "--name", "task1"]) == 0
    copy = tmp_path / "inbox" / "task1"
    assert copy.stat().st_mode & 0o070 == 0o070
    assert all(p.stat().st_mode & 0o040 for p in copy.iterdir())
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # main() installed its handler in this process


def test_the_demo_models_are_written_as_ordinary_files(tmp_path: Path):
    run_cli("demo", tmp_path / "demo")
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "demo/base/model.safetensors").stat().st_mode & 0o777 == 0o666 & ~umask
