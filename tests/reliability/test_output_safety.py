"""Outputs never cost the user data: guarded targets, one writer per output, atomic replacement, file modes.

Cases 1 (data loss), 4 (concurrent runs), 8 (full disk, unwritable parent), 9 (leftovers of killed
runs) and 10 (file modes) of the hostile-inputs issue.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors import SafetensorError

from quantkit import outputs
from quantkit.errors import EnvironmentFault, QuantkitError
from quantkit.model.checkpoint import DEMO_MODEL_DIR
from quantkit.outputs import atomic_directory
from tests.test_cli import assert_one_line_error, run

QUANTIZE = ("--method", "absmax", "--bits", "4", "--group-size", "32")


def tree(path: Path) -> dict[str, bytes]:
    """Every file below ``path`` with its bytes: what must stay untouched."""
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.fixture
def workspace(tiny_models: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A user's directory: a model, notes and a folder of their own; the working directory."""
    shutil.copytree(tiny_models["qwen2_moe"], tmp_path / "model")
    (tmp_path / "notes.txt").write_text("mine\n")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "data.bin").write_bytes(b"\x00\x01")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_out_dot_with_overwrite_keeps_the_directory(workspace: Path) -> None:
    before = tree(workspace)
    code, _, err = run("quantize", "model", *QUANTIZE, "--out", ".", "--overwrite")
    assert_one_line_error(code, err, "refusing to write to .", "current directory")
    assert tree(workspace) == before


