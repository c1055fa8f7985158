"""Helpers several test files share: toy batches for the MPL step, dotted config overrides, and
the check that a skipped step left the run's state as it was."""

from __future__ import annotations

import torch

from mpl_fast.train.config import preset


def toy_batches(seed: int, b: int = 8, u: int = 24):
    """((x_l, y_l), (x_weak, x_strong)) of 5-feature points in 3 classes, the strong view a
    jittered copy of the weak one."""
    g = torch.Generator().manual_seed(seed)
    x_l = torch.randn(b, 5, generator=g)
    y_l = torch.randint(0, 3, (b,), generator=g)
    x_uw = torch.randn(u, 5, generator=g)
    x_us = x_uw + 0.3 * torch.randn(u, 5, generator=g)
    return (x_l, y_l), (x_uw, x_us)


def set_fields(cfg, **overrides):
    """``cfg`` with ``a__b=v`` overrides applied as ``cfg.a.b = v``."""
    for key, value in overrides.items():
        obj = cfg
        *path, leaf = key.split("__")
        for part in path:
            obj = getattr(obj, part)
        setattr(obj, leaf, value)
    return cfg


def assert_state_unchanged(before: dict, after: dict) -> None:
    """Teacher, student, the EMA's weights and both optimizers' momentum are bit-identical in
    two MPL.state_dict()s."""
    for key in ("teacher", "student"):
        for k, v in before[key].items():
            assert torch.equal(v, after[key][k]), (key, k)
    for k, v in before["ema"]["module"].items():
        assert torch.equal(v, after["ema"]["module"][k]), k
    for key in ("teacher_opt", "student_opt"):
        for i, st in before[key]["state"].items():
            if st.get("momentum_buffer") is not None:
                assert torch.equal(st["momentum_buffer"], after[key]["state"][i]["momentum_buffer"]), (key, i)


def tiny_dali_config(out_dir, data_dir, *, mu: int, uda_ramp_steps: int | None = None, **overrides):
    """The imagenet-10pct recipe on a tiny ImageFolder read by DALI, shrunk to 6 CPU steps of a
    small CNN (the data wiring is under test, not the model)."""
    cfg = preset("imagenet-10pct")
    cfg.steps, cfg.log_every, cfg.eval_every, cfg.checkpoint_every, cfg.threads = 6, 2, 100, 0, 1
    cfg.data.data_dir, cfg.data.loader, cfg.data.image_size = str(data_dir), "dali", 32
    cfg.data.labeled_fraction, cfg.data.labels_per_class, cfg.data.val_per_class = None, 2, 1
    cfg.data.batch_size, cfg.data.mu, cfg.data.num_workers, cfg.data.eval_batch_size = 2, mu, 1, 64
    cfg.model.name = "digits-cnn"
    for opt in (cfg.teacher, cfg.student):
        opt.warmup_steps = 2
    cfg.mpl.student_wait_steps, cfg.finetune.steps = 0, 0
    if uda_ramp_steps is not None:
        cfg.mpl.uda_ramp_steps = uda_ramp_steps
    cfg.output_dir = str(out_dir)
    return set_fields(cfg, **overrides)


def rank_slice(batches, rank: int, world_size: int):
    """This rank's equal share of ``toy_batches``' global batch (the rows a data-parallel rank reads)."""
    (x_l, y_l), (x_uw, x_us) = batches

    def part(t):
        n = t.shape[0] // world_size
        return t[rank * n:(rank + 1) * n]

    return (part(x_l), part(y_l)), (part(x_uw), part(x_us))


def init_gloo_rank(rank: int, world_size: int, init_file: str) -> None:
    """Joins a gloo group of ``world_size`` spawned processes through a file:// rendezvous, with
    the torchrun environment variables set as the trainer expects them."""
    import os

    import torch.distributed as dist

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)


def save_rank_result_and_leave(returned, tmp: str, rank: int) -> None:
    """The end of a spawned rank: saves what it measured as rank{rank}.pt, frees its models
    (garbage-collected before the process group: see mpl_fast.parallel.distributed.shutdown;
    the caller drops its own references first) and leaves the process group."""
    import gc
    import os

    import torch.distributed as dist

    torch.save(returned, os.path.join(tmp, f"rank{rank}.pt"))
    del returned
    gc.collect()
    dist.destroy_process_group()


def spawn_ranks(rank_main, world_size: int, tmp) -> list:
    """Runs ``rank_main(rank, rendezvous_file, tmp)`` in ``world_size`` spawned processes and
    returns what each saved (save_rank_result_and_leave), by rank."""
    import torch.multiprocessing as mp

    mp.spawn(rank_main, args=(str(tmp / "rendezvous"), str(tmp)), nprocs=world_size, join=True)
    return [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in range(world_size)]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (for a tcp:// rendezvous or torchrun)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_trainer(nproc: int, args: list[str], *, timeout: float, env: dict | None = None):
    """``torchrun --nproc_per_node=nproc -m mpl_fast.train *args`` from the repository root, as a
    user types it; asserts a clean exit (showing the output's tail otherwise) and returns the
    finished process (its stdout is rank 0's and the others' prints)."""
    import os
    import subprocess
    import sys

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={free_port()}",
           "-m", "mpl_fast.train", *args]
    proc = subprocess.run(cmd, cwd=repo, capture_output=True, text=True, timeout=timeout,
                          env=None if env is None else dict(os.environ, **env))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


def reference_student_step_and_h(student, x_us, y_hat, x_l, y_l, lr_s: float):
    """The MPL student step and feedback by hand (plain SGD, no momentum): the student steps on
    the pseudo labels (g_u), then h = lr_s * <g_l', g_u> on the labeled batch at the new weights.
    Updates ``student`` in place; returns h."""
    import torch.nn.functional as F  # noqa: PLC0415

    params = list(student.parameters())
    g_u = torch.autograd.grad(F.cross_entropy(student(x_us), y_hat), params)
    with torch.no_grad():
        for p, g in zip(params, g_u):
            p -= lr_s * g
    g_l_new = torch.autograd.grad(F.cross_entropy(student(x_l), y_l), params)
    return lr_s * sum((a * b).sum() for a, b in zip(g_l_new, g_u))
