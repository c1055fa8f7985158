"""The run's layout, resolved once from the flags and torchrun's environment (no process group
is joined to resolve it): its name, and its answers on shards, replicas, seeds and evaluation."""

import pytest

from mpl_fast.train import LAYOUTS, resolve_topology
from mpl_fast.train.config import preset


def _resolve(monkeypatch, world_size=None, rank=0, **fields):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    if world_size is not None:
        monkeypatch.setenv("WORLD_SIZE", str(world_size))
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("LOCAL_RANK", str(rank))
    cfg = preset("digits")
    for name, value in fields.items():
        setattr(cfg, name, value)
    return resolve_topology(cfg)


def test_the_layouts_have_four_names():
    assert LAYOUTS == ("single-device", "two-devices", "rank-pair", "rank-groups")


def test_one_process(monkeypatch):
    t = _resolve(monkeypatch)
    assert (t.layout, t.replicas, t.shard, t.evaluates, t.split) == ("single-device", 1, (0, 1), True, False)
    assert t.own_seed(5) is None and t.describe(preset("digits")) is None and t.grad_sync(None) is None


def test_data_parallel_replicas(monkeypatch):
    t = _resolve(monkeypatch, world_size=4, rank=2)
    assert (t.layout, t.replicas, t.shard, t.evaluates, t.shards_data) == ("single-device", 4, (2, 4), False, True)
    assert t.own_seed(5) == 5 + 7_919 * 2
    assert _resolve(monkeypatch, world_size=4, rank=0).own_seed(5) is None  # the first replica keeps the run's


def test_two_devices(monkeypatch):
    t = _resolve(monkeypatch, model_parallel=True, teacher_device="cpu", student_device="cpu")
    assert (t.layout, t.placement.role, t.replicas, t.evaluates) == ("two-devices", "both", 1, True)
    assert "two devices" in t.describe(preset("digits"))


def test_rank_pair(monkeypatch):
    t = _resolve(monkeypatch, world_size=2, rank=1, model_parallel=True)
    assert (t.layout, t.placement.role, t.replicas, t.shard) == ("rank-pair", "student", 1, (0, 1))
    assert t.evaluates and not t.shards_data and t.own_seed(5) is None  # both ranks read the same batches


@pytest.mark.parametrize("rank,role,shard,evaluates", [(0, "teacher", (0, 3), True), (2, "teacher", (2, 3), False),
                                                       (3, "student", (0, 3), True), (4, "student", (1, 3), False)])
def test_rank_groups(monkeypatch, rank, role, shard, evaluates):
    t = _resolve(monkeypatch, world_size=6, rank=rank, model_parallel=True)
    assert (t.layout, t.placement.role, t.replicas, t.shard, t.evaluates) == ("rank-groups", role, 3, shard, evaluates)
    assert (t.own_seed(5) is None) == (shard[0] == 0)


@pytest.mark.parametrize("world_size,fields,expect", [
    (None, dict(fsdp=True), "--fsdp shards the networks over torchrun ranks"),
    (2, dict(fsdp=True, model_parallel=True), "it needs 2k >= 4 processes"),
    (3, dict(model_parallel=True), "even number"),
    (None, dict(model_parallel=True, method="supervised"), "--method supervised has no teacher"),
    (None, dict(teacher_device="cpu"), "add --model-parallel"),
])
def test_layouts_that_cannot_work_are_refused_with_one_sentence(monkeypatch, world_size, fields, expect):
    with pytest.raises(SystemExit, match=expect):
        _resolve(monkeypatch, world_size=world_size, **fields)
