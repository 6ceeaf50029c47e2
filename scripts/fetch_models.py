#!/usr/bin/env python3
"""Fetch the models, labels and sample media listed in ``models/fetch.yaml``.

They are never committed: this puts each file where the repo expects it (``models/``,
``media/``, ``media/images/``), either copied from a local mirror or downloaded from its
public URL, and checks every byte against the sha256 in the fetch list.

    python scripts/fetch_models.py                      # download what is missing
    python scripts/fetch_models.py --mirror ../shared   # copy from a local mirror
    python scripts/fetch_models.py --only imagenet_labels.txt --list

A mirror (``--mirror DIR``, or ``$EDGECAM_MIRROR``) is searched at ``DIR/<name>``,
``DIR/models/<name>``, ``DIR/media/<name>`` and ``DIR/media/images/<name>``; a file the
mirror lacks falls back to its URL. Files already in place with the right sha256 are
left alone, so running it again is cheap. Exit status 0 when every requested file is in
place, 1 otherwise. Needs only the standard library and PyYAML.
"""
from __future__ import annotations

import argparse
import hashlib
import http.client
import os
import re
import sys
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Sequence

import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_FETCH_LIST = REPO_ROOT / "models" / "fetch.yaml"
MIRROR_ENV = "EDGECAM_MIRROR"
ALLOWED_DESTS = ("models", "media", "media/images")
# file: is accepted so the download path can be exercised without a network.
ALLOWED_SCHEMES = ("https://", "http://", "file:")
# Where a file may sit inside a mirror, relative to it: flat, or laid out like ../shared.
MIRROR_SUBDIRS = ("", "models", "media", "media/images")
CHUNK = 1 << 20
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class FetchError(Exception):
    """A file could not be put in place; the message is the reason shown to the user."""


@dataclass(frozen=True)
class Entry:
    """One file of the fetch list."""

    name: str
    dest: str
    url: str | None
    sha256: str
    licence: str
    source: str
    note: str | None = None

    def target(self, root: Path) -> Path:
        """Where the file lives under ``root``."""
        return root / self.dest / self.name


def _entry_from_mapping(raw: object, index: int) -> Entry:
    """Validate one fetch-list item; errors name the item so a bad edit is easy to find."""
    where = f"files[{index}]"
    if not isinstance(raw, dict):
        raise FetchError(f"{where}: expected a mapping, got {type(raw).__name__}")
    name = raw.get("name")
    if isinstance(name, str):
        where = f"{where} ({name})"
    missing = [k for k in ("name", "dest", "sha256", "licence", "source") if not raw.get(k)]
    if "url" not in raw:
        missing.append("url")
    if missing:
        raise FetchError(f"{where}: missing {', '.join(missing)}")
    # The name is joined onto the destination and mirror paths, so it must stay a bare name.
    if not isinstance(name, str) or name in (".", "..") or "/" in name or "\\" in name:
        raise FetchError(f"{where}: name must be a plain file name")
    if raw["dest"] not in ALLOWED_DESTS:
        raise FetchError(f"{where}: dest must be one of {', '.join(ALLOWED_DESTS)}")
    sha = str(raw["sha256"]).lower()
    if not _SHA256.match(sha):
        raise FetchError(f"{where}: sha256 must be 64 hex digits")
    url = raw["url"]
    if url is not None and not (isinstance(url, str) and url.startswith(ALLOWED_SCHEMES)):
        raise FetchError(f"{where}: url must be null or start with one of {', '.join(ALLOWED_SCHEMES)}")
    return Entry(
        name=name,
        dest=raw["dest"],
        url=url,
        sha256=sha,
        licence=str(raw["licence"]),
        source=str(raw["source"]),
        note=raw.get("note"),
    )


def load_fetch_list(path: Path) -> list[Entry]:
    """Read and validate the fetch list at ``path``."""
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise FetchError(f"cannot read fetch list {path}: {exc.strerror or exc}") from exc
    except yaml.YAMLError as exc:
        raise FetchError(f"fetch list {path} is not valid YAML: {exc}") from exc
    files = doc.get("files") if isinstance(doc, dict) else None
    if not isinstance(files, list) or not files:
        raise FetchError(f"fetch list {path}: expected a non-empty `files:` list")
    entries = [_entry_from_mapping(raw, i) for i, raw in enumerate(files)]
    seen: set[str] = set()
    for entry in entries:
        # Names are the key for --only and for mirror lookups, so they must be unique.
        if entry.name in seen:
            raise FetchError(f"fetch list {path}: {entry.name} is listed twice")
        seen.add(entry.name)
    return entries


def sha256_of(path: Path) -> str:
    """Hex sha256 of a file, read in chunks so large videos do not fill memory."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def find_in_mirror(mirror: Path, entry: Entry) -> Path | None:
    """The mirror's copy of ``entry``, whether the mirror is flat or laid out like ../shared."""
    for sub in MIRROR_SUBDIRS:
        candidate = mirror / sub / entry.name
        if candidate.is_file():
            return candidate
    return None


