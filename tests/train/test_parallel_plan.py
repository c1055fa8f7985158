import pytest
import timm
import torch
from torch import nn

from mpl_fast.train.plan import NetworkFootprint, measure_footprint, plan_mpl_memory


def test_footprint_counts_parameters_and_leaf_outputs():
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    footprint = measure_footprint(model, (4,))
    assert footprint.parameters == 4 * 8 + 8 + 8 * 2 + 2
    assert footprint.activation_elements_per_image == 8 + 8 + 2


def test_efficientnet_l2_on_meta_device_has_the_papers_size():
    with torch.device("meta"):
        model = timm.create_model("tf_efficientnet_l2", pretrained=False)
    footprint = measure_footprint(model, (3, 64, 64))
    assert 470e6 < footprint.parameters < 490e6  # paper: ~480M
    assert footprint.activation_elements_per_image > 0


def test_plan_arithmetic_per_layout():
    teacher = NetworkFootprint(parameters=1000, activation_elements_per_image=10)
    student = NetworkFootprint(parameters=500, activation_elements_per_image=20)
    single = plan_mpl_memory(teacher, student, batch_size=2, mu=3, precision="fp32")
    teacher_acts, student_acts = 10 * 2 * 7 * 4, 20 * 2 * 3 * 4
    assert single.per_device_bytes == [1000 * 12 + 500 * 16 + teacher_acts + student_acts]
    split = plan_mpl_memory(teacher, student, batch_size=2, mu=3, layout="model-parallel", devices=2)
    assert split.per_device_bytes == [1000 * 12 + teacher_acts, 500 * 16 + student_acts]
    sharded = plan_mpl_memory(teacher, student, batch_size=2, mu=3, layout="fsdp", devices=4)
    assert sharded.per_device_bytes == [(1000 * 12 + 500 * 16) // 4 + teacher_acts + student_acts] * 4
    bf16 = plan_mpl_memory(teacher, student, batch_size=2, mu=3, precision="bf16")
    assert bf16.per_device_bytes[0] == single.per_device_bytes[0] - (teacher_acts + student_acts) // 2
    assert "GiB" in single.describe()


def test_plan_of_model_parallel_groups():
    """2k ranks: k teacher devices, then k student devices, each at the per-device batch; --fsdp
    divides each network's state over its k ranks, not its activations."""
    teacher = NetworkFootprint(parameters=1000, activation_elements_per_image=10)
    student = NetworkFootprint(parameters=500, activation_elements_per_image=20)
    teacher_acts, student_acts = 10 * 2 * 7 * 4, 20 * 2 * 3 * 4
    whole = plan_mpl_memory(teacher, student, batch_size=2, mu=3, layout="model-parallel", devices=6)
    assert whole.per_device_bytes == [1000 * 12 + teacher_acts] * 3 + [500 * 16 + student_acts] * 3
    sharded = plan_mpl_memory(teacher, student, batch_size=2, mu=3, layout="model-parallel", devices=6, sharded=True)
    assert sharded.per_device_bytes == [1000 * 12 // 3 + teacher_acts] * 3 + [500 * 16 // 3 + student_acts] * 3


def test_dry_run_under_torchrun_plans_the_model_parallel_groups(monkeypatch, capsys):
    from mpl_fast.train import main

    monkeypatch.setenv("WORLD_SIZE", "4")
    assert main(["--dry-run", "--model-parallel", "--fsdp"]) == 0
    out = capsys.readouterr().out
    assert "model-parallel on 4 device(s)" in out and "each of 2 ranks per network" in out
    assert "ranks 0..1 the teacher, 2..3 the student" in out and "1/2 of its state per rank" in out


@pytest.mark.parametrize("kwargs,match", [
    (dict(precision="fp8"), "precision must be one of"),
    (dict(layout="pipeline"), "layout must be one of"),
    (dict(layout="model-parallel", devices=3), "2 devices"),
    (dict(batch_size=0), "batch_size >= 1"),
])
def test_plan_bad_input(kwargs, match):
    footprint = NetworkFootprint(parameters=1, activation_elements_per_image=1)
    args = dict(batch_size=1, mu=1) | kwargs
    with pytest.raises(ValueError, match=match):
        plan_mpl_memory(footprint, footprint, **args)


def test_dry_run_of_the_l2_preset_reports_parameters_and_memory(capsys):
    from mpl_fast.train import main

    assert main(["--preset", "imagenet-l2", "--dry-run"]) == 0
    out = capsys.readouterr().out
    count = int(out.split(" parameters per network")[0].rsplit(" ", 1)[1].replace(",", ""))
    assert 470e6 < count < 490e6
    assert out.count("GiB") == 6 and "model-parallel on 2 device(s)" in out
