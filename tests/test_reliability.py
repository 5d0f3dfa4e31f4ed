"""Never lose a good run (issue #17): the divergence guard, faults that leave no debris, one-line errors (exit 2)
for every bad input of every script, and what a user sees when a run is complete."""

import errno
import json
import math
import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT

import common
import eval_probe
import mae
import simclr

MODULES = ["simclr", "mae", "can", "igpt", "gcrl", "contrastive_props"]
MAE_TINY = ["--preset", "tiny", "--no-amp", "--synthetic-size", "256", "--eval-every", "1000"]
SIMCLR_TINY = ["--preset", "tiny", "--no-amp", "--synthetic-size", "256", "--batch-size", "16", "--knn-bank", "0"]
TINY = {"mae": (mae, MAE_TINY), "simclr": (simclr, SIMCLR_TINY)}


def run(module, argv: list[str]) -> tuple[int, str]:
    """main(argv) in this process: (exit status, the error line) for a run that stops, (0, '') otherwise."""
    try:
        module.main(argv)
    except SystemExit as e:
        return e.code, str(e)
    return 0, ""


# ---------------------------------------------------------------------------------------------- divergence guard
@pytest.mark.parametrize("method", ["mae", "simclr"])
def test_a_diverging_step_never_replaces_the_last_good_checkpoint(method, tmp_path):
    """The issue's scenario: 6 good steps, then --lr 1e6 --ckpt-every 1. Step 7's loss is still finite but its update
    blows the weights up; the checkpoint it would write is refused, checkpoint.pt stays the step-6 state, the message
    says so, and resuming with a sane lr trains on from step 6."""
    module, tiny = TINY[method]
    base = [*tiny, "--output-dir", str(tmp_path), "--run-name", "r"]
    run_dir = tmp_path / "r"
    assert run(module, [*base, "--steps", "6", "--ckpt-every", "3"]) == (0, "")
    good = (run_dir / "checkpoint.pt").read_bytes()
    code, line = run(module, [*base, "--steps", "12", "--lr", "1e6", "--ckpt-every", "1"])
    assert code == 1 and "\n" not in line
    assert f"{method}.py: error: the run diverged at step 7: the weight norm grew" in line
    assert "checkpoint.pt (step 6) is kept as it was. Resume it with --resume auto and a lower learning rate" in line
    assert (run_dir / "checkpoint.pt").read_bytes() == good
    assert not [n for n in os.listdir(run_dir) if ".tmp" in n]
    result = module.main([*base, "--steps", "8"])  # the fix the message names works
    assert result["step"] == 8 and torch.load(run_dir / "checkpoint.pt", weights_only=False)["step"] == 8


def test_a_checkpoint_whose_weights_give_nan_is_set_aside(tmp_path, monkeypatch):
    """When the growth check lets an exploding step through (here: switched off), the next loss, computed from the
    new checkpoint's own weights, is not finite: that checkpoint moves to checkpoint.diverged.pt, checkpoint.prev.pt
    (step 6) becomes checkpoint.pt again, and the message tells exactly that."""
    monkeypatch.setattr(common, "DIVERGENCE_GROWTH", math.inf)
    base = [*MAE_TINY, "--output-dir", str(tmp_path), "--run-name", "r"]
    run_dir = tmp_path / "r"
    assert run(mae, [*base, "--steps", "6", "--ckpt-every", "3"]) == (0, "")
    good = (run_dir / "checkpoint.pt").read_bytes()
    code, line = run(mae, [*base, "--steps", "12", "--lr", "1e6", "--ckpt-every", "1"])
    assert code == 1 and line.startswith("mae.py: error: non-finite loss at step 7:"), line
    assert "The checkpoint of step 7 gives this loss itself: it was moved to checkpoint.diverged.pt" in line
    assert "checkpoint.pt is again the one before it (step 6); resume it with --resume auto" in line
    assert (run_dir / "checkpoint.pt").read_bytes() == good
    assert torch.load(run_dir / "checkpoint.diverged.pt", weights_only=False)["step"] == 7
    assert mae.main([*base, "--steps", "7"])["step"] == 7


