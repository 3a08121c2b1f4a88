"""dff-eval --video (dff.models.agreement): an export's agreement with its own per-frame
inference on real video; and dff-eval --flow dis on the synthetic split."""

import json

import numpy as np
import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("cv2")

from dff.models.agreement import PER_FRAME, Tally
from dff.runtime.video import VideoWriter, write_synthetic_clip

from dff.commands.evaluate import main as dff_eval


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    """A 12-frame synthetic clip, 64x96, as an .avi file."""
    path = tmp_path_factory.mktemp("agreement") / "clip.avi"
    write_synthetic_clip(path, seed=3, num_frames=12, height=64, width=96)
    return path


@pytest.fixture(scope="module")
def still(tmp_path_factory):
    """A static video: 11 identical frames (lossless enough that decoding gives one image)."""
    from dff.data.synthetic import make_clip

    path = tmp_path_factory.mktemp("agreement") / "still.avi"
    frame = make_clip(5, 1, 64, 96).frames[0]
    with VideoWriter(path, 25, (64, 96)) as out:
        for _ in range(11):
            out.write(frame)
    return path


def _eval(tmp_path, engines, videos, *extra):
    out = tmp_path / "agreement.json"
    rc = dff_eval(["--video", *map(str, videos), "--engine-dir", str(engines),
                   "--backend", "onnxruntime-cpu", "--threads", "1", "--quiet",
                   "--json", str(out), *extra])
    assert rc == 0
    return json.loads(out.read_text())


def test_video_json_fields(tmp_path, engines, clip, capsys):
    res = _eval(tmp_path, engines, [clip], "--intervals", "3,5")
    table = capsys.readouterr().out
    assert "dff-dis k=5" in table and "speedup" in table
    assert res["task"] == "segmentation" and res["intervals"] == [3, 5]
    assert res["modes"] == ["dff", "dff-dis", "copy"]
    assert res["videos"] == [str(clip)] and res["frames"] == {"clip.avi": 12}
    assert res["size"] == {"clip.avi": [64, 96]} and res["backend"] == "onnxruntime-cpu"
    assert res["flow"]["dff"] == {"source": "learned"}
    assert res["flow"]["dff-dis"]["source"] == "dis"
    assert res["command"].startswith("dff-eval --video")
    assert res["ms_per_frame"][PER_FRAME] > 0
    for mode in res["modes"]:
        for k, n in (("3", 12 - 4), ("5", 12 - 3)):  # key frames 0,3,6,9 / 0,5,10: not scored
            assert res["scored_frames"][mode][k] == n
            assert 0 <= res["agreement"][mode][k] <= 1
            assert res["feature_error"][mode][k] >= 0
            assert res["ms_per_frame"][mode][k] > 0
    clip_res = res["clips"]["clip.avi"]
    assert clip_res["agreement"] == res["agreement"]  # one video: the totals are its own
    assert clip_res["frames"] == 12 and clip_res["size"] == [64, 96]


def test_video_two_videos_max_frames(tmp_path, engines, clip, still):
    res = _eval(tmp_path, engines, [clip, still], "--intervals", "5", "--max-frames", "7",
                "--modes", "copy")
    assert res["modes"] == ["copy"] and res["frames"] == {"clip.avi": 7, "still.avi": 7}
    assert res["scored_frames"]["copy"]["5"] == 2 * 5  # frames 1-4 and 6 of each
    assert res["total_frames"] == 14 and set(res["clips"]) == {"clip.avi", "still.avi"}


def test_static_video(tmp_path, engines, still):
    """Nothing moves: copying the key frame's features is per-frame inference exactly, and
    DIS's flow is (near) zero."""
    res = _eval(tmp_path, engines, [still], "--intervals", "5,10")
    for k in ("5", "10"):
        assert res["agreement"]["copy"][k] == 1.0
        assert res["feature_error"]["copy"][k] == 0.0
        assert res["agreement"]["dff-dis"][k] > 0.99
        assert res["feature_error"]["dff-dis"][k] < 0.01


@pytest.mark.parametrize("intervals", ["1,5", "0", "x"])
def test_video_refuses_k_below_2(tmp_path, engines, clip, capsys, intervals):
    rc = dff_eval(["--video", str(clip), "-e", str(engines), "--intervals", intervals,
                   "--backend", "onnxruntime-cpu", "--quiet"])
    err = capsys.readouterr().err
    assert rc == 1 and "at least 2" in err and len(err.strip().splitlines()) == 1


def test_video_errors(tmp_path, engines, clip, capsys):
    bad = tmp_path / "not_a_video.mp4"
    bad.write_bytes(b"nothing here")
    rc = dff_eval(["--video", str(bad), "-e", str(engines), "--backend", "onnxruntime-cpu",
                   "--quiet"])
    err = capsys.readouterr().err
    assert rc == 1 and "not_a_video.mp4" in err and len(err.strip().splitlines()) == 1
    # 64x100 is not a multiple of the stride: refused, naming --resize
    rc = dff_eval(["--video", str(clip), "-e", str(engines), "--resize", "64x100",
                   "--backend", "onnxruntime-cpu", "--quiet"])
    err = capsys.readouterr().err
    assert rc == 1 and "--resize" in err
    with pytest.raises(SystemExit):  # --video needs an engine folder
        dff_eval(["--video", str(clip)])


