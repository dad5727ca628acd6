"""Data sources, on data built in tmp_path: FaceSynthetics (folder, zip, URL), resumable download against a
local HTTP server, hub layout, image folder (side captions, metadata, conditioning folder), parquet."""

from __future__ import annotations

import hashlib
import inspect
import itertools
import json
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from controlnet_recipe.core.errors import BadInput
from controlnet_recipe.core.images import decode_image, encode_png
from controlnet_recipe.faces.synthetic import make_face
from controlnet_recipe.sources import SOURCES, SourceRow, SourceSpec, facesynthetics, hub, imagefolder, parquet
from controlnet_recipe.sources.download import download

N_FACES = 4
BAD = "000002"  # its ldmks file has 50 lines
NO_LDMKS = "000003"  # it has none


def _decode(raw) -> np.ndarray:
    d = decode_image(raw)
    assert d.ok, d.reason
    return np.asarray(d.image)


@pytest.fixture(scope="module")
def faces() -> list[tuple[Image.Image, np.ndarray]]:
    return [make_face(seed, 64)[:2] for seed in range(N_FACES)]


def _write_facesynthetics(folder: Path, faces) -> Path:
    folder.mkdir(parents=True)
    for i, (img, lm) in enumerate(faces):
        sid = f"{i:06d}"
        img.save(folder / f"{sid}.png")
        Image.new("L", img.size, 3).save(folder / f"{sid}_seg.png")
        pupils = lm[36:42].mean(0), lm[42:48].mean(0)
        lines = [f"{x:.6f} {y:.6f}" for x, y in [*lm, *pupils]]
        if sid == BAD:
            lines = lines[:50]
        if sid != NO_LDMKS:
            (folder / f"{sid}_ldmks.txt").write_text("\n".join(lines) + "\n")
    return folder


@pytest.fixture(scope="module")
def fs_folder(tmp_path_factory, faces) -> Path:
    return _write_facesynthetics(tmp_path_factory.mktemp("fs") / "dataset_4", faces)


def _zip(folder: Path, dest: Path, top: str | None) -> Path:
    with zipfile.ZipFile(dest, "w") as zf:
        for p in sorted(folder.iterdir()):
            zf.write(p, f"{top}/{p.name}" if top else p.name)
    return dest


def _check_facesynthetics(rows: list[SourceRow], faces, as_path: bool) -> None:
    assert [r.id for r in rows] == [f"{i:06d}" for i in range(N_FACES)]
    for r, (img, lm) in zip(rows, faces):
        assert isinstance(r.image, str if as_path else bytes)
        assert np.array_equal(_decode(r.image), np.asarray(img))
        if r.id in (BAD, NO_LDMKS):
            assert r.landmarks is None and r.problem == "bad_landmarks"
        else:
            assert r.problem is None and r.landmarks.shape == (68, 2) and r.landmarks.dtype == np.float32
            np.testing.assert_allclose(r.landmarks, lm, atol=1e-4)


def test_facesynthetics_folder(fs_folder, faces):
    rows = list(facesynthetics.read(SourceSpec(str(fs_folder))))
    _check_facesynthetics(rows, faces, as_path=True)
    # the parent folder works too (the files sit inside a top folder)
    assert [r.id for r in facesynthetics.read(SourceSpec(str(fs_folder.parent)))] == [r.id for r in rows]


@pytest.mark.parametrize("top", [None, "dataset_4"])
def test_facesynthetics_zip(fs_folder, faces, tmp_path: Path, top):
    archive = _zip(fs_folder, tmp_path / "dataset_4.zip", top)
    _check_facesynthetics(list(facesynthetics.read(SourceSpec(str(archive)))), faces, as_path=False)
    rows = list(facesynthetics.read(SourceSpec(str(archive), use_landmarks=False)))
    assert all(r.landmarks is None and r.problem is None for r in rows)


def test_facesynthetics_zip_is_read_lazily(fs_folder, tmp_path: Path, monkeypatch):
    archive = _zip(fs_folder, tmp_path / "d.zip", "top")
    reads: list[str] = []
    real = zipfile.ZipFile.read
    monkeypatch.setattr(zipfile.ZipFile, "read", lambda self, name, pwd=None: reads.append(name) or real(self, name, pwd))
    gen = facesynthetics.read(SourceSpec(str(archive)))
    assert inspect.isgenerator(gen) and not reads  # nothing happens before the first row is asked for
    assert next(gen).id == "000000"
    assert sorted(reads) == ["top/000000.png", "top/000000_ldmks.txt"]
    gen.close()


