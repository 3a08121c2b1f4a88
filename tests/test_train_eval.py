"""dff-train and dff-eval end to end on tiny settings: outputs, resume, JSON, bad input."""

import json

import numpy as np
import pytest
import torch
from conftest import tiny_config
from dff.models import evaluate as evaluation
from dff.models import train as training
from dff.models.checkpoint import load_checkpoint, save_checkpoint
from dff.models.dff import DFF

from dff.commands import evaluate, train

TINY = ["--config", "tiny", "--clips", "2", "--frames", "6", "--batch", "2", "--height", "64", "--width", "96",
        "--iters-flow", "3", "--iters-seg", "3", "--iters-dff", "3", "--save-every", "2",
        "--quiet"]


def test_train_writes_a_loadable_checkpoint_and_half_copy(tmp_path):
    ship = tmp_path / "ship.pth"
    assert train.main(TINY + ["--out", str(tmp_path / "run"), "--save", str(ship),
                              "--weights-dtype", "float16"]) == 0
    model = load_checkpoint(tmp_path / "run" / "model.pth")
    assert model.config.input_size == [64, 96]
    blob = torch.load(ship, weights_only=True)
    assert blob["state_dict"]["trunk.feat_conv.0.weight"].dtype == torch.float16
    assert "dff-train" in blob["meta"]["command"]
    state = torch.load(tmp_path / "run" / "state.pt", weights_only=True)
    assert [e["stage"] for e in state["log"]] == ["flow", "flow", "seg", "seg", "dff", "dff"]


def test_resumed_training_matches_an_uninterrupted_run(tmp_path, monkeypatch):
    assert train.main(TINY + ["--out", str(tmp_path / "a")]) == 0
    real_step, calls = training.train_step, {"n": 0}

    def crash_on_fifth(*a, **kw):  # dies in stage 2, after the save at iteration 2 of stage 1
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return real_step(*a, **kw)

    monkeypatch.setattr(training, "train_step", crash_on_fifth)
    with pytest.raises(KeyboardInterrupt):
        train.main(TINY + ["--out", str(tmp_path / "b")])
    state = torch.load(tmp_path / "b" / "state.pt", weights_only=True)
    assert (state["stage"], state["iteration"]) == (1, 0)  # stage 1 done, stage 2 not begun
    monkeypatch.setattr(training, "train_step", real_step)
    assert train.main(TINY + ["--out", str(tmp_path / "b"), "--resume"]) == 0
    a = load_checkpoint(tmp_path / "a" / "model.pth").state_dict()
    b = load_checkpoint(tmp_path / "b" / "model.pth").state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], msg=k)


def test_train_refuses_a_size_off_the_stride(tmp_path, capsys):
    assert train.main(["--out", str(tmp_path), "--height", "100"]) == 2
    assert "multiple of 16" in capsys.readouterr().err


