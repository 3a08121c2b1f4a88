"""dff-adapt (models/adapt.py, dff/commands/adapt.py): a learned flow for an existing export,
trained on the user's video with the export's feature graph as the teacher. A few iterations
each, on the tiny export and a short synthetic clip."""

from __future__ import annotations

import contextlib
import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from dff.engines import builder
from dff.export.manifest import DIS, LEARNED, default_flow, flow_sources, load_manifest
from dff.models import adapt as adapt_mod
from dff.runtime.video import write_synthetic_clip
from torch import nn

from dff.commands import adapt as adapt_cli
from dff.commands import build as build_cli
from dff.commands import export as export_cmd
from dff.commands import run as run_cli

pytest.importorskip("onnxruntime")
pytest.importorskip("cv2")

INIT = ("scratch:SmallFlowNet", adapt_mod.SmallFlowNet)


@pytest.fixture(autouse=True)
def _small_init(monkeypatch):
    """The small flow net whatever dff.models.realflow is, so each test takes seconds."""
    monkeypatch.setattr(adapt_mod, "default_init", lambda: INIT)


@pytest.fixture
def export(engines, tmp_path) -> Path:
    return shutil.copytree(engines, tmp_path / "engines")


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("clip") / "clip.mp4"
    write_synthetic_clip(path, seed=4, num_frames=24, height=64, width=96)
    return path


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def test_adapt_writes_a_learned_flow_and_resumes(export, clip, tmp_path, capsys):
    old_flow = (export / "flow.onnx").read_bytes()
    m = json.loads((export / "manifest.json").read_text())
    m["engines"]["flow_x"] = {"file": "flow.onnx", "sha256": m["graphs"]["flow"]["sha256"],
                              "graph": "flow"}  # as an engine built from the old flow graph
    (export / "manifest.json").write_text(json.dumps(m))
    argv = [str(export), "--video", str(clip), "--iters", "4", "--k-max", "3",
            "--eval-every", "2", "--batch", "2"]
    assert adapt_cli.main(argv) == 0
    out = capsys.readouterr()
    assert "held_feat" in out.err and "dis_epe" in out.err and "max abs error" in out.out
    assert "motion_epe" in out.err and "known-motion EPE" in out.out
    assert "held_task_err" in out.err and "task-output error this net" in out.out
    assert (export / "flow.prev.onnx").read_bytes() == old_flow
    assert (export / "flow.onnx").read_bytes() != old_flow
    assert (export / "adapt" / "checkpoint.pt").is_file()
    m = load_manifest(export)
    record = m["export"]["adapt"]
    assert record["iterations"] == 4 and record["stages"] == ["dis", "distil"]
    assert record["k_max"] == 3 and record["init"] == INIT[0]
    assert record["videos"][0]["sha256"] and record["held_out"][0]["from_frame"] == 19
    assert {"feat", "dis_epe", "copy_feat", "dis_feat", "task_err", "copy_task_err",
            "dis_task_err", "motion_epe"} <= set(record["held_out_loss"])
    assert record["motion_weight"] == 0.5 and record["chosen"]["motion_epe"] >= 0
    # the net written is the held-out's best of the init (iteration 0) and iterations 2 and 4
    assert record["chosen"]["iteration"] in (0, 2, 4)
    assert record["input_scale"] == 1.0 and record["train_scale"] is False
    assert record["verdict"]["says"] in out.out and record["verdict"]["on"] in ("task_err", "feat")
    assert record["engines_dropped"] == ["flow_x"] and "flow_x" not in m["engines"]
    assert m["normalisation"]["flow"] == {"mean": [127.5] * 3, "std": [127.5] * 3}
    assert flow_sources(m) == [LEARNED, DIS] and default_flow(m) == LEARNED
    proto = onnx.load(export / "flow.onnx")
    assert [(f.domain, f.name) for f in proto.functions] == [("dff", "FlowWarp")]
    assert [i.name for i in proto.graph.input] == ["image", "key_image", "key_feat"]
    # dff-run runs it
    assert run_cli.main([str(clip), "-e", str(export), "-b", "onnxruntime-cpu", "--flow",
                         "learned", "-o", str(tmp_path / "o.mp4"), "-k", "5", "--quiet"]) == 0
    assert (tmp_path / "o.mp4").is_file()
    # --resume continues the count
    assert adapt_cli.main([*argv[:3], "--iters", "2", "--k-max", "3", "--resume", "-q"]) == 0
    assert load_manifest(export)["export"]["adapt"]["iterations"] == 6
    blob = torch.load(export / "adapt" / "checkpoint.pt", weights_only=False)
    assert blob["iteration"] == 6 and blob["optimizer"]["state"]
    assert blob["stage"] == "distil"  # a resumed run that reached distil does not refit DIS
    assert [h["stage"] for h in blob["history"]] == ["dis", "distil"]
    with pytest.raises(adapt_mod.AdaptError, match="--input-scale 1, not 0.5"):
        adapt_mod.adapt(export, [clip], adapt_mod.AdaptOptions(iters=1, k_max=3, resume=True,
                                                               input_scale=0.5), init=INIT)


