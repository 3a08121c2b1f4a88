"""dff-tune (dff.models.tune, issue 24): candidates timed end to end and scored against
per-frame in one sitting, the frontier and the recommendation, --write into the manifest and
dff-run taking it; the carried outputs (runtime/propagate.py) on real motion."""

import json
import shutil

import numpy as np
import pytest

pytest.importorskip("onnxruntime")
cv2 = pytest.importorskip("cv2")

from dff.export.manifest import ManifestError, deploy_settings, load_manifest, write_deploy
from dff.models.frontier import frontier, recommend
from dff.models.tune import reduced_sizes
from dff.runtime.flows import DisFlow
from dff.runtime.propagate import BoxTracker, LabelWarp
from dff.runtime.scheduler import FixedInterval
from dff.runtime.step import StreamState
from dff.runtime.video import write_synthetic_clip

from dff.commands.run import main as dff_run
from dff.commands.tune import main as dff_tune


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    """A 10-frame synthetic clip, 64x96, as an .avi file."""
    path = tmp_path_factory.mktemp("tune") / "clip.avi"
    write_synthetic_clip(path, seed=4, num_frames=10, height=64, width=96)
    return path


def _rows(*pairs):
    return [{"ms_per_frame": ms, "agreement": a} for ms, a in pairs]


def test_frontier_and_recommendation():
    rows = _rows((100, 1.0), (10, 0.80), (20, 0.79), (30, 0.96), (12, 0.90), (5, None))
    assert frontier(rows) == [1, 4, 3, 0]  # by cost; (20, 0.79) is beaten by (10, 0.80)
    assert recommend(rows, 0.95) == 3
    assert recommend(rows, 0.85) == 4
    assert recommend(rows, 1.0) == 0  # only per-frame: "not DFF" is an answer
    assert recommend(_rows((10, 0.5)), 0.9) is None


def test_reduced_sizes_multiples_of_the_stride():
    profile = {"min": [1, 32, 32], "max": [2, 128, 192]}
    assert reduced_sizes((64, 96), 16, profile) == [(48, 80), (32, 48)]
    assert reduced_sizes((64, 96), 32, profile) == [(64, 64), (32, 64)]  # each side rounded


def _texture(h, w, seed=0):
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 255, (h // 4, w // 4, 3), dtype=np.uint8)
    return cv2.GaussianBlur(cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC), (3, 3), 0)


def test_label_warp_follows_a_shift():
    """The key frame's labels warped along DIS's flow land where the content moved: better
    than the key frame's labels as they are."""
    h, w, dx = 96, 128, 6
    key = _texture(h, w + dx)
    key_frame, frame = key[:, dx:], key[:, :w]  # the content moves right by dx pixels
    labels = np.zeros((h, w), np.uint8)
    labels[30:70, 40:90] = 1
    truth = np.zeros_like(labels)
    truth[30:70, 40 + dx:90 + dx] = 1
    warp = LabelWarp(DisFlow("medium", 1.0))
    stream = StreamState(FixedInterval(5))
    warp.key(stream, key_frame, {"labels": labels})
    out = warp.carry(stream, frame)["labels"]
    assert out.shape == (h, w) and out.dtype == np.uint8
    inner = (slice(8, h - 8), slice(8, w - 8))
    right, copied = (out == truth)[inner].mean(), (labels == truth)[inner].mean()
    assert right > 0.98 and right > copied + 0.02


def _iou(a, b):
    x0, y0 = np.maximum(a[:2], b[:2])
    x1, y1 = np.minimum(a[2:], b[2:])
    inter = max(0.0, x1 - x0) * max(0.0, y1 - y0)
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def test_box_tracker_carries_a_moving_box():
    """A box moving 3 px a frame, detected every 5th frame: once the Kalman filter has seen it
    move, the carried box follows it better than the last key frame's box, with the
    detection's score and class."""
    pytest.importorskip("norfair")
    k, v = 5, 3.0
    tracker = BoxTracker(k, score_threshold=0.2)
    stream = StreamState(FixedInterval(k))
    frame = np.zeros((8, 8, 3), np.uint8)
    gains = []
    for t in range(30):
        box = np.array([20 + v * t, 30, 60 + v * t, 70], np.float32)
        if t % k == 0:
            tracker.key(stream, frame, {"boxes": np.stack([box, np.zeros(4, np.float32)]),
                                        "scores": np.array([0.9, 0.1], np.float32),
                                        "classes": np.array([2, 0], np.int32),
                                        "num": np.array(2, np.int32)})
            last = box
            continue
        out = tracker.carry(stream, frame)
        assert int(out["num"]) == 1  # the row under the score threshold is not tracked
        assert out["classes"][0] == 2 and out["scores"][0] == pytest.approx(0.9)
        if t > 3 * k:
            gains.append(_iou(out["boxes"][0], box) - _iou(last, box))
    assert np.mean(gains) > 0.05


