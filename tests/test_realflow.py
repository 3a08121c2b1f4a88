"""RealFlowNet (models/realflow.py, issue 23): shapes at every stride, the scale head's start,
the shipped weights on a known translation, and the ONNX export."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from dff.models.realflow import (
    FLOW_MEAN,
    FLOW_STD,
    INPUT_SCALES,
    STRIDES,
    WEIGHTS,
    RealFlowNet,
    cost_volume,
    halve,
    load_realflow,
    softmax1,
    trunk_state,
    unit,
)


def texture(h: int, w: int, seed: int = 0) -> np.ndarray:
    """An RGB uint8 texture: a real frame (vtest.avi) where the cache has it, else blurred
    noise."""
    from dff.data import real

    if real.is_cached("vtest.avi"):
        import cv2

        cap = cv2.VideoCapture(str(real.path("vtest.avi")))
        ok, frame = cap.read()
        cap.release()
        if ok and frame.shape[0] >= h and frame.shape[1] >= w:
            return cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)[:h, :w]
    rng = np.random.default_rng(seed)
    noise = torch.from_numpy(rng.uniform(0, 255, (1, 3, h, w)).astype(np.float32))
    blurred = torch.nn.functional.avg_pool2d(noise, 5, 1, 2, count_include_pad=False)
    blurred = (blurred - blurred.mean()) * 4 + 128
    return blurred.clamp(0, 255)[0].permute(1, 2, 0).numpy().astype(np.uint8)


def normalised(rgb: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1).float()[None]
    mean = torch.tensor(FLOW_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(FLOW_STD).view(1, 3, 1, 1)
    return (x - mean) / std


@pytest.mark.parametrize("stride", STRIDES)
@pytest.mark.parametrize("input_scale", INPUT_SCALES)
def test_shapes_at_every_stride(stride, input_scale):
    net = RealFlowNet(stride, 5, input_scale=input_scale).eval()
    for h, w in ((3 * stride, 5 * stride), (7 * stride, 9 * stride)):
        x, k = torch.randn(2, 1, 3, h, w)
        with torch.no_grad():
            flow, scale = net(x, k)
        assert flow.shape == (1, 2, h // stride, w // stride)
        assert scale.shape == (1, 5, h // stride, w // stride)


def test_scale_starts_at_one():
    net = RealFlowNet(16, 7)
    x, k = torch.randn(2, 2, 3, 64, 96)
    with torch.no_grad():
        _, scale = net(x, k)
    assert torch.equal(scale, torch.ones_like(scale))
    assert not net.predict_scale.bias.requires_grad


def test_a_scale_head_at_its_start_gives_exactly_one_and_a_trained_one_its_field():
    """In eval mode a head at its start (weight 0, bias 1) skips the 1x1 conv and the resize:
    the same ones as the head computes; a head trained since, even after eval(), is computed."""
    net = RealFlowNet(8, 3, input_scale=0.5)
    x, k = torch.randn(2, 2, 3, 64, 96, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        computed = net(x, k)[1]  # training mode: always the head
        assert net.eval().scale_is_one()
        constant = net(x, k)[1]
        assert torch.equal(constant, computed) and torch.equal(constant, torch.ones(2, 3, 8, 12))
        torch.nn.init.normal_(net.predict_scale.weight, std=0.1)  # changed after eval()
        assert not net.scale_is_one()
        trained = net(x, k)[1]
        assert torch.equal(trained, net.train()(x, k)[1])
        assert float((trained - 1).abs().max()) > 1e-3
    loaded = RealFlowNet(8, 3, input_scale=0.5).eval()
    loaded.load_state_dict(net.state_dict())  # a load refreshes what an export reads
    assert not loaded._scale_one


def test_cost_volume_slices_take_constant_bounds():
    """The exported cost volume slices the padded key map with constant starts and ends
    (counted from its end), so ONNX needs no arithmetic on the map's size for them."""
    onnx = pytest.importorskip("onnx")

    class Volume(torch.nn.Module):
        def forward(self, cur, key):
            return cost_volume(cur, key, 2)

    cur, key = torch.randn(2, 1, 4, 6, 8)
    dims = {2: torch.export.Dim("h", min=3), 3: torch.export.Dim("w", min=3)}
    with torch.no_grad():
        proto = torch.onnx.export(Volume(), (cur, key), dynamo=True, opset_version=20,
                                  dynamic_shapes=(dims, dims), verbose=False).model_proto
    known = {t.name for t in proto.graph.initializer}
    known |= {o for n in proto.graph.node if n.op_type == "Constant" for o in n.output}
    slices = [n for n in proto.graph.node if n.op_type == "Slice"]
    assert len(slices) == 2 * 5
    assert all(i in known for n in slices for i in n.input[1:] if i)
    onnx.checker.check_model(proto)