def test_out_parent_of_working_directory_is_refused(workspace: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(workspace / "mine")
    before = tree(workspace)
    code, _, err = run("quantize", "../model", *QUANTIZE, "--out", "..", "--overwrite")
    assert_one_line_error(code, err, "current directory or one of its parents")
    assert tree(workspace) == before


@pytest.mark.parametrize("out", ["model", "model/quantized", "."])
def test_out_is_or_is_inside_the_model_is_refused(workspace: Path, out: str) -> None:
    model = workspace / "model"
    before = tree(workspace)
    code, _, err = run("quantize", model, *QUANTIZE, "--out", workspace / out, "--overwrite")
    assert code == 2
    assert "refusing to write to" in err
    assert tree(workspace) == before


def test_out_containing_the_model_is_refused(workspace: Path) -> None:
    shutil.copytree(workspace / "model", workspace / "mine" / "model")
    before = tree(workspace)
    code, _, err = run("quantize", workspace / "mine" / "model", *QUANTIZE, "--out", workspace / "mine",
                       "--overwrite")
    assert_one_line_error(code, err, "contains or lies inside")
    assert tree(workspace) == before


def test_overwrite_refuses_a_regular_file_and_leaves_no_old_copy(workspace: Path) -> None:
    before = tree(workspace)
    code, _, err = run("quantize", "model", *QUANTIZE, "--out", "notes.txt", "--overwrite")
    assert_one_line_error(code, err, "refusing to replace notes.txt", "not a quantkit output directory")
    assert tree(workspace) == before
    assert not [p for p in workspace.iterdir() if p.name.startswith(".")]


def test_overwrite_refuses_a_directory_that_is_not_a_quantkit_output(workspace: Path) -> None:
    before = tree(workspace)
    code, _, err = run("quantize", "model", *QUANTIZE, "--out", "mine", "--overwrite")
    assert_one_line_error(code, err, "refusing to replace mine", "not a quantkit output")
    assert tree(workspace) == before


def test_overwrite_replaces_a_previous_quantkit_output(workspace: Path) -> None:
    assert run("quantize", "model", *QUANTIZE, "--out", "q")[0] == 0
    (workspace / "q" / "stale.txt").write_text("from the first run")
    code, out, err = run("quantize", "model", "--method", "absmax", "--bits", "8", "--out", "q", "--overwrite")
    assert code == 0, err
    assert "wrote q" in out
    assert not (workspace / "q" / "stale.txt").exists()  # the whole previous output was replaced
    assert sorted(p.name for p in workspace.iterdir()) == ["mine", "model", "notes.txt", "q"]


def test_calibration_directory_read_by_the_run_is_not_replaced(workspace: Path) -> None:
    assert run("calibrate", DEMO_MODEL_DIR, "--num-samples", "2", "--seq-len", "32", "--out", "calib")[0] == 0
    before = tree(workspace / "calib")
    code, _, err = run("quantize", DEMO_MODEL_DIR, "--preset", "Q4_K_M", "--calibration", "calib", "--out", "calib",
                       "--overwrite")
    assert_one_line_error(code, err, "refusing to write to calib", "which this run reads")
    assert tree(workspace / "calib") == before


def test_parents_created_for_a_failed_output_are_removed(workspace: Path) -> None:
    with pytest.raises(QuantkitError), atomic_directory(workspace / "new" / "deep" / "out"):
        raise QuantkitError("fails inside")
    assert not (workspace / "new").exists()


# ---- one writer per output -------------------------------------------------------------------------------

def test_second_writer_is_refused_while_the_first_holds_the_lock(workspace: Path) -> None:
    with atomic_directory(workspace / "q") as tmp:
        (tmp / "quantkit_report.json").write_text("{}")
        code, _, err = run("quantize", "model", *QUANTIZE, "--out", "q")
        assert_one_line_error(code, err, f"another quantkit run (pid {os.getpid()}) is writing")
    assert (workspace / "q" / "quantkit_report.json").read_text() == "{}"  # the first result survives


HOLD_LOCK = """
import sys, time
from quantkit.outputs import atomic_directory
with atomic_directory(sys.argv[1]) as tmp:
    (tmp / "half-written.safetensors").write_bytes(b"x" * 1000)
    print("ready", flush=True)
    time.sleep(600)
"""


def test_killed_writer_blocks_nothing_and_its_leftovers_are_cleaned(workspace: Path) -> None:
    writer = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(workspace / "q")], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert writer.stdout is not None and writer.stdout.readline().strip() == "ready"
        code, _, err = run("quantize", "model", *QUANTIZE, "--out", "q")
        assert_one_line_error(code, err, f"another quantkit run (pid {writer.pid}) is writing")
    finally:
        writer.kill()
        writer.wait()
    leftovers = sorted(p.name for p in workspace.iterdir() if p.name.startswith("."))
    assert leftovers == [f".q.partial-{writer.pid}", ".q.quantkit-lock"]  # what SIGKILL leaves
    code, out, err = run("quantize", "model", *QUANTIZE, "--out", "q", "--json")
    assert code == 0, err
    assert not [p for p in workspace.iterdir() if p.name.startswith(".")]
    notes = " ".join(__import__("json").loads(out)["notes"])
    assert f"removed .q.partial-{writer.pid}" in notes and f"lock .q.quantkit-lock of pid {writer.pid}" in notes


TERMINATE_WHILE_WRITING = """
import sys, time
import quantkit.formats.sharded as sharded
from quantkit.cli import app

def slow_add(self, name, tensor):
    print("writing", flush=True)
    time.sleep(600)

sharded.ShardedWriter.add = slow_add
app(["quantize", sys.argv[1], "--method", "absmax", "--bits", "4", "--group-size", "32", "--out", sys.argv[2]])
"""