def _tune(tmp_path, engines, videos, *extra):
    out = tmp_path / "tune.json"
    rc = dff_tune(["-e", str(engines), "--video", *map(str, videos), "--backend",
                   "onnxruntime-cpu", "--threads", "1", "--quiet", "--json", str(out), *extra])
    assert rc == 0
    return json.loads(out.read_text())


def test_tune_write_then_run(tmp_path, engines, clip, capsys):
    """Every kind measured, the frontier and recommendation consistent with the figures, the
    plot written; --write records the recommendation and dff-run takes it, an explicit option
    winning."""
    mine = tmp_path / "engines"
    shutil.copytree(engines, mine)
    res = _tune(tmp_path, mine, [clip], "--quick", "--target", "0.9", "--write")
    out = capsys.readouterr().out
    rows = res["candidates"]
    assert {r["kind"] for r in rows} == {"per-frame", "resize", "dff", "copy", "warp-output"}
    assert {(r["flow"], r["schedule"]) for r in rows if r["kind"] == "dff"} == {
        ("learned", "fixed"), ("learned", "adaptive"), ("dis", "fixed"), ("dis", "adaptive")}
    assert {r["k"] for r in rows if r["kind"] == "copy"} == {2, 5, 10, 20}
    assert rows[0]["kind"] == "per-frame" and rows[0]["agreement"] == 1.0
    assert rows[0]["speedup"] == 1.0 and res["frames"] == 10 and res["size"] == [64, 96]
    assert all(r["ms_per_frame"] > 0 and 0 <= r["agreement"] <= 1 for r in rows)
    assert [r["size"] for r in rows if r["kind"] == "resize"] == [[48, 80], [32, 48]]
    rec = res["recommended"]
    assert rec is not None and rows[rec]["agreement"] >= 0.9
    assert all(r["ms_per_frame"] >= rows[rec]["ms_per_frame"] for r in rows
               if r["agreement"] >= 0.9)
    assert rec in res["frontier"] and 0 in res["frontier"]
    assert set(res["r"]) == {"learned", "dis"} and res["motion_px_per_frame"] > 0
    assert (tmp_path / "tune.png").stat().st_size > 1000
    assert "recommended" in out and "frontier" in out
    deploy = deploy_settings(load_manifest(mine))
    assert {k: deploy[k] for k in ("kind", "k", "flow", "schedule", "size")} == {
        k: rows[rec][k] for k in ("kind", "k", "flow", "schedule", "size")}

    # dff-run takes the recorded candidate; an explicit option wins
    write_deploy(mine, {"kind": "copy", "k": 4, "schedule": "fixed", "flow": None,
                        "size": [64, 96]})
    summary = tmp_path / "run.json"
    assert dff_run([str(clip), "-e", str(mine), "--json", str(tmp_path / "r.jsonl"),
                    "--summary", str(summary), "-b", "onnxruntime-cpu", "-q"]) == 0
    s = json.loads(summary.read_text())
    assert (s["propagate"], s["key_interval"], s["key_frames"]) == ("copy", 4, 3)
    assert dff_run([str(clip), "-e", str(mine), "--json", str(tmp_path / "r.jsonl"),
                    "--summary", str(summary), "-b", "onnxruntime-cpu", "-q", "-k", "5",
                    "--propagate", "dff"]) == 0
    s = json.loads(summary.read_text())
    assert (s["propagate"], s["key_interval"], s["key_frames"]) == ("dff", 5, 2)
    # the other commands still load the manifest
    from dff.commands import profile

    assert profile.main(["-e", str(mine), "-b", "onnxruntime-cpu", "--iterations", "2",
                         "--warmUp", "0", "--key-intervals", "1", "--frames", "2"]) == 0