def test_normalisation_is_recorded_on_the_0_255_scale():
    assert RealFlowNet.flow_mean == (127.5,) * 3 and RealFlowNet.flow_std == (255.0,) * 3


def test_bad_stride_or_input_scale_is_refused():
    with pytest.raises(ValueError, match="stride"):
        RealFlowNet(12)
    with pytest.raises(ValueError, match="input scale"):
        RealFlowNet(8, input_scale=0.3)


def test_halve_is_the_2x2_average_and_softmax1_is_softmax():
    x = torch.randn(2, 3, 12, 20)
    torch.testing.assert_close(halve(x), torch.nn.functional.avg_pool2d(x, 2, 2))
    torch.testing.assert_close(softmax1(x * 30), torch.softmax(x * 30, 1))


@pytest.mark.parametrize("radius", [1, 2, 3])
def test_cost_volume_is_its_definition(radius):
    """Candidate (dy, dx), dy outer: mean over channels of cur(y, x) · key(y + dy, x + dx),
    zero where that is off the key map."""
    g = torch.Generator().manual_seed(radius)
    cur, key = torch.randn(2, 5, 4, 6, generator=g), torch.randn(2, 5, 4, 6, generator=g)
    got = cost_volume(cur, key, radius)
    k = 2 * radius + 1
    assert got.shape == (2, k * k, 4, 6)
    for i, (dy, dx) in enumerate((dy, dx) for dy in range(-radius, radius + 1)
                                 for dx in range(-radius, radius + 1)):
        want = torch.zeros(2, 4, 6)
        for y in range(4):
            for x in range(6):
                if 0 <= y + dy < 4 and 0 <= x + dx < 6:
                    want[:, y, x] = (cur[:, :, y, x] * key[:, :, y + dy, x + dx]).mean(1)
        torch.testing.assert_close(got[:, i], want)


def test_unit_removes_the_contrast():
    """The cost volume compares unit-RMS features: a cell and the same cell at a tenth of its
    contrast look alike; a featureless cell stays small."""
    x = torch.randn(1, 8, 4, 4, generator=torch.Generator().manual_seed(0))
    x = x / x.pow(2).mean(1, keepdim=True).sqrt()  # every cell of RMS 1, then of 0.1
    torch.testing.assert_close(unit(x * 0.1), unit(x), rtol=0.01, atol=1e-3)
    assert float(unit(x).pow(2).mean(1).sqrt().sub(1).abs().max()) < 1e-3
    assert float(unit(torch.zeros(1, 8, 2, 2)).abs().max()) == 0.0


def test_weights_of_another_version_are_refused():
    state = trunk_state(RealFlowNet(8, 1))
    old = {k: v for k, v in state.items() if k != "version"}  # version 3 and before
    with pytest.raises(ValueError, match="version none"):
        load_realflow(8, 1, old)
    with pytest.raises(ValueError, match="version 3"):
        load_realflow(8, 1, {**state, "version": torch.tensor(3)})
    assert int(load_realflow(8, 1, state).version) == 4


shipped = pytest.mark.skipif(not WEIGHTS.exists(), reason="no shipped realflow.pth")


def real_frame(real_material, index: int = 60) -> np.ndarray:
    """Frame `index` of bikes.mp4 (RGB, 272x640; fetched with the small material, as in CI).
    The shipped weights learnt real texture: on blurred noise they do not follow even a
    translation, so their tests read a real frame."""
    from itertools import islice

    from dff.runtime.video import open_video

    with open_video(real_material("bikes.mp4")) as video:
        frame = next(islice(iter(video), index, None), None)
    assert frame is not None, f"bikes.mp4: no frame {index}"
    return np.ascontiguousarray(frame)