@pytest.mark.parametrize("stop_at", [3, 52])
def test_ctrl_c_keeps_the_export_and_says_how_to_resume(export, clip, monkeypatch, capsys,
                                                        stop_at):
    """Ctrl-C (a KeyboardInterrupt from inside a training step) before and after the first
    checkpoint (every 50 iterations): exit 130, the export untouched, one line that says
    whether --resume has this run's checkpoint to continue from."""
    before = snapshot(export)
    step, calls = adapt_mod.Trainer.step, []

    def interrupted(self, stage):
        calls.append(stage)
        if len(calls) == stop_at:
            raise KeyboardInterrupt
        return step(self, stage)

    monkeypatch.setattr(adapt_mod.Trainer, "step", interrupted)
    argv = [str(export), "--video", str(clip), "--iters", "60", "--k-max", "3",
            "--eval-every", "100", "--batch", "2", "-q"]
    assert adapt_cli.main(argv) == 130
    ckpt = export / "adapt" / "checkpoint.pt"
    then = (f"--resume continues from {ckpt}" if stop_at > 50
            else "this run saved no checkpoint yet")
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"dff-adapt: interrupted (Ctrl-C); {export}'s flow.onnx and manifest unchanged; {then}")
    assert snapshot(export) == before
    if stop_at > 50:
        monkeypatch.setattr(adapt_mod.Trainer, "step", step)
        argv[argv.index("--iters") + 1] = "2"  # two more than the 50 saved
        assert adapt_cli.main([*argv, "--resume"]) == 0
        assert load_manifest(export)["export"]["adapt"]["iterations"] == 52


def test_refusals_are_one_line_and_change_nothing(export, clip, tmp_path, capsys):
    before = snapshot(export)
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"not a video at all")
    short = tmp_path / "short.mp4"
    write_synthetic_clip(short, seed=1, num_frames=4, height=64, width=96)
    empty = tmp_path / "empty"
    empty.mkdir()
    cases = [
        ([str(export), "--video", str(bad), "--iters", "2"], "bad.mp4"),
        ([str(export), "--video", str(short), "--iters", "2", "--k-max", "3"], "too few"),
        ([str(export), "--video", str(clip), "--iters", "2", "--k-max", "20"], "too few"),
        ([str(tmp_path / "nothing"), "--video", str(clip), "--iters", "2"], "no such directory"),
        ([str(empty), "--video", str(clip), "--iters", "2"], "manifest.json: missing"),
    ]
    for argv, words in cases:
        assert adapt_cli.main(argv) == 1
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith("dff-adapt: ") and words in err, err
    assert snapshot(export) == before and not (export / "adapt").exists()
    assert list(empty.iterdir()) == []


def test_library_takes_its_init_and_holds_out_clips(export, clip, tmp_path):
    second = tmp_path / "b.mp4"
    write_synthetic_clip(second, seed=5, num_frames=12, height=64, width=96)
    made = []

    def init(stride, channels, input_scale):
        made.append((stride, channels, input_scale))
        return adapt_mod.SmallFlowNet(stride, channels, input_scale, width=8)

    options = adapt_mod.AdaptOptions(iters=3, k_max=2, batch=1, stages=("distil",),
                                     eval_every=2)
    watched = []

    def watch(iteration, net, scores):  # benchmarks/adapt_stereo.py's hook
        watched.append((iteration, net.training, set(scores)))

    record = adapt_mod.adapt(export, [clip, second], options, init=("test:init", init),
                             watch=watch)
    # the start, each held-out evaluation (every 2) and the last iteration, in eval mode
    assert [(i, training) for i, training, _ in watched] == [(0, False), (2, False),
                                                             (3, False)]
    assert all({"feat", "dis_epe", "motion_epe"} <= names for *_, names in watched)
    m = load_manifest(export)
    assert made == [(m["stride"], m["feat_channels"], 1.0)]  # a small export: scale 1
    assert record["init"] == "test:init" and record["stages"] == ["distil"]
    assert [h["file"] for h in record["held_out"]] == [str(second.resolve())]
    with pytest.raises(adapt_mod.AdaptError, match="started from 'test:init'"):
        adapt_mod.adapt(export, [clip], adapt_mod.AdaptOptions(iters=1, k_max=2, resume=True),
                        init=INIT)


