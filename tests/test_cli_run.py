"""dff-run and dff-profile: end to end on tiny segmentation and detection exports, every output
checked by reading it back; bad inputs give one line, exit 1 and no files; Ctrl-C leaves
nothing behind."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
from dff.models.checkpoint import demo_checkpoint_path
from dff.runtime.video import VideoWriter, open_video, write_synthetic_clip
from dff.runtime.writers import ResultWriter, read_detections, rle_decode

from dff.commands import demo, profile
from dff.commands import run as cli

pytest.importorskip("onnxruntime")
pytest.importorskip("cv2", reason="video I/O needs opencv-python-headless")

H, W, T = 64, 96, 10


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("cli")


@pytest.fixture(scope="module")
def tiny_pth(tiny_export):
    return tiny_export[0]


@pytest.fixture(scope="module")
def clip(root):
    path = root / "clip.mp4"
    write_synthetic_clip(path, seed=7, num_frames=T, height=H, width=W)
    return path


def call(main, args):
    """(exit code, stdout, stderr) of a command's main(args)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in args])
    return code, out.getvalue(), err.getvalue()


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def labels_of(records):
    return np.stack([rle_decode(r["labels"]) for r in records])


@pytest.fixture(scope="module")
def ort_run(root, engines, clip):
    """dff-run on ONNX Runtime with all three outputs, key interval 5."""
    out = root / "ort"
    out.mkdir()
    result = call(cli.main, [clip, "--engine-dir", engines, "--backend", "onnxruntime",
                             "--key-interval", 5, "--output", out / "x.mp4",
                             "--json", out / "x.jsonl", "--summary", out / "s.json",
                             "--threads", 1, "--quiet"])
    return out, result


# --- happy paths ----------------------------------------------------------------------------

def test_run_writes_annotated_video_jsonl_and_summary(ort_run, clip):
    out, (code, stdout, stderr) = ort_run
    assert code == 0, stderr
    assert sorted(os.listdir(out)) == ["s.json", "x.jsonl", "x.mp4"]  # no temp files left
    with open_video(out / "x.mp4") as video:
        frames = list(video)
    assert len(frames) == T and frames[0].shape == (H, W, 3)
    records = read_jsonl(out / "x.jsonl")
    assert [r["frame"] for r in records] == list(range(T))
    assert [r["frame"] for r in records if r["key"]] == [0, 5]
    assert all(r["labels"]["size"] == [H, W] for r in records)
    assert records[0]["time_ms"]["feature"] > 0 and "flow" in records[1]["time_ms"]
    summary = json.loads((out / "s.json").read_text())
    assert (summary["frames"], summary["key_frames"]) == (T, 2)
    assert summary["backend"] == "onnxruntime-cpu" and summary["key_interval"] == 5
    assert summary["video"]["path"] == str(clip) and summary["video"]["resized_to"] is None
    assert summary["outputs"] == {"video": str(out / "x.mp4"), "jsonl": str(out / "x.jsonl"),
                                  "summary": str(out / "s.json")}
    assert 0 < summary["efficiency"] <= 1.5
    assert "key frames: 2 of 10 (start 1, interval 1)" in stdout
    assert f"wrote {out / 'x.jsonl'}: 10 JSON records" in stdout


def test_torch_backend_labels_agree_with_onnxruntime(ort_run, engines, clip, tmp_path):
    out, _ = ort_run
    code, _, stderr = call(cli.main, [clip, "-e", engines, "--backend", "torch",
                                      "--key-interval", 5, "--json", tmp_path / "t.jsonl",
                                      "--threads", 1, "--quiet"])
    assert code == 0, stderr
    ort_labels = labels_of(read_jsonl(out / "x.jsonl"))
    torch_labels = labels_of(read_jsonl(tmp_path / "t.jsonl"))
    assert len(np.unique(ort_labels)) >= 2, "a model predicting one class tests nothing"
    agree = (ort_labels == torch_labels).mean()
    assert agree >= 0.999, agree


