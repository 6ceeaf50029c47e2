"""scripts/fetch_models.py, run as a subprocess the way developers and CI run it.

Every run writes under a temporary ``--root``, never into the repo. Nothing here touches
the network: downloads use ``file:`` URLs, and the subprocess gets a dead proxy so an
accidental real download fails fast instead of reaching out.
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "fetch_models.py"
FETCH_LIST = REPO / "models" / "fetch.yaml"
# Same override as conftest.py, so a relocated shared checkout is found here too.
SHARED = Path(os.environ.get("EDGECAM_SHARED", REPO.parent / "shared"))
# Small real files, so the mirror tests stay fast.
SMALL = ("imagenet_labels.txt", "pascal_voc_segmentation_labels.txt", "mobilenet_v1_0.25_128_quant.tflite")
MIRROR_LAYOUT = ("", "models", "media", "media/images")


def run(*args: str | Path, cwd: Path, env_extra: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run the script with a clean environment: no inherited mirror, no reachable proxy."""
    env = {k: v for k, v in os.environ.items() if k != "EDGECAM_MIRROR"}
    dead_proxy = "http://127.0.0.1:9"
    env.update(http_proxy=dead_proxy, https_proxy=dead_proxy, HTTP_PROXY=dead_proxy, HTTPS_PROXY=dead_proxy)
    env.pop("no_proxy", None)
    env.pop("NO_PROXY", None)
    env.update(env_extra or {})
    # cwd is a temp dir on purpose: the script must not depend on where it is run from.
    return subprocess.run(
        [sys.executable, str(SCRIPT), *map(str, args)],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=120,
    )


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_fetch_list(path: Path, files: list[dict[str, object]]) -> Path:
    """A fetch list in the same format as models/fetch.yaml."""
    path.write_text(yaml.safe_dump({"files": files}, sort_keys=False))
    return path


def entry(name: str, data: bytes, url: str | None = None, dest: str = "models") -> dict[str, object]:
    """A fetch-list item whose sha256 is that of ``data``."""
    return {"name": name, "dest": dest, "url": url, "sha256": sha256(data),
            "licence": "test", "source": "made up by the test"}


def shared_file(name: str) -> Path | None:
    """Where ../shared keeps ``name``, searched the way the script searches a mirror."""
    for sub in MIRROR_LAYOUT:
        candidate = SHARED / sub / name
        if candidate.is_file():
            return candidate
    return None


def require_shared(names: tuple[str, ...]) -> None:
    """Skip, naming the missing path, when the shared material is not checked out beside us."""
    if not SHARED.is_dir():
        pytest.skip(f"{SHARED} is absent (the shared models and media live there)")
    for name in names:
        if shared_file(name) is None:
            pytest.skip(f"{SHARED}/models/{name} (or media/) is absent")


def no_temp_files(directory: Path) -> bool:
    return not directory.exists() or not any(p.name.startswith(".fetch-") for p in directory.iterdir())


# --- the fetch list itself -----------------------------------------------------------

def load_list() -> list[dict[str, object]]:
    return yaml.safe_load(FETCH_LIST.read_text())["files"]


def test_fetch_list_is_well_formed() -> None:
    files = load_list()
    names = [f["name"] for f in files]
    assert len(names) == len(set(names))
    for f in files:
        assert f["dest"] in ("models", "media", "media/images"), f
        assert len(f["sha256"]) == 64 and int(f["sha256"], 16) >= 0, f
        assert f["licence"] and f["source"], f
        url = f["url"]
        # Only URLs confirmed to exist in google-coral/test_data are allowed in.
        assert url is None or url == f"https://github.com/google-coral/test_data/raw/master/{f['name']}", f
        if url is None:
            assert f.get("note"), f"{f['name']}: a file without a URL needs a note saying where it comes from"
    for name in ("yolov8n_full_integer_quant-a.tflite", "yolov8n_full_integer_quant-b.tflite"):
        yolo = next(f for f in files if f["name"] == name)
        assert yolo["url"] is None and yolo["licence"] == "AGPL-3.0" and "mirror" in yolo["note"]


