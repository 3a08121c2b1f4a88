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


class Untouchable(types.ModuleType):
    """A module that records every attribute read (an import reads __spec__ too)."""

    def __init__(self, name):
        super().__init__(name)
        object.__setattr__(self, "reads", [])

    def __getattribute__(self, attr):
        if attr != "reads":
            object.__getattribute__(self, "reads").append(attr)
        return object.__getattribute__(self, attr)
