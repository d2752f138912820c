"""CUB-200-2011 -> webdataset shards of the official train/test split.

    python -m data_prep cub --root data/CUB_200_2011 --out shards/cub [--classes 1-50] [--workers 4]

Each sample: `jpg` (the original bytes, never re-encoded: grayscale and CMYK files stay as they
are, the loader converts to RGB), `cls` (0-based index into manifest["classes"]) and `json`:
{"id": CUB image id, "file", "class_id": CUB's 1-based class id, "label": cls, "class_name",
"size": [w, h], "mode": PIL mode, "bbox": [x, y, w, h] (pixels, top-left origin),
"parts": [[x, y, visible], ...] in the order of manifest["parts"] (invisible parts are 0, 0, 0)}.
Keys are the 6-digit zero-padded image id. The number of parts comes from parts/parts.txt.

Large or preemptible jobs: the shards are fixed pieces, so a SLURM array (`--array=0-7`: the task
id and count come from the environment) or `--num-jobs 8 --job-index i` each write their own, the
last to finish writes manifest.json (or run `--finalize-only`), and a rerun after a crash writes
only the missing shards. `--overwrite` clears the folder: use it in one job, not in an array.
Then check the result with `python -m data_prep verify OUT`.
"""
from __future__ import annotations

import os
from contextlib import closing
from dataclasses import asdict, dataclass
from pathlib import Path
from itertools import chain
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

from . import DataPrepError
from ._cli import add_job_arguments, job_kwargs, print_summary
from .contract import BadImage, check_image
from .jobs import ExistsCheck, JobOptions, Plan, ShardContent, ShardSpec, chunk_specs, digest, run_plan
from .shards import file_sha256, json_text, read_files_ahead

SPLITS = ("train", "test")
METADATA_FILES = ("classes.txt", "images.txt", "image_class_labels.txt", "train_test_split.txt",
                  "bounding_boxes.txt", "parts/parts.txt", "parts/part_locs.txt")
MAX_SHARD_SIZE = 90  # full CUB train (5,994) -> 67 shards: enough for 8 GPUs x 8 loader workers
MIN_TRAIN_SHARDS = 64
# A small set gets fewer shards rather than one-sample ones (each costs a tar header, an open and a
# draw of the resampler; training resamples shards, so no rank needs a shard of its own).
MIN_SHARD_SIZE = 16
CHECKS = ("fast", "full")


@dataclass(frozen=True)
class CubOptions:
    """What goes into the output (the folder's identity); job and worker counts are not here."""

    classes: Optional[Tuple[int, ...]] = None  # 1-based CUB class ids; None = all
    limit: Optional[int] = None  # at most this many images per split (the lowest ids)
    shard_size: int = MAX_SHARD_SIZE
    skip_missing: bool = False
    check: str = "full"  # full: decode every image (contract.check_image); fast: header + end marker


def prepare(root: str | Path, out: str | Path, classes: Any = None, limit: Optional[int] = None,
            shard_size: Optional[int] = None, workers: int = 1, num_jobs: int = 1,
            job_index: Optional[int] = None, finalize: bool = True, overwrite: bool = False,
            skip_missing: bool = False, strict: bool = False, check: str = "full",
            finalize_only: bool = False) -> Optional[Dict[str, Any]]:
    """Write CUB shards + manifest into `out`; returns the manifest (None if other jobs' shards are missing).

    `classes`: "1-50", "1,3,10-20" or an iterable of 1-based class ids. `shard_size` None picks a
    size that gives at least 64 train shards (at most 90 samples each).
    """
    plan = make_plan(root, classes=classes, limit=limit, shard_size=shard_size,
                     skip_missing=skip_missing, check=check)
    opts = JobOptions(workers=workers, num_jobs=num_jobs, job_index=job_index, finalize=finalize,
                      finalize_only=finalize_only, overwrite=overwrite, strict=strict)
    return run_plan(out, plan, build_shard, opts)