def test_parse_landmarks():
    ok = "\n".join(f"{i} {i + 0.5}" for i in range(70))
    assert facesynthetics.parse_landmarks(ok).shape == (68, 2)
    assert facesynthetics.parse_landmarks("\n".join(ok.splitlines()[:68])) is not None
    assert facesynthetics.parse_landmarks("\n".join(ok.splitlines()[:67])) is None
    assert facesynthetics.parse_landmarks(ok.replace("3 3.5", "3 nan")) is None
    assert facesynthetics.parse_landmarks(ok.replace("3 3.5", "3 x")) is None
    assert facesynthetics.parse_landmarks(None) is None


# --- downloads ---------------------------------------------------------------------------------


class _Handler(BaseHTTPRequestHandler):
    files: dict[str, bytes] = {}
    ranges: list[str | None] = []
    honour_range = True

    def do_GET(self):  # noqa: N802
        data = self.files.get(self.path)
        if data is None:
            self.send_error(404)
            return
        rng = self.headers.get("Range")
        type(self).ranges.append(rng)
        start = int(rng.split("=")[1].split("-")[0]) if rng and self.honour_range else 0
        if start >= len(data) > 0 and rng and self.honour_range:
            self.send_response(416)
            self.send_header("Content-Range", f"bytes */{len(data)}")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.send_response(206 if start else 200)
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.send_header("Content-Length", str(len(data) - start))
        self.end_headers()
        self.wfile.write(data[start:])

    def log_message(self, *args):
        pass


@pytest.fixture
def server(monkeypatch):
    """A local HTTP server with Range support; yields (base URL, handler class)."""
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    handler = type("Handler", (_Handler,), {"files": {}, "ranges": [], "honour_range": True})
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", handler
    httpd.shutdown()
    httpd.server_close()


PAYLOAD = np.random.default_rng(0).integers(0, 256, 300_000, dtype=np.uint8).tobytes()
DIGEST = hashlib.sha256(PAYLOAD).hexdigest()


def test_download_resumes_part_file(server, tmp_path: Path):
    url, handler = server
    handler.files["/data.zip"] = PAYLOAD
    dest = tmp_path / "dl" / "data.zip"
    dest.parent.mkdir()
    part = dest.with_suffix(".zip.part")
    part.write_bytes(PAYLOAD[:150_000])
    assert download(f"{url}/data.zip", dest, sha256=DIGEST, chunk_size=4096) == dest
    assert dest.read_bytes() == PAYLOAD and not part.exists()
    assert handler.ranges == ["bytes=150000-"]
    # already there and matching: no request at all
    assert download(f"{url}/data.zip", dest, sha256=DIGEST.upper()) == dest
    assert download(f"{url}/data.zip", dest) == dest
    assert len(handler.ranges) == 1


def test_download_server_ignoring_range_restarts(server, tmp_path: Path):
    url, handler = server
    handler.files["/data.zip"] = PAYLOAD
    handler.honour_range = False
    dest = tmp_path / "data.zip"
    dest.with_suffix(".zip.part").write_bytes(b"x" * 1000)  # stale bytes that must not survive
    download(f"{url}/data.zip", dest, sha256=DIGEST)
    assert dest.read_bytes() == PAYLOAD and handler.ranges == ["bytes=1000-"]


def test_download_complete_part_file(server, tmp_path: Path):
    url, handler = server
    handler.files["/data.zip"] = PAYLOAD
    dest = tmp_path / "data.zip"
    dest.with_suffix(".zip.part").write_bytes(PAYLOAD)  # finished, but never renamed: the server answers 416
    download(f"{url}/data.zip", dest, sha256=DIGEST)
    assert dest.read_bytes() == PAYLOAD and handler.ranges == [f"bytes={len(PAYLOAD)}-"]


def test_download_wrong_checksum(server, tmp_path: Path):
    url, handler = server
    handler.files["/data.zip"] = PAYLOAD
    dest = tmp_path / "data.zip"
    wrong = "0" * 64
    with pytest.raises(ValueError, match=rf"data\.zip.*expected {wrong}, got {DIGEST}") as e:
        download(f"{url}/data.zip", dest, sha256=wrong)
    assert "\n" not in str(e.value)
    assert not dest.exists() and not dest.with_suffix(".zip.part").exists()