def test_adaptive_schedule_reports_key_frames_and_writes_the_default_video(engines, clip,
                                                                           tmp_path,
                                                                           monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, stdout, stderr = call(cli.main, [clip, "-e", engines, "--schedule", "adaptive",
                                           "--summary", "s.json", "--threads", 1])
    assert code == 0, stderr
    summary = json.loads((tmp_path / "s.json").read_text())
    keys = summary["key_frames"]
    assert 1 <= keys <= T and sum(summary["schedule"]["reasons"].values()) == keys
    assert summary["schedule_name"] == "adaptive"
    assert f"key frames: {keys} of {T} (start 1" in stdout
    assert stdout.startswith("picked onnxruntime-cpu: ")  # --backend auto says what and why
    default = tmp_path / "clip.dff.mp4"
    assert f"wrote {default}: annotated video (the default" in stdout
    assert sorted(os.listdir(tmp_path)) == ["clip.dff.mp4", "s.json"]
    with open_video(default) as video:
        assert sum(1 for _ in video) == T


def test_resize_runs_a_video_larger_than_the_profile(engines, root, tmp_path):
    big = root / "big.mp4"
    if not big.exists():
        write_synthetic_clip(big, seed=3, num_frames=3, height=144, width=208)
    code, stdout, stderr = call(cli.main, [big, "-e", engines, "--resize", f"{H}x{W}",
                                           "-o", tmp_path / "o.mp4", "--summary",
                                           tmp_path / "s.json", "--threads", 1, "-q"])
    assert code == 0, stderr
    assert "resized from 144x208 to 64x96 (--resize)" in stdout
    assert json.loads((tmp_path / "s.json").read_text())["video"]["resized_to"] == [H, W]
    with open_video(tmp_path / "o.mp4") as video:
        assert video.size == (H, W) and sum(1 for _ in video) == 3


def test_truncated_video_warns_and_runs_the_frames_it_has(engines, tmp_path):
    full = tmp_path / "full.avi"
    noise = np.random.default_rng(0).integers(0, 256, (20, H, W, 3), dtype=np.uint8)
    with VideoWriter(full, 25, (H, W)) as out:
        for frame in noise:
            out.write(frame)
    cut = tmp_path / "cut.avi"
    data = full.read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    code, _, stderr = call(cli.main, [cut, "-e", engines, "--json", tmp_path / "c.jsonl",
                                      "--threads", 1, "-q"])
    assert code == 0, stderr
    n = len(read_jsonl(tmp_path / "c.jsonl"))
    assert 0 < n < 20
    assert stderr.startswith(f"dff-run: warning: {cut}: decoding stopped after {n} of 20")


def test_max_frames_stops_early(engines, clip, tmp_path):
    code, _, stderr = call(cli.main, [clip, "-e", engines, "--json", tmp_path / "m.jsonl",
                                      "--max-frames", 3, "--threads", 1, "-q"])
    assert code == 0, stderr
    assert [r["frame"] for r in read_jsonl(tmp_path / "m.jsonl")] == [0, 1, 2]


def test_dff_run_needs_no_torch(engines, clip, tmp_path):
    code = (f"import sys; sys.modules['torch'] = None\n"
            f"from dff.commands.run import main\n"
            f"sys.exit(main([{str(clip)!r}, '-e', {str(engines)!r}, '--json', "
            f"{str(tmp_path / 'n.jsonl')!r}, '--max-frames', '2', '-q']))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, check=False)
    assert out.returncode == 0, out.stderr
    assert len(read_jsonl(tmp_path / "n.jsonl")) == 2


# --- detection ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def det_export(detection_export):
    """conftest's tiny detection export, under a shorter name."""
    return detection_export


@pytest.fixture(scope="module")
def det_run(root, det_export, clip):
    """dff-run on the detection export, ONNX Runtime, key interval 5, every output."""
    out = root / "det"
    out.mkdir()
    result = call(cli.main, [clip, "-e", det_export[1], "--backend", "onnxruntime",
                             "--key-interval", 5, "-o", out / "d.mp4", "--json", out / "d.jsonl",
                             "--summary", out / "s.json", "--threads", 1, "--min-score", 0.2])
    return out, result


def test_detection_run_writes_boxes_video_detections_and_counts(det_run, clip):
    out, (code, stdout, stderr) = det_run
    assert code == 0, stderr
    assert sorted(os.listdir(out)) == ["d.jsonl", "d.mp4", "s.json"]
    with open_video(out / "d.mp4") as video, open_video(clip) as source:
        drawn, plain = np.stack(list(video)).astype(int), np.stack(list(source)).astype(int)
    assert drawn.shape == (T, H, W, 3)
    records = read_jsonl(out / "d.jsonl")
    assert [r["frame"] for r in records if r["key"]] == [0, 5]
    assert all("labels" not in r for r in records)
    dets = [d for r in records for d in r["detections"]]
    assert dets, "a model detecting nothing tests nothing"
    assert {d["name"] for d in dets} <= {"disc", "box", "triangle", "cross"}
    for r in records:
        scores = [d["score"] for d in r["detections"]]
        assert scores == sorted(scores, reverse=True) and min(scores, default=1) > 0.05
        assert sum(r["classes"].values()) == len(r["detections"])
    summary = json.loads((out / "s.json").read_text())
    counts = summary["per_class"]["counts"]
    assert summary["task"] == "detection" and summary["per_class"]["unit"] == "detections"
    assert summary["per_class"]["min_score"] == 0.2
    assert counts == {n: sum(d["name"] == n and d["score"] >= 0.2 for d in dets)
                      for n in ("disc", "box", "triangle", "cross")}
    assert f"detections scoring >= 0.2: {sum(counts.values())} (disc {counts['disc']}" in stdout
    drawn_frames = [t for t, r in enumerate(records)
                    if any(d["score"] >= 0.2 for d in r["detections"])]
    for t in drawn_frames:  # boxes drawn where there are some, the frame's pixels elsewhere
        assert np.abs(drawn[t] - plain[t]).mean() > 0.5


def test_detection_torch_backend_agrees_with_onnxruntime_through_dff_run(det_run, det_export,
                                                                         clip, tmp_path):
    out, _ = det_run
    code, _, stderr = call(cli.main, [clip, "-e", det_export[1], "--backend", "torch",
                                      "--key-interval", 5, "--json", tmp_path / "t.jsonl",
                                      "--threads", 1, "-q"])
    assert code == 0, stderr
    for a, b in zip(read_jsonl(out / "d.jsonl"), read_jsonl(tmp_path / "t.jsonl")):
        da, db = read_detections(a), read_detections(b)
        assert len(da["scores"]) == len(db["scores"])
        np.testing.assert_allclose(da["scores"], db["scores"], atol=2e-4)
        np.testing.assert_allclose(da["boxes"], db["boxes"], atol=0.02)
        np.testing.assert_array_equal(da["classes"], db["classes"])


@pytest.mark.parametrize("flag, value, kind", [("--alpha", 0.3, "detection"),
                                               ("--min-score", 0.5, "segmentation")])
def test_an_option_of_the_other_task_is_one_line_exit_1_and_no_files(flag, value, kind, engines,
                                                                     det_export, clip,
                                                                     tmp_path):
    engine_dir = det_export[1] if kind == "detection" else engines
    code, stdout, stderr = call(cli.main, [clip, "-e", engine_dir, flag, value, "-o",
                                           tmp_path / "x.mp4", "--threads", 1])
    assert code == 1 and stdout == ""
    assert stderr == (f"dff-run: {flag}: {engine_dir / 'manifest.json'} holds a {kind} model "
                      f"(field 'task.kind'), and {flag} "
                      f"{cli.TASK_OPTIONS[flag[2:].replace('-', '_')][1]}; drop {flag}\n")
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("task", ["segmentation", "detection"])
def test_profile_runs_either_task_at_batch_two(task, engines, det_export, tmp_path):
    engine_dir = det_export[1] if task == "detection" else engines
    code, stdout, stderr = call(profile.main, [
        "-e", engine_dir, "--backend", "onnxruntime", "--iterations", 3, "--warmUp", 0,
        "--key-intervals", "1,5", "--frames", 10, "--shape", "2x64x96",
        "--json", tmp_path / "p.json", "--threads", 1])
    assert code == 0, stderr
    res = json.loads((tmp_path / "p.json").read_text())
    assert res["task"] == task and res["shape"] == [2, H, W]
    assert all(res["stages"][s]["iterations"] == 3 for s in ("feature", "flow", "task"))
    assert [row["key_frames"] for row in res["end_to_end"]] == [10, 2]
    assert f"({task}) at 2x64x96" in stdout.splitlines()[0]


def test_detection_parity_benchmark_reads_dff_runs_json_lines_back(det_export, tmp_path, capsys):
    import importlib.util
    from pathlib import Path

    pytest.importorskip("pycocotools")
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "detection_parity.py"
    spec = importlib.util.spec_from_file_location("detection_parity", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    code = bench.main(["--engine-dir", str(det_export[1]), "--clips", "1", "--frames", "6",
                       "--intervals", "1,3", "--threads", "1", "--keep", str(tmp_path / "runs"),
                       "--json", str(tmp_path / "p.json")])
    out = capsys.readouterr().out
    assert code == 0, out
    res = json.loads((tmp_path / "p.json").read_text())
    assert res["passed"] and sorted(res["intervals"]) == ["1", "3"]
    for k, r in res["intervals"].items():
        records = read_jsonl(tmp_path / "runs" / f"k{k}_{10_000_000}.jsonl")
        assert [rec["key"] for rec in records] == [t % int(k) == 0 for t in range(6)]
        n = sum(len(rec["detections"]) for rec in records)
        assert n > 0 and r["onnxruntime"]["detections"] == n == r["pytorch"]["detections"]
        assert all(abs(d) <= 0.5 for d in r["delta_points"].values())
    assert out.splitlines()[-1].startswith("within 0.5 AP points at k=1, 3 (1 clips x 6 frames")


def test_true_flow_benchmark_bootstraps_its_differences_from_copying(detection_export,
                                                                     tmp_path, capsys):
    import importlib.util
    from pathlib import Path

    pytest.importorskip("pycocotools")
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "true_flow.py"
    spec = importlib.util.spec_from_file_location("true_flow", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    code = bench.main([str(detection_export[0]), "--clips", "1", "--bootstrap", "3",
                       "--threads", "1", "--json", str(tmp_path / "t.json")])
    out = capsys.readouterr().out
    assert code == 0, out
    res = json.loads((tmp_path / "t.json").read_text())
    assert res["bootstrap"]["draws"] == 3
    for pair in ("dff-copy", "true_flow-copy"):
        mode = pair.split("-")[0]
        for key in ("map50", "map"):
            gap = res["bootstrap"][pair][key]
            assert gap["diff"] == pytest.approx(res[mode][key] - res["copy"][key], abs=1e-5)
            # one clip: every draw is that clip, so the interval is the difference itself
            assert gap["low"] == pytest.approx(gap["diff"]) == gap["high"]
    assert "paired bootstrap over clips, 3 draws" in out


def test_detection_parity_benchmark_refuses_a_segmentation_export(engines, capsys):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "detection_parity.py"
    spec = importlib.util.spec_from_file_location("detection_parity", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(["--engine-dir", str(engines), "--clips", "1"]) == 1
    assert "field 'task.kind' is 'segmentation'" in capsys.readouterr().err


# --- bad inputs -----------------------------------------------------------------------------

def _bad_video(tmp_path, kind, root):
    if kind == "missing video":
        return tmp_path / "nope.mp4"
    if kind == "text as video":
        path = tmp_path / "notes.mp4"
        path.write_text("not a video\n" * 20)
        return path
    big = root / "big.mp4"
    if not big.exists():
        write_synthetic_clip(big, seed=3, num_frames=3, height=144, width=208)
    return big


@pytest.mark.parametrize("kind, named, fix", [
    ("missing video", "nope.mp4", "no such file"),
    ("text as video", "notes.mp4", "not a video"),
    ("too large", "big.mp4", "pass --resize 128x192"),
    ("missing engine dir", "no-engines", "dff-export"),
    ("manifest version 99", "manifest.json", "field 'version' is 99"),
    ("torch checkpoint not one", "fake.pth", "not a loadable PyTorch checkpoint"),
    ("output folder missing", "missing", "does not exist"),
])
def test_bad_input_is_one_line_exit_1_and_no_files(kind, named, fix, engines, clip, root,
                                                   tmp_path):
    video = _bad_video(tmp_path, kind, root) if kind in (
        "missing video", "text as video", "too large") else clip
    engine_dir, extra = engines, []
    if kind == "missing engine dir":
        engine_dir = tmp_path / "no-engines"
    elif kind == "manifest version 99":
        engine_dir = tmp_path / "v99"
        shutil.copytree(engines, engine_dir)
        manifest = json.loads((engine_dir / "manifest.json").read_text())
        manifest["version"] = 99
        (engine_dir / "manifest.json").write_text(json.dumps(manifest))
    elif kind == "torch checkpoint not one":
        (tmp_path / "fake.pth").write_text("weights")
        extra = ["--backend", "torch", "--checkpoint", tmp_path / "fake.pth"]
    out = tmp_path / "out"
    out.mkdir()
    target = tmp_path / "missing" if kind == "output folder missing" else out
    code, stdout, stderr = call(cli.main, [video, "-e", engine_dir, *extra, "-o",
                                           target / "x.mp4", "--json", out / "x.jsonl",
                                           "--summary", out / "s.json", "--threads", 1])
    assert code == 1
    assert stderr.count("\n") == 1 and stderr.startswith("dff-run: "), stderr
    assert named in stderr and fix in stderr, stderr
    assert "Traceback" not in stderr + stdout
    assert os.listdir(out) == []


def test_verbose_shows_the_traceback(engines, tmp_path):
    code, _, stderr = call(cli.main, [tmp_path / "nope.mp4", "-e", engines, "--verbose"])
    assert code == 1 and "Traceback" in stderr
    assert stderr.strip().splitlines()[-1].startswith(f"dff-run: {tmp_path / 'nope.mp4'}")


def test_argument_errors_exit_2(clip):
    for args in ([clip], [clip, "-e", "engines", "--key-interval", "0"],
                 [clip, "-e", "engines", "--resize", "big"],
                 [clip, "-e", "engines", "--checkpoint", "m.pth"]):
        with pytest.raises(SystemExit) as info, contextlib.redirect_stderr(io.StringIO()):
            cli.main([str(a) for a in args])
        assert info.value.code == 2


def test_ctrl_c_exits_130_and_leaves_no_outputs(engines, clip, tmp_path, monkeypatch):
    write = ResultWriter.write

    def interrupted(self, index, *rest):
        if index == 3:
            raise KeyboardInterrupt
        write(self, index, *rest)

    monkeypatch.setattr(ResultWriter, "write", interrupted)
    code, _, stderr = call(cli.main, [clip, "-e", engines, "-o", tmp_path / "x.mp4", "--json",
                                      tmp_path / "x.jsonl", "--summary", tmp_path / "s.json",
                                      "--threads", 1, "-q"])
    assert code == 130
    assert stderr == "dff-run: interrupted (Ctrl-C); no outputs written\n"
    assert os.listdir(tmp_path) == []


# --- dff-profile ----------------------------------------------------------------------------

def test_profile_times_stages_and_end_to_end(engines, tmp_path):
    code, stdout, stderr = call(profile.main, [
        "--engine-dir", engines, "--backend", "onnxruntime", "--iterations", 5, "--warmUp", 0,
        "--key-intervals", "1,5", "--frames", 10, "--json", tmp_path / "p.json",
        "--threads", 1])
    assert code == 0, stderr
    res = json.loads((tmp_path / "p.json").read_text())
    assert res["backend"] == "onnxruntime-cpu" and res["shape"] == [1, H, W]
    for stage in ("feature", "flow", "task"):
        s = res["stages"][stage]
        lat = s["latency_ms"]
        assert s["iterations"] == 5 and s["throughput_qps"] > 0
        assert lat["p99"] >= lat["p95"] >= lat["p90"] >= lat["median"] >= lat["min"] > 0
        assert s["h2d_ms"] is None and s["gpu_compute_ms"] is None and s["d2h_ms"] is None
    rows = {row["key_interval"]: row for row in res["end_to_end"]}
    assert sorted(rows) == [1, 5]
    assert rows[1]["speedup"] == 1.0 and rows[1]["predicted_speedup"] == 1.0
    assert (rows[1]["key_frames"], rows[5]["key_frames"]) == (10, 2)
    r = res["r"]
    assert rows[5]["predicted_speedup"] == pytest.approx(5 / (1 + 4 * r))
    assert all(0 < row["efficiency"] <= 1.5 for row in rows.values())
    assert stdout.count("n/a (CPU backend)") == 3
    assert "flow (+warp)" in stdout and f"wrote {tmp_path / 'p.json'}" in stdout


def test_profile_refuses_cuda_graphs_on_a_cpu_backend(engines, tmp_path):
    code, _, stderr = call(profile.main, ["-e", engines, "--backend", "onnxruntime-cpu",
                                          "--useCudaGraph", "--json", tmp_path / "p.json"])
    assert code == 1
    assert stderr == ("dff-profile: CUDA graph capture is done by the tensorrt backend only, "
                      "not onnxruntime-cpu; drop --useCudaGraph or use --backend tensorrt\n")
    assert os.listdir(tmp_path) == []


# --- --demo ---------------------------------------------------------------------------------

def test_demo_reuses_a_cached_export_and_ends_with_the_output_video(engines, tiny_pth,
                                                                    tmp_path, monkeypatch):
    """--demo's caching and clip, with the tiny checkpoint standing in for the demo model."""
    monkeypatch.setattr("dff.models.checkpoint.demo_checkpoint_path",
                        lambda task="segmentation": tiny_pth)
    monkeypatch.chdir(tmp_path)
    shutil.copytree(engines, tmp_path / "dff-demo" / "engines")
    code, stdout, stderr = call(cli.main, ["--demo", "--max-frames", 5, "--threads", 1])
    assert code == 0, stderr
    assert "demo: reusing the export in dff-demo/engines/" in stdout
    assert stdout.splitlines()[-1] == "output video: dff-demo/clip.dff.mp4"
    with open_video(tmp_path / "dff-demo" / "clip.mp4") as video:
        assert video.size == (H, W) and video.frame_count == demo.DEMO_FRAMES
    with open_video(tmp_path / "dff-demo" / "clip.dff.mp4") as video:
        assert sum(1 for _ in video) == 5


@pytest.mark.parametrize("field, value", [("checkpoint_sha256", "0" * 64),
                                          ("tool_version", "0.0.1")])
def test_demo_reexports_when_the_cache_holds_another_checkpoint_or_version(
        engines, tiny_pth, tmp_path, monkeypatch, field, value):
    monkeypatch.setattr("dff.models.checkpoint.demo_checkpoint_path",
                        lambda task="segmentation": tiny_pth)
    cache = tmp_path / "engines"
    shutil.copytree(engines, cache)
    manifest = json.loads((cache / "manifest.json").read_text())
    manifest["export"][field] = value
    (cache / "manifest.json").write_text(json.dumps(manifest))
    calls = []

    def fake_export(checkpoint, out_dir):
        calls.append((checkpoint, out_dir))
        return SimpleNamespace(manifest={"stand-in": True})

    monkeypatch.setattr("dff.export.exporter.export_model", fake_export)
    assert demo.ensure_demo_engines(cache) == {"stand-in": True}
    assert calls == [(tiny_pth, cache)]
    assert demo.ensure_demo_engines(engines)["export"]["checkpoint"] == str(tiny_pth)
    assert len(calls) == 1  # the matching export was reused


def test_demo_detection_without_its_weights_is_one_line_and_writes_nothing(tiny_pth, tmp_path,
                                                                          monkeypatch):
    weights = tmp_path / "weights"
    weights.mkdir()
    shutil.copy(tiny_pth, weights / "dff_small_synthetic.pth")  # segmentation's, not detection's
    names = {"segmentation": "dff_small_synthetic.pth", "detection": "dff_small_detection.pth"}
    monkeypatch.setattr("dff.models.checkpoint.demo_checkpoint_path",
                        lambda task="segmentation": weights / names[task])
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    for command in (cli.main, profile.main):
        code, stdout, stderr = call(command, ["--demo", "detection"])
        assert code == 1 and stdout == ""
        assert stderr.endswith(f"--demo detection: the shipped detection model "
                               f"{weights / 'dff_small_detection.pth'} is missing (this install "
                               "has no detection weights); export a detection model with "
                               "`dff-export MODEL.pth -o engines` and pass --engine-dir engines\n")
        assert stderr.count("\n") == 1
    assert os.listdir(work) == []


@pytest.mark.parametrize("demo", ["detection", "rfcn"])
def test_demo_detection_uses_its_own_folder_and_ends_with_the_output_video(det_export, tiny_pth,
                                                                            tmp_path,
                                                                            monkeypatch, demo):
    # rfcn is the detection demo with the R-FCN head; the tiny CenterNet export stands in for
    # its weights here: what is tested is the demo's own file and folder
    weights = tmp_path / "weights"
    weights.mkdir()
    shutil.copy(tiny_pth, weights / "dff_small_synthetic.pth")
    names = {"segmentation": "dff_small_synthetic.pth", "detection": "dff_small_detection.pth",
             "rfcn": "dff_small_rfcn.pth"}
    shutil.copy(det_export[0], weights / names[demo])
    monkeypatch.setattr("dff.models.checkpoint.demo_checkpoint_path",
                        lambda task="segmentation": weights / names[task])
    monkeypatch.chdir(tmp_path)
    cache = tmp_path / "dff-demo" / demo / "engines"
    shutil.copytree(det_export[1], cache)
    manifest = json.loads((cache / "manifest.json").read_text())  # as if exported from there
    manifest["export"]["checkpoint"] = str(weights / names[demo])
    (cache / "manifest.json").write_text(json.dumps(manifest))
    code, stdout, stderr = call(cli.main, ["--demo", demo, "--max-frames", 4, "--threads", 1])
    assert code == 0, stderr
    assert f"demo: reusing the export in dff-demo/{demo}/engines/" in stdout
    assert stdout.splitlines()[-1] == f"output video: dff-demo/{demo}/clip.dff.mp4"
    assert sorted(os.listdir(tmp_path / "dff-demo")) == [demo]
    with open_video(tmp_path / "dff-demo" / demo / "clip.dff.mp4") as video:
        assert sum(1 for _ in video) == 4


def test_demo_followed_by_a_video_is_still_the_segmentation_demo_on_it(clip):
    assert cli.demo_video_first(["--demo", str(clip), "-q"]) == [
        "--demo", "segmentation", str(clip), "-q"]
    assert cli.demo_video_first(["--demo", "detection", str(clip)]) == [
        "--demo", "detection", str(clip)]
    assert cli.demo_video_first(["--demo", "rfcn", str(clip)]) == ["--demo", "rfcn", str(clip)]
    assert cli.demo_video_first(["--demo", "detecton"]) == ["--demo", "detecton"]  # argparse's
    assert cli.build_parser().parse_args(["--demo"]).demo == "segmentation"


@pytest.mark.skipif(not demo_checkpoint_path().is_file(),
                    reason="the shipped demo checkpoint (models/weights/) is not in this "
                           "checkout")
def test_demo_with_the_shipped_model(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, stdout, stderr = call(cli.main, ["--demo", "--max-frames", 5, "--threads", 1, "-q"])
    assert code == 0, stderr
    assert stdout.splitlines()[-1] == "output video: dff-demo/clip.dff.mp4"


# --- several videos: batched streams (--output-dir) -----------------------------------------

@pytest.fixture(scope="module")
def clip2(root):
    """A second clip, other content and length."""
    path = root / "other.mp4"
    write_synthetic_clip(path, seed=8, num_frames=6, height=H, width=W)
    return path


def without_times(records):
    return [{k: v for k, v in r.items() if k != "time_ms"} for r in records]


@pytest.mark.parametrize("task", ["segmentation", "detection"])
def test_several_videos_write_each_streams_outputs_as_a_run_alone_would(task, ort_run, det_run,
                                                                        engines, det_export,
                                                                        clip, clip2, tmp_path):
    engine_dir, (alone, name) = ((engines, (ort_run[0], "x")) if task == "segmentation"
                                 else (det_export[1], (det_run[0], "d")))
    extra = ["--min-score", 0.2] if task == "detection" else []
    code, _, stderr = call(cli.main, [clip2, "-e", engine_dir, "--backend", "onnxruntime", "-k",
                                      5, "--json", tmp_path / "o.jsonl", "--threads", 1, "-q",
                                      *extra])
    assert code == 0, stderr
    out = tmp_path / "out"
    out.mkdir()
    code, stdout, stderr = call(cli.main, [clip, clip2, "-e", engine_dir, "--backend",
                                           "onnxruntime", "-k", 5, "--output-dir", out,
                                           "--threads", 1, "-q", *extra])
    assert code == 0, stderr
    assert sorted(os.listdir(out)) == ["clip.dff.mp4", "clip.jsonl", "other.dff.mp4",
                                       "other.jsonl", "summary.json"]  # no temp files left
    assert without_times(read_jsonl(out / "clip.jsonl")) == without_times(
        read_jsonl(alone / f"{name}.jsonl"))
    assert without_times(read_jsonl(out / "other.jsonl")) == without_times(
        read_jsonl(tmp_path / "o.jsonl"))
    for video, frames in (("clip", T), ("other", 6)):
        with open_video(out / f"{video}.dff.mp4") as v:
            assert sum(1 for _ in v) == frames
    s = json.loads((out / "summary.json").read_text())
    assert (s["streams"], s["frames"], s["max_batch"], s["task"]) == (2, T + 6, 2, task)
    assert [(e["frames"], e["key_frames"]) for e in s["per_stream"]] == [(T, 2), (6, 2)]
    assert s["per_stream"][1]["outputs"] == {"video": str(out / "other.dff.mp4"),
                                             "jsonl": str(out / "other.jsonl")}
    assert s["per_stream"][0]["video"]["path"] == str(clip)
    assert s["stages"]["flow"]["batch"] > 1  # the streams' frames went in one call
    lines = stdout.splitlines()
    assert lines[0] == ("2 streams on onnxruntime-cpu (fp32), fixed, key interval 5, "
                        "batches of at most 2")
    assert lines[1].startswith(f"  {clip}: {T} frames at {H}x{W}, key frames 2 (start 1, "
                               f"interval 1) -> {out / 'clip.dff.mp4'}, {out / 'clip.jsonl'}")
    assert lines[3].startswith(f"  total: {T + 6} frames in ")
    assert " per stream); frames per call: feature " in lines[3]


def test_one_video_with_output_dir_writes_the_same_files(engines, clip, tmp_path):
    code, _, stderr = call(cli.main, [clip, "-e", engines, "--output-dir", tmp_path,
                                      "--threads", 1, "-q"])
    assert code == 0, stderr
    assert sorted(os.listdir(tmp_path)) == ["clip.dff.mp4", "clip.jsonl", "summary.json"]
    assert json.loads((tmp_path / "summary.json").read_text())["streams"] == 1


@pytest.mark.parametrize("kind, fix", [
    ("one name", "would both write"),
    ("missing video", "no such file"),
    ("a file", "--output-dir is a file, not a folder"),
    ("too large", "pass --resize 128x192"),
])
def test_bad_input_among_several_videos_is_one_line_exit_1_and_no_files(kind, fix, engines,
                                                                        clip, clip2, root,
                                                                        tmp_path):
    videos = [clip, clip2]
    if kind == "one name":
        (tmp_path / "a").mkdir()
        shutil.copy(clip2, tmp_path / "a" / "clip.mp4")
        videos = [clip, tmp_path / "a" / "clip.mp4"]
    elif kind == "missing video":
        videos = [clip, tmp_path / "nope.mp4"]
    elif kind == "too large":
        videos = [clip, _bad_video(tmp_path, kind, root)]
    out = tmp_path / "out"
    if kind == "a file":
        out.write_text("not a folder")
    else:
        out.mkdir()
    code, stdout, stderr = call(cli.main, [*videos, "-e", engines, "--output-dir", out,
                                           "--threads", 1])
    assert code == 1
    assert stderr.count("\n") == 1 and stderr.startswith("dff-run: ") and fix in stderr, stderr
    assert "Traceback" not in stderr + stdout
    assert kind == "a file" or os.listdir(out) == []


def test_a_missing_output_dir_is_created_and_removed_again_if_the_run_fails(engines, clip,
                                                                             tmp_path):
    out = tmp_path / "new" / "out"
    code, _, stderr = call(cli.main, [clip, tmp_path / "nope.mp4", "-e", engines,
                                      "--output-dir", out, "--threads", 1, "-q"])
    assert code == 1 and "no such file" in stderr and not out.exists()
    code, _, stderr = call(cli.main, [clip, "-e", engines, "--output-dir", out, "--threads", 1,
                                      "-q"])
    assert code == 0, stderr
    assert sorted(os.listdir(out)) == ["clip.dff.mp4", "clip.jsonl", "summary.json"]


def test_several_videos_without_output_dir_or_with_single_outputs_exit_2(clip, clip2):
    for args in ([clip, clip2, "-e", "engines"],
                 [clip, clip2, "-e", "engines", "--output-dir", ".", "--json", "x.jsonl"],
                 [clip, "-e", "engines", "--max-batch", 2],
                 [clip, "-e", "engines", "--output-dir", ".", "--useCudaGraph"]):
        err = io.StringIO()
        with pytest.raises(SystemExit) as info, contextlib.redirect_stderr(err):
            cli.main([str(a) for a in args])
        assert info.value.code == 2 and "dff-run: error: " in err.getvalue()


def test_ctrl_c_with_several_videos_leaves_no_outputs(engines, clip, clip2, tmp_path,
                                                       monkeypatch):
    write = ResultWriter.write

    def interrupted(self, index, *rest):
        if index == 3:
            raise KeyboardInterrupt
        write(self, index, *rest)

    monkeypatch.setattr(ResultWriter, "write", interrupted)
    code, _, stderr = call(cli.main, [clip, clip2, "-e", engines, "--output-dir", tmp_path,
                                      "--threads", 1, "-q"])
    assert code == 130 and stderr == "dff-run: interrupted (Ctrl-C); no outputs written\n"
    assert os.listdir(tmp_path) == []


def test_profile_streams_reports_total_and_per_stream_fps_against_one(engines, tmp_path):
    code, stdout, stderr = call(profile.main, [
        "--engine-dir", engines, "--backend", "onnxruntime", "--iterations", 2, "--warmUp", 0,
        "--key-intervals", "1", "--frames", 6, "--json", tmp_path / "p.json", "--threads", 1,
        "--streams", 3])
    assert code == 0, stderr
    st = json.loads((tmp_path / "p.json").read_text())["streams"]
    assert (st["streams"], st["frames"], st["max_batch"]) == (3, 18, 2)
    assert st["key_interval"] == 10 and st["key_frames"] == 3
    assert st["total_fps"] > 0 and st["per_stream_fps"] == pytest.approx(st["total_fps"] / 3)
    assert st["ratio"] == pytest.approx(st["total_fps"] / st["single_fps"])
    assert 1 < st["frames_per_call"]["flow"] <= 2
    assert "streams: 3 copies of the clip, batched (frames per call at most 2)" in stdout
    assert f"total / one stream {st['ratio']:.2f}x" in stdout
    code, stdout, _ = call(profile.main, [
        "--engine-dir", engines, "--backend", "onnxruntime", "--iterations", 2, "--warmUp", 0,
        "--key-intervals", "1", "--frames", 6, "--json", tmp_path / "one.json", "--threads", 1])
    assert "streams" not in json.loads((tmp_path / "one.json").read_text())
    assert "streams:" not in stdout


def test_stage_ab_benchmark_gives_r_for_each_export(engines, real_material, capsys):
    """benchmarks/stage_ab.py (a smoke test: nothing is judged by its times)."""
    import importlib.util
    from pathlib import Path

    real_material("bikes.mp4")
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "stage_ab.py"
    spec = importlib.util.spec_from_file_location("stage_ab", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    bench.main([str(engines), str(engines), "--threads", "1", "--rounds", "2", "--calls", "1"])
    rows = [line.split() for line in capsys.readouterr().out.splitlines()
            if line.startswith(str(engines))]
    assert len(rows) == 2 and rows[0][5] == "1.000"
    assert rows[0][6] == "-"  # no key_code: the shipped demo's flow takes two images
    assert all(0 < float(row[4]) < 10 for row in rows)  # r, from positive stage medians