# ---- metadata ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Metadata:
    classes: Dict[int, str]  # class id -> folder name, e.g. 1 -> "001.Black_footed_Albatross"
    parts: List[str]
    images: Dict[int, str]
    labels: Dict[int, int]
    is_train: Dict[int, bool]
    boxes: Dict[int, List[float]]
    part_locs: Dict[int, str]  # JSON text of [[x, y, visible], ...] in parts.txt order, as samples carry it


def read_metadata(root: Path) -> Metadata:
    """Parse the CUB text files (CRLF, blank lines and names with spaces are fine)."""
    if not root.is_dir():
        raise DataPrepError(f"{root}: CUB root folder not found (expected the CUB_200_2011 folder)")
    for name in ("images", "parts"):
        if not (root / name).is_dir():
            raise DataPrepError(f"{root / name}: missing CUB folder")
    classes = {i: name for i, name in _id_name_rows(root / "classes.txt")}
    parts = _id_name_rows(root / "parts" / "parts.txt")
    if [i for i, _ in parts] != list(range(1, len(parts) + 1)):
        raise DataPrepError(f"{root / 'parts' / 'parts.txt'}: part ids must be 1..{len(parts)} in order")
    images = _unique(root / "images.txt", _id_name_rows(root / "images.txt"))
    ids, classes_of = _columns(root / "image_class_labels.txt", (int, int))
    labels = _unique(root / "image_class_labels.txt", zip(ids, classes_of))
    ids, flags = _columns(root / "train_test_split.txt", (int, int))
    split = _unique(root / "train_test_split.txt", zip(ids, map((1).__eq__, flags)))
    ids, *box = _columns(root / "bounding_boxes.txt", (int, float, float, float, float))
    boxes = _unique(root / "bounding_boxes.txt", zip(ids, map(list, zip(*box))))
    locs = _part_locs(root / "parts" / "part_locs.txt", len(parts))
    for path, table in (("image_class_labels.txt", labels), ("train_test_split.txt", split),
                        ("bounding_boxes.txt", boxes), ("parts/part_locs.txt", locs)):
        missing = None if table.keys() >= images.keys() else next(i for i in images if i not in table)
        if missing is not None:
            raise DataPrepError(f"{root / path}: no entry for image id {missing} of images.txt")
    unknown = (None if classes.keys() >= set(labels.values())
               else next((i, c) for i, c in labels.items() if c not in classes))
    if unknown:
        raise DataPrepError(f"{root / 'image_class_labels.txt'}: image {unknown[0]} has class {unknown[1]}, not in classes.txt")
    return Metadata(classes, [name for _, name in parts], images, labels, split, boxes, locs)


def _lines(path: Path) -> Iterable[Tuple[int, str]]:
    if not path.is_file():
        raise DataPrepError(f"{path}: missing CUB metadata file")
    with open(path, encoding="utf-8", newline=None) as f:  # universal newlines: CRLF reads as LF
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if line:
                yield lineno, line


def _id_name_rows(path: Path) -> List[Tuple[int, str]]:
    rows = []
    for lineno, line in _lines(path):
        head, _, name = line.partition(" ")
        name = name.strip()
        if not head.isdigit() or not name:
            raise DataPrepError(f"{path}:{lineno}: expected '<id> <name>', got {line[:60]!r}")
        rows.append((int(head), name))
    return rows


def _read_table(path: Path) -> str:
    if not path.is_file():
        raise DataPrepError(f"{path}: missing CUB metadata file")
    return path.read_text(encoding="utf-8")


# ASCII whitespace that str.split() splits on besides " " and "\n" (read_text turns CR into LF)
_OTHER_SPACE = ("\t", "\r", "\x0b", "\x0c", "\x1c", "\x1d", "\x1e", "\x1f")