def test_detection_ap_fields(tmp_path, detection_engines, clip):
    res = _eval(tmp_path, detection_engines, [clip], "--intervals", "4", "--modes",
                "dff-dis,copy")
    assert res["task"] == "detection"
    for mode in ("dff-dis", "copy"):
        for field in ("agreement", "agreement50"):
            v = res[field][mode]["4"]
            assert v is None or 0 <= v <= 1
        assert res["feature_error"][mode]["4"] >= 0
    assert "agreement50" in res["clips"]["clip.avi"]


def test_detection_tally_identical_is_one():
    """Detections equal to the reference score AP 1; a threshold drops low reference rows."""
    t = Tally("detection", ["a", "b"], score_threshold=0.3)
    ref = {"boxes": np.array([[0, 0, 10, 10], [20, 20, 40, 30], [5, 5, 8, 8]], np.float32),
           "scores": np.array([0.9, 0.8, 0.1], np.float32), "classes": np.array([0, 1, 1])}
    for _ in range(3):
        t.add(ref, ref, None, None)
    res = t.result()
    assert res["agreement"] == pytest.approx(1.0) and res["agreement50"] == pytest.approx(1.0)


def test_raw_tally():
    """raw: each output's pooled relative error and their mean."""
    t = Tally("raw", [])
    ref = {"a": np.ones((2, 3), np.float32), "b": np.array([3.0, 4.0])}
    t.add({"a": ref["a"] * 1.1, "b": ref["b"]}, ref, np.ones(4), np.ones(4) * 2)
    res = t.result()
    assert res["output_errors"]["a"] == pytest.approx(0.1)
    assert res["output_errors"]["b"] == 0.0
    assert res["output_error"] == pytest.approx(0.05)
    assert res["feature_error"] == pytest.approx(0.5)


def test_real_video_bikes(tmp_path, engines, real_material):
    bikes = real_material("bikes.mp4")
    res = _eval(tmp_path, engines, [bikes], "--intervals", "5", "--max-frames", "12",
                "--resize", "64x96", "--modes", "dff-dis,copy")
    assert res["frames"] == {"bikes.mp4": 12} and res["size"] == {"bikes.mp4": [64, 96]}
    assert res["source_size"]["bikes.mp4"] != [64, 96]
    assert 0 <= res["agreement"]["dff-dis"]["5"] <= 1


def test_synthetic_flow_dis(tmp_path, tiny_model):
    """dff-eval --flow dis on the synthetic split: DFF with DIS's flow on the torch backend."""
    from dff.models.checkpoint import save_checkpoint

    save_checkpoint(tmp_path / "tiny.pth", tiny_model)
    out = tmp_path / "eval.json"
    rc = dff_eval([str(tmp_path / "tiny.pth"), "--clips", "1", "--frames", "6", "--intervals", "1,3", "--threads", "1",
                   "--quiet", "--flow", "dis", "--dis-scale", "1", "--json", str(out)])
    assert rc == 0
    res = json.loads(out.read_text())
    assert res["flow"] == {"source": "dis", "preset": "ultrafast", "scale": 1.0}
    assert 0 <= res["dff"]["3"]["miou"] <= 1 and res["frames"] == 6
    assert res["flow_epe"] >= 0


def test_video_without_torch(tmp_path, engines, clip):
    """dff-eval --video on an ONNX Runtime export runs where torch cannot be imported."""
    import subprocess
    import sys

    code = ("import sys\n"
            "class Block:\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name.split('.')[0] == 'torch':\n"
            "            raise ImportError('torch is blocked')\n"
            "sys.meta_path.insert(0, Block())\n"
            "from dff.commands.evaluate import main\n"
            f"rc = main(['--video', {str(clip)!r}, '-e', {str(engines)!r}, '--intervals', '4',"
            " '--max-frames', '6', '--backend', 'onnxruntime-cpu', '--quiet'])\n"
            "assert 'torch' not in sys.modules\n"
            "sys.exit(rc)\n")
    done = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "dff-dis k=4" in done.stdout


def test_motion_schedules_without_learned_under_dis(tiny_model):
    """--split motion with --flow dis: the learned schedule (the flow net's quality output)
    is left out."""
    from dff.models.motion_eval import schedules_for
    from dff.runtime.flows import DisFlow

    assert "learned" not in schedules_for(tiny_model, DisFlow())
    assert schedules_for(tiny_model)[:2] == ["fixed", "adaptive"]


def test_raw_onnx_export_with_dis_only(tmp_path, clip, real_material):
    """CenterFace split with --task raw: no learned flow, so the modes are dff-dis and copy,
    scored by the outputs' relative error (the heatmap 537 among them)."""
    from dff.commands import export as export_cmd

    engines = tmp_path / "cf"
    assert export_cmd.main(["--onnx", str(real_material("centerface.onnx")),
                            "--feature-output", "535", "--bgr", "--input-size", "64x96",
                            "--max-shape", "1x64x96", "-o", str(engines)]) == 0
    res = _eval(tmp_path, engines, [clip], "--intervals", "4", "--max-frames", "8")
    assert res["task"] == "raw" and res["modes"] == ["dff-dis", "copy"]
    assert "agreement" not in res
    for mode in res["modes"]:
        errors = res["output_errors"][mode]["4"]
        assert set(errors) == {"537", "538", "539", "540"}
        assert all(np.isfinite(v) and v >= 0 for v in errors.values())
        assert res["output_error"][mode]["4"] == pytest.approx(np.mean(list(errors.values())),
                                                             abs=1e-5)
        assert res["scored_frames"][mode]["4"] == 6  # frames 1-3 and 5-7