def test_the_finiteness_check_syncs_only_on_logging_and_checkpoint_steps_on_a_gpu(tmp_path):
    """On a GPU the check records the first bad step on the device and reads it back on logging, checkpoint and
    --keep-every snapshot steps (and the last step) only; on the CPU every step is read. The GPU rule, forced on CPU
    tensors: a NaN passes silently until the step before the next logging / checkpoint / snapshot step, which stops
    the run naming the first bad step."""
    cases = [  # (log_every, ckpt_every, keep_every, steps per epoch, bad step, the step that reads it)
        (5, 100, 0, 0, 3, 4),  # logging step 5
        (100, 6, 0, 0, 1, 5),  # checkpoint step 6
        (100, 100, 1, 4, 1, 3),  # snapshot at the end of epoch 1 (step 4)
    ]
    for log_every, ckpt_every, keep_every, per_epoch, bad, reads in cases:
        args = mae.Args(log_every=log_every, ckpt_every=ckpt_every, keep_every=keep_every)
        logger = common.RunLogger(
            str(tmp_path), args, common.DistInfo(), 0.0, 100, 0, method="mae", steps_per_epoch=per_epoch
        )
        assert logger.sync_every_step  # a CPU run
        logger.sync_every_step = False
        for step in range(reads):
            logger.check_finite(step, {"total": torch.tensor(float("nan") if step == bad else 1.0)})
        with pytest.raises(SystemExit, match=rf"non-finite loss first at step {bad} \(at step {reads}: total=1\)"):
            logger.check_finite(reads, {"total": torch.tensor(1.0)})
        logger.close()


# ---------------------------------------------------------------------------------------------- faults
def test_interrupted_and_failed_writes_leave_no_temp_files(tmp_path, monkeypatch):
    """A kill during a write leaves .checkpoint.pt.tmp<pid> behind: the next start deletes the files of dead
    processes (not those of a live one). A write that fails (here: KeyboardInterrupt half-way) removes its own."""
    info = common.DistInfo()
    model, run_dir = torch.nn.Linear(4, 4), tmp_path / "run"
    run_dir.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (run_dir / f".checkpoint.pt.tmp{dead.pid}").write_bytes(b"x" * 4096)  # a killed writer's debris
    (run_dir / f".checkpoint.pt.tmp{os.getppid()}").write_bytes(b"y")  # a live process: left alone
    common.prepare_run_dir(str(run_dir), info)
    assert sorted(os.listdir(run_dir)) == [f".checkpoint.pt.tmp{os.getppid()}"]
    os.remove(run_dir / f".checkpoint.pt.tmp{os.getppid()}")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    common.save_training_state(str(run_dir), "mae", mae.Args(), model, opt, 1, 0, info)
    good = (run_dir / "checkpoint.pt").read_bytes()
    real_save = torch.save

    def interrupted(obj, f):
        f.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        common.save_training_state(str(run_dir), "mae", mae.Args(), model, opt, 2, 0, info)
    assert sorted(os.listdir(run_dir)) == ["checkpoint.pt"] and (run_dir / "checkpoint.pt").read_bytes() == good

    def disk_full(obj, f):
        f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(SystemExit) as e:
        common.save_training_state(str(run_dir), "mae", mae.Args(), model, opt, 2, 0, info)
    assert e.value.code == 1 and "\n" not in str(e.value)
    assert str(e.value).startswith(
        "mae.py: error: the disk is full: writing"
    ) and "previous checkpoint is intact" in str(e.value)
    assert sorted(os.listdir(run_dir)) == ["checkpoint.pt"] and (run_dir / "checkpoint.pt").read_bytes() == good
    monkeypatch.setattr(torch, "save", real_save)