def test_download_not_found(server, tmp_path: Path):
    import urllib.error

    url, _ = server
    with pytest.raises(urllib.error.HTTPError):
        download(f"{url}/nothing.zip", tmp_path / "nothing.zip", retries=0)


def test_facesynthetics_from_url(server, fs_folder, faces, tmp_path: Path):
    url, handler = server
    data = _zip(fs_folder, tmp_path / "src.zip", "dataset_4").read_bytes()
    handler.files["/files/dataset_4.zip"] = data
    spec = SourceSpec(f"{url}/files/dataset_4.zip", sha256=hashlib.sha256(data).hexdigest(), cache_dir=tmp_path / "cache")
    _check_facesynthetics(list(facesynthetics.read(spec)), faces, as_path=False)
    assert (tmp_path / "cache" / "dataset_4.zip").is_file()


# --- hub layout and parquet ------------------------------------------------------------------------


def _hub_dataset(path: Path, faces, start: int = 0, n: int | None = None) -> list[int]:
    from datasets import Dataset, Image

    idx = list(range(start, start + (n or len(faces))))
    ds = Dataset.from_dict(
        {
            "image": [encode_png(faces[i % len(faces)][0]) for i in idx],
            "spiga_seg": [encode_png(_gray(i)) for i in idx],
            "image_caption": [f"caption {i}" for i in idx],
            "other": list(idx),
        }
    )
    ds = ds.cast_column("image", Image()).cast_column("spiga_seg", Image())
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.to_parquet(str(path))
    return idx


def _gray(i: int) -> Image.Image:
    return Image.new("L", (32, 32), 10 * i)


MAPPING = {"image": "image", "spiga_seg": "conditioning_image", "image_caption": "caption"}


def test_hub_layout(tmp_path: Path, faces):
    repo = tmp_path / "repo"
    _hub_dataset(repo / "data" / "train-00000-of-00001.parquet", faces)
    gen = hub.read(SourceSpec(str(repo), columns=MAPPING))
    assert inspect.isgenerator(gen)
    rows = list(gen)
    assert [r.id for r in rows] == [f"train-{i:08d}" for i in range(N_FACES)]
    for i, r in enumerate(rows):
        assert isinstance(r.image, bytes) and isinstance(r.conditioning_image, bytes)
        assert np.array_equal(_decode(r.image), np.asarray(faces[i][0]))
        assert decode_image(r.conditioning_image).converted == "L"
        assert r.caption == f"caption {i}" and r.problem is None and r.landmarks is None
    assert [r.id for r in hub.read(SourceSpec(str(repo), columns=MAPPING))] == [r.id for r in rows]
    with pytest.raises(BadInput, match="no column missing"):
        next(hub.read(SourceSpec(str(repo), columns={"image": "image", "missing": "caption"})))
    with pytest.raises(ValueError, match="recipe columns"):
        next(hub.read(SourceSpec(str(repo), columns={"image": "picture"})))


def test_hub_default_columns(tmp_path: Path):
    from datasets import Dataset, Image

    repo = tmp_path / "repo"
    imgs = [encode_png(_gray(i)) for i in range(3)]
    ds = Dataset.from_dict({"image": imgs, "conditioning_image": imgs, "text": ["a", "b", "c"]})
    ds = ds.cast_column("image", Image()).cast_column("conditioning_image", Image())
    ds.to_parquet(str(repo / "data" / "train-00000-of-00001.parquet"))
    rows = list(hub.read(SourceSpec(str(repo))))
    assert [r.caption for r in rows] == ["a", "b", "c"] and all(isinstance(r.conditioning_image, bytes) for r in rows)


def test_parquet_glob(tmp_path: Path, faces):
    shards = tmp_path / "shards"
    _hub_dataset(shards / "part-1.parquet", faces, start=3, n=2)
    _hub_dataset(shards / "part-0.parquet", faces, start=0, n=3)
    for location in (str(shards / "*.parquet"), str(shards)):
        rows = list(parquet.read(SourceSpec(location, columns=MAPPING, split="validation")))
        assert [r.id for r in rows] == [f"validation-{i:08d}" for i in range(5)]
        assert [r.caption for r in rows] == [f"caption {i}" for i in range(5)]  # file order: part-0 then part-1
    single = list(parquet.read(SourceSpec(str(shards / "part-1.parquet"), columns={"image": "image"})))
    assert len(single) == 2 and single[0].caption is None and single[0].conditioning_image is None
    with pytest.raises(FileNotFoundError):
        next(parquet.read(SourceSpec(str(tmp_path / "none-*.parquet"))))


