"""What a user does after training, end to end on one tiny digits run: mpl_fast.load, the
evaluate, export and plot tools, and weights-only checkpoints."""

import json
import math
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from mpl_fast import evaluate as evaluate_tool
from mpl_fast import export as export_tool
from mpl_fast import plot as plot_tool
from mpl_fast import runs

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# torchvision warns at every decoded file that its decoders are deprecated (the trainer's decoder,
# mpl_fast.data.torch_pipeline.decode_file, which load and evaluate reuse).
pytestmark = pytest.mark.filterwarnings("ignore:The image decoding and encoding:DeprecationWarning")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """One MPL run on digits: 30 steps, evaluations at 10, 20 and 30, a short finetune."""
    from mpl_fast.train import main

    out = str(tmp_path_factory.mktemp("after") / "digits-mpl")
    code = main(["--preset", "digits", "--steps", "30", "--eval-every", "10", "--log-every", "5",
                 "--checkpoint-every", "0", "--mpl.student-wait-steps", "5", "--finetune.steps", "3",
                 "--threads", "1", "--output-dir", out])
    assert code == 0
    return out


@pytest.fixture(scope="module")
def summary(run_dir):
    with open(os.path.join(run_dir, "summary.json")) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def test_split(run_dir):
    """The run's own test batches (float digits in [0, 1]) as the trainer evaluated them."""
    from mpl_fast.data import build_streams

    cfg = runs.read_config(run_dir)
    return list(build_streams(cfg.data, seed=cfg.seed).test)


def _top1(model, batches):
    correct = total = 0
    with torch.no_grad():
        for x, y in batches:
            correct += int((model(x).argmax(1) == y).sum())
            total += len(y)
    return 100.0 * correct / total


# ----------------------------------------------------------------------------- load

@pytest.mark.parametrize("name", ["selected", "student", "ema", "teacher", "finetuned"])
def test_load_gives_each_network_in_eval_mode_with_the_accuracy_the_run_reported(run_dir, summary, test_split, name):
    import mpl_fast

    model, preprocess = mpl_fast.load(run_dir, model=name)
    assert not model.training and all(not m.training for m in model.modules())
    assert preprocess.size == 8 and preprocess.channels == 1
    assert _top1(model, test_split) == pytest.approx(summary["test_top1"][name], abs=1e-9)


def test_selected_is_the_best_validation_state_of_the_selection_model(run_dir):
    state = torch.load(os.path.join(run_dir, "checkpoint.pt"), weights_only=True)
    assert runs.selection_model(runs.read_config(run_dir), runs.read_summary(run_dir)) == "ema"
    selected = runs.model_state(run_dir, "selected")
    for k, v in state["best"]["state"].items():
        assert torch.equal(selected[k], v)