@pytest.fixture
def tiny_checkpoint(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "tiny.pth"
    save_checkpoint(path, DFF(tiny_config()).eval())
    return path


def test_eval_writes_the_documented_json_and_a_plot(tiny_checkpoint, tmp_path):
    out, png = tmp_path / "r.json", tmp_path / "r.png"
    rc = evaluate.main([str(tiny_checkpoint), "--clips", "1", "--frames", "6", "--intervals",
                        "1,2,5", "--json", str(out), "--plot", str(png), "--quiet"])
    assert rc == 0
    res = json.loads(out.read_text())
    assert set(res["dff"]) == {"1", "2", "5"} and set(res["copy"]) == {"1", "2", "5"}
    for entry in [res["per_frame"], *res["dff"].values()]:
        assert 0 <= entry["miou"] <= 1 and entry["fps"] > 0
    assert res["dff"]["1"]["miou"] == res["per_frame"]["miou"]  # k=1 is per-frame
    assert res["flow_epe"] >= 0 and res["frames"] == 6
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_eval_on_a_bad_checkpoint_prints_one_line_and_fails(tmp_path, capsys):
    bad = tmp_path / "bad.pth"
    bad.write_text("not a checkpoint")
    assert evaluate.main([str(bad), "--quiet"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(bad) in err and "Traceback" not in err


def test_miou_counts_only_present_classes():
    import numpy as np

    conf = np.array([[5, 1, 0], [1, 3, 0], [0, 0, 0]])
    assert evaluation.miou(conf) == pytest.approx((5 / 7 + 3 / 5) / 2)


DET = TINY + ["--task", "detection", "--iters-det", "3"]


def test_detection_training_runs_flow_det_dff_and_writes_a_detection_checkpoint(tmp_path):
    assert train.main(DET + ["--out", str(tmp_path / "run"), "--head-upsample", "2"]) == 0
    model = load_checkpoint(tmp_path / "run" / "model.pth")
    assert model.config.task == "detection" and model.config.head_upsample == 2
    assert model.config.class_names == ["disc", "box", "triangle", "cross"]
    state = torch.load(tmp_path / "run" / "state.pt", weights_only=True)
    assert [e["stage"] for e in state["log"]] == ["flow", "flow", "det", "det", "dff", "dff"]
    assert {"heat", "size", "offset"} <= set(state["log"][-1])
    assert "--task detection" in json.loads(json.dumps(
        torch.load(tmp_path / "run" / "model.pth", weights_only=True)["meta"]))["command"]


def test_rfcn_detection_training_writes_a_checkpoint_that_decodes_to_the_contract(tmp_path):
    assert train.main(DET + ["--out", str(tmp_path / "run"), "--head", "rfcn"]) == 0
    model = load_checkpoint(tmp_path / "run" / "model.pth")
    assert model.config.head == "rfcn" and "head.ps_cls.weight" in model.state_dict()
    state = torch.load(tmp_path / "run" / "state.pt", weights_only=True)
    assert {"rpn_cls", "rpn_box", "rfcn_cls", "rfcn_box"} <= set(state["log"][-1])
    with torch.no_grad():
        out = model.outputs(model.forward_key(torch.full((1, 3, 64, 96), 128.0))[1])
    assert out["boxes"].shape == (1, 100, 4) and out["classes"].dtype == torch.int32


def test_head_rfcn_without_task_detection_is_refused(tmp_path, capsys):
    assert train.main(TINY + ["--out", str(tmp_path), "--head", "rfcn"]) == 2
    assert "--task detection" in capsys.readouterr().err


def test_max_key_offset_sets_how_far_back_the_key_frames_are_drawn():
    data = training.TrainData(2, 30, (64, 96), seed=0, num_classes=5, progress=False)

    def offsets(max_offset):
        rng = np.random.default_rng(0)
        pairs = data.sample_pairs(rng, 400, max_offset)
        return {t - k for _, t, k in pairs if t >= max_offset}  # not clamped at the start

    assert offsets(0) == {0}
    assert offsets(training.MAX_KEY_OFFSET) == set(range(training.MAX_KEY_OFFSET + 1))
    assert offsets(19) == set(range(20))


def test_max_key_offset_beyond_the_training_clips_is_refused(tmp_path, capsys):
    assert train.main(TINY + ["--out", str(tmp_path), "--frames", "8",
                              "--max-key-offset", "8"]) == 2
    assert "--max-key-offset 8 must be 0 to --frames - 1 (7)" in capsys.readouterr().err


def test_init_starts_trunk_and_flow_net_from_a_checkpoint_of_another_task(tmp_path):
    seg = tmp_path / "seg.pth"
    assert train.main(TINY + ["--out", str(tmp_path / "seg"), "--save", str(seg)]) == 0
    zero = ["--iters-flow", "0", "--iters-det", "0", "--iters-dff", "0"]
    assert train.main(DET + zero + ["--out", str(tmp_path / "det"), "--init", str(seg)]) == 0
    a, b = load_checkpoint(seg).state_dict(), load_checkpoint(tmp_path / "det" / "model.pth")
    for k, v in b.state_dict().items():
        if k.startswith(("trunk.", "flownet.")):
            torch.testing.assert_close(v, a[k], msg=k)
    assert "head.heat.weight" in b.state_dict() and "head.classifier.weight" in a
    meta = torch.load(tmp_path / "det" / "model.pth", weights_only=True)["meta"]
    assert meta["init"] == str(seg) and meta["init_task"] == "segmentation"


def test_init_from_another_architecture_is_one_line_naming_the_field(tmp_path, capsys):
    seg = tmp_path / "seg.pth"
    save_checkpoint(seg, DFF(tiny_config(feat_channels=24)))
    assert train.main(DET + ["--out", str(tmp_path / "det"), "--init", str(seg)]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(seg) in err and "config.feat_channels" in err


def test_init_head_fine_tunes_a_trained_model_end_to_end(tmp_path, capsys):
    det = tmp_path / "det.pth"
    assert train.main(DET + ["--out", str(tmp_path / "a"), "--save", str(det)]) == 0
    zero = ["--iters-flow", "0", "--iters-det", "0"]
    # no training at all: the copy is exact, head included
    assert train.main(DET + zero + ["--iters-dff", "0", "--out", str(tmp_path / "b"), "--init",
                                    str(det), "--init-head"]) == 0
    a, b = load_checkpoint(det).state_dict(), load_checkpoint(tmp_path / "b" / "model.pth")
    for k, v in b.state_dict().items():
        torch.testing.assert_close(v, a[k], msg=k)
    meta = torch.load(tmp_path / "b" / "model.pth", weights_only=True)["meta"]
    assert meta["init_head"] is True and meta["max_key_offset"] == training.MAX_KEY_OFFSET
    # end-to-end steps from there: only stage 3 runs
    assert train.main(DET + zero + ["--out", str(tmp_path / "c"), "--init", str(det),
                                    "--init-head"]) == 0
    state = torch.load(tmp_path / "c" / "state.pt", weights_only=True)
    assert {e["stage"] for e in state["log"]} == {"dff"}
    # a head of other settings is refused in one line naming the field and the fix
    capsys.readouterr()
    assert train.main(DET + zero + ["--out", str(tmp_path / "d"), "--init", str(det),
                                    "--init-head", "--head", "rfcn"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(det) in err and "config.head" in err
    assert "--init-head needs a checkpoint of the same task and head" in err
    assert train.main(DET + ["--out", str(tmp_path / "e"), "--init-head"]) == 2
    assert "add --init MODEL.pth" in capsys.readouterr().err


@pytest.fixture
def tiny_detector(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "det.pth"
    save_checkpoint(path, DFF(tiny_config().for_task("detection")).eval())
    return path


def test_eval_of_a_detector_reports_ap_per_mode_in_the_segmentation_json_shape(
        tiny_detector, tmp_path, capsys):
    out, png = tmp_path / "r.json", tmp_path / "r.png"
    rc = evaluate.main([str(tiny_detector), "--clips", "1", "--frames", "6", "--intervals",
                        "1,2,5", "--json", str(out), "--plot", str(png), "--quiet"])
    assert rc == 0
    res = json.loads(out.read_text())
    assert res["task"] == "detection"
    assert set(res["dff"]) == {"1", "2", "5"} and set(res["copy"]) == {"1", "2", "5"}
    for entry in [res["per_frame"], *res["dff"].values(), *res["copy"].values()]:
        assert set(entry) == {"map50", "map", "fps"}
        assert 0 <= entry["map"] <= entry["map50"] <= 1 and entry["fps"] > 0
    assert res["dff"]["1"]["map50"] == res["per_frame"]["map50"]  # k=1 is per-frame
    assert set(res["class_ap_per_frame"]) == {"disc", "box", "triangle", "cross"}
    assert res["frames"] == 6 and res["flow_epe"] >= 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = capsys.readouterr().out
    assert "AP@0.5" in table and "copy k=5" in table and "pycocotools" in table


def test_eval_of_a_checkpoint_with_an_unknown_task_names_config_task(tiny_checkpoint, capsys):
    blob = torch.load(tiny_checkpoint, weights_only=True)
    blob["config"]["task"] = "tracking"
    torch.save(blob, tiny_checkpoint)
    assert evaluate.main([str(tiny_checkpoint), "--quiet"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(tiny_checkpoint) in err
    assert "config.task" in err and "'tracking'" in err


def test_eval_demo_detection_takes_the_shipped_detection_model(monkeypatch, capsys):
    from dff.models import checkpoint

    from dff.errors import CheckpointError

    seen = []

    def refuse(path):  # the path is the test; evaluating the shipped model is not
        seen.append(path)
        raise CheckpointError(f"{path}: stop here")

    monkeypatch.setattr(evaluate, "load_checkpoint", refuse)
    assert evaluate.main(["--demo", "detection", "--quiet"]) == 1
    assert seen == [checkpoint.demo_checkpoint_path("detection")]
    assert seen[0].name == "dff_small_detection.pth"
    assert capsys.readouterr().err == f"dff-eval: {seen[0]}: stop here\n"
    with pytest.raises(SystemExit):
        evaluate.main(["model.pth", "--demo", "detection"])
    assert "not both" in capsys.readouterr().err


def test_flipped_training_frames_get_mirrored_boxes_and_detection_classes():
    data = training.TrainData(1, 4, (64, 96), seed=0, num_classes=5, progress=False)
    clip = data.clips[0]
    pairs = [(0, t, t) for t in range(4) if len(clip.boxes[t])]
    assert pairs
    boxes, classes, ignore = data.boxes(pairs, flip=False)
    flipped, _, _ = data.boxes(pairs, flip=True)
    for (_, t, _), b, f, c, i in zip(pairs, boxes, flipped, classes, ignore):
        np.testing.assert_array_equal(b, clip.boxes[t])
        np.testing.assert_array_equal(f[:, [0, 2]], 96 - clip.boxes[t][:, [2, 0]])
        np.testing.assert_array_equal(f[:, [1, 3]], clip.boxes[t][:, [1, 3]])
        np.testing.assert_array_equal(c, clip.box_classes[t] - 1)
        np.testing.assert_array_equal(i, clip.box_ignore[t])