def test_resume_cuts_metrics_back_and_args_json_records_what_ran(tmp_path, monkeypatch):
    """A run killed after step 3 with its last checkpoint at step 2 logged steps 1-3; resuming must not log step 3
    twice. args.json says which precision ran (bf16 asked, not native here -> amp false, amp_requested true)."""
    monkeypatch.setattr(common, "bf16_is_fast", lambda device: False)
    base = [*MAE_TINY, "--output-dir", str(tmp_path), "--run-name", "r", "--amp"]
    run_dir = tmp_path / "r"
    mae.main([*base, "--steps", "3", "--ckpt-every", "2"])
    os.replace(run_dir / "checkpoint.prev.pt", run_dir / "checkpoint.pt")  # as if killed before the step-3 save
    mae.main([*base, "--steps", "4"])
    rows = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    train_steps = [r["step"] for r in rows if "loss/total" in r]
    assert train_steps == [1, 2, 3, 4]
    saved = json.load(open(run_dir / "args.json"))
    assert saved["amp"] is False and saved["amp_requested"] is True


def test_a_complete_run_says_so_and_how_to_start_another(tmp_path, capsys):
    base = [*MAE_TINY, "--output-dir", str(tmp_path), "--run-name", "r"]
    mae.main([*base, "--steps", "3"])
    with pytest.raises(SystemExit) as e:
        mae.main([*base, "--steps", "2"])
    out = capsys.readouterr().out
    assert e.value.code == 0
    assert "is complete: its checkpoint is at step 3 and this command stops at step 2" in out
    assert "--run-name NAME" in out and "--resume ''" in out


def test_keep_every_keeps_epoch_snapshots(tmp_path):
    """--keep-every 1 with 4 steps per epoch: checkpoint-ep0001.pt and -ep0002.pt hold the states of steps 4 and 8
    besides the rolling checkpoint.pt."""
    base = [*MAE_TINY, "--synthetic-size", "64", "--output-dir", str(tmp_path), "--run-name", "r"]
    mae.main([*base, "--epochs", "3", "--steps", "9", "--ckpt-every", "100", "--keep-every", "1"])
    run_dir = tmp_path / "r"
    steps = {n: torch.load(run_dir / n, weights_only=False)["step"] for n in os.listdir(run_dir) if n.endswith(".pt")}
    assert steps == {"checkpoint-ep0001.pt": 4, "checkpoint-ep0002.pt": 8, "checkpoint.prev.pt": 8, "checkpoint.pt": 9}