def _plain_fields(text: str, width: int) -> Optional[List[str]]:
    """The fields of an ASCII table whose rows end in LF (read_text has made CRLF that) and whose
    fields are separated by single spaces, row by row with a "\n" field after each row's `width` fields;
    None if the file is not laid out so (the general parse then decides).

    For such a file these are text.split()'s tokens and every line has `width` of them, found with a
    few passes in C instead of a split per line. An empty field (two spaces, a space before or after
    a line break, a blank line) is left in: it fails its conversion, which sends the file to the
    general parse too.
    """
    if not text.isascii() or any(s in text for s in _OTHER_SPACE):
        return None
    if text.endswith("\n\n"):
        text = text.rstrip("\n") + "\n"  # blank lines at the end
    elif not text.endswith("\n"):
        text += "\n"
    fields = text.replace("\n", " \n ").split(" ")
    del fields[-1]  # "" after the last newline
    rows = len(fields) // (width + 1)
    # every "\n" is a field of its own: `rows` of them, each after `width` fields
    if (len(fields) != rows * (width + 1) or text.count("\n") != rows
            or fields[width::width + 1] != ["\n"] * rows):
        return None
    return fields


def _convert(kind: Callable[[str], Any], column: List[str]) -> List[Any]:
    """list(map(kind, column)), converting each distinct string once (CUB's columns repeat a lot:
    a few hundred distinct values in part_locs.txt's 176,820 rows)."""
    distinct = set(column)
    if 4 * len(distinct) > len(column):
        return list(map(kind, column))
    value_of = dict(zip(distinct, map(kind, distinct)))
    return list(map(value_of.__getitem__, column))


def _columns(path: Path, kinds: Sequence[type], text: Optional[str] = None) -> List[List[Any]]:
    """Columns of a whitespace-separated numeric table, each converted by its kind.

    Whole columns at a time (map in C) rather than row by row: part_locs.txt has 176,820 rows.
    """
    if text is None:
        text = _read_table(path)
    width = len(kinds)
    fields = _plain_fields(text, width)
    if fields is not None:
        try:
            return [_convert(kind, fields[i::width + 1]) for i, kind in enumerate(kinds)]
        except ValueError:
            pass  # the general parse below finds the line for the message
    tokens = text.split()
    try:
        if set(map(len, map(str.split, text.splitlines()))) - {width, 0}:  # every non-blank line: width fields
            raise ValueError
        return [list(map(kind, tokens[i::width])) for i, kind in enumerate(kinds)]
    except ValueError:
        for lineno, line in _lines(path):  # find the offending line for the message
            fields = line.split()
            try:
                if len(fields) != len(kinds):
                    raise ValueError
                for kind, value in zip(kinds, fields):
                    kind(value)
            except ValueError:
                names = " ".join("<int>" if k is int else "<number>" for k in kinds)
                raise DataPrepError(f"{path}:{lineno}: expected '{names}', got {line[:60]!r}") from None
        raise


def _unique(path: Path, pairs: Iterable[Tuple[int, Any]]) -> Dict[int, Any]:
    pairs = list(pairs)
    table: Dict[int, Any] = dict(pairs)
    if len(table) == len(pairs):
        return table
    table = {}
    for key, value in pairs:
        if key in table:
            raise DataPrepError(f"{path}: image id {key} appears twice")
        table[key] = value
    return table


PART_LOC_KINDS = (int, int, float, float, int)


def _part_locs(path: Path, num_parts: int) -> Dict[int, str]:
    """Each image's parts as the JSON text its samples carry: json.dumps([[x, y, visible], ...]) with
    x, y floats and visible an int. Made here from the table's strings (each distinct value
    converted once), not encoded per sample: a third of a one-worker job's JSON time."""
    text = _read_table(path)
    locs = _part_locs_in_blocks(text, num_parts) if num_parts else None
    if locs is not None:
        return locs
    # any other layout (CRLF, tabs, rows in any order, ...), and the messages for bad rows
    rows = _part_locs_any_order(path, num_parts, zip(*_columns(path, PART_LOC_KINDS, text)))
    return {image: json_text(slots) for image, slots in rows.items()}


