import pytest
import torch
from dff.models.config import PRESETS, DFFConfig
from dff.models.dff import DFF


@pytest.fixture(scope="session", autouse=True)
def _few_threads():
    torch.set_num_threads(2)


def tiny_config(**kw) -> DFFConfig:
    """A DFF small enough to build and run in milliseconds."""
    return DFFConfig.from_dict({**PRESETS["tiny"].to_dict(), **kw})


@pytest.fixture
def tiny_model() -> DFF:
    torch.manual_seed(0)
    return DFF(tiny_config()).eval()
