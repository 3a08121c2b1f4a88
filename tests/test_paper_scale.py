"""benchmarks/paper_scale.py: the paper's architecture (ResNet-101 at stride 16, C = 1024,
FlowNet-S half on the half-resolution pair) and the script's JSON, at 64×128. A smoke test:
nothing here is timed or compared with a speed (the paper-scale run is a benchmark)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from dff.models.trunk import Bottleneck

ROOT = Path(__file__).resolve().parents[1]
FLOWNET_S = (64, 128, 256, 256, 512, 512, 512, 512, 1024, 1024)  # the released FlowNet-S
H, W = 64, 128


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("paper_scale",
                                                  ROOT / "benchmarks" / "paper_scale.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("task, seg_head, head, classes", [
    ("segmentation", "paper", "ScoreHead", 19), ("segmentation", "aspp", "SegmentationHead", 19),
    ("detection", "paper", "DetectionHead", 30)])
def test_the_model_is_resnet101_at_stride_16_with_flownet_half_on_the_half_resolution_pair(
        bench, task, seg_head, head, classes):
    model = bench.build_model(bench.paper_config(task, (H, W), seg_head=seg_head))
    stages = model.trunk.stages
    assert [len(s) for s in stages] == [3, 4, 23, 3]
    assert all(isinstance(block, Bottleneck) for s in stages for block in s)
    assert stages[3][0].conv2.dilation == (2, 2) and stages[3][0].conv1.stride == (1, 1)
    with torch.no_grad():
        feat = model.features(torch.zeros(1, 3, H, W))
    assert feat.shape == (1, 1024, H // 16, W // 16)
    arch = bench.architecture(model)
    assert arch["blocks"] == [3, 4, 23, 3] and arch["output_stride"] == 16
    assert arch["feat_channels"] == 1024 and arch["feat_conv_dilation"] == 6
    assert arch["flow_widths"] == [w // 2 for w in FLOWNET_S]
    assert arch["flow_input"] == [6, H // 2, W // 2]  # current and key frame, half resolution
    assert type(model.head).__name__ == head and model.config.num_classes == classes
    assert arch["head"].startswith(head)
    if head == "ScoreHead":  # the paper's: one 1x1 conv to the scores, upsampled to H x W
        convs = [m for m in model.head.modules() if isinstance(m, torch.nn.Conv2d)]
        assert [(c.in_channels, c.out_channels, c.kernel_size) for c in convs] == [
            (1024, classes, (1, 1))]
        with torch.no_grad():
            assert model.task(feat).shape == (1, classes, H, W)


def test_the_benchmark_writes_the_documented_json_and_says_random_weights(bench, tmp_path,
                                                                           capsys):
    out = tmp_path / "paper.json"
    code = bench.main(["--size", f"{H}x{W}", "--parity-size", f"{H}x{W}", "--iterations", "1",
                       "--repeats", "1", "--frames", "20", "--threads", "1", "--keep",
                       str(tmp_path / "engines"), "--flow", "dis", "--json", str(out)])
    stdout = capsys.readouterr().out
    assert code == 0, stdout
    res = json.loads(out.read_text())
    assert {"stages_ms", "r", "speedup", "efficiency"} <= set(res)
    assert set(res["stages_ms"]) == {"feature", "flow", "task"}
    assert all(v > 0 for v in res["stages_ms"].values())
    assert 0 < res["r"] < 1
    assert sorted(res["speedup"], key=int) == ["5", "10", "20"]
    assert set(res["model_speedup"]) == set(res["speedup"])
    assert res["efficiency"] > 0 and res["weights"] == "random: speed only"
    assert res["seg_head"] == "paper" and res["architecture"]["head"].startswith("ScoreHead")
    assert res["architecture"]["blocks"] == [3, 4, 23, 3]
    assert [row["key_interval"] for row in res["profile"]["end_to_end"]] == [1, 5, 10, 20]
    # exported by dff-export's code into --keep, at the size benchmarked
    manifest = json.loads((tmp_path / "engines" / "segmentation" / "manifest.json").read_text())
    assert manifest["export"]["tool"] == "dff-export"
    assert manifest["profile"]["max"] == [1, H, W] and manifest["feat_channels"] == 1024
    assert "weights random: speed only" in stdout and "model s" in stdout
    # --flow dis: its flow stage, r and speedups beside the learned flow's, from the same run
    dis = res["dis"]
    assert dis["flow"]["source"] == "dis" and dis["r"] == pytest.approx(
        res["r"] * dis["r_over_learned"])
    assert sorted(dis["speedup"], key=int) == ["5", "10", "20"]
    assert dis["dis_ms"] > 0 and dis["warp_ms"] > 0
    assert [row["key_interval"] for row in dis["end_to_end_repeats"][0]] == [1, 5, 10, 20]
    assert "--flow dis (ultrafast" in stdout
