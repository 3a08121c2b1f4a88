import types

import pytest
import torch
from dff.models.config import PRESETS, DFFConfig
from dff.models.dff import DFF


@pytest.fixture(scope="session", autouse=True)
def _few_threads():
    torch.set_num_threads(2)


@pytest.fixture(scope="module")
def one_thread():
    """torch on one thread for a module (ONNX Runtime runs beside it in these tests)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_config(**kw) -> DFFConfig:
    """A DFF small enough to build and run in milliseconds."""
    return DFFConfig.from_dict({**PRESETS["tiny"].to_dict(), **kw})


@pytest.fixture
def tiny_model() -> DFF:
    torch.manual_seed(0)
    return DFF(tiny_config()).eval()


@pytest.fixture(scope="session")
def tiny_export(tmp_path_factory):
    """(checkpoint, engine dir): a tiny model (seed 0) exported once for the session with
    dynamic N, H and W in 1x32x32 .. 2x128x192, opt 1x64x96. Tests copy it before changing it."""
    pytest.importorskip("onnxruntime")
    from dff.export.exporter import export_model
    from dff.models.checkpoint import save_checkpoint

    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("tiny_export")
    save_checkpoint(root / "tiny.pth", DFF(tiny_config()).eval())
    export_model(root / "tiny.pth", root / "engines", min_shape=(1, 32, 32),
                 opt_shape=(1, 64, 96), max_shape=(2, 128, 192))
    return root / "tiny.pth", root / "engines"


@pytest.fixture(scope="session")
def engines(tiny_export):
    """The engine folder of `tiny_export` (ONNX graphs + manifest.json)."""
    return tiny_export[1]


def tiny_detection_model() -> DFF:
    """A tiny detection DFF (seed 0) whose BatchNorm statistics come from 8 synthetic-clip
    frames. With the default statistics an untrained trunk's features reach the hundreds and
    its heat logits +-100: scores of exactly 1.0 tie, and TopK orders ties as each runtime
    likes, so no export of it could pass parity."""
    from dff.data.synthetic import make_clip

    torch.manual_seed(0)
    cfg = tiny_config().for_task("detection")
    model = DFF(cfg)
    frames = make_clip(0, 8, *cfg.input_size).frames.transpose(0, 3, 1, 2)
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average: the statistics of these frames
    with torch.no_grad():
        model.train().task(model.features(torch.from_numpy(frames.copy()).float()))
    for m in norms:
        m.momentum = 0.1
    return model.eval()


@pytest.fixture(scope="session")
def detection_export(tmp_path_factory):
    """(checkpoint, engine dir): `tiny_detection_model` exported once for the session with
    tiny_export's profile (1x32x32 .. 2x128x192, opt 1x64x96). Tests copy it before changing
    it."""
    pytest.importorskip("onnxruntime")
    from dff.export.exporter import export_model
    from dff.models.checkpoint import save_checkpoint

    root = tmp_path_factory.mktemp("detection_export")
    save_checkpoint(root / "tiny_detection.pth", tiny_detection_model())
    export_model(root / "tiny_detection.pth", root / "engines", min_shape=(1, 32, 32),
                 opt_shape=(1, 64, 96), max_shape=(2, 128, 192))
    return root / "tiny_detection.pth", root / "engines"


@pytest.fixture(scope="session")
def detection_engines(detection_export):
    """The engine folder of `detection_export` (ONNX graphs + manifest.json)."""
    return detection_export[1]


class Untouchable(types.ModuleType):
    """A module that records every use: a read of a public name, or an import (which reads
    __spec__). Other dunders are introspection, not use: any code that walks sys.modules with
    isinstance() reads __class__ (CI caught one on a fresh machine), inspect reads __file__."""

    _IMPORT = ("__spec__", "__path__", "__getattr__")

    def __init__(self, name):
        super().__init__(name)
        object.__setattr__(self, "reads", [])

    def __getattribute__(self, attr):
        dunder = attr.startswith("__") and attr.endswith("__")
        if attr != "reads" and (not dunder or attr in Untouchable._IMPORT):
            object.__getattribute__(self, "reads").append(attr)
        return object.__getattribute__(self, attr)


@pytest.fixture
def real_material():
    """get(name) -> Path: a cached, checksum-checked real file (dff.data.real). When it is
    missing or damaged the test skips with the fetch command, or fails where
    DFF_REAL_REQUIRED=1 (CI, which fetches the small material first: a file that is not
    small, vtest.avi, still skips there)."""
    import os

    from dff.data import real

    def get(name: str):
        try:
            return real.path(name)
        except real.MaterialError as e:
            if os.environ.get("DFF_REAL_REQUIRED") == "1" and real.MATERIAL[name].small:
                pytest.fail(f"DFF_REAL_REQUIRED=1: {e}")
            pytest.skip(str(e))

    return get