def test_sigterm_mid_run_exits_143_and_leaves_nothing(workspace: Path) -> None:
    process = subprocess.Popen([sys.executable, "-c", TERMINATE_WHILE_WRITING, "model", "q"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert process.stdout is not None and process.stdout.readline().strip() == "writing"
    assert any(p.name.startswith(".q.partial-") for p in workspace.iterdir())
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 143, err
    assert "terminated" in err and "Traceback" not in err
    assert sorted(p.name for p in workspace.iterdir()) == ["mine", "model", "notes.txt"]


# ---- crash during replacement ------------------------------------------------------------------------------

def test_crash_between_the_two_renames_is_repaired_by_the_next_run(workspace: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Where no atomic exchange exists, a crash between parking the old output and moving the new one in
    leaves the old one at .OUT.old-<pid>; the next run puts it back before anything else."""
    out = workspace / "q"
    with atomic_directory(out) as tmp:
        (tmp / "quantkit_report.json").write_text("old")
    monkeypatch.setattr(outputs, "_exchange", lambda a, b: False)
    real_replace = os.replace

    def crash_on_second_rename(src: object, dst: object) -> None:
        if Path(str(dst)) == out:
            raise KeyboardInterrupt  # the process dies here
        real_replace(src, dst)  # type: ignore[arg-type]

    monkeypatch.setattr(outputs.os, "replace", crash_on_second_rename)
    with pytest.raises(KeyboardInterrupt), atomic_directory(out, overwrite=True) as tmp:
        (tmp / "quantkit_report.json").write_text("new")
    monkeypatch.setattr(outputs.os, "replace", real_replace)
    assert not out.exists() and (workspace / f".q.old-{os.getpid()}" / "quantkit_report.json").read_text() == "old"
    notes: list[str] = []
    with pytest.raises(QuantkitError, match="already exists"), atomic_directory(out, notes=notes):
        pass
    assert (out / "quantkit_report.json").read_text() == "old"
    assert notes and "restored the previous output q" in notes[0]


def test_atomic_exchange_swaps_directories() -> None:
    import tempfile

    with tempfile.TemporaryDirectory() as root:
        a, b = Path(root, "a"), Path(root, "b")
        a.mkdir()
        b.mkdir()
        (a / "x").write_text("a")
        (b / "x").write_text("b")
        if not outputs._exchange(a, b):
            pytest.skip("renameat2(RENAME_EXCHANGE) is not available on this system")
        assert ((a / "x").read_text(), (b / "x").read_text()) == ("b", "a")


# ---- environment faults -----------------------------------------------------------------------------------

def test_full_disk_is_one_line_exit_1_and_leaves_nothing(workspace: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_space(*args: object, **kwargs: object) -> None:
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(outputs, "save_file", no_space)
    code, _, err = run("quantize", "model", *QUANTIZE, "--out", "q")
    lines = err.strip().splitlines()
    assert code == 1 and len(lines) == 1 and "No space left on device" in lines[0], err
    assert sorted(p.name for p in workspace.iterdir()) == ["mine", "model", "notes.txt"]


def test_full_tmpfs_is_one_line_exit_1_and_leaves_nothing(workspace: Path) -> None:
    """A real full disk: a 256 KiB tmpfs (needs root and mount; skipped otherwise)."""
    disk = workspace / "small"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(disk)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        code, _, err = run("quantize", "model", "--method", "fp16", "--out", disk / "q")
        lines = err.strip().splitlines()
        assert code == 1 and len(lines) == 1 and "No space left on device" in lines[0], err
        assert list(disk.iterdir()) == []
    finally:
        subprocess.run(["umount", str(disk)], check=True)


def test_unwritable_parent_is_one_line_exit_1(workspace: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """EACCES injected where the lock file is created (root ignores directory modes)."""
    real_open = os.open

    def denied(path: object, *args: object, **kwargs: object) -> int:
        if str(path).endswith(".quantkit-lock"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(outputs.os, "open", denied)
    code, _, err = run("quantize", "model", *QUANTIZE, "--out", "q")
    lines = err.strip().splitlines()
    assert code == 1 and len(lines) == 1 and "Permission denied" in lines[0], err
    assert sorted(p.name for p in workspace.iterdir()) == ["mine", "model", "notes.txt"]


def test_environment_fault_class_exits_1() -> None:
    assert EnvironmentFault("x").exit_code == 1 and QuantkitError("x").exit_code == 2


# ---- file modes --------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("umask", "file_mode", "dir_mode"), [(0o022, 0o644, 0o755), (0o027, 0o640, 0o750)])
def test_outputs_get_the_modes_of_the_umask(workspace: Path, umask: int, file_mode: int, dir_mode: int) -> None:
    previous = os.umask(umask)
    try:
        assert run("quantize", "model", *QUANTIZE, "--max-shard-size", "20KB", "--out", "q")[0] == 0
        assert run("calibrate", DEMO_MODEL_DIR, "--num-samples", "2", "--seq-len", "32", "--out", "calib",
                   "--imatrix-out", "imatrix.gguf")[0] == 0
    finally:
        os.umask(previous)
    written = [*(workspace / "q").rglob("*"), *(workspace / "calib").rglob("*"), workspace / "imatrix.gguf"]
    assert any(p.name.endswith(".safetensors") for p in written)
    for path in written:
        expected = dir_mode if path.is_dir() else file_mode
        assert path.stat().st_mode & 0o777 == expected, (path, oct(path.stat().st_mode))
    for path in (workspace / "q", workspace / "calib"):
        assert path.stat().st_mode & 0o777 == dir_mode


# ---- single-file outputs -----------------------------------------------------------------------------------

def test_gguf_overwrite_replaces_only_a_quantkit_gguf(workspace: Path) -> None:
    (workspace / "foreign.gguf").write_bytes(b"GGUF not ours")
    before = tree(workspace)
    code, _, err = run("quantize", "--method", "kquant", "--type", "Q8_0", "--format", "gguf",
                       "--out", "foreign.gguf", "--overwrite")
    assert_one_line_error(code, err, "refusing to replace foreign.gguf", "not written by quantkit")
    assert tree(workspace) == before
    for _ in range(2):  # the second run replaces the first one's file (its report lies beside it)
        code, _, err = run("quantize", "--method", "kquant", "--type", "Q8_0", "--format", "gguf",
                           "--out", "demo.gguf", "--overwrite")
        assert code == 0, err
    assert (workspace / "demo.gguf").read_bytes()[:4] == b"GGUF"
    assert (workspace / "demo.quantkit_report.json").is_file()
    assert not [p for p in workspace.iterdir() if p.name.startswith(".")]


def test_imatrix_and_results_files_replace_only_their_own_kind(workspace: Path, test_text: Path) -> None:
    (workspace / "imatrix.gguf").write_text("my notes")
    before = tree(workspace)
    code, _, err = run("calibrate", "--num-samples", "2", "--seq-len", "32", "--out", "calib",
                       "--imatrix-out", "imatrix.gguf", "--overwrite")
    assert_one_line_error(code, err, "refusing to replace imatrix.gguf")
    assert tree(workspace) == before  # neither output was written: both are checked before either
    code, _, err = run("eval", "perplexity", "--dataset", test_text, "--seq-len", "32", "--max-windows", "1",
                       "--save", "notes.txt")
    assert_one_line_error(code, err, "refusing to replace notes.txt")
    assert (workspace / "notes.txt").read_text() == "mine\n"
    for _ in range(2):
        code, _, err = run("eval", "perplexity", "--dataset", test_text, "--seq-len", "32", "--max-windows", "1",
                           "--save", "results.json")
        assert code == 0, err


def test_lock_file_names_the_holder(workspace: Path) -> None:
    with atomic_directory(workspace / "q"):
        assert (workspace / ".q.quantkit-lock").read_text() == f"{os.getpid()}\n"
    assert not (workspace / ".q.quantkit-lock").exists()


def test_a_killed_gguf_writers_temporary_file_is_cleaned_too(tmp_path: Path) -> None:
    leftovers = [tmp_path / ".m.gguf.partial-4242", tmp_path / "..m.gguf.partial-4242.0a1b2c3d4e5f.tmp"]
    for leftover in leftovers:
        leftover.write_bytes(b"GGUF half")
    (tmp_path / ".other.gguf.partial-4242").write_bytes(b"not ours to clean: another output")
    notes: list[str] = []
    with outputs.atomic_file(tmp_path / "m.gguf", is_previous=lambda _: False, notes=notes) as tmp:
        tmp.write_bytes(b"GGUF")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.gguf.partial-4242", "m.gguf"]
    assert len(notes) == 2 and all("killed run (pid 4242)" in note for note in notes)