# --- image folder -----------------------------------------------------------------------------------


@pytest.fixture
def image_folder(tmp_path: Path, faces) -> Path:
    root = tmp_path / "images"
    (root / "sub").mkdir(parents=True)
    faces[0][0].save(root / "a.png")
    faces[1][0].save(root / "b.jpg")
    faces[2][0].save(root / "sub" / "c.png")
    (root / "notes.md").write_text("not an image")
    return root


def test_imagefolder_side_captions(image_folder: Path):
    (image_folder / "a.txt").write_text("a face\n")
    (image_folder / "sub" / "c.txt").write_text("another face")
    gen = imagefolder.read(SourceSpec(str(image_folder)))
    assert inspect.isgenerator(gen)
    rows = list(gen)
    assert [r.id for r in rows] == ["a.png", "b.jpg", "sub/c.png"]
    assert [r.caption for r in rows] == ["a face", None, "another face"]
    assert all(Path(r.image).is_file() and r.conditioning_image is None and r.problem is None for r in rows)


def test_imagefolder_metadata(image_folder: Path):
    records = [{"file_name": "a.png", "text": "from text"}, {"file_name": "sub/c.png", "caption": "from caption"}]
    (image_folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    rows = list(imagefolder.read(SourceSpec(str(image_folder))))
    assert {r.id: r.caption for r in rows} == {"a.png": "from text", "b.jpg": None, "sub/c.png": "from caption"}


def test_imagefolder_conditioning_folder(image_folder: Path, tmp_path: Path):
    cond = tmp_path / "conditioning"
    (cond / "sub").mkdir(parents=True)
    _gray(1).save(cond / "a.png")
    _gray(3).save(cond / "sub" / "c.png")  # b.jpg has none
    rows = list(imagefolder.read(SourceSpec(str(image_folder), columns={"conditioning_folder": str(cond)})))
    assert [r.id for r in rows] == ["a.png", "b.jpg", "sub/c.png"]
    assert [r.problem for r in rows] == [None, "missing_conditioning", None]
    assert rows[0].conditioning_image == str(cond / "a.png") and rows[1].conditioning_image is None
    assert decode_image(rows[2].conditioning_image).converted == "L"


def test_imagefolder_conditioning_inside_and_in_metadata(image_folder: Path):
    (image_folder / "cond").mkdir()
    _gray(1).save(image_folder / "cond" / "a.png")
    _gray(2).save(image_folder / "cond" / "b.png")  # same stem, another extension: still its pair
    rows = list(imagefolder.read(SourceSpec(str(image_folder), columns={"conditioning_folder": "cond"})))
    assert [r.id for r in rows] == ["a.png", "b.jpg", "sub/c.png"]  # the conditioning folder is not read as targets
    assert [r.problem for r in rows] == [None, None, "missing_conditioning"]
    assert rows[1].conditioning_image == str(image_folder / "cond" / "b.png")
    (image_folder / "cond" / "b.png").unlink()
    # the same pairing from metadata: a second "file name" column
    records = [{"file_name": f, "seg_file_name": "cond/a.png" if f == "a.png" else None} for f in ("a.png", "b.jpg")]
    (image_folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    rows = list(imagefolder.read(SourceSpec(str(image_folder), columns={"seg_file_name": "conditioning_image"})))
    assert [r.id for r in rows] == ["a.png", "b.jpg", "sub/c.png"]
    assert rows[0].conditioning_image == str(image_folder / "cond" / "a.png")
    assert [r.problem for r in rows] == [None, "missing_conditioning", "missing_conditioning"]


# --- registry --------------------------------------------------------------------------------------


def test_registry_readers_are_generators():
    assert set(SOURCES) == {"facesynthetics", "hub", "imagefolder", "parquet"}
    assert all(inspect.isgeneratorfunction(read) for read in SOURCES.values())


def test_streaming_first_rows(fs_folder):
    rows = list(itertools.islice(SOURCES["facesynthetics"](SourceSpec(str(fs_folder))), 2))
    assert [r.id for r in rows] == ["000000", "000001"]
