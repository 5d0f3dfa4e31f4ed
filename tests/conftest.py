"""Shared test setup: the repository root on sys.path, one torch thread (TEST_TORCH_THREADS to change), helpers to run
the method scripts as a user would (python / torchrun subprocesses) and to run a function on 2 gloo processes."""

import os
import socket
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# One thread by default: the tests' tensors are small (a second thread mostly adds synchronization), the scripts the
# tests launch run with OMP_NUM_THREADS=1 beside them, and a loaded 2-core CI machine is not oversubscribed.
torch.set_num_threads(int(os.environ.get("TEST_TORCH_THREADS", "1")))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_script(args: list[str], cwd: str, timeout: int = 300, torchrun: int = 0) -> subprocess.CompletedProcess:
    """Run a repository script (e.g. ["simclr.py", "--steps", "2"]) in a fresh interpreter, like a user would.
    torchrun=N launches it with `torchrun --nproc_per_node N` on a free port (gloo on CPU). Fails the test with
    the script's output when it exits non-zero."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT, CUDA_VISIBLE_DEVICES="")
    script = os.path.join(ROOT, args[0])
    if torchrun:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            f"--nproc_per_node={torchrun}",
            f"--master_port={free_port()}",
            script,
            *args[1:],
        ]
    else:
        cmd = [sys.executable, script, *args[1:]]
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        pytest.fail(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc


def _spawn_entry(rank, world, init_file, fn, args, queue):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        queue.put((rank, fn(rank, world, *args)))
    finally:
        dist.destroy_process_group()


def run_distributed(fn, world: int, tmp_path, *args) -> list:
    """Run fn(rank, world, *args) on `world` gloo processes (file:// rendezvous); returns the results by rank.
    fn must be a module-level function returning plain Python data (lists, floats), not tensors."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    init_file = str(tmp_path / "dist_init")
    procs = [ctx.Process(target=_spawn_entry, args=(r, world, init_file, fn, args, queue)) for r in range(world)]
    for p in procs:
        p.start()
    results = dict(queue.get(timeout=120) for _ in range(world))
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0, f"distributed worker exited with {p.exitcode}"
    return [results[r] for r in range(world)]


@pytest.fixture
def repo_root():
    return ROOT


def read_png(path) -> torch.Tensor:
    """A PNG written by the scripts as a (3, H, W) uint8 tensor (PIL: torchvision's decoders are deprecated)."""
    import numpy as np
    from PIL import Image

    with Image.open(path) as img:
        return torch.from_numpy(np.array(img.convert("RGB"))).permute(2, 0, 1).contiguous()