def test_load_refuses_what_it_cannot_serve_in_one_sentence(run_dir, tmp_path):
    import mpl_fast

    unfinished = tmp_path / "unfinished"
    shutil.copytree(run_dir, unfinished)
    os.remove(unfinished / "finetuned.pt")
    with pytest.raises(runs.RunError, match="has no finetuned.pt: the run has not finished, or it does not "
                                            "finetune.*model='selected'"):
        mpl_fast.load(str(unfinished), model="finetuned")
    with pytest.raises(runs.RunError, match="model must be one of"):
        mpl_fast.load(run_dir, model="best")
    with pytest.raises(runs.RunError, match="does not exist"):
        mpl_fast.load(str(tmp_path / "missing"))
    with pytest.raises(runs.RunError, match="is not a torch device"):
        mpl_fast.load(run_dir, device="gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(runs.RunError, match="no CUDA GPU is visible"):
            mpl_fast.load(run_dir, device="cuda")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(runs.RunError, match="has no checkpoint.pt"):
        mpl_fast.load(str(empty))


def test_import_mpl_fast_does_not_import_the_run_reader():
    code = "import sys, mpl_fast; print('mpl_fast.runs' in sys.modules, callable(mpl_fast.load))"
    out = subprocess.run([sys.executable, "-c", code], check=False, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "True"]


# ----------------------------------------------------------------------------- weights only

class _RunsCodeWhenUnpickled:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_checkpoints_load_weights_only_and_a_pickled_object_is_refused_without_running_it(run_dir, tmp_path):
    state = torch.load(os.path.join(run_dir, "checkpoint.pt"), map_location="cpu", weights_only=True)
    assert state["mpl"]["student"] and state["config"]["method"] == "mpl"

    bad = tmp_path / "bad"
    shutil.copytree(run_dir, bad)
    marker = tmp_path / "code-ran"
    state["extra"] = _RunsCodeWhenUnpickled(str(marker))
    torch.save(state, bad / "checkpoint.pt")
    with pytest.raises(runs.RunError, match="cannot be read as a weights-only checkpoint"):
        runs.load(str(bad))
    assert not marker.exists()

    data = (tmp_path / "bad" / "checkpoint.pt").read_bytes()
    (bad / "checkpoint.pt").write_bytes(data[: len(data) // 2])  # a run killed while writing (no atomic rename)
    with pytest.raises(runs.RunError, match="cannot be read as a weights-only checkpoint"):
        runs.load(str(bad))


# ----------------------------------------------------------------------------- preprocessing

def test_preprocess_turns_images_into_the_trainers_input():
    preset = runs.config_module().preset  # the config's module moves with the trainer's restructure
    from mpl_fast.data.views import Normalize, resize_center_crop

    digits = runs.preprocessing(preset("digits"))
    grey = torch.randint(0, 256, (1, 8, 8), dtype=torch.uint8)
    assert torch.allclose(digits(grey), grey.float().div(255).unsqueeze(0))
    assert torch.allclose(digits(grey.expand(3, 8, 8)), digits(grey))  # RGB files of grey digits
    assert digits(torch.zeros(2, 3, 20, 16, dtype=torch.uint8)).shape == (2, 1, 8, 8)

    cifar = runs.preprocessing(preset("cifar10-4k"))
    batch = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    expect = Normalize(cifar.mean, cifar.std)(batch)
    assert torch.allclose(cifar(batch), expect, atol=1e-5)

    photos = runs.preprocessing(preset("imagenet-10pct"))
    photo = torch.randint(0, 256, (3, 200, 300), dtype=torch.uint8)
    expect = Normalize(photos.mean, photos.std)(resize_center_crop(photo, 224).unsqueeze(0))
    assert photos(photo).shape == (1, 3, 224, 224)
    assert torch.allclose(photos(photo), expect, atol=1e-5)


def test_preprocess_of_photo_files_equals_the_trainers_test_batches(tmp_path):
    preset = runs.config_module().preset  # the config's module moves with the trainer's restructure
    from mpl_fast.data import build_streams
    from mpl_fast.data.tiny import write_tiny_imagefolder

    root = write_tiny_imagefolder(str(tmp_path / "photos"), num_classes=3, train_per_class=4, val_per_class=3,
                                  bad_files=False)
    cfg = preset("imagenet-10pct")
    cfg.data.data_dir, cfg.data.image_size, cfg.data.num_workers, cfg.data.loader = root, 48, 0, "torch"
    cfg.data.labeled_fraction, cfg.data.val_per_class = 0.5, 1
    trainer_view = torch.cat([x for x, _ in build_streams(cfg.data, seed=0).test])
    paths, labels, _ = evaluate_tool.folder_samples(os.path.join(root, "val"), 3)
    preprocess = runs.preprocessing(cfg)
    mine = torch.cat([preprocess(path) for path in paths])
    assert mine.shape == trainer_view.shape == (9, 3, 48, 48)
    assert torch.allclose(mine, trainer_view, atol=1e-5)


# ----------------------------------------------------------------------------- evaluate

def test_evaluate_on_the_runs_own_test_split_reproduces_the_summary(run_dir, summary):
    result = evaluate_tool.evaluate(run_dir, model="teacher")
    confusion = np.array(result["confusion"])
    assert result["images"] == confusion.sum() == 540 and confusion.shape == (10, 10)
    assert result["top1"] == pytest.approx(summary["test_top1"]["teacher"], abs=1e-9)
    assert result["top1"] == pytest.approx(100.0 * np.trace(confusion) / confusion.sum())
    assert result["top1"] <= result["top5"] <= 100.0


def _write_digit_folder(root, test_split, corrupt=True):
    """The test split as 8-bit grey PNGs in root/<label>/, and one file that is not an image."""
    from PIL import Image

    pixels, labels = [], []
    for x, y in test_split:
        pixels.append(torch.round(x[:, 0] * 255).to(torch.uint8))
        labels.append(y)
    pixels, labels = torch.cat(pixels), torch.cat(labels)
    for i, (image, label) in enumerate(zip(pixels, labels)):
        folder = root / str(int(label))
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image.numpy(), "L").save(folder / f"{i:04d}.png")
    if corrupt:
        (root / "3" / "broken.png").write_bytes(b"not a png")
    return pixels, labels


def test_evaluate_on_an_image_folder_predicts_what_the_network_predicts_on_those_pixels(run_dir, test_split,
                                                                                      tmp_path, capsys):
    pixels, labels = _write_digit_folder(tmp_path / "digits", test_split)
    model, _ = runs.load(run_dir, "teacher")
    with torch.no_grad():
        logits = model(pixels.float().div(255).unsqueeze(1))
    expect_top1 = 100.0 * int((logits.argmax(1) == labels).sum()) / len(labels)
    expect_top5 = 100.0 * int((logits.topk(5, 1).indices == labels[:, None]).any(1).sum()) / len(labels)

    out_json = tmp_path / "eval.json"
    code = evaluate_tool.main([run_dir, "--data-dir", str(tmp_path / "digits"), "--model", "teacher",
                               "--batch-size", "100", "--json", str(out_json)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "top-1" in printed and "top-5" in printed and "true \\ predicted" in printed
    assert "skipped 1 files that do not decode" in printed
    result = json.loads(out_json.read_text())
    assert result["images"] == len(labels)
    assert result["top1"] == pytest.approx(expect_top1, abs=1e-9)
    assert result["top5"] == pytest.approx(expect_top5, abs=1e-9)
    assert [os.path.basename(p) for p in result["unreadable"]] == ["broken.png"]
    assert np.array(result["confusion"]).sum(1).tolist() == torch.bincount(labels, minlength=10).tolist()


def test_evaluate_refuses_a_folder_whose_classes_do_not_fit_the_network(run_dir, tmp_path, capsys):
    for name in ("cat", "dog"):
        (tmp_path / "pets" / name).mkdir(parents=True)
    code = evaluate_tool.main([run_dir, "--data-dir", str(tmp_path / "pets")])
    err = capsys.readouterr().err
    assert code == 2 and "has 2 class folders and the network 10 classes" in err and "Traceback" not in err
    (tmp_path / "big" / "12").mkdir(parents=True)
    assert evaluate_tool.main([run_dir, "--data-dir", str(tmp_path / "big")]) == 2
    assert "class folder 12" in capsys.readouterr().err


# ----------------------------------------------------------------------------- export

def _reference_logits(run_dir, x):
    model, _ = runs.load(run_dir)
    with torch.no_grad():
        return model(x)


@pytest.mark.parametrize("fmt", ["safetensors", "torchscript", "onnx", "pt"])
def test_export_writes_a_file_that_loads_without_mpl_fast_and_gives_the_same_outputs(run_dir, tmp_path, fmt):
    if fmt == "safetensors":
        pytest.importorskip("safetensors", reason="safetensors is not installed (pip install mpl_fast[export])")
    if fmt == "onnx":
        pytest.importorskip("onnx", reason="onnx is not installed (pip install mpl_fast[export])")
        pytest.importorskip("onnxscript", reason="onnxscript is not installed (pip install mpl_fast[export])")
    out = str(tmp_path / f"net.{fmt}")
    result = export_tool.export(run_dir, fmt, out=out)
    assert os.path.isfile(out) and result["path"] == out
    x = torch.randn(5, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    expect = _reference_logits(run_dir, x)

    # Loaded with the format's own library alone (no mpl_fast code involved).
    if fmt == "safetensors":
        from safetensors import safe_open
        from safetensors.torch import load_file

        weights = load_file(out)
        with safe_open(out, "pt") as f:
            meta = json.loads(f.metadata()["mpl_fast"])
        got = torch.func.functional_call(runs.load(run_dir)[0], weights, (x,))
    elif fmt == "pt":
        saved = torch.load(out, map_location="cpu", weights_only=True)
        weights, meta = saved["state_dict"], saved["metadata"]
        got = torch.func.functional_call(runs.load(run_dir)[0], weights, (x,))
    elif fmt == "torchscript":
        files = {"mpl_fast.json": ""}
        net = torch.jit.load(out, map_location="cpu", _extra_files=files)
        meta = json.loads(files["mpl_fast.json"])
        got = net(x)
    else:
        import onnx

        model = onnx.load(out)
        onnx.checker.check_model(model)
        meta = json.loads({p.key: p.value for p in model.metadata_props}["mpl_fast"])
        ort = pytest.importorskip("onnxruntime", reason="onnxruntime is not installed: only the ONNX checker ran")
        session = ort.InferenceSession(out, providers=["CPUExecutionProvider"])
        got = torch.from_numpy(session.run(["logits"], {"input": x.numpy()})[0])
        assert result["skipped_check"] is None
    assert result["max_abs_diff"] is not None and result["max_abs_diff"] <= export_tool.TOLERANCE
    assert torch.allclose(got.detach(), expect, atol=1e-5)
    assert meta["network"]["model_name"] == "digits-cnn" and meta["network"]["num_classes"] == 10
    assert meta["network"]["input_shape"] == [1, 8, 8] and meta["preprocess"]["image_size"] == 8
    assert meta["model"] == "selected" and meta["checkpoint_step"] == 30


def test_export_without_onnxruntime_runs_the_checker_and_says_the_comparison_was_skipped(run_dir, tmp_path,
                                                                                        monkeypatch):
    pytest.importorskip("onnx", reason="onnx is not installed (pip install mpl_fast[export])")
    pytest.importorskip("onnxscript", reason="onnxscript is not installed (pip install mpl_fast[export])")
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    result = export_tool.export(run_dir, "onnx", out=str(tmp_path / "net.onnx"))
    assert result["max_abs_diff"] is None and "onnxruntime is not installed" in result["skipped_check"]


def test_export_names_the_missing_package_and_the_extra(run_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)
    code = export_tool.main([run_dir, "--format", "safetensors", "--out", str(tmp_path / "w.safetensors")])
    err = capsys.readouterr().err
    assert code == 2 and "needs the safetensors.torch package" in err and "pip install mpl_fast[export]" in err



def test_exporting_the_finetuned_student_leaves_the_runs_finetuned_pt_alone(run_dir, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    before = (run / "finetuned.pt").read_bytes()
    assert export_tool.main([str(run), "--format", "pt", "--model", "finetuned"]) == 0
    assert (run / "finetuned.pt").read_bytes() == before
    exported = torch.load(run / "finetuned.export.pt", weights_only=True)
    for k, v in runs.model_state(str(run), "finetuned").items():
        assert torch.equal(exported["state_dict"][k], v)


def test_export_refuses_an_export_that_does_not_reproduce_the_network(run_dir, tmp_path, monkeypatch):
    opened = runs.open_network(run_dir)
    out = str(tmp_path / "net.pt")
    export_tool.write(opened, "pt", out)
    with torch.no_grad():
        next(opened.network.parameters()).add_(1.0)  # the live network now differs from the file
    with pytest.raises(export_tool.ExportError, match="does not reproduce the network"):
        export_tool.check(opened, "pt", out)


# ----------------------------------------------------------------------------- plot

def test_plot_draws_every_panel_of_several_runs_and_tolerates_partial_and_nonfinite_lines(run_dir, tmp_path):
    pytest.importorskip("matplotlib", reason="matplotlib is not installed (pip install mpl_fast[plot])")
    other = tmp_path / "other"
    shutil.copytree(run_dir, other)
    with open(other / "metrics.jsonl", "a") as f:
        f.write('{"step": 35, "loss_teacher": NaN, "h": Infinity, "lr_teacher": null}\n{"step": 40, "loss_tea')
    metrics = plot_tool.read_metrics(str(other))
    assert metrics["skipped_lines"] == 1 and metrics["final"]["final"] is True
    assert math.isnan(metrics["train"][-1]["loss_teacher"]) and metrics["train"][-1]["lr_teacher"] is None
    assert [line["step"] for line in metrics["eval"]] == [10, 20, 30]
    steps, values = plot_tool.series(metrics, ("h",), "train")["h"]
    assert steps[-1] == 35 and math.isnan(values[-1])

    out = str(tmp_path / "curves.png")
    result = plot_tool.plot_runs([run_dir, str(other)], out)
    with open(out, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    panels = result["panels"]
    # 2 runs x (teacher losses 4, student 1, h 1, both rates 2, val/test: 3 models + selected + finetuned)
    assert panels == {"teacher losses": 8, "student loss": 2, "feedback h": 2, "learning rate": 4,
                      "validation top-1 (%)": 10, "test top-1 (%)": 10}
    assert result["skipped_lines"] == 1


def test_plot_cli_writes_next_to_the_run_and_refuses_a_missing_folder(run_dir, tmp_path, capsys):
    pytest.importorskip("matplotlib", reason="matplotlib is not installed (pip install mpl_fast[plot])")
    single = tmp_path / "single"
    shutil.copytree(run_dir, single)
    assert plot_tool.main([str(single)]) == 0
    assert (single / "metrics.png").stat().st_size > 10_000
    assert plot_tool.main([str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and "Traceback" not in err


def test_plot_without_matplotlib_says_how_to_install_it(run_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib.backends.backend_agg", None)
    assert plot_tool.main([run_dir, "--out", str(tmp_path / "x.png")]) == 2
    assert "pip install mpl_fast[plot]" in capsys.readouterr().err
