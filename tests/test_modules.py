"""Bring your own model: export_modules on modules written as a user would, the contract's checks
(one line naming the module, the shape it gave, the one expected and the fix), any stride."""

from __future__ import annotations

import inspect
import json
import math
import os
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from dff.export.exporter import export_dff_modules, export_modules
from dff.export.graphs import ExportError
from dff.export.modules import (
    DFFModules,
    ModuleError,
    as_modules,
    check_modules,
    load_factory,
    with_default_flow,
)
from torch import nn

from dff.commands import export as cli

NAMES = ("background", "thing")
SIZE = (64, 96)


class Trunk(nn.Module):
    """log2(stride) stride-2 convs with BatchNorm: the output stride is `stride`."""

    def __init__(self, stride: int = 8, channels: int = 8):
        super().__init__()
        layers, cin = [], 3
        for _ in range(int(math.log2(stride))):
            layers += [nn.Conv2d(cin, channels, 3, 2, 1), nn.BatchNorm2d(channels), nn.ReLU()]
            cin = channels
        self.body = nn.Sequential(*layers)

    def forward(self, x):
        return self.body(x)


class Flow(nn.Module):
    """A flow net on the stride grid, optionally with a scale field of `channels`."""

    def __init__(self, stride: int = 8, channels: int = 8, scale: bool = False,
                 flow_channels: int = 2, pool: int | None = None):
        super().__init__()
        self.pool, self.with_scale = pool or stride, scale
        self.conv = nn.Conv2d(6, 8, 3, padding=1)
        self.flow = nn.Conv2d(8, flow_channels, 1)
        self.scale = nn.Conv2d(8, channels, 1)

    def forward(self, x, key):
        y = F.avg_pool2d(torch.relu(self.conv(torch.cat((x, key), 1))), self.pool)
        return 0.1 * self.flow(y), (1 + 0.1 * self.scale(y) if self.with_scale else None)


class Head(nn.Module):
    def __init__(self, channels: int = 8, classes: int = 2):
        super().__init__()
        self.conv = nn.Conv2d(channels, classes, 1)

    def forward(self, feat):
        return self.conv(feat)  # logits on the feature grid: the graph resizes them


def modules(stride=8, **kw) -> dict:
    torch.manual_seed(0)
    parts = {"feature": Trunk(stride).eval(), "flow": Flow(stride).eval(), "task": Head().eval(),
             "class_names": NAMES, "input_size": SIZE, "stride": stride}
    return {**parts, **kw}


def check(**kw) -> str:
    with pytest.raises(ModuleError) as err:
        check_modules(DFFModules(**modules(**kw)))
    message = str(err.value)
    assert "\n" not in message
    return message


# --- the checks, one broken module each ----------------------------------------------------

def test_a_feature_map_off_the_stride_names_module_shape_expected_and_fix():
    message = check(feature=Trunk(stride=4).eval())
    assert message.startswith("feature test_modules.Trunk (tests/test_modules.py:")
    assert "gave feat [2, 8, 16, 24] for a 2x3x64x96 image" in message
    assert "expected float32 [2, C, 8, 12] (H/8 x W/8)" in message
    assert "make its output stride 8 or pass the stride it has (stride=...)" in message


def test_a_flow_with_three_channels_is_refused():
    message = check(flow=Flow(flow_channels=3).eval())
    assert message.startswith("flow test_modules.Flow (tests/test_modules.py:")
    assert "gave flow [2, 3, 8, 12]" in message and "expected [2, 2, 8, 12]" in message
    assert message.endswith(": 2 channels, (dx, dy) in feature cells; predict two")


def test_a_flow_off_the_feature_grid_is_refused():
    message = check(flow=Flow(pool=16).eval())
    assert "gave flow [2, 2, 4, 6] for a 2x3x64x96 image; expected [2, 2, 8, 12]" in message
    assert "the feature grid 8x12" in message and "pool or resize it onto the stride-8" in message


def test_a_scale_with_other_than_c_channels_is_refused():
    message = check(flow=Flow(scale=True, channels=5).eval())
    assert "gave scale [2, 5, 8, 12]" in message
    assert "expected [2, 8, 8, 12] (C = 8, the feature's channels), or None" in message


def test_segmentation_logits_for_other_classes_than_the_names_are_refused():
    message = check(task=Head(classes=3).eval())
    assert message.startswith("task test_modules.Head (tests/test_modules.py:")
    assert "gave [2, 3, 8, 12] for feat [2, 8, 8, 12]; expected logits [2, 2, h', w'] " \
           "(2 class names)" in message


class ThreeOutputs(nn.Module):
    def forward(self, feat):
        n = feat.shape[0]
        return feat.new_zeros(n, 5, 4), feat.new_zeros(n, 5), feat.new_zeros(n, 5)


class BadBoxes(nn.Module):
    def forward(self, feat):
        n = feat.shape[0]
        return {"boxes": feat.new_zeros(n, 5, 2), "scores": feat.new_zeros(n, 5),
                "classes": torch.zeros(n, 5, dtype=torch.int32),
                "num": torch.zeros(n, dtype=torch.int32)}


