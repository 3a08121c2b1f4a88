"""dff-train and dff-eval end to end on tiny settings: outputs, resume, JSON, bad input."""

import json

import pytest
import torch
from conftest import tiny_config
from dff.models import evaluate, train
from dff.models.checkpoint import load_checkpoint, save_checkpoint
from dff.models.dff import DFF

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
    real_step, calls = train.train_step, {"n": 0}

    def crash_on_fifth(*a, **kw):  # dies in stage 2, after the save at iteration 2 of stage 1
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return real_step(*a, **kw)

    monkeypatch.setattr(train, "train_step", crash_on_fifth)
    with pytest.raises(KeyboardInterrupt):
        train.main(TINY + ["--out", str(tmp_path / "b")])
    state = torch.load(tmp_path / "b" / "state.pt", weights_only=True)
    assert (state["stage"], state["iteration"]) == (1, 0)  # stage 1 done, stage 2 not begun
    monkeypatch.setattr(train, "train_step", real_step)
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
    assert evaluate.miou(conf) == pytest.approx((5 / 7 + 3 / 5) / 2)