def test_tune_detection_tracks(tmp_path, detection_engines, clip):
    pytest.importorskip("norfair")
    res = _tune(tmp_path, detection_engines, [clip], "--intervals", "3", "--kinds",
                "track,copy")
    kinds = [(r["kind"], r["k"]) for r in res["candidates"]]
    assert kinds == [("per-frame", None), ("copy", 3), ("track", 3)]
    assert res["task"] == "detection"
    # (the untrained tiny detector's boxes include empty ones, which pycocotools never
    # matches, so even per-frame against itself scores below 1 here)
    assert all(0 <= r["agreement"] <= 1 for r in res["candidates"])


def test_tune_bad_input_one_line(tmp_path, engines, clip, capsys):
    def refused(*argv):
        rc = dff_tune(["--json", str(tmp_path / "t.json"), "-b", "onnxruntime-cpu", "-q",
                       *map(str, argv)])
        err = capsys.readouterr().err
        assert rc == 1 and len(err.strip().splitlines()) == 1, err
        return err

    assert "no video" in refused("-e", engines)
    assert "--target 1.5" in refused("-e", engines, "--video", clip, "--target", "1.5")
    assert "--kinds" in refused("-e", engines, "--video", clip, "--kinds", "dff,bogus")
    flowless = tmp_path / "flowless"
    shutil.copytree(engines, flowless)
    manifest = json.loads((flowless / "manifest.json").read_text())
    manifest.pop("flow", None)
    manifest["graphs"].pop("flow")
    (flowless / "manifest.json").write_text(json.dumps(manifest))
    err = refused("-e", flowless, "--video", clip, "--kinds", "dff")
    assert "graphs.flow" in err and "missing" in err


def test_manifest_deploy_checked(tmp_path, engines):
    mine = tmp_path / "engines"
    shutil.copytree(engines, mine)
    write_deploy(mine, {"kind": "dff", "k": 7, "schedule": "fixed", "flow": "dis",
                        "size": [64, 96]})
    assert deploy_settings(load_manifest(mine))["k"] == 7
    with pytest.raises(ManifestError, match="deploy.kind"):
        write_deploy(mine, {"kind": "warp-features", "k": 7})
    assert deploy_settings(load_manifest(mine))["kind"] == "dff"  # the failed write left it
    manifest = json.loads((mine / "manifest.json").read_text())
    manifest["deploy"]["size"] = [64]
    (mine / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ManifestError, match="deploy.size"):
        load_manifest(mine)


def test_split_labels_then_verify(tmp_path, engines, capsys):
    """--split renders a synthetic split with its ground truth: --labels scores accuracy;
    --verify measures the recommendation again on clips that run did not see."""
    res = _tune(tmp_path, engines, [], "--split", "eval:0-1", "--resize", "64x96", "--labels",
                "--max-frames", "6",
                "--intervals", "3", "--kinds", "copy,resize", "--target", "0.01")
    assert res["reference"] == "labels" and res["videos"] == ["eval:0", "eval:1"]
    assert res["frames"] == 12 and res["size"] == [64, 96]
    rows = res["candidates"]
    assert [r["kind"] for r in rows] == ["per-frame", "resize", "resize", "copy"]
    assert all(0 <= r["agreement"] < 1 for r in rows)  # an untrained model against the truth
    assert res["recommended"] is not None
    first = tmp_path / "first.json"
    (tmp_path / "tune.json").rename(first)
    again = _tune(tmp_path, engines, [], "--split", "eval:2", "--resize", "64x96", "--labels",
                  "--max-frames", "6", "--verify", str(first))
    out = capsys.readouterr().out
    v = again["verify"]
    assert v["candidate"] == rows[res["recommended"]]["label"]
    assert [r["label"] for r in again["candidates"]] == ["per-frame", v["candidate"]]
    assert v["measured"]["agreement"] == again["candidates"][1]["agreement"]
    assert v["agreement_points"] == pytest.approx(
        100 * (v["measured"]["agreement"] - v["predicted"]["agreement"]), abs=1e-3)
    assert isinstance(v["within"], bool) and "verify" in out and "predicted" in out
    # the bar given again: the candidate chosen again from the first run's figures
    again0 = _tune(tmp_path, engines, [], "--split", "eval:2", "--resize", "64x96", "--labels",
                   "--max-frames", "2", "--verify", str(first), "--max-drop", "0")
    chosen = recommend(rows, rows[0]["agreement"])
    assert again0["verify"]["candidate"] == rows[chosen]["label"]
    # against labels the verdict judges the loss against per-frame, whose own accuracy moves
    # with the clips
    assert v["judged_on"] == "drop_points"
    assert v["measured"]["per_frame"] == again["candidates"][0]["agreement"]
    assert v["predicted"]["per_frame"] == rows[0]["agreement"]
    assert v["drop_points"] == pytest.approx(
        100 * ((v["measured"]["agreement"] - v["measured"]["per_frame"])
               - (v["predicted"]["agreement"] - v["predicted"]["per_frame"])), abs=2e-3)