def install(src: BinaryIO, entry: Entry, root: Path, origin: str) -> None:
    """Stream ``src`` into place: temp file beside the target, verify, then atomic rename.

    The temp file sits in the destination directory so the rename never crosses file
    systems, and a failed or interrupted fetch never leaves a partial file under the
    real name.
    """
    target = entry.target(root)
    target.parent.mkdir(parents=True, exist_ok=True)
    # "-<name>" at the end keeps the temp file under the same .gitignore patterns as
    # the real file (models/*.tflite, ...) should a hard kill leave it behind.
    fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=".fetch-", suffix=f"-{entry.name}")
    tmp = Path(tmp_name)
    try:
        digest = hashlib.sha256()
        with os.fdopen(fd, "wb") as out:
            for chunk in iter(lambda: src.read(CHUNK), b""):
                digest.update(chunk)
                out.write(chunk)
        got = digest.hexdigest()
        if got != entry.sha256:
            raise FetchError(
                f"sha256 mismatch for {origin}: expected {entry.sha256}, got {got}; "
                "nothing was written"
            )
        # mkstemp creates 0600; these are ordinary shared data files.
        tmp.chmod(0o644)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def copy_from_mirror(mirror_file: Path, entry: Entry, root: Path) -> None:
    """Install ``entry`` from a file in the mirror."""
    try:
        with mirror_file.open("rb") as src:
            install(src, entry, root, str(mirror_file))
    except OSError as exc:
        raise FetchError(f"cannot copy {mirror_file}: {exc.strerror or exc}") from exc


def download(entry: Entry, root: Path, timeout: float) -> None:
    """Install ``entry`` from its URL."""
    assert entry.url is not None
    request = urllib.request.Request(entry.url, headers={"User-Agent": "edgecam-fetch_models/1"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            install(response, entry, root, entry.url)
    except urllib.error.HTTPError as exc:
        raise FetchError(f"download of {entry.url} failed: HTTP {exc.code} {exc.reason}") from exc
    except urllib.error.URLError as exc:
        raise FetchError(f"download of {entry.url} failed: {exc.reason}") from exc
    except (OSError, http.client.HTTPException) as exc:
        raise FetchError(f"download of {entry.url} failed: {exc}") from exc


def fetch_one(entry: Entry, root: Path, mirror: Path | None, timeout: float) -> str:
    """Put one file in place and say how: ``ok``, ``copied ...`` or ``fetched ...``."""
    target = entry.target(root)
    if target.is_file() and sha256_of(target) == entry.sha256:
        return "ok"
    # A present file with the wrong hash is replaced, but only once a verified copy exists.
    mirror_file = find_in_mirror(mirror, entry) if mirror is not None else None
    if mirror_file is not None:
        # A bad mirror copy is reported, not papered over by a download: it needs fixing.
        copy_from_mirror(mirror_file, entry, root)
        return f"copied from {mirror_file}"
    if entry.url is not None:
        download(entry, root, timeout)
        return f"fetched from {entry.url}"
    looked = f"not in mirror {mirror}" if mirror is not None else "no mirror given"
    note = f" ({entry.note})" if entry.note else ""
    raise FetchError(
        f"{entry.name} has no public URL and {looked}{note}; "
        f"use --mirror DIR (or set {MIRROR_ENV}) pointing at a copy, e.g. --mirror ../shared"
    )


def describe(entry: Entry, root: Path) -> str:
    """One --list line: where the file goes, whether it is in place, where it comes from."""
    target = entry.target(root)
    if not target.is_file():
        state = "missing"
    elif sha256_of(target) == entry.sha256:
        state = "ok"
    else:
        state = "wrong sha256"
    origin = entry.url or "no public URL: mirror only"
    return f"{entry.dest}/{entry.name}: {state} [{entry.licence}] {origin}"


def select(entries: list[Entry], only: Sequence[str] | None) -> tuple[list[Entry], list[str]]:
    """The entries named by --only (all when not given), and the names it did not match."""
    if not only:
        return entries, []
    by_name = {e.name: e for e in entries}
    unknown = [n for n in only if n not in by_name]
    # dict.fromkeys drops repeats while keeping the order the user gave.
    return [by_name[n] for n in dict.fromkeys(only) if n in by_name], unknown


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(
        description="Fetch the models, labels and sample media listed in models/fetch.yaml.",
    )
    parser.add_argument(
        "--mirror",
        type=Path,
        default=os.environ.get(MIRROR_ENV) or None,
        help=f"copy from this local directory instead of downloading (default: ${MIRROR_ENV})",
    )
    parser.add_argument("--only", nargs="+", metavar="NAME", help="just these files (by name)")
    parser.add_argument("--list", action="store_true", help="show the fetch list and what is in place")
    parser.add_argument(
        "--root",
        type=Path,
        default=REPO_ROOT,
        help="put files under this directory instead of the repo root (used by the tests)",
    )
    parser.add_argument(
        "--fetch-list",
        type=Path,
        default=DEFAULT_FETCH_LIST,
        help="fetch list to read (default: models/fetch.yaml of this repo)",
    )
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds per network operation")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the fetch; returns the exit status."""
    args = parse_args(argv)
    try:
        entries = load_fetch_list(args.fetch_list)
    except FetchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    chosen, unknown = select(entries, args.only)
    for name in unknown:
        print(f"{name}: FAILED: not in the fetch list {args.fetch_list} (see --list)")
    root: Path = args.root.resolve()

    if args.list:
        for entry in chosen:
            print(describe(entry, root))
        return 1 if unknown else 0

    mirror: Path | None = args.mirror
    if mirror is not None and not mirror.is_dir():
        # A mistyped mirror would otherwise quietly turn into downloads or odd errors.
        print(f"error: mirror directory {mirror} does not exist", file=sys.stderr)
        return 1

    failed = len(unknown)
    for entry in chosen:
        label = f"{entry.dest}/{entry.name}"
        try:
            status = fetch_one(entry, root, mirror, args.timeout)
        except FetchError as exc:
            status = f"FAILED: {exc}"
            failed += 1
        print(f"{label}: {status}", flush=True)
    if failed:
        print(f"{failed} of {len(chosen) + len(unknown)} file(s) not in place", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