def test_below_input_scale_1_the_known_motions_are_also_fitted_on_the_whole_frames(
        export, clip, monkeypatch):
    from dff.models.realflow import RealFlowNet

    entered = []  # (net.training, the input scale inside) at each full_size block
    full_size = adapt_mod.full_size

    def counted(net):
        entered.append((net.training, None))
        with full_size(net):
            entered[-1] = (net.training, net.input_scale)
            yield

    monkeypatch.setattr(adapt_mod, "full_size", contextlib.contextmanager(counted))
    # what is written is tested above and in test_realflow.py; here only what is trained
    monkeypatch.setattr(adapt_mod, "write_learned_flow", lambda *a, **k: None)
    options = adapt_mod.AdaptOptions(iters=1, k_max=2, batch=1, stages=("distil",),
                                     eval_every=1, input_scale=0.5)
    watched = []
    nets = []

    def init(stride, channels, input_scale):
        nets.append(RealFlowNet(stride, channels, input_scale))
        return nets[-1]

    record = adapt_mod.adapt(export, [clip], options, init=("test:realflow", init),
                             watch=lambda i, net, scores: watched.append(scores))
    # the start's evaluation, the training step, its evaluation and the last one
    assert [t for t, _ in entered] == [False, True, False, False]
    assert {s for _, s in entered} == {1.0} and nets[0].input_scale == 0.5
    assert len(watched) == 2 and all(s["motion_epe_full"] > 0 for s in watched)
    assert record["full_motion_weight"] == 3.0 and record["chosen"]["motion_epe_full"] > 0
    # only a net that reads its input scale in forward runs on the whole frames
    assert not adapt_mod.shrinks(RealFlowNet(16, 1, 1.0))
    assert not adapt_mod.shrinks(adapt_mod.SmallFlowNet(16, 1, 0.5))


