"""Shapes of every trunk and flow width, the DFF paths, and checkpoint save/load."""

import pickle

import pytest
import torch
from conftest import tiny_config
from dff.models.checkpoint import load_checkpoint, read_checkpoint, save_checkpoint
from dff.models.config import PRESETS, DFFConfig
from dff.models.dff import DFF, fixed_schedule
from dff.models.flownet import FlowNetS
from dff.models.heads import build_head
from dff.models.trunk import ResNetTrunk

from dff.errors import CheckpointError, DffError


@pytest.mark.parametrize("depth", [18, 34, 50, 101])
@pytest.mark.parametrize("size", [(64, 96), (80, 48)])
def test_every_trunk_has_output_stride_16_and_width_c(depth, size):
    trunk = ResNetTrunk(depth, width=8, feat_channels=24, feat_dilation=6).eval()
    with torch.no_grad():
        out = trunk(torch.randn(2, 3, *size))
    assert out.shape == (2, 24, size[0] // 16, size[1] // 16)
    assert (out >= 0).all()  # feat_conv ends with ReLU


def test_resnet101_at_paper_widths_has_1024_feature_channels():
    trunk = ResNetTrunk(101)
    assert trunk.out_channels == 1024
    # res5 is dilated, not strided: its first block keeps stride 1 and uses dilation 2
    res5 = trunk.stages[3][0]
    assert res5.conv1.stride == (1, 1) and res5.conv2.dilation == (2, 2)
    # ResNet-101 (42.5M) plus feat_conv_3x3 2048→1024 (18.9M)
    assert 60e6 < sum(p.numel() for p in trunk.parameters()) < 63e6


@pytest.mark.parametrize("width", [1.0, 0.5, 0.125])
def test_flownet_outputs_flow_and_unit_scale_on_the_feature_grid(width):
    net = FlowNetS(feat_channels=32, width=width).eval()
    a, b = torch.rand(1, 3, 64, 96) * 255, torch.rand(1, 3, 64, 96) * 255
    with torch.no_grad():
        flow, scale = net(a, b)
    assert flow.shape == (1, 2, 4, 6)
    assert scale.shape == (1, 32, 4, 6)
    torch.testing.assert_close(scale, torch.ones_like(scale))  # weight 0, bias 1 at init
    assert not net.predict_scale.bias.requires_grad  # the bias stays frozen at 1


def test_flownet_widths_follow_flownet_s():
    full = FlowNetS(feat_channels=8, width=1.0)
    assert [full.conv1[0].out_channels, full.conv2[0].out_channels, full.conv6_1[0].out_channels] \
        == [64, 128, 1024]
    half = FlowNetS(feat_channels=8, width=0.5)
    assert half.conv1[0].out_channels == 32 and half.conv6_1[0].out_channels == 512


def test_segmentation_head_upsamples_to_the_input_size():
    head = build_head("segmentation", 16, 5, 8, 16).eval()
    with torch.no_grad():
        assert head(torch.randn(3, 16, 4, 6)).shape == (3, 5, 64, 96)
    with pytest.raises(ValueError, match="unknown task"):
        build_head("detection3d", 16, 5, 8, 16)


def test_dff_paths_agree_on_key_frames_and_differ_elsewhere(tiny_model):
    frames = torch.rand(6, 3, 64, 96) * 255
    per_frame = [tiny_model.forward_key(frames[i:i + 1])[1] for i in range(6)]
    video = list(tiny_model.video((frames[i:i + 1] for i in range(6)), fixed_schedule(6, 3)))
    for t in (0, 3):
        torch.testing.assert_close(video[t], per_frame[t])
    assert not torch.allclose(video[1], per_frame[1])
    # k=1 is per-frame inference
    every = list(tiny_model.video((frames[i:i + 1] for i in range(6)), fixed_schedule(6, 1)))
    for a, b in zip(every, per_frame):
        torch.testing.assert_close(a, b)


def test_copy_baseline_reuses_the_key_frame_output(tiny_model):
    frames = torch.rand(4, 3, 64, 96) * 255
    out = list(tiny_model.video((frames[i:i + 1] for i in range(4)), fixed_schedule(4, 4),
                                copy_features=True))
    for t in range(1, 4):
        torch.testing.assert_close(out[t], out[0])


def test_training_forward_warps_key_features_with_zero_flow_as_identity(tiny_model):
    # with flow forced to 0 and scale to 1 the training forward is the key frame's output
    tiny_model.flownet.predict_flow.weight.data.zero_()
    tiny_model.flownet.predict_flow.bias.data.zero_()
    cur, key = torch.rand(2, 3, 64, 96) * 255, torch.rand(2, 3, 64, 96) * 255
    with torch.no_grad():
        torch.testing.assert_close(tiny_model(cur, key), tiny_model.forward_key(key)[1])


def test_fixed_schedule():
    assert fixed_schedule(7, 3) == [True, False, False, True, False, False, True]
    with pytest.raises(ValueError):
        fixed_schedule(5, 0)


def test_config_round_trip_and_unknown_fields():
    cfg = PRESETS["small"]
    assert DFFConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown config fields"):
        DFFConfig.from_dict({**cfg.to_dict(), "bogus": 1})


# --- checkpoints -------------------------------------------------------------------------

def test_checkpoint_round_trip_gives_identical_outputs(tmp_path, tiny_model):
    path = tmp_path / "m.pth"
    save_checkpoint(path, tiny_model, meta={"note": "test"})
    loaded = load_checkpoint(path)
    assert loaded.config == tiny_model.config
    x = torch.rand(1, 3, 64, 96) * 255
    with torch.no_grad():
        torch.testing.assert_close(loaded.forward_key(x)[1], tiny_model.forward_key(x)[1],
                                   rtol=0, atol=0)
    assert read_checkpoint(path)["meta"] == {"note": "test"}
    assert list(tmp_path.iterdir()) == [path]  # no temp file left behind


def test_half_checkpoint_is_smaller_and_close(tmp_path, tiny_model):
    full, half = tmp_path / "f.pth", tmp_path / "h.pth"
    save_checkpoint(full, tiny_model)
    save_checkpoint(half, tiny_model, weights="float16")
    assert half.stat().st_size < 0.7 * full.stat().st_size
    loaded = load_checkpoint(half)
    assert all(p.dtype == torch.float32 for p in loaded.parameters())
    x = torch.rand(1, 3, 64, 96) * 255
    with torch.no_grad():
        a, b = loaded.forward_key(x)[1], tiny_model.forward_key(x)[1]
    assert (a - b).abs().max() < 1e-2 * b.abs().max()


def test_int8_checkpoint_is_a_quarter_and_loads_as_its_dequantized_weights(tmp_path):
    torch.manual_seed(0)
    model = DFF(tiny_config(trunk_width=16, feat_channels=32)).eval()
    full, q8 = tmp_path / "f.pth", tmp_path / "q.pth"
    save_checkpoint(full, model)
    save_checkpoint(q8, model, weights="int8")
    assert q8.stat().st_size < 0.4 * full.stat().st_size
    raw = torch.load(q8, weights_only=True)
    assert raw["version"] == 2
    key = "trunk.feat_conv.0.weight"
    assert raw["state_dict"][key].dtype == torch.int8 and key in raw["quantized"]
    # what loads is exactly q * scale, per output channel, and every tensor is float32
    w = model.state_dict()[key]
    scale = w.abs().reshape(w.shape[0], -1).amax(1) / 127
    want = torch.round(w / scale.view(-1, 1, 1, 1)).clamp(-127, 127) * scale.view(-1, 1, 1, 1)
    loaded = load_checkpoint(q8)
    torch.testing.assert_close(loaded.state_dict()[key], want, rtol=0, atol=1e-7)
    assert all(p.dtype == torch.float32 for p in loaded.parameters())
    assert (loaded.state_dict()[key] - w).abs().max() <= scale.max() / 2 + 1e-7
    x = torch.rand(1, 3, 64, 96) * 255
    with torch.no_grad():
        a, b = loaded.forward_key(x)[1], model.forward_key(x)[1]
    assert (a - b).abs().max() < 0.05 * b.abs().max()


def test_int8_checkpoint_with_a_damaged_scale_is_refused(tmp_path, tiny_model):
    path = tmp_path / "q.pth"
    save_checkpoint(path, tiny_model, weights="int8")
    blob = torch.load(path, weights_only=True)
    key = next(iter(blob["quantized"]))
    blob["quantized"][key] = blob["quantized"][key][:1]
    torch.save(blob, path)
    with pytest.raises(CheckpointError, match=f"quantized weight '{key}' does not match"):
        load_checkpoint(path)
    del blob["quantized"]
    torch.save(blob, path)
    with pytest.raises(CheckpointError, match="without its 'quantized' scales"):
        load_checkpoint(path)


def _write(path, obj):
    torch.save(obj, path)
    return path


class NotAllowed:  # a pickled object: weights_only loading must refuse it
    pass


@pytest.mark.parametrize("make, match", [
    (lambda p: p, "no such checkpoint file"),
    (lambda p: (p.write_bytes(b"\x00garbage" * 10), p)[1], "not a loadable PyTorch checkpoint"),
    (lambda p: _write(p, torch.zeros(3)), "not a dff-trt checkpoint"),
    (lambda p: _write(p, {"state_dict": {}}), "not a dff-trt checkpoint"),
    (lambda p: _write(p, {"format": "dff-trt-checkpoint", "version": 99, "config": {},
                          "state_dict": {}}), "checkpoint version 99"),
    (lambda p: _write(p, {"format": "dff-trt-checkpoint", "version": 1, "config": {},
                          "state_dict": []}), "no 'state_dict' dict"),
    (lambda p: (p.write_bytes(pickle.dumps(NotAllowed())), p)[1], "not a loadable"),
])
def test_bad_checkpoints_raise_one_clear_error_naming_the_file(tmp_path, make, match):
    path = make(tmp_path / "bad.pth")
    with pytest.raises(CheckpointError, match=match) as err:
        load_checkpoint(path)
    assert str(path) in str(err.value)


def test_checkpoint_whose_weights_do_not_match_its_config(tmp_path, tiny_model):
    path = tmp_path / "m.pth"
    save_checkpoint(path, tiny_model)
    blob = torch.load(path, weights_only=True)
    blob["config"]["feat_channels"] = 32
    torch.save(blob, path)
    with pytest.raises(CheckpointError):
        load_checkpoint(path)
    blob["config"] = {**tiny_config().to_dict(), "unknown_field": 3}
    torch.save(blob, path)
    with pytest.raises(CheckpointError, match="bad config"):
        load_checkpoint(path)


def test_demo_checkpoint_path_knows_both_tasks():
    from dff.models.checkpoint import demo_checkpoint_path

    assert demo_checkpoint_path().name == "dff_small_synthetic.pth"
    assert demo_checkpoint_path("segmentation") == demo_checkpoint_path()
    assert demo_checkpoint_path("detection").name == "dff_small_detection.pth"
    assert demo_checkpoint_path("detection").parent == demo_checkpoint_path().parent
    assert demo_checkpoint_path("rfcn").name == "dff_small_rfcn.pth"
    with pytest.raises(DffError, match="'tracking' is not shipped; the demos are segmentation, "
                                       "detection, rfcn"):
        demo_checkpoint_path("tracking")


def test_a_checkpoint_with_an_unknown_task_is_refused_naming_config_task(tmp_path, tiny_model):
    path = tmp_path / "m.pth"
    save_checkpoint(path, tiny_model)
    blob = torch.load(path, weights_only=True)
    blob["config"]["task"] = "tracking"
    torch.save(blob, path)
    with pytest.raises(DffError, match="config.task") as err:
        load_checkpoint(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_a_detection_checkpoint_round_trips_in_int8(tmp_path):
    torch.manual_seed(0)
    model = DFF(tiny_config(trunk_width=16, feat_channels=32, head_upsample=2)
                .for_task("detection")).eval()
    save_checkpoint(tmp_path / "d.pth", model, weights="int8")
    loaded = load_checkpoint(tmp_path / "d.pth")
    assert loaded.config.task == "detection" and loaded.head.out_stride == 8
    x = torch.rand(1, 3, 64, 96) * 255
    with torch.no_grad():
        a, b = model.forward_key(x)[1], loaded.forward_key(x)[1]
    assert loaded.outputs(b)["boxes"].shape == (1, 100, 4)
    assert b[0].shape == (1, 4, 8, 12)  # heat at stride 8
    for got, want in zip(b[:2], a[:2]):  # heat logits, size
        assert (got - want).abs().max() < 0.05 * want.abs().max()
    assert (b[2] - a[2]).abs().max() < 0.1  # offset, 0..1


@pytest.mark.parametrize("demo", ["segmentation", "detection", "rfcn"])
def test_the_shipped_demo_checkpoint_loads_and_fits_in_10_mb(demo):
    from dff.models.checkpoint import demo_checkpoint_path

    path = demo_checkpoint_path(demo)
    if not path.exists():
        pytest.skip(f"{path} not trained yet (see README for the command)")
    assert path.stat().st_size <= 10_000_000
    model = load_checkpoint(path)
    task = "detection" if demo == "rfcn" else demo
    assert model.config.task == task
    assert model.config.head == ("rfcn" if demo == "rfcn" else "centernet")
    h, w = model.config.input_size
    with torch.no_grad():
        out = model.outputs(model.forward_key(torch.full((1, 3, h, w), 128.0))[1])
    if task == "segmentation":
        assert out["labels"].shape == (1, h, w)
    else:
        assert out["boxes"].shape == (1, model.config.max_detections, 4)