# ---------------------------------------------------------------------------------------------- bad input
@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """An empty and a truncated checkpoint, a plain file where a folder is expected, and a tiny MAE checkpoint."""
    root = tmp_path_factory.mktemp("bad")
    (root / "empty.pt").write_bytes(b"")
    mae.main([*MAE_TINY, "--steps", "1", "--output-dir", str(root), "--run-name", "good"])
    whole = (root / "good" / "checkpoint.pt").read_bytes()
    (root / "truncated.pt").write_bytes(whole[: len(whole) // 2])
    (root / "a_file").write_text("not a folder")
    return root


# (script, arguments, what the one error line must contain); {root} is the fixture's folder
BAD_INPUT = [
    *[(m, ["--base-lr", "nan"], "argument --base-lr: nan is not a finite number") for m in MODULES],
    *[(m, ["--lr", "nan"], "argument --lr: nan is not a finite number") for m in ("simclr", "mae", "can", "igpt")],
    *[
        (m, ["--temperature", "0"], "argument --temperature: 0 is outside (0, inf)")
        for m in ("simclr", "can", "igpt", "gcrl", "contrastive_props")
    ],  # fmt: skip
    *[(m, ["--temperature", "nan"], "argument --temperature: nan is not a finite number") for m in ("simclr", "can")],
    *[(m, ["--mask-ratio", "nan"], "argument --mask-ratio: nan is not a finite number") for m in ("mae", "can")],
    *[(m, ["--epochs", "0", "--steps", "-1"], "argument --epochs: 0 is outside (0, inf)") for m in MODULES],
    *[(m, ["--device", "gpu"], "--device gpu: unknown; use auto") for m in MODULES],
    *[(m, ["--device", "cuda"], "--device cuda: no CUDA device is visible here; use --device cpu") for m in MODULES],
    *[(m, ["--batch-size", "0"], "argument --batch-size: 0 is outside [1, inf)") for m in MODULES],
    *[(m, ["--resume", "{root}/empty.pt"], "empty.pt is not a readable checkpoint (0 bytes") for m in TINY],
    *[(m, ["--resume", "{root}/truncated.pt"], "truncated.pt is not a readable checkpoint") for m in TINY],
    *[(m, ["--output-dir", "{root}/a_file"], "--output-dir: cannot write the run folder") for m in TINY],
    ("igpt", ["--output-dir", "/proc/no/such"], "--output-dir: cannot write the run folder"),
    ("eval_probe", ["--ckpt", "{root}/good/checkpoint.pt", "--dataset", "foo"], "--dataset foo: unknown dataset"),
    (
        "eval_probe",
        ["--ckpt", "{root}/good/checkpoint.pt", "--image-size", "32"],
        "--image-size 32 does not match the checkpoint's 16 px",
    ),  # fmt: skip
    ("eval_probe", ["--ckpt", "{root}/good/checkpoint.pt", "--batch-size", "0"], "argument --batch-size: 0 is outside"),
    ("eval_probe", ["--ckpt", "x", "--batch-size", "-3"], "argument --batch-size: -3 is outside [1, inf)"),
    ("eval_probe", ["--ckpt", "x", "--extract-batch-size", "0"], "argument --extract-batch-size: 0 is outside"),
    ("eval_probe", ["--ckpt", "x", "--knn-k", "0"], "argument --knn-k: 0 is outside [1, inf)"),
    ("eval_probe", ["--ckpt", "{root}/empty.pt"], "empty.pt is not a readable checkpoint"),
    (
        "eval_probe",
        ["--ckpt", "{root}/good/checkpoint.pt", "--output-dir", "{root}/a_file"],
        "cannot write eval_results.jsonl (--output-dir picks another folder)",
    ),  # fmt: skip
]


@pytest.mark.parametrize(("script", "argv", "expected"), BAD_INPUT, ids=lambda v: v if isinstance(v, str) else None)
def test_bad_input_is_one_line_naming_the_flag(script, argv, expected, files, capsys):
    import importlib

    module = importlib.import_module(script)
    tiny = [] if script == "eval_probe" else (TINY[script][1] if script in TINY else ["--preset", "tiny"])
    argv = [a.replace("{root}", str(files)) for a in argv]
    code, line = run(module, [*tiny, "--output-dir", str(files / "runs"), *argv] if tiny else argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, (code, line)
    assert line.startswith(f"{script}.py: error: ") and "\n" not in line and expected in line, line
    assert err == line  # what the user sees on stderr: the one line, no traceback


def test_read_only_feature_cache_names_no_cache(files, monkeypatch):
    """The checkpoint's folder cannot take the feature cache (read-only; emulated, the tests may run as root)."""
    real = os.makedirs

    def makedirs(path, *a, **kw):
        if str(path).endswith("feature_cache"):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real(path, *a, **kw)

    monkeypatch.setattr(os, "makedirs", makedirs)
    code, line = run(eval_probe, ["--ckpt", str(files / "good" / "checkpoint.pt"), "--output-dir", str(files)])
    assert code == 2 and "cannot write the feature cache: pass --no-cache to skip it" in line and "\n" not in line


def test_bad_input_from_the_command_line_exits_2_without_a_traceback(tmp_path):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "can.py"), "--temperature", "0"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip() == "can.py: error: argument --temperature: 0 is outside (0, inf) (see --help)"


def test_fashion_mnist_says_which_root_it_reads(tmp_path, monkeypatch, capsys):
    """--data-root without a copy falls back to Debian's files, and says so (the given root is not silently
    ignored)."""
    if not os.path.isdir(common.FASHION_MNIST_SYSTEM_DIR):
        pytest.skip(f"needs Debian's dataset-fashion-mnist at {common.FASHION_MNIST_SYSTEM_DIR}")
    common.build_dataset("fashion_mnist", root=str(tmp_path), train=False, image_size=28)
    assert f"fashion_mnist: no copy under --data-root {tmp_path}; reading Debian's" in capsys.readouterr().out