def test_fetch_list_matches_shared() -> None:
    if not SHARED.is_dir():
        pytest.skip(f"{SHARED} is absent (the shared models and media live there)")
    files = load_list()
    listed = {f["name"] for f in files}
    # Everything the brief asks for is listed: every usable model, every label file,
    # the two clips and every sample image.
    wanted = {p.name for p in (SHARED / "models").glob("*.tflite")}
    wanted |= {p.name for p in (SHARED / "models").glob("*.txt")}
    wanted |= {p.name for p in (SHARED / "media" / "images").iterdir() if p.is_file()}
    wanted |= {"pedestrians-360p10.avi", "pedestrians-720p50.avi"}
    assert wanted <= listed, f"not in the fetch list: {sorted(wanted - listed)}"
    assert "model_invoking_error.tflite" not in listed
    for f in files:
        path = SHARED / f["dest"] / f["name"]  # ../shared uses the same layout as the repo
        if not path.is_file():
            pytest.fail(f"{path} is missing from the shared copy")
        assert sha256(path.read_bytes()) == f["sha256"], f"sha256 of {path} differs from the fetch list"


# --- mirror copies with the real fetch list ------------------------------------------

@pytest.mark.parametrize("mirror_sub", ["", "models"], ids=["shared", "shared/models"])
def test_mirror_copy_verifies_then_second_run_skips(tmp_path: Path, mirror_sub: str) -> None:
    require_shared(SMALL)
    root = tmp_path / "root"
    first = run("--mirror", SHARED / mirror_sub, "--root", root, "--only", *SMALL, cwd=tmp_path)
    assert first.returncode == 0, first.stdout + first.stderr
    for name in SMALL:
        assert f"models/{name}: copied from" in first.stdout
        target = root / "models" / name
        assert target.read_bytes() == shared_file(name).read_bytes()
    assert no_temp_files(root / "models")
    # Nothing was written outside --root: only the requested files appeared.
    assert sorted(p.name for p in root.rglob("*") if p.is_file()) == sorted(SMALL)

    mtimes = {name: (root / "models" / name).stat().st_mtime_ns for name in SMALL}
    second = run("--mirror", SHARED / mirror_sub, "--root", root, "--only", *SMALL, cwd=tmp_path)
    assert second.returncode == 0, second.stdout + second.stderr
    assert second.stdout.splitlines() == [f"models/{name}: ok" for name in SMALL]
    assert mtimes == {name: (root / "models" / name).stat().st_mtime_ns for name in SMALL}


def test_mirror_from_environment(tmp_path: Path) -> None:
    require_shared(SMALL[:1])
    root = tmp_path / "root"
    result = run("--root", root, "--only", SMALL[0], cwd=tmp_path, env_extra={"EDGECAM_MIRROR": str(SHARED)})
    assert result.returncode == 0, result.stdout + result.stderr
    assert "copied from" in result.stdout
    assert (root / "models" / SMALL[0]).is_file()


def test_mirror_only_file_without_mirror_fails_clearly(tmp_path: Path) -> None:
    # The real YOLO entries have no URL: without a mirror they must say how to get them.
    result = run("--root", tmp_path / "root", "--only", "yolov8n_full_integer_quant-a.tflite", cwd=tmp_path)
    assert result.returncode == 1
    line = result.stdout.strip()
    assert line.startswith("models/yolov8n_full_integer_quant-a.tflite: FAILED:")
    assert "no public URL" in line and "--mirror" in line
    assert not (tmp_path / "root" / "models" / "yolov8n_full_integer_quant-a.tflite").exists()