def test_detection_outputs_off_the_contract_are_refused():
    message = check(kind="detection", task=ThreeOutputs())
    assert "returned a tuple of 3 for feat [2, 8, 8, 12]" in message and "['boxes', 'scores', 'classes', 'num']" in message
    message = check(kind="detection", task=BadBoxes())
    assert "gave boxes [2, 5, 2] for feat [2, 8, 8, 12]; expected [2, 5, 4]" in message


class CumMax(nn.Module):
    """A trunk with an op torch's ONNX exporter has no translation for."""

    def __init__(self):
        super().__init__()
        self.trunk = Trunk(8)

    def forward(self, x):
        return torch.cummax(self.trunk(x), 3)[0]


def test_a_module_the_exporter_cannot_export_names_the_op_and_the_module(tmp_path):
    parts = modules(feature=CumMax().eval())
    with pytest.raises(ExportError) as err:
        export_modules(tmp_path / "e", **parts)
    message = str(err.value)
    assert message.startswith("feature.onnx: torch.onnx.export failed on feature "
                              "test_modules.CumMax (tests/test_modules.py:")
    assert " at aten.cummax " in message and "\x1b" not in message and "\n" not in message
    assert not (tmp_path / "e").exists()


def test_modules_in_training_mode_are_exported_in_eval_mode_and_said_so(tmp_path):
    parts = modules()
    parts["feature"].train()
    lines: list[str] = []
    result = export_modules(tmp_path / "e", **parts, log=lines.append)
    assert not parts["feature"].training
    notes = [line for line in lines if line.startswith("note: feature")]
    assert notes == [(f"note: feature test_modules.Trunk (tests/test_modules.py:"
                     f"{inspect.getsourcelines(Trunk)[1]}) was in training mode (its "
                     "BatchNorm2d would use batch statistics or drop units); exported in eval "
                     "mode")]
    assert result.manifest["export"]["parity"]["passed"]


# --- export and run, any stride ------------------------------------------------------------

@pytest.mark.parametrize("stride", [8, 32])
def test_export_modules_at_any_stride_runs_through_the_runtime(stride, tmp_path):
    from dff.data.synthetic import make_clip
    from dff.runtime.loop import Pipeline
    from dff.runtime.ort_backend import OrtBackend
    from dff.runtime.scheduler import FixedInterval

    size = (64, 96) if stride == 8 else (64, 128)
    parts = modules(stride, input_size=size)
    result = export_modules(tmp_path / "e", **parts)
    m = result.manifest
    assert m["stride"] == stride and m["feat_channels"] == 8
    assert m["export"]["modules"]["scale_field"] is False and "checkpoint" not in m["export"]
    assert m["normalisation"]["flow"] == {"mean": [0.0] * 3, "std": [255.0] * 3}
    frames = make_clip(7, 6, *size).frames
    backend = OrtBackend(tmp_path / "e", threads=1)
    results = list(Pipeline(backend, FixedInterval(3)).run(iter(frames)))
    backend.close()
    ref = reference_labels(parts, frames, 3)
    got = np.stack([r.labels for r in results])
    assert got.shape == ref.shape == (6, *size)
    assert (got == ref).mean() >= 0.999


def test_no_flow_net_exports_the_pretrained_real_footage_net(tmp_path):
    """flow=None (or left out of a factory's dict): RealFlowNet for the stride and the
    feature's channels, on its own normalisation, named in the manifest."""
    from dff.models.realflow import WEIGHTS, RealFlowNet

    if not WEIGHTS.exists():
        pytest.skip(f"no shipped {WEIGHTS.name}")
    parts = {k: v for k, v in modules(8).items() if k != "flow"}
    mods = as_modules(dict(parts), "test")
    assert mods.flow is None
    filled = with_default_flow(mods)
    assert isinstance(filled.flow, RealFlowNet) and filled.flow.stride == 8
    assert filled.flow.predict_scale.out_channels == 8 and filled.flow.input_scale == 1.0
    assert "realflow" in filled.source["flow"] and mods.flow is None
    result = export_modules(tmp_path / "e", flow=None, **parts)
    m = result.manifest
    assert m["normalisation"]["flow"] == {"mean": [127.5] * 3, "std": [255.0] * 3}
    assert "realflow" in json.dumps(m["export"])
    assert (tmp_path / "e" / "flow.onnx").is_file()


class TopDetections(nn.Module):
    """A user's own detection decode: the 5 best cells of a class heatmap, a cell-sized box
    each, returned as a dict with int64 classes (the graph casts them to the contract's int32)."""

    def __init__(self, channels: int = 8, classes: int = 2, stride: int = 8):
        super().__init__()
        self.heat, self.stride = nn.Conv2d(channels, classes, 1), stride

    def forward(self, feat):
        heat = self.heat(feat).sigmoid()
        _, k, h, w = heat.shape
        scores, index = heat.flatten(1).topk(5)

        def at(values, view):  # a per-cell value, gathered at the top cells
            return values.view(view).expand_as(heat).flatten(1).gather(1, index)

        y = at(torch.arange(h, dtype=torch.float32), (1, 1, -1, 1))
        x = at(torch.arange(w, dtype=torch.float32), (1, 1, 1, -1))
        classes = at(torch.arange(k), (1, -1, 1, 1))
        boxes = torch.stack((x, y, x + 1, y + 1), -1) * self.stride
        return {"boxes": boxes, "scores": scores, "classes": classes,
                "num": (scores > 0.05).sum(1)}


