"""The learned schedule end to end (issue 13): a quality head exported as flow.onnx's output
`quality`, read by every backend, and `--schedule learned --key-budget` in dff-run (one budget
shared by the streams of a run) and dff-serve."""

from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import pytest
import torch
from conftest import tiny_config
from dff.export.manifest import load_manifest
from dff.export.modules import DFFModules, ModuleError, check_modules
from dff.models.dff import DFF
from dff.runtime.scheduler import KeyBudget, make_schedulers
from dff.runtime.video import write_synthetic_clip

from dff.errors import DffError

H, W, T = 64, 96, 12

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def quality_export(tmp_path_factory):
    """(checkpoint, engine dir) of a tiny model with a quality head (seed 0)."""
    pytest.importorskip("onnxruntime")
    from dff.export.exporter import export_model
    from dff.models.checkpoint import save_checkpoint

    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("quality")
    save_checkpoint(root / "q.pth", DFF(tiny_config(quality_channels=4)).eval())
    result = export_model(root / "q.pth", root / "engines", min_shape=(1, 32, 32),
                          opt_shape=(1, H, W), max_shape=(2, 128, 192))
    return root / "q.pth", root / "engines", result


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    root = tmp_path_factory.mktemp("quality_clips")
    paths = [root / f"cam{i}.mp4" for i in range(2)]
    for i, path in enumerate(paths):
        write_synthetic_clip(path, seed=20 + i, num_frames=T, height=H, width=W)
    return paths


def call(args):
    from dff.commands import run as cli

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main([str(a) for a in args])
    return code, out.getvalue(), err.getvalue()


def keys_of(path):
    return [json.loads(line)["key"] for line in path.read_text().splitlines()]


def test_flow_onnx_outputs_quality_and_its_parity_is_checked(quality_export, engines):
    _, engine_dir, result = quality_export
    flow = load_manifest(engine_dir)["graphs"]["flow"]["outputs"]
    assert [o["name"] for o in flow] == ["flow", "scale", "feat", "quality"]
    assert flow[3]["shape"] == ["N", 1] and flow[3]["dtype"] == "float32"
    rows = [r for r in result.rows if (r.graph, r.output) == ("flow", "quality")]
    assert rows and all(r.passed for r in rows)
    plain = load_manifest(engines)["graphs"]["flow"]["outputs"]
    assert "quality" not in [o["name"] for o in plain]  # no head, no output