def test_list_writes_nothing(tmp_path: Path) -> None:
    root = tmp_path / "root"
    result = run("--list", "--root", root, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "models/yolov8n_full_integer_quant-a.tflite: missing" in result.stdout
    assert "mirror only" in result.stdout
    assert not root.exists()


def test_unknown_only_name_fails(tmp_path: Path) -> None:
    result = run("--root", tmp_path / "root", "--only", "no_such_model.tflite", cwd=tmp_path)
    assert result.returncode == 1
    assert "no_such_model.tflite: FAILED: not in the fetch list" in result.stdout


# --- failure handling, with made-up files so it runs without ../shared ---------------

def test_corrupted_mirror_fails_and_leaves_nothing(tmp_path: Path) -> None:
    data = b"background\nperson\nbicycle\n" * 100
    fetch_list = write_fetch_list(tmp_path / "fetch.yaml", [entry("labels.txt", data)])
    mirror = tmp_path / "mirror" / "models"
    mirror.mkdir(parents=True)
    corrupted = bytearray(data)
    corrupted[len(corrupted) // 2] ^= 0x01
    (mirror / "labels.txt").write_bytes(bytes(corrupted))
    root = tmp_path / "root"

    result = run("--fetch-list", fetch_list, "--mirror", mirror.parent, "--root", root, cwd=tmp_path)
    assert result.returncode == 1
    line = result.stdout.strip()
    assert line.startswith("models/labels.txt: FAILED: sha256 mismatch")
    assert str(mirror / "labels.txt") in line and sha256(data) in line
    assert not (root / "models" / "labels.txt").exists()
    assert no_temp_files(root / "models")


def test_corrupted_real_file_in_mirror_fails(tmp_path: Path) -> None:
    # Same, against the real fetch list: one flipped byte in a copy of a real label file.
    name = "pascal_voc_segmentation_labels.txt"
    require_shared((name,))
    data = bytearray(shared_file(name).read_bytes())
    data[0] ^= 0x20
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    (mirror / name).write_bytes(bytes(data))
    root = tmp_path / "root"
    result = run("--mirror", mirror, "--root", root, "--only", name, cwd=tmp_path)
    assert result.returncode == 1
    assert f"models/{name}: FAILED: sha256 mismatch" in result.stdout
    assert not (root / "models" / name).exists()
    assert no_temp_files(root / "models")


def test_missing_file_without_url_fails_with_clear_message(tmp_path: Path) -> None:
    fetch_list = write_fetch_list(tmp_path / "fetch.yaml", [entry("private.tflite", b"weights")])
    empty_mirror = tmp_path / "mirror"
    empty_mirror.mkdir()
    result = run("--fetch-list", fetch_list, "--mirror", empty_mirror, "--root", tmp_path / "root", cwd=tmp_path)
    assert result.returncode == 1
    line = result.stdout.strip()
    assert line.startswith("models/private.tflite: FAILED: private.tflite has no public URL")
    assert f"not in mirror {empty_mirror}" in line and "--mirror" in line


def test_download_verifies_and_replaces_wrong_file(tmp_path: Path) -> None:
    data = b"\x00\x01model bytes" * 1000
    source = tmp_path / "upstream.tflite"
    source.write_bytes(data)
    fetch_list = write_fetch_list(tmp_path / "fetch.yaml", [entry("m.tflite", data, url=source.as_uri())])
    root = tmp_path / "root"
    (root / "models").mkdir(parents=True)
    (root / "models" / "m.tflite").write_bytes(b"stale")  # present but wrong: must be replaced

    result = run("--fetch-list", fetch_list, "--root", root, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == f"models/m.tflite: fetched from {source.as_uri()}"
    assert (root / "models" / "m.tflite").read_bytes() == data
    assert no_temp_files(root / "models")


def test_download_mismatch_keeps_nothing(tmp_path: Path) -> None:
    source = tmp_path / "upstream.jpg"
    source.write_bytes(b"not what was promised")
    fetch_list = write_fetch_list(
        tmp_path / "fetch.yaml", [entry("x.jpg", b"the promised bytes", url=source.as_uri(), dest="media/images")]
    )
    root = tmp_path / "root"
    result = run("--fetch-list", fetch_list, "--root", root, cwd=tmp_path)
    assert result.returncode == 1
    assert "media/images/x.jpg: FAILED: sha256 mismatch" in result.stdout
    assert not (root / "media" / "images" / "x.jpg").exists()
    assert no_temp_files(root / "media" / "images")


def test_bad_fetch_list_is_reported(tmp_path: Path) -> None:
    bad = write_fetch_list(tmp_path / "fetch.yaml", [{**entry("../escape.txt", b""), "dest": "models"}])
    result = run("--fetch-list", bad, "--root", tmp_path / "root", cwd=tmp_path)
    assert result.returncode == 1
    assert "name must be a plain file name" in result.stderr