class TinyFace(nn.Module):
    """A CenterFace-shaped model (stride 4 features, four heads), as tests/test_onnx_split.py."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.b = nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.heads = nn.ModuleList(nn.Conv2d(8, c, 1) for c in (1, 2, 2, 10))

    def forward(self, x):
        feat = torch.relu(self.b(torch.relu(self.a(x))))
        heat, scale, offset, marks = (h(feat) for h in self.heads)
        return heat.sigmoid(), scale, offset, marks


def onnx_export(tmp_path: Path) -> Path:
    """dff-export --onnx of TinyFace at 64x96: no flow.onnx, DIS by default."""
    path = tmp_path / "tiny.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(TinyFace().eval(), torch.zeros(1, 3, 32, 32), path, dynamo=False,
                          opset_version=9, input_names=["input.1"])
    tensor = [n.output[0] for n in onnx.load(path).graph.node if n.op_type == "Relu"][-1]
    out = tmp_path / "e"
    assert export_cmd.main(["--onnx", str(path), "--feature-output", tensor, "--bgr",
                            "--input-size", "64x96", "-o", str(out)]) == 0
    return out


def adapted_onnx_export(tmp_path: Path, capsys) -> Path:
    out = onnx_export(tmp_path)
    assert not (out / "flow.onnx").exists()
    video = tmp_path / "v.mp4"
    write_synthetic_clip(video, seed=2, num_frames=16, height=64, width=96)
    capsys.readouterr()
    assert adapt_cli.main([str(out), "--video", str(video), "--iters", "3", "--k-max", "3",
                           "--default", "learned", "-q"]) == 0, capsys.readouterr().err
    return out


def test_an_onnx_export_without_a_flow_graph_gets_a_learned_flow(tmp_path, capsys):
    out = adapted_onnx_export(tmp_path, capsys)
    m = load_manifest(out)
    assert flow_sources(m) == [LEARNED, DIS] and default_flow(m) == LEARNED
    assert not (out / "flow.prev.onnx").exists() and m["plugin"]["graph"] == "flow"
    assert m["graphs"]["flow"]["outputs"][1]["shape"][1] == m["feat_channels"]
    import onnxruntime as ort

    image = np.random.default_rng(0).integers(0, 256, (1, 3, 64, 96), dtype=np.uint8)
    feat = ort.InferenceSession(str(out / "feature.onnx")).run(None, {"image": image})[0]
    flow, _scale, warped = ort.InferenceSession(str(out / "flow.onnx")).run(
        None, {"image": image, "key_image": image, "key_feat": feat})
    assert warped.shape == feat.shape and flow.shape[1] == 2
    assert adapt_mod.read_export(out)["export"]["adapt"]["iterations"] == 3


@pytest.mark.skipif(not builder.tensorrt_available(), reason="TensorRT is not installed")
def test_dff_build_builds_the_learned_flow_graph(tmp_path, capsys):
    out = adapted_onnx_export(tmp_path, capsys)
    assert build_cli.main([str(out), "--fp32"]) == 0
    m = load_manifest(out)
    flows = [e for e in m["engines"].values() if e["graph"] == "flow"]
    assert len(flows) == 1 and flows[0]["onnx_sha256"] == m["graphs"]["flow"]["sha256"]


def test_known_motions_are_the_exact_flow_in_feature_cells():
    """dff-adapt's known motions: a frame moved along a layered motion, the flow averaged over
    each feature cell and given in cells (current -> key)."""
    frames = np.random.default_rng(1).integers(0, 255, (3, 64, 96, 3), np.uint8)
    clip = adapt_mod.Clip(Path("c.mp4"), "0", frames)
    mean, std = torch.zeros(1, 3, 1, 1), torch.ones(1, 3, 1, 1)
    m = adapt_mod.known_motions([clip], 2, 16, mean, std, np.random.default_rng(0))
    assert m["x"].shape == m["key_x"].shape == (2, 3, 64, 96) and m["flow"].shape == (2, 2, 4, 6)
    again = adapt_mod.known_motions([clip], 2, 16, mean, std, np.random.default_rng(0))
    assert torch.equal(m["flow"], again["flow"])  # from the generator given, nothing else
    assert float(m["flow"].abs().max()) > 0.05  # cells, not pixels, and not zero


def test_the_teacher_pads_the_last_chunk_for_a_graph_of_fixed_batch():
    class Session:
        def run(self, _, feeds):
            assert len(feeds["image"]) == 3
            return [feeds["image"][:, :1].astype(np.float32)]

    teacher = adapt_mod.Teacher.__new__(adapt_mod.Teacher)
    teacher.session, teacher.input, teacher.batch, teacher.fixed = Session(), "image", 3, True
    images = np.arange(4 * 3 * 2 * 2, dtype=np.uint8).reshape(4, 3, 2, 2)
    np.testing.assert_array_equal(teacher.run(images), images[:, :1].astype(np.float32))


def test_the_verdict_compares_the_written_net_with_copy_and_dis():
    best = {"task_err": 0.3, "feat": 0.2}
    final = {"copy_task_err": 0.4, "dis_task_err": 0.2, "copy_feat": 0.1, "dis_feat": 0.1}
    v = adapt_mod.held_out_verdict(best, final)
    assert v["on"] == "task_err" and v["beats_copy"] and not v["beats_dis"]
    assert "does not beat DIS" in v["says"] and "--flow dis" in v["says"]
    # no task-output error for one of them (nothing to score): the feature error decides
    v = adapt_mod.held_out_verdict({"task_err": None, "feat": 0.05}, final)
    assert v["on"] == "feat" and v["beats_copy"] and v["beats_dis"]
    assert v["says"].endswith("it beats both on this footage")
    assert adapt_mod.held_out_verdict(None, {}) == {}


def test_a_detectors_task_error_needs_enough_held_out_boxes():
    """Fewer than MIN_BOXES teacher boxes on the held-out pairs: no task-output error (an AP
    of a handful of boxes is noise), so the feature error decides."""
    scorer = object.__new__(adapt_mod.TaskScorer)
    scorer.manifest = {"task": {"kind": "detection", "score_threshold": 0.2,
                                "max_detections": 100}, "class_names": ["face"]}

    def frame(n):
        boxes = np.array([[10.0 * i, 0, 10.0 * i + 8, 8] for i in range(n)], np.float32)
        return {"boxes": boxes.reshape(-1, 4), "scores": np.full(n, 0.9, np.float32),
                "classes": np.zeros(n, np.int32)}

    scorer.outputs = lambda feat: [frame(len(f)) for f in feat]
    few = [frame(3), frame(3), frame(3)]
    assert scorer.error(np.zeros((3, 3)), few) is None  # 9 boxes
    enough = [frame(5), frame(5)]
    assert scorer.error(np.zeros((2, 5)), enough) == pytest.approx(0.0)  # the same boxes