def test_a_detection_module_of_ones_own_exports_with_the_contracts_outputs(tmp_path):
    parts = modules(kind="detection", task=TopDetections().eval(), max_detections=5)
    result = export_modules(tmp_path / "e", **parts)
    m = result.manifest
    assert m["task"]["kind"] == "detection" and m["task"]["max_detections"] == 5
    assert [(t["name"], t["dtype"], t["shape"]) for t in m["graphs"]["task"]["outputs"]] == [
        ("boxes", "float32", ["N", 5, 4]), ("scores", "float32", ["N", 5]),
        ("classes", "int32", ["N", 5]), ("num", "int32", ["N"])]
    frames = [r for r in result.rows if r.graph == "task"]
    assert frames and all(r.passed and r.value >= 0.999 for r in frames)


def test_the_torch_backend_on_a_module_export_says_it_runs_checkpoints(tmp_path):
    from dff.runtime.backends import BackendError
    from dff.runtime.torch_backend import torch_checkpoint

    export_modules(tmp_path / "e", **modules())
    with pytest.raises(BackendError, match=r"manifest.json: exported from your own modules "
                                           r"\(dff.export.export_modules\).*--backend onnxruntime"):
        torch_checkpoint(tmp_path / "e", None)


@torch.no_grad()
def reference_labels(parts: dict, frames: np.ndarray, interval: int) -> np.ndarray:
    """The modules run directly: ImageNet-normalised trunk, [0,1] flow net, FlowWarp's reference
    warp with scale 1, logits resized bilinearly to the frame, arg-max."""
    from dff.export.modules import IMAGENET_MEAN, IMAGENET_STD
    from dff.models.warp import flow_warp

    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD)
    out, key_feat, key_x = [], None, None
    for t, frame in enumerate(frames):
        x = torch.from_numpy(frame).permute(2, 0, 1)[None].float()
        if t % interval == 0:
            key_feat, key_x = parts["feature"]((x - mean) / std.view(1, 3, 1, 1)), x
            feat = key_feat
        else:
            flow, _ = parts["flow"](x / 255, key_x / 255)
            feat = flow_warp(key_feat, flow, torch.ones_like(key_feat))
        logits = F.interpolate(parts["task"](feat), size=frame.shape[:2], mode="bilinear",
                               align_corners=False)
        out.append(logits.argmax(1)[0].numpy())
    return np.stack(out).astype(np.uint8)


# --- the factory and the command line ------------------------------------------------------

FACTORY = '''
from test_modules import Flow, Head, Trunk

def build(stride=8, names=("background", "thing")):
    return {"feature": Trunk(stride).eval(), "flow": Flow(stride).eval(), "task": Head().eval(),
            "class_names": names, "input_size": (64, 96), "stride": stride}

def broken():
    raise RuntimeError("no weights here")
'''


@pytest.fixture
def factory(tmp_path, monkeypatch):
    (tmp_path / "my_models.py").write_text(textwrap.dedent(FACTORY))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    yield "my_models"
    sys.modules.pop("my_models", None)


def test_dff_export_module_exports_what_the_factory_builds(factory, capsys):
    assert cli.main(["--module", f"{factory}:build", "--module-arg", "stride=16", "-o",
                     "out"]) == 0
    manifest = json.loads(Path("out/manifest.json").read_text())
    assert manifest["stride"] == 16
    assert manifest["export"]["modules"]["factory"].startswith(
        f"factory {factory}:build (my_models.py:4)")


@pytest.mark.parametrize("argv, message", [
    (["--module", "my_models:broken"], ("factory my_models:broken (my_models.py:8): raised "
                                       "RuntimeError: no weights here")),
    (["--module", "my_models:nothing"], ("--module my_models:nothing (my_models.py): has no "
                                        "callable 'nothing'")),
    (["--module", "my_models:build", "--module-arg", "depth=3"],
     "factory my_models:build (my_models.py:4): calling it with {'depth': 3} failed"),
    (["--module", "no_such_package.models:build"], ("--module no_such_package.models:build: "
                                                   "importing no_such_package.models failed")),
    (["--module", "my_models"], "--module 'my_models': give package.module:factory"),
])
def test_a_bad_factory_is_one_line_exit_1_and_nothing_written(factory, argv, message, capsys):
    assert cli.main([*argv, "-o", "out"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"dff-export: {message}") and err.count("\n") == 1
    assert not os.path.exists("out")


def test_a_factory_may_return_dffmodules_and_its_fields_are_checked(factory):
    mods = load_factory(f"{factory}:build", {"names": ["only"]})
    assert isinstance(mods, DFFModules) and mods.num_classes == 1
    with pytest.raises(ModuleError, match=r"task test_modules.Head .*expected logits "
                                          r"\[2, 1, h', w'\] \(1 class names\)"):
        export_dff_modules(mods, "out")