def _json_float(text: str) -> str:
    return json_text(float(text))


def _json_int(text: str) -> str:
    return json_text(int(text))


def _part_locs_in_blocks(text: str, num_parts: int) -> Optional[Dict[int, str]]:
    """_part_locs of a plain file (see _plain_fields) as CUB ships it, with the id columns checked on
    the strings (ids as written: "1", not "01"); None if it is not quite that (the general parse then
    decides). The same text as the general parse in well under half its time (part_locs.txt, 176,820
    rows, is most of the planning time)."""
    fields = _plain_fields(text, len(PART_LOC_KINDS))
    if fields is None:
        return None
    stride = len(PART_LOC_KINDS) + 1
    rows = len(fields) // stride
    blocks = rows // num_parts
    images = fields[0::stride]
    heads = images[::num_parts]
    if (rows != blocks * num_parts or fields[1::stride] != [str(p) for p in range(1, num_parts + 1)] * blocks
            or images != list(chain.from_iterable(zip(*[heads] * num_parts)))):
        return None
    try:
        ids = list(map(int, heads))
        cells = [""] * (3 * rows)  # x, y, visible of every row, as JSON text
        cells[0::3] = _convert(_json_float, fields[2::stride])
        cells[1::3] = _convert(_json_float, fields[3::stride])
        cells[2::3] = _convert(_json_int, fields[4::stride])
    except ValueError:
        return None
    if len(set(ids)) != blocks:
        return None
    image_json = "[" + ", ".join(["[{}, {}, {}]"] * num_parts) + "]"  # json.dumps's separators
    per_image = 3 * num_parts
    return {image: image_json.format(*cells[b * per_image:(b + 1) * per_image]) for b, image in enumerate(ids)}


def _part_locs_any_order(path: Path, num_parts: int, rows: Iterable[Tuple[int, int, float, float, int]]):
    locs: Dict[int, List[Any]] = {}
    for image, part, x, y, visible in rows:
        slots = locs.get(image)
        if slots is None:
            slots = locs[image] = [None] * num_parts
        if not 1 <= part <= num_parts:
            raise DataPrepError(f"{path}: image {image} has part id {part}, parts.txt has 1..{num_parts}")
        if slots[part - 1] is not None:
            raise DataPrepError(f"{path}: image {image} has two rows for part {part}")
        slots[part - 1] = [x, y, visible]
    for image, slots in locs.items():
        if None in slots:
            raise DataPrepError(f"{path}: image {image} has no row for part {slots.index(None) + 1}")
    return locs


def parse_classes(spec: Any, known: Iterable[int]) -> Optional[Tuple[int, ...]]:
    """'1-50' / '1,3,10-20' / [1, 2] -> sorted 1-based class ids (None = all)."""
    if spec is None:
        return None
    known = set(known)
    ids = set()
    tokens = spec.split(",") if isinstance(spec, str) else list(spec)
    for token in tokens:
        text = str(token).strip()
        lo, sep, hi = text.partition("-")
        try:
            first, last = int(lo), int(hi) if sep else int(lo)
        except ValueError:
            raise DataPrepError(f"--classes: expected ids or ranges like 1-50, got {text!r}") from None
        if first > last or first not in known or last not in known:
            raise DataPrepError(f"--classes: {text!r} is outside the class ids of classes.txt "
                                f"({min(known)}-{max(known)})")
        ids.update(range(first, last + 1))
    return tuple(sorted(ids))


# ---- plan and shards ----------------------------------------------------------------------------