def test_every_backend_returns_the_quality_of_the_flow_graph(quality_export, engines):
    from dff.models.checkpoint import load_checkpoint
    from dff.runtime.backends import host_quality
    from dff.runtime.loaders import open_backend
    from dff.runtime.scheduler import make_scheduler

    ckpt, engine_dir, _ = quality_export
    rng = np.random.default_rng(0)
    image, key = (rng.integers(0, 256, (2, 3, H, W), dtype=np.uint8) for _ in range(2))
    model = load_checkpoint(ckpt)
    with torch.no_grad():
        ref = model.flow_quality(torch.from_numpy(image).float(),
                                 torch.from_numpy(key).float())[2].numpy()
    learned, fixed = make_scheduler("learned", 10), make_scheduler("fixed", 10)
    for kind, extra in (("onnxruntime-cpu", {}), ("torch-cpu", {"checkpoint": ckpt})):
        backend = open_backend(kind, engine_dir, threads=1, **extra)
        try:
            assert backend.has_quality
            out = backend.flow(image, key, backend.feature(key))
            flow, _scale, _feat = out  # still unpacks as the triple
            assert backend.to_host(flow).shape == (2, 2, H // 16, W // 16)
            np.testing.assert_allclose(host_quality(backend, out, [learned]), ref, atol=1e-4)
            assert host_quality(backend, out, [fixed]) is None  # not read, not copied
        finally:
            backend.close()
    plain = open_backend("onnxruntime-cpu", engines, threads=1)
    try:
        assert not plain.has_quality
        assert plain.flow(image, key, plain.feature(key)).quality is None
    finally:
        plain.close()


class _Flow(torch.nn.Module):
    def __init__(self, quality_shape=None):
        super().__init__()
        self.conv = torch.nn.Conv2d(6, 2, 1)
        self.quality_shape = quality_shape

    def forward(self, x, key):
        flow = torch.nn.functional.avg_pool2d(self.conv(torch.cat((x, key), 1)), 16)
        quality = flow.abs().mean(dim=(1, 2, 3))
        return flow, None, quality.view(self.quality_shape or (-1, 1))


def test_a_users_flow_module_may_output_a_quality():
    def mods(flow):
        return DFFModules(feature=torch.nn.Conv2d(3, 8, 16, 16), flow=flow,
                          task=torch.nn.Conv2d(8, 2, 1), class_names=("a", "b"),
                          input_size=(64, 96))

    facts = check_modules(mods(_Flow()))
    assert facts.quality and not facts.scale_field
    with pytest.raises(ModuleError, match=r"quality \[2\].*expected float \[2, 1\]"):
        check_modules(mods(_Flow(quality_shape=(-1,))))


def test_dff_run_learned_keeps_to_its_budget_on_every_backend(quality_export, clips, tmp_path):
    ckpt, engine_dir, _ = quality_export
    runs = {}
    for kind, extra in (("onnxruntime", []), ("torch", ["--checkpoint", ckpt])):
        out = tmp_path / f"{kind}.jsonl"
        code, stdout, err = call([clips[0], "-e", engine_dir, "--backend", kind, *extra,
                                  "--schedule", "learned", "--key-budget", "0.2", "--json", out,
                                  "--summary", tmp_path / f"{kind}.json", "--quiet"])
        assert code == 0, err
        assert "learned, key interval 10, key budget 0.2" in stdout
        runs[kind] = keys_of(out)
        summary = json.loads((tmp_path / f"{kind}.json").read_text())
        assert summary["key_budget"] == 0.2
        assert sum(summary["schedule"]["reasons"].values()) == sum(runs[kind])
    assert runs["onnxruntime"] == runs["torch"]  # one schedule, whatever computes quality
    assert runs["onnxruntime"][0] and sum(runs["onnxruntime"]) <= 1 + 0.2 * (T - 1)


def test_dff_run_refuses_learned_without_a_quality_head_and_bad_budgets(engines, clips,
                                                                        tmp_path):
    code, _, err = call([clips[0], "-e", engines, "--backend", "onnxruntime", "--schedule",
                         "learned", "--json", tmp_path / "x.jsonl"])
    assert code == 1 and "no quality head" in err and "python -m dff.models.quality" in err
    assert not (tmp_path / "x.jsonl").exists()
    from dff.commands import run as cli

    with pytest.raises(SystemExit) as e, contextlib.redirect_stderr(io.StringIO()) as msg:
        cli.main([str(clips[0]), "-e", str(engines), "--schedule", "adaptive", "--key-budget",
                  "0"])
    assert e.value.code == 2 and "outside (0, 1]" in msg.getvalue()
    code, _, err = call([clips[0], "-e", engines, "--key-budget", "0.1", "--json",
                         tmp_path / "y.jsonl"])
    assert code == 1 and "--key-budget applies to --schedule adaptive or learned" in err


def test_streams_of_one_run_share_one_budget(quality_export, clips, tmp_path):
    schedulers = make_schedulers(3, "learned", 10, key_budget=0.1)
    assert len({id(s.budget) for s in schedulers}) == 1
    assert isinstance(schedulers[0].budget, KeyBudget) and schedulers[0].budget.streams == 3
    assert all(s.budget is None for s in make_schedulers(2, "adaptive", 10))
    with pytest.raises(DffError, match="key-budget"):
        make_schedulers(2, "fixed", 10, key_budget=0.1)

    _, engine_dir, _ = quality_export
    out = tmp_path / "out"
    out.mkdir()
    code, stdout, err = call([*clips, "-e", engine_dir, "--backend", "onnxruntime",
                              "--schedule", "learned", "--key-budget", "0.25",
                              "--output-dir", out, "--quiet"])
    assert code == 0, err
    keys = [keys_of(out / f"cam{i}.jsonl") for i in range(2)]
    assert all(k[0] for k in keys)
    assert sum(map(sum, keys)) <= 2 * (1 + 0.25 * (T - 1))  # the budget of both together
    summary = json.loads((out / "summary.json").read_text())
    assert summary["key_budget"] == 0.25 and "key budget 0.25" in stdout


def test_dff_serve_repository_takes_the_budget_and_checks_for_quality(quality_export, engines,
                                                                      tmp_path):
    from dff.serve.repository import RepositoryError, write_dff_model

    _, engine_dir, _ = quality_export
    with pytest.raises(RepositoryError, match="no `quality` output"):
        write_dff_model(engines, tmp_path / "a", schedule="learned")
    summary = write_dff_model(engine_dir, tmp_path / "b", schedule="learned", key_budget=0.1)
    assert summary["schedule"] == "learned"
    text = (tmp_path / "b" / "dff" / "config.pbtxt").read_text()
    assert 'key: "key_budget"' in text and "0.1" in text
    with pytest.raises(DffError, match="key-budget"):
        write_dff_model(engine_dir, tmp_path / "c", schedule="fixed", key_budget=0.1)


def test_triton_serves_the_learned_schedule_as_a_run_in_process(quality_export, tmp_path):
    """Through Triton's real server (the BLS model asks the flow stage for `quality`): each
    sequence's key frames and labels equal an in-process run with a budget of its own."""
    from dff.data.synthetic import make_clip
    from dff.runtime.loop import Pipeline
    from dff.runtime.ort_backend import OrtBackend
    from dff.runtime.scheduler import make_scheduler
    from dff.serve.repository import write_repository
    from triton_fixture import grpc_client_module, start_server

    _, engine_dir, _ = quality_export
    write_repository(engine_dir, tmp_path / "repo", schedule="learned", key_budget=0.25)
    clips = [make_clip(30 + i, T, H, W).frames for i in range(2)]
    g = grpc_client_module()
    server = start_server(tmp_path / "repo")
    served: dict[int, list] = {0: [], 1: []}
    try:
        client = g.InferenceServerClient(server.grpc_url)
        for t in range(T):  # the two sequences in turns
            for i, frames in enumerate(clips):
                image = g.InferInput("image", [1, H, W, 3], "UINT8")
                image.set_data_from_numpy(frames[t][None])
                r = client.infer("dff", [image], sequence_id=300 + i, sequence_start=t == 0,
                                 sequence_end=t == T - 1, client_timeout=60)
                served[i].append((bool(r.as_numpy("is_key")[0, 0]), r.as_numpy("labels")[0]))
        client.close()
    finally:
        server.stop()
    backend = OrtBackend(engine_dir)
    try:
        for i, frames in enumerate(clips):
            scheduler = make_scheduler("learned", 10, key_budget=0.25)
            want = list(Pipeline(backend, scheduler).run(frames))
            assert [k for k, _ in served[i]] == [r.is_key for r in want], f"sequence {i}"
            assert scheduler.stats()["reasons"]["quality"] >= 1  # quality really decided
            for (_, labels), ref in zip(served[i], want):
                np.testing.assert_array_equal(labels, ref.labels)
    finally:
        backend.close()


def test_the_schedules_benchmark_runs_the_motion_split_through_the_runtime(quality_export,
                                                                           tmp_path, capsys):
    """benchmarks/schedules.py on one clip per category (a smoke test: nothing timed here)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "schedules.py"
    spec = importlib.util.spec_from_file_location("schedules_bench", path)
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    ckpt, engine_dir, _ = quality_export
    out = tmp_path / "schedules.json"
    assert bench.main(["--engine-dir", str(engine_dir), "--checkpoint", str(ckpt), "--clips",
                       "1", "--threads", "1", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["frames"] == 5 * 60 and set(res["stream"]) == set(res["pooled"]) == {
        "fixed", "adaptive", "learned"}
    for mode in ("stream", "pooled"):
        for name, row in res[mode].items():
            assert 0 <= row["miou"] <= 1 and row["fps"] > 0, (mode, name)
            assert row["key_fraction"] <= 0.1 + 1e-9, (mode, name)  # within the budget
            assert set(row["by_category"]) == {"slow", "medium", "fast", "cuts", "bursts"}
        assert res[mode]["fixed"]["key_fraction"] == pytest.approx(0.1)
    assert "one budget for all" in capsys.readouterr().out