@shipped
def test_shipped_weights_follow_an_8px_translation(real_material):
    """key = the frame from (8, 8) on, current from (0, 0): current(p) = key(p − (8, 8)), so
    the flow current → key is (−8, −8) px, −1 cell at stride 8 in each direction."""
    net = load_realflow(8, 3).eval()
    big = real_frame(real_material)[:200, 100:396]
    cur, key = big[:192, :288], big[8:200, 8:296]
    with torch.no_grad():
        flow, scale = net(normalised(cur), normalised(key))
    assert flow.shape == (1, 2, 24, 36) and torch.equal(scale, torch.ones_like(scale))
    inner = flow[0, :, 2:-2, 2:-2]
    err = torch.linalg.vector_norm(inner - torch.tensor([-1.0, -1.0]).view(2, 1, 1), dim=0)
    assert float(err.mean()) < 0.5, inner.mean((1, 2))
    assert float(err.median()) < 0.25


@shipped
def test_shipped_weights_keep_two_regions_apart(real_material):
    """The left half of the frame moves 12 px one way, the right half 20 px the other: each
    half's flow is its own, not a blur of the two (version 2's fault on the stereo pair)."""
    cv2 = pytest.importorskip("cv2")
    net = load_realflow(8, 3).eval()
    key = np.ascontiguousarray(real_frame(real_material)[:192, 100:388])
    ys, xs = np.mgrid[0:192, 0:288].astype(np.float32)
    fx = np.where(xs < 144, -12.0, 20.0).astype(np.float32)
    cur = cv2.remap(key, xs + fx, ys, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
    with torch.no_grad():
        flow = net(normalised(cur), normalised(key))[0][0].numpy() * 8  # px
    for cells, truth in ((flow[0, 3:-3, 2:15], -12.0), (flow[0, 3:-3, 21:34], 20.0)):
        assert abs(float(np.median(cells)) - truth) < 1.5, float(np.median(cells))
        assert float(np.abs(cells - truth).mean()) < 3.0
    assert float(np.abs(flow[1, 3:-3]).mean()) < 1.5  # no vertical motion


@shipped
def test_load_realflow_keeps_the_trunk_and_builds_the_scale_head():
    a, b = load_realflow(16, 4), load_realflow(32, 9)
    assert a.predict_scale.out_channels == 4 and b.predict_scale.out_channels == 9
    assert torch.equal(a.enc1[0].weight, b.enc1[0].weight)
    assert not torch.equal(a.enc1[0].weight, RealFlowNet(16, 4).enc1[0].weight)
    # or from a state dict (a dff-adapt checkpoint's net), its own scale head left out
    c = load_realflow(8, 2, a.state_dict())
    assert torch.equal(c.enc1[0].weight, a.enc1[0].weight) and c.predict_scale.out_channels == 2


@shipped
@pytest.mark.parametrize("head", ["start", "trained"])
def test_onnx_export_is_tensorrt_clean_and_matches_pytorch(tmp_path, head):
    """Also with a trained scale head: the export then computes the field, where the head at
    its start gives the constant 1 (RealFlowNet.scale_is_one)."""
    onnxruntime = pytest.importorskip("onnxruntime")
    from dff.engines import onnx_ops

    net = load_realflow(8, 4)
    if head == "trained":
        torch.nn.init.normal_(net.predict_scale.weight, std=0.05,
                              generator=torch.Generator().manual_seed(0))
    net.eval()
    big = texture(136, 232)
    cur, key = normalised(big[:128, :224]), normalised(big[8:136, 8:232])
    dims = {2: torch.export.Dim("height"), 3: torch.export.Dim("width")}
    with torch.no_grad():
        program = torch.onnx.export(net, (cur, key), dynamo=True, opset_version=20,
                                    input_names=["image", "key"],
                                    output_names=["flow", "scale"],
                                    dynamic_shapes=(dims, dims), verbose=False)
        expected = net(cur, key)
    assert onnx_ops.problems(program.model_proto) == []
    path = tmp_path / "realflow.onnx"
    program.save(str(path))
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    flow, scale = session.run(None, {"image": cur.numpy(), "key": key.numpy()})
    np.testing.assert_allclose(flow, expected[0].numpy(), atol=1e-4)
    np.testing.assert_allclose(scale, expected[1].numpy(), atol=1e-4)
    assert (float(np.abs(scale - 1).max()) > 1e-3) == (head == "trained")


def test_layered_samples_have_exact_flow_and_several_motions():
    """pretrain_flow.layered_sample: current(p) = key(p + flow(p)) wherever p + flow(p) is in
    the key, and the flow is piecewise (regions with their own motion), not one affine map."""
    cv2 = pytest.importorskip("cv2")
    from dff.models.pretrain_flow import layered_sample

    frame = cv2.GaussianBlur(texture(240, 320), (0, 0), 1.5)  # resampling errors small
    rng = np.random.default_rng(0)
    distinct = []
    for _ in range(6):
        cur, key, flow = layered_sample(frame, rng, crop=(160, 224), large_share=0.5)
        assert cur.shape == key.shape == (160, 224, 3) and flow.shape == (160, 224, 2)
        assert cur.dtype == key.dtype == np.uint8 and flow.dtype == np.float32
        ys, xs = np.mgrid[0:160, 0:224].astype(np.float32)
        mx, my = xs + flow[..., 0], ys + flow[..., 1]
        back = cv2.remap(key, mx, my, cv2.INTER_LINEAR)
        inside = (mx > 1) & (mx < 222) & (my > 1) & (my < 158)
        diff = np.abs(back.astype(np.float32) - cur.astype(np.float32)).mean(-1)
        assert inside.mean() > 0.2 and float(np.median(diff[inside])) < 3.0
        # residual from the best affine fit of the flow: large where regions move apart
        a = np.stack([xs.ravel(), ys.ravel(), np.ones(xs.size, np.float32)], 1)
        fit = a @ np.linalg.lstsq(a, flow.reshape(-1, 2), rcond=None)[0]
        distinct.append(float(np.abs(fit - flow.reshape(-1, 2)).max()))
    assert max(distinct) > 5.0, distinct


def test_low_contrast_samples_keep_their_flow_and_lose_contrast():
    """pretrain_flow.to_batch(low_contrast=1): both images' contrast scaled down alike (the
    flow between them unchanged); low_contrast=0 draws no more random numbers, so earlier
    recipes' samples are unchanged."""
    from dff.models.pretrain_flow import LOW_CONTRAST, to_batch

    frame = texture(64, 96)
    samples = [(frame, frame[::-1].copy(), np.zeros((64, 96, 2), np.float32))] * 4
    torch.manual_seed(0)  # the noise is torch's
    plain = to_batch(samples, np.random.default_rng(3))
    torch.manual_seed(0)
    same = to_batch(samples, np.random.default_rng(3), low_contrast=0.0)
    for a, b in zip(plain, same):
        assert torch.equal(a, b)
    torch.manual_seed(0)
    faint = to_batch(samples, np.random.default_rng(3), low_contrast=1.0)
    raw = torch.from_numpy(frame).float().std() / 255.0
    for img in faint[:2]:
        assert float(img.std((1, 2, 3)).max()) < float(raw) * 1.1
        assert float(img.std((1, 2, 3)).min()) > float(raw) * LOW_CONTRAST * 0.5
    assert torch.equal(faint[2], plain[2])


def test_adapt_stereo_benchmark_scores_each_evaluation(engines, tmp_path, capsys):
    """benchmarks/adapt_stereo.py (a smoke test; it needs the `bench` extra's scikit-image):
    a row per held-out evaluation, the export left as it was."""
    pytest.importorskip("skimage")
    pytest.importorskip("onnxruntime")
    import importlib.util
    from pathlib import Path

    from dff.runtime.video import write_synthetic_clip

    clips = [tmp_path / "a.mp4", tmp_path / "b.mp4"]
    for seed, clip in enumerate(clips):
        write_synthetic_clip(clip, seed=seed, num_frames=12, height=64, width=96)
    before = (engines / "flow.onnx").read_bytes()
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "adapt_stereo.py"
    spec = importlib.util.spec_from_file_location("adapt_stereo", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    threads = torch.get_num_threads()
    try:
        bench.main([str(engines), "--video", *map(str, clips), "--iters", "2", "--eval-every",
                    "1", "--threads", "1"])
    finally:
        torch.set_num_threads(threads)  # the benchmark sets PyTorch's for the process
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines() if line[:9].strip().isdigit()]
    assert [int(r[0]) for r in rows] == [0, 1, 2]
    assert all(0 < float(r[4]) < 100 for r in rows)  # stereo EPE in px
    assert "the held-out rule chose iteration" in out
    assert (engines / "flow.onnx").read_bytes() == before