def make_plan(root: str | Path, classes: Any = None, limit: Optional[int] = None,
              shard_size: Optional[int] = None, skip_missing: bool = False, check: str = "full") -> Plan:
    """Read and check all metadata (nothing is written), then cut the split lists into shards."""
    root = Path(root).resolve()
    if check not in CHECKS:
        raise DataPrepError(f"--check must be one of {', '.join(CHECKS)}, got {check!r}")
    if limit is not None and limit < 1:
        raise DataPrepError(f"--limit must be >= 1, got {limit}")
    meta = read_metadata(root)
    selected = parse_classes(classes, meta.classes)
    class_ids = list(selected) if selected is not None else sorted(meta.classes)
    label_of = {c: i for i, c in enumerate(class_ids)}
    per_split: Dict[str, List[Dict[str, Any]]] = {s: [] for s in SPLITS}
    skipped = []
    images_dir = str(root / "images")
    exists = ExistsCheck(images_dir)
    name_of = {c: class_name(meta.classes[c]) for c in class_ids}
    images, labels, is_train, boxes, part_locs = meta.images, meta.labels, meta.is_train, meta.boxes, meta.part_locs
    for image_id in sorted(images):
        cls = labels[image_id]
        items = per_split["train" if is_train[image_id] else "test"]
        if cls not in label_of or (limit is not None and len(items) >= limit):
            continue
        key = f"{image_id:06d}"
        rel = images[image_id]
        if not exists(rel):
            if not skip_missing:
                raise DataPrepError(f"{root / 'images' / rel}: image of id {image_id} in images.txt is missing "
                                    "(pass --skip-missing to leave it out)")
            skipped.append({"key": key, "reason": f"missing: images/{rel}"})
            continue
        items.append({
            "key": key, "id": image_id, "file": rel, "class_id": cls, "label": label_of[cls],
            "class_name": name_of[cls], "bbox": boxes[image_id], "parts_json": part_locs[image_id]})
    if shard_size is None:
        shard_size = max(MIN_SHARD_SIZE, min(MAX_SHARD_SIZE, len(per_split["train"]) // MIN_TRAIN_SHARDS))
    options = CubOptions(selected, limit, shard_size, skip_missing, check)
    root_str = str(root)
    specs = [spec for split in SPLITS
             for spec in chunk_specs(split, [(root_str, check, item) for item in per_split[split]], shard_size)]
    extra = {"task": "classification", "classes": [name_of[c] for c in class_ids],
             "class_ids": class_ids, "parts": meta.parts}
    # identity of the data: the metadata files' bytes and which ids go where (not the root: moving
    # the raw data is fine); hashing the files costs milliseconds, encoding every item ~0.5 s
    files = {name: file_sha256(root / name) for name in METADATA_FILES}
    keys = [[s.split, [i[2]["key"] for i in s.items]] for s in specs]
    return Plan("cub", specs, list(SPLITS), asdict(options), str(root), extra, skipped,
                plan_digest=digest([files, keys, skipped]))


def class_name(folder: str) -> str:
    """'001.Black_footed_Albatross' -> 'Black_footed_Albatross'."""
    head, dot, rest = folder.partition(".")
    return rest if dot and head.isdigit() else folder


def build_shard(spec: ShardSpec, strict: bool) -> ShardContent:
    skipped: List[Dict[str, str]] = []

    def samples():
        paths = [os.path.join(root, "images", item["file"]) for root, _, item in spec.items]
        with closing(read_files_ahead(paths)) as images:  # stopped early: no file left open
            for (_, check, item), path, data in zip(spec.items, paths, images):
                try:
                    width, height, mode = inspect_jpeg(data, full=check == "full")
                except BadImage as err:
                    if strict:
                        raise DataPrepError(f"{path}: {err} (image id {item['id']}; drop --strict to skip it)") from None
                    skipped.append({"key": item["key"], "reason": f"corrupt: images/{item['file']}: {err}"})
                    continue
                meta = {"id": item["id"], "file": item["file"], "class_id": item["class_id"], "label": item["label"],
                        "class_name": item["class_name"], "size": [width, height], "mode": mode, "bbox": item["bbox"]}
                # json.dumps of meta with "parts" last, the parts' text made while planning
                text = f'{json_text(meta)[:-1]}, "parts": {item["parts_json"]}}}'
                yield {"__key__": item["key"], "jpg": data, "cls": item["label"], "json": text.encode()}

    return samples(), skipped


JPEG_MODES = {1: "L", 3: "RGB", 4: "CMYK"}  # by component count, as PIL opens them


def inspect_jpeg(data: bytes, full: bool = True) -> Tuple[int, int, str]:
    """(width, height, mode) of a JPEG, or BadImage naming what is wrong.

    full: the contract's check (`contract.check_image`: libjpeg decodes every coefficient and
    reports no corrupt data, ~0.6 ms a CUB image), the one verify and the loaders apply too. Not
    full: walk the markers to the frame header and find the end-of-image marker, ~5 us, which
    catches a truncated file (one without that marker near its end is checked in full) but not
    one scrambled in the middle.
    """
    if data[:2] != b"\xff\xd8":
        raise BadImage("not a JPEG (no start-of-image marker)")
    width, height, components = _frame_header(data)
    if width == 0 or height == 0 or components not in JPEG_MODES:
        raise BadImage(f"bad JPEG frame header ({width}x{height}, {components} components)")
    # a truncated download lacks the end-of-image marker; a file with more than a little data
    # after it (some cameras append some) is judged by decoding it
    if full or b"\xff\xd9" not in data[-64:]:
        check_image(data)
    return width, height, JPEG_MODES[components]


def _frame_header(data: bytes) -> Tuple[int, int, int]:
    """Width, height and component count from the first SOFn segment."""
    pos, end = 2, len(data)
    while pos + 4 <= end:
        if data[pos] != 0xFF:
            raise BadImage(f"corrupt JPEG (no marker at byte {pos})")
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # markers without a length
            pos += 2
            continue
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):  # SOF0..SOF15
            if pos + 10 > end:
                break
            height = (data[pos + 5] << 8) | data[pos + 6]
            width = (data[pos + 7] << 8) | data[pos + 8]
            return width, height, data[pos + 9]
        if marker == 0xDA:
            raise BadImage("corrupt JPEG (scan before frame header)")
        pos += 2 + ((data[pos + 2] << 8) | data[pos + 3])
    raise BadImage("corrupt JPEG (no frame header)")


# ---- CLI ----------------------------------------------------------------------------------------

def main(argv: Optional[Sequence[str]] = None) -> int:
    import argparse  # here: planning from Python needs none of it

    parser = argparse.ArgumentParser(prog="python -m data_prep cub", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", required=True, help="the CUB_200_2011 folder (images/, parts/, *.txt)")
    parser.add_argument("--out", required=True, help="output folder for <split>-NNNNNN.tar + manifest.json")
    parser.add_argument("--classes", default=None, help="1-based class ids, e.g. 1-50 or 1,3,10-20 (default all)")
    parser.add_argument("--limit", type=int, default=None, help="at most N images per split (lowest ids)")
    parser.add_argument("--shard-size", type=int, default=None,
                        help=f"most samples per shard (default: train/{MIN_TRAIN_SHARDS}, "
                             f"{MIN_SHARD_SIZE} to {MAX_SHARD_SIZE})")
    parser.add_argument("--skip-missing", action="store_true",
                        help="leave out (and list in manifest 'skipped') images listed but not on disk")
    parser.add_argument("--check", choices=CHECKS, default="full",
                        help="full: decode every image, as verify and the loader do (default); fast: header and "
                             "end marker only (lets a JPEG scrambled in the middle through)")
    add_job_arguments(parser)
    args = parser.parse_args(argv)
    manifest = prepare(args.root, args.out, classes=args.classes, limit=args.limit, shard_size=args.shard_size,
                       skip_missing=args.skip_missing, check=args.check, **job_kwargs(args))
    print_summary("cub", manifest, args.out)
    return 0
