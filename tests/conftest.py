import pytest
import torch
from dff.models.config import DFFConfig
from dff.models.dff import DFF


@pytest.fixture(scope="session", autouse=True)
def _few_threads():
    torch.set_num_threads(2)


def tiny_config(**kw) -> DFFConfig:
    """A DFF small enough to build and run in milliseconds."""
    base = {"trunk_depth": 18, "trunk_width": 8, "feat_channels": 16, "feat_dilation": 2,
            "flow_width": 0.0625, "head_channels": 8, "input_size": [64, 96]}
    base.update(kw)
    return DFFConfig(**base)


@pytest.fixture
def tiny_model() -> DFF:
    torch.manual_seed(0)
    return DFF(tiny_config()).eval()
