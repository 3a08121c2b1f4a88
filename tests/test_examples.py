"""The examples run as a user runs them: examples/own_model/run.py trains a MobileNetV2-style
model of its own (output stride 8, a flow net without a scale field), exports it with
`dff.export.export_modules`, runs dff-run on an encoded clip at k=1 and k=5 and compares the
labels with its PyTorch modules on the same decoded frames."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OWN_MODEL = ROOT / "examples" / "own_model" / "run.py"


def test_own_model_example_exports_runs_and_matches_pytorch(tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("cv2")
    out = tmp_path / "demo"
    proc = subprocess.run([sys.executable, str(OWN_MODEL), "--out", str(out)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    agreement = dict(re.findall(r"^k=(\d+): agreement ([\d.]+) % of pixels", proc.stdout,
                                re.MULTILINE))
    assert sorted(agreement, key=int) == ["1", "5"], proc.stdout[-4000:]
    for k, percent in agreement.items():
        assert float(percent) >= 99.9, f"k={k}: {percent} % of pixels agree"
    manifest = json.loads((out / "engines" / "manifest.json").read_text())
    assert manifest["stride"] == 8
    assert manifest["feat_channels"] == 32
    for k in (1, 5):  # labels at the image size: the graph resized the stride-8 logits
        records = [json.loads(line) for line in
                   (out / f"labels.k{k}.jsonl").read_text().splitlines()]
        assert len(records) == 30
        assert {tuple(r["labels"]["size"]) for r in records} == {(96, 160)}
        assert sum(r["key"] for r in records) == 30 // k


REAL_FOOTAGE = ROOT / "examples" / "real_footage" / "run.py"


def test_real_footage_example_on_a_short_cut_of_the_held_out_clip(tmp_path, real_material):
    """examples/real_footage/run.py --max-frames 30: CenterFace (fetched) split with its
    decode, dff-run with DIS at k=10 and dff-eval's agreement JSON on carphone's first 30
    frames. The full run's figures are in docs/MEASUREMENTS.md; here, that it runs and that
    its outputs hold together."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("cv2")
    real_material("centerface.onnx")
    real_material("carphone_pristine.mp4")
    out = tmp_path / "demo"
    proc = subprocess.run([sys.executable, str(REAL_FOOTAGE), "--out", str(out),
                           "--max-frames", "30"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    manifest = json.loads((out / "engines" / "manifest.json").read_text())
    assert manifest["stride"] == 4 and manifest["task"]["kind"] == "detection"
    assert manifest["flow"]["sources"] == ["dis"] and "flow" not in manifest["graphs"]
    assert (out / "carphone.dff.mp4").stat().st_size > 0
    res = json.loads((out / "agreement.json").read_text())
    assert res["modes"] == ["dff-dis", "copy"] and res["intervals"] == [5, 10]
    assert res["frames"] == {"carphone_pristine.mp4": 30}
    for mode in res["modes"]:
        for k in ("5", "10"):
            assert 0 <= res["agreement"][mode][k] <= 1
            assert res["agreement50"][mode][k] >= res["agreement"][mode][k]
    assert "k=10: AP@[.5:.95] agreement with per-frame: dff-dis" in proc.stdout


def test_real_footage_example_adapts_a_learned_flow(tmp_path, real_material):
    """--adapt with a few iterations on bikes.mp4 alone (its last 20 % held out; CI fetches
    no vtest.avi): the adapted flow becomes the export's default, dff-run runs it and the
    agreement has mode dff beside dff-dis and copy. The full 25-minute run's figures are in
    docs/MEASUREMENTS.md."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("cv2")
    for name in ("centerface.onnx", "carphone_pristine.mp4", "bikes.mp4"):
        real_material(name)
    out = tmp_path / "demo"
    proc = subprocess.run([sys.executable, str(REAL_FOOTAGE), "--out", str(out),
                           "--max-frames", "20", "--adapt", "--adapt-iters", "3",
                           "--adapt-clips", "bikes.mp4"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    manifest = json.loads((out / "engines" / "manifest.json").read_text())
    assert manifest["flow"] == {**manifest["flow"], "sources": ["learned", "dis"],
                                "default": "learned"}
    record = manifest["export"]["adapt"]
    assert record["iterations"] == 3 and record["input_scale"] == 0.5  # the example's choice
    assert [Path(v["file"]).name for v in record["videos"]] == ["bikes.mp4"]
    assert record["held_out"][0]["from_frame"] == 200 and record["verdict"]["says"]
    res = json.loads((out / "agreement.json").read_text())
    assert res["modes"] == ["dff", "dff-dis", "copy"]
    for mode in res["modes"]:
        for k in ("5", "10"):
            assert 0 <= res["agreement"][mode][k] <= 1
    assert "k=10: AP@[.5:.95] agreement with per-frame: dff " in proc.stdout
    # the held-out clip is never trained on
    bad = subprocess.run([sys.executable, str(REAL_FOOTAGE), "--out", str(tmp_path / "x"),
                          "--adapt", "--adapt-clips", "carphone_pristine.mp4"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=600, check=False)
    assert bad.returncode != 0 and "held-out clip" in bad.stderr