def test_split_and_verify_refusals(tmp_path, engines, clip, capsys):
    def refused(*argv):
        rc = dff_tune(["-e", str(engines), "--json", str(tmp_path / "t.json"), "-b",
                       "onnxruntime-cpu", "-q", *map(str, argv)])
        err = capsys.readouterr().err
        assert rc == 1 and len(err.strip().splitlines()) == 1, err
        return err

    assert "--split" in refused("--video", clip, "--labels")
    assert "eval:0-9" in refused("--split", "eval:30-40")
    assert "--resize" in refused("--split", "eval:0")  # 128x224 is outside the tiny profile
    assert "two sources" in refused("--video", clip, "--split", "eval")
    nothing = tmp_path / "nothing.json"
    nothing.write_text(json.dumps({"candidates": [], "recommended": None, "size": [64, 96]}))
    assert "nothing to measure" in refused("--video", clip, "--verify", nothing)
    assert "not a dff-tune result" in refused("--video", clip, "--verify", clip)


def test_cost_only_from_stage_medians(tmp_path, engines, clip, capsys):
    """--cost-only: probes timed on the first frames, every fixed-schedule candidate costed
    from their medians by the formula it states; what each alternative needs to cost no more
    than DFF at k = 10."""
    res = _tune(tmp_path, engines, [clip], "--cost-only", "--quick")
    rows = res["candidates"]
    assert res["recommended"] is None and res["frontier"] == [] and res["frames"] == 8
    assert all(r["agreement"] is None for r in rows)
    ref = res["probes"][0]["stage_ms"]
    base = res["decode_ms_per_frame"] + ref["upload"] + ref["schedule"]
    probe = next(p for p in res["probes"] if p["kind"] == "copy")
    assert probe["k"] == 20
    copy5 = next(r for r in rows if r["kind"] == "copy" and r["k"] == 5)
    want = base + (ref["feature"] + ref["task"]) / 5 + 0.8 * (probe["stage_ms"]["flow"]
                                                            + ref["task"])
    assert copy5["ms_per_frame"] == pytest.approx(want, abs=2e-3)
    assert copy5["cost"] == "stage medians" and rows[0]["cost"] == "end to end"
    assert res["match"]["dff"] == "dff learned k=10"
    assert set(res["match"]) >= {"copy", "dff dis", "warp-output", "resize"}
    assert "cost only" in capsys.readouterr().out


def test_run_propagate_track_and_refusals(tmp_path, detection_engines, clip, capsys):
    """dff-run --propagate track: boxes carried between key frames through the one Step (their
    time the flow stage's); a schedule that reads a flow, or --flow dis, is refused."""
    pytest.importorskip("norfair")
    summary = tmp_path / "run.json"
    base = [str(clip), "-e", str(detection_engines), "-b", "onnxruntime-cpu", "-q",
            "--json", str(tmp_path / "r.jsonl"), "--summary", str(summary)]
    assert dff_run([*base, "--propagate", "track", "-k", "3"]) == 0
    s = json.loads(summary.read_text())
    assert (s["propagate"], s["key_frames"], s["frames"]) == ("track", 4, 10)
    assert s["stages"]["flow"]["count"] == 6 and s["stages"]["feature"]["count"] == 4
    records = [json.loads(line) for line in (tmp_path / "r.jsonl").read_text().splitlines()]
    assert [r["key"] for r in records] == [t % 3 == 0 for t in range(10)]
    capsys.readouterr()
    for extra, says in ((["--schedule", "adaptive"], "--schedule fixed"),
                        (["--flow", "dis"], "drop --flow dis"),
                        (["--propagate", "warp-output"], "--propagate track")):
        args = [*base, "--propagate", "track", *extra] if extra[0] != "--propagate" else [
            *base, *extra]
        assert dff_run(args) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and says in err[0], err
