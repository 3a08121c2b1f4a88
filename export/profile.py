"""The input profile of the exported graphs: min/opt/max image shapes N×H×W (DESIGN.md §3).

Each axis is dynamic in the ONNX graphs when its min < max and fixed otherwise; H and W are
multiples of the stride, so the feature grid is exactly h×w = H/stride × W/stride.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from dff.errors import DffError

AXES = ("N", "H", "W")
_SHAPE_RE = re.compile(r"^\s*(\d+)\s*[xX×]\s*(\d+)\s*[xX×]\s*(\d+)\s*$")


class ProfileError(DffError):
    """A profile shape that is malformed, not a multiple of the stride, or out of order."""


Shape = tuple[int, int, int]


def parse_shape(text: str) -> Shape:
    """'NxHxW' (e.g. '1x128x224') -> (N, H, W). Raises ProfileError for anything else."""
    match = _SHAPE_RE.match(text)
    if not match:
        raise ProfileError(f"shape {text!r} is not NxHxW with three positive integers "
                           "(for example 1x128x224)")
    shape = tuple(int(v) for v in match.groups())
    if min(shape) < 1:
        raise ProfileError(f"shape {text!r} has a zero size; every axis must be at least 1")
    return shape  # type: ignore[return-value]


def format_shape(shape: Shape) -> str:
    return "x".join(str(v) for v in shape)


@dataclass(frozen=True)
class Profile:
    min: Shape
    opt: Shape
    max: Shape
    stride: int = 16

    def validate(self) -> Profile:
        """Raise ProfileError naming the option and the fix; return self when fine."""
        for name, shape in (("min", self.min), ("opt", self.opt), ("max", self.max)):
            if len(shape) != 3 or min(shape) < 1:
                raise ProfileError(f"--{name}-shape {shape}: need three positive sizes NxHxW")
            for axis, size in zip(AXES[1:], shape[1:]):
                if size % self.stride:
                    down = size // self.stride * self.stride
                    up = down + self.stride
                    hint = f"{down} or {up}" if down else f"{up}"
                    raise ProfileError(
                        f"--{name}-shape {format_shape(shape)}: {axis}={size} is not a multiple "
                        f"of the stride {self.stride}; use {hint}")
        for i, axis in enumerate(AXES):
            if not self.min[i] <= self.opt[i] <= self.max[i]:
                raise ProfileError(
                    f"profile {axis}: need min <= opt <= max, got {self.min[i]}, {self.opt[i]}, "
                    f"{self.max[i]} (--min-shape {format_shape(self.min)}, --opt-shape "
                    f"{format_shape(self.opt)}, --max-shape {format_shape(self.max)})")
        return self

    def dynamic(self, axis: str) -> bool:
        i = AXES.index(axis)
        return self.min[i] < self.max[i]

    def example(self, axis: str) -> int:
        """The size to trace with: opt, but never 1 on a dynamic axis (torch.export would
        specialise a size-1 example to the constant 1). H and W are counted in cells."""
        i = AXES.index(axis)
        unit = 1 if axis == "N" else self.stride
        lo, opt, hi = self.min[i] // unit, self.opt[i] // unit, self.max[i] // unit
        if lo == hi:
            return lo
        return max(opt, 2)

    def to_dict(self) -> dict:
        return {"layout": "NxHxW", "min": list(self.min), "opt": list(self.opt),
                "max": list(self.max)}


def default_profile(input_size: list[int] | tuple[int, int], stride: int = 16) -> Profile:
    """From the checkpoint's training size H×W: min 1×min(64,H)×min(64,W), opt 1×H×W,
    max 4×2H×2W (H and W first rounded up to the stride)."""
    h, w = (-(-int(v) // stride) * stride for v in input_size)
    return Profile(min=(1, min(64, h), min(64, w)), opt=(1, h, w), max=(4, 2 * h, 2 * w),
                   stride=stride)


def make_profile(input_size: list[int] | tuple[int, int], stride: int = 16,
                 min_shape: Shape | None = None, opt_shape: Shape | None = None,
                 max_shape: Shape | None = None) -> Profile:
    """The default profile with any of min/opt/max replaced, validated."""
    base = default_profile(input_size, stride)
    return Profile(min=min_shape or base.min, opt=opt_shape or base.opt,
                   max=max_shape or base.max, stride=stride).validate()
