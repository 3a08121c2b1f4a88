"""`--demo [segmentation|detection|rfcn]` for dff-run and dff-profile: a shipped demo model
exported once into a cache folder per demo, and a synthetic benchmark clip to run it on.

The export is redone only when the folder's manifest is missing, unreadable, or was made from
another checkpoint (by sha256) or by another dff-trt version, so a second `--demo` starts in
seconds. Segmentation keeps ./dff-demo/ (engines/, clip.mp4); detection uses
./dff-demo/detection/ and the R-FCN detection model ./dff-demo/rfcn/.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import dff
from dff.errors import DffError
from dff.export.manifest import ManifestError, load_manifest, sha256_file
from dff.tasks import DEMOS, SEGMENTATION

DEMO_TASKS = DEMOS  # what --demo takes; plain --demo is segmentation
DEMO_DIR = Path("dff-demo")
DEMO_ENGINES = DEMO_DIR / "engines"
DEMO_CLIP = DEMO_DIR / "clip.mp4"
DEMO_FRAMES = 60

Log = Callable[[str], None]


def demo_dir(task: str = SEGMENTATION) -> Path:
    """The demo's folder: ./dff-demo/ for segmentation, ./dff-demo/<demo>/ otherwise."""
    return DEMO_DIR if task == SEGMENTATION else DEMO_DIR / task


def demo_engines(task: str = SEGMENTATION) -> Path:
    return DEMO_ENGINES if task == SEGMENTATION else demo_dir(task) / "engines"


def demo_clip(task: str = SEGMENTATION) -> Path:
    return DEMO_CLIP if task == SEGMENTATION else demo_dir(task) / "clip.mp4"


def demo_checkpoint(task: str = SEGMENTATION) -> Path:
    """The shipped weights of the demo `task` (a task, or "rfcn"), or a DffError saying they
    are missing."""
    try:
        from dff.models.checkpoint import demo_checkpoint_path
    except ImportError as e:
        raise DffError(f"--demo exports the demo model with PyTorch, which is not importable "
                       f"({e}); `pip install dff-trt[export]`, or pass --engine-dir DIR "
                       "written by dff-export") from None
    path = demo_checkpoint_path(task)
    if task != SEGMENTATION:
        if not path.is_file():
            raise DffError(f"--demo {task}: the shipped {task} model {path} is missing (this "
                           f"install has no {task} weights); export a detection model with "
                           "`dff-export MODEL.pth -o engines` and pass --engine-dir engines")
    elif not path.is_file():
        raise DffError(f"--demo: the shipped demo model {path} is missing (this install has no "
                       "demo weights); export your own with `dff-export MODEL.pth -o engines` "
                       "and pass --engine-dir engines")
    return path


def ensure_demo_engines(engine_dir: str | os.PathLike[str] = DEMO_ENGINES,
                        log: Log | None = None, task: str = SEGMENTATION) -> dict:
    """Export `task`'s demo model into `engine_dir` unless it already holds that export;
    return the (checked) manifest."""
    log = log or (lambda _: None)
    engine_dir = Path(engine_dir)
    checkpoint = demo_checkpoint(task)
    want = sha256_file(checkpoint)
    try:
        manifest = load_manifest(engine_dir)
        made = manifest["export"]
        why = (None if made.get("checkpoint_sha256") == want else
               f"its manifest was made from {made.get('checkpoint')}")
        if why is None and made.get("tool_version") != dff.__version__:
            why = f"it was made by dff-export {made.get('tool_version')}, this is {dff.__version__}"
    except ManifestError as e:
        manifest, why = None, str(e).split(";")[0]
    if why is None and manifest is not None:
        log(f"demo: reusing the export in {engine_dir}/ (same checkpoint sha256 and dff-trt "
            "version)")
        return manifest
    log(f"demo: exporting {checkpoint.name} into {engine_dir}/ ({why}) ...")
    from dff.export.exporter import export_model

    return export_model(checkpoint, engine_dir).manifest


def ensure_demo_clip(path: str | os.PathLike[str], manifest: dict,
                     log: Log | None = None) -> Path:
    """A synthetic clip from the evaluation split at the manifest's opt size, written once."""
    from dff.data.synthetic import EVAL_SEEDS
    from dff.runtime.video import VideoError, open_video, write_synthetic_clip

    log = log or (lambda _: None)
    path = Path(path)
    _, height, width = manifest["profile"]["opt"]
    if path.is_file():
        try:
            with open_video(path) as video:
                if video.size == (height, width) and video.frame_count == DEMO_FRAMES:
                    return path
        except VideoError:
            pass
    path.parent.mkdir(parents=True, exist_ok=True)
    log(f"demo: writing a {DEMO_FRAMES}-frame synthetic clip at {height}x{width} to {path}")
    write_synthetic_clip(path, seed=EVAL_SEEDS[0], num_frames=DEMO_FRAMES, height=height,
                         width=width)
    return path
