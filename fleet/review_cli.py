"""``fleet review``: list unsure and alert frames, fetch one from its device, label it,
export the labelled cases for retraining.

``list`` and ``label`` go to the manager (metadata only); ``fetch`` asks the manager which
device keeps the snapshot and its hash, then asks that device directly, and keeps the
verified JPEG in the operator's own cases directory (``--cases``, default
``$FLEET_REVIEW_DIR`` or ``./fleet-review``): the only place outside the device where it
exists. ``export`` joins the fleet's labels with the images found there.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import struct
import time
from pathlib import Path
from typing import Any

from edge.core.contract import ULID_PATTERN
from edge.core.errors import UsageError

from . import operate

DEFAULT_CASES = Path(os.environ.get("FLEET_REVIEW_DIR", "fleet-review"))


def add_commands(sub: Any, common: argparse.ArgumentParser, rpc: argparse.ArgumentParser) -> None:
    review = sub.add_parser("review", parents=[common], help="review unsure and alert frames (pixels on request)")
    r_sub = review.add_subparsers(metavar="ACTION")
    listing = r_sub.add_parser("list", parents=[common, rpc], help="snapshots the devices keep (metadata only)")
    listing.add_argument("--device", help="only this device")
    listing.add_argument("--outcome", choices=("unsure", "alert"), help="only unsure frames, or only alerts")
    listing.add_argument("--limit", type=int, default=50, help="the newest N (default 50, at most 1000)")
    listing.add_argument("--db", help="read this fleet store directly instead (offline)")
    listing.set_defaults(func=cmd_list)
    fetch = r_sub.add_parser("fetch", parents=[common, rpc],
                             help="one snapshot's JPEG, from its device to you (needs privacy.snapshot_export there)")
    fetch.add_argument("snapshot", help="the snapshot id (fleet review list)")
    fetch.add_argument("--out", type=Path, help="also write it here")
    _cases_arg(fetch)
    fetch.set_defaults(func=cmd_fetch)
    label = r_sub.add_parser("label", parents=[common, rpc], help="record your verdict on a snapshot")
    label.add_argument("snapshot", help="the snapshot id")
    label.add_argument("--label", required=True, help="what the frame shows (a class name, or e.g. false_alarm)")
    label.add_argument("--note", help="a free-text note kept with the verdict")
    label.set_defaults(func=cmd_label)
    export = r_sub.add_parser("export", parents=[common, rpc],
                              help="the labelled cases you fetched: images and a COCO-style labels.json")
    export.add_argument("--dir", type=Path, required=True, help="where to write them (created)")
    export.add_argument("--device", help="only this device's cases")
    _cases_arg(export)
    export.set_defaults(func=cmd_export)


def _cases_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cases", type=Path, default=DEFAULT_CASES,
                   help=f"your fetched snapshots (default $FLEET_REVIEW_DIR or {DEFAULT_CASES})")


def _snapshot_id(value: str) -> str:
    if not re.fullmatch(ULID_PATTERN, value):
        raise UsageError(f"{value!r} is not a snapshot id (26 characters, as `fleet review list` shows)")
    return value


def cmd_list(args: argparse.Namespace) -> int:
    if not 1 <= args.limit <= 1000:
        raise UsageError("--limit must be between 1 and 1000")
    if args.db is not None:
        from .cli import _reading
        from .review import ListArgs, list_cases

        with _reading(args.db) as store:
            rows = list_cases(store, ListArgs(device=args.device, outcome=args.outcome, limit=args.limit))
    else:
        rows = operate.call(args, "review.list", {"device": args.device, "outcome": args.outcome,
                                                  "limit": args.limit})
    if args.json:
        print(json.dumps(rows, indent=2))
    elif not rows:
        print("no snapshots kept" + (f" by {args.device}" if args.device else ""))
    else:
        operate._table(("SNAPSHOT", "DEVICE", "CAMERA", "CAPTURED", "OUTCOME", "LABEL", "SCORE", "MODEL", "POLICY",
                        "REVIEW"),
                       [(r["snapshot"], r["device"], r["camera"] or "-", _when(r["captured_at"]),
                         r["outcome"] + (f" ({r['rule']})" if r["rule"] else ""), r["label"] or "-",
                         f"{r['score']:.2f}" if r["score"] is not None else "-", r["model_version"] or "-",
                         r["policy_version"] or "-", (r["review"] or {}).get("label", "-")) for r in rows])
    return 0


def cmd_fetch(args: argparse.Namespace) -> int:
    snapshot = _snapshot_id(args.snapshot)
    with operate._client(args) as client:
        case = client.call("review.show", {"snapshot": snapshot})
        data = client.fetch_snapshot(case["device"], snapshot, sha256=case["sha256"])
    args.cases.mkdir(parents=True, exist_ok=True)
    image = args.cases / f"{snapshot}.jpg"
    _write(image, data)
    _write(args.cases / f"{snapshot}.json", json.dumps({**case, "fetched_at": time.time()}, indent=1).encode())
    if args.out is not None:
        _write(args.out, data)
    where = args.out or image
    operate._out(args, {**case, "file": str(where), "bytes": len(data)},
                 f"wrote {where} ({len(data)} bytes, sha256 {case['sha256'][:16]}… verified) from {case['device']}")
    return 0


def cmd_label(args: argparse.Namespace) -> int:
    snapshot = _snapshot_id(args.snapshot)
    body = {"snapshot": snapshot, "label": args.label, "note": args.note}
    with operate._client(args) as client:
        verdict = client.call("review.label", body)
    operate._out(args, verdict, f"{snapshot} labelled {args.label!r} (model {verdict['model_version'] or '-'}, "
                                f"policy {verdict['policy_version'] or '-'}, device {verdict['device']})")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    with operate._client(args) as client:
        cases = client.call("review.labels", {"device": args.device})
    images_dir = args.dir / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    categories: dict[str, int] = {}
    images, annotations, missing = [], [], []
    for c in cases:
        source = args.cases / f"{c['snapshot']}.jpg"
        try:
            data = source.read_bytes()
        except FileNotFoundError:
            missing.append(c["snapshot"])
            continue
        if hashlib.sha256(data).hexdigest() != c["sha256"]:
            missing.append(c["snapshot"])
            continue
        shutil.copyfile(source, images_dir / source.name)
        width, height = jpeg_size(data)
        image_id = len(images) + 1
        review = c["review"]
        images.append({"id": image_id, "file_name": f"images/{source.name}", "width": width, "height": height,
                       "snapshot": c["snapshot"], "sha256": c["sha256"], "device": c["device"], "camera": c["camera"],
                       "captured_at": c["captured_at"], "model": c["model"], "model_version": c["model_version"],
                       "policy_version": c["policy_version"], "outcome": c["outcome"], "rule": c["rule"]})
        category = categories.setdefault(review["label"], len(categories) + 1)
        annotation = {"id": len(annotations) + 1, "image_id": image_id, "category_id": category,
                      "predicted": c["label"], "score": c["score"], "note": review.get("note"),
                      "by": review.get("by"), "labelled_at": review.get("at")}
        bbox = coco_box(c["box"], width, height)
        if bbox is not None:
            annotation |= {"bbox": bbox, "area": round(bbox[2] * bbox[3], 2), "iscrowd": 0}
        annotations.append(annotation)
    doc = {"info": {"description": "edgecam review export", "date_created": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                                          time.gmtime())},
           "images": images, "annotations": annotations,
           "categories": [{"id": i, "name": n} for n, i in categories.items()]}
    _write(args.dir / "labels.json", json.dumps(doc, indent=1).encode())
    operate._out(args, {"dir": str(args.dir), "images": len(images), "not_fetched": missing},
                 f"wrote {len(images)} labelled images and {args.dir / 'labels.json'}"
                 + (f"; {len(missing)} labelled case(s) not in {args.cases} (fetch them first): "
                    + ", ".join(missing[:5]) if missing else ""))
    return 0


def coco_box(box: list[float] | None, width: int, height: int) -> list[float] | None:
    """``[x1, y1, x2, y2]`` (normalised 0..1, or pixels) as COCO's ``[x, y, w, h]`` in pixels."""
    if not box or len(box) != 4 or not width or not height:
        return None
    x1, y1, x2, y2 = box
    if max(box) <= 1.0:
        x1, x2, y1, y2 = x1 * width, x2 * width, y1 * height, y2 * height
    return [round(x1, 2), round(y1, 2), round(x2 - x1, 2), round(y2 - y1, 2)]


def jpeg_size(data: bytes) -> tuple[int, int]:
    """A JPEG's width and height from its frame header; (0, 0) when there is none."""
    i = 2
    while i + 9 < len(data) and data[i] == 0xFF:
        marker = data[i + 1]
        length = struct.unpack(">H", data[i + 2:i + 4])[0]
        if marker in (0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF):
            height, width = struct.unpack(">HH", data[i + 5:i + 9])
            return width, height
        i += 2 + length
    return 0, 0


def _write(path: Path, data: bytes) -> None:
    from edge.core.files import replace_file

    path.parent.mkdir(parents=True, exist_ok=True)
    replace_file(path, data, mode=0o600, durable=False)


def _when(t: float | None) -> str:
    return "-" if t is None else time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))
