"""Make datasets: raw sources -> WebDataset shards + manifest.

Three sources, one output contract (``<out>/<split>.json`` beside ``<out>/<split>/shard-%06d.tar``):

* ``prepare_fashion_mnist``: the four IDX files -> ``train`` / ``test`` (+ corrupted copies of ``test``);
* ``prepare_image_folder``: one subfolder per class -> one split;
* ``scan_shards``: existing third-party shards -> a manifest only (the shards are never rewritten).

Pipelines are small composable stages over iterators (arrays -> corrupted arrays -> encoded samples -> shards).

Crash safety: shards are written into a hidden staging folder inside the output folder, moved into place when all
of them are complete, and each manifest is written (atomically) only after its shards are in place.  A manifest
therefore only ever exists for a complete split; an interrupted run leaves at most a ``.partial-*`` folder.

Idempotency: every manifest records in ``source["recipe"]`` a digest of what determines its bytes (input file
hashes or listing, options, format version).  Re-running with the same recipe finds the manifest, checks its
shards against their sha256 (so its fingerprint still holds) and skips the split; a different recipe is refused
unless ``force=True``.
"""
from __future__ import annotations

import gzip
import hashlib
import io
import json
import logging
import multiprocessing
import os
import posixpath
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from functools import partial

import fsspec
import numpy as np
from PIL import Image
from tqdm import tqdm

from shared.corruptions import CORRUPTIONS, SEVERITIES, corrupt
from shared.errors import CitUserError
from shared.io import is_local, local_path
from shared.manifest import Manifest, ManifestError, ShardInfo, stream_digest, verify_shards
from shared.shards import IMAGE_EXTS, ShardError, ShardWriter, check_key, decode_image, encode_png, is_pipe, \
    iter_shard, mode_channels, open_image, read_label, to_channels

log = logging.getLogger(__name__)

PREPARE_VERSION = 1     # bump when the same input and options would give different shard bytes
SHARD_PATTERN = "shard-%06d.tar"

FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
FASHION_MNIST_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
                       "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
DEFAULT_FASHION_MNIST = os.environ.get("CIT_FASHION_MNIST", "/usr/share/datasets/fashion-mnist")


class PrepareError(CitUserError):
    """Bad input or output location for a prepare step; the message names the culprit file, folder or option."""


# ---------------------------------------------------------------------------------------------------------------
# IDX files

_IDX_DTYPES = {0x08: np.dtype(np.uint8), 0x09: np.dtype(np.int8), 0x0B: np.dtype(">i2"),
               0x0C: np.dtype(">i4"), 0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


def read_idx(path: str) -> np.ndarray:
    """Parse an IDX file (optionally gzipped), checking the magic number and that the size matches the header."""
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise PrepareError(f"IDX file not found: {path}") from None
    except (OSError, EOFError) as exc:   # gzip: BadGzipFile is an OSError, a cut-off stream an EOFError
        raise PrepareError(f"cannot read IDX file {path} (truncated or corrupt gzip?): {exc}") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise PrepareError(f"{path} is not an IDX file: magic number {data[:4].hex() or '(empty file)'}")
    dtype, ndim = _IDX_DTYPES[data[2]], data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise PrepareError(f"IDX file {path} is truncated inside its header ({len(data)} < {header} bytes)")
    dims = tuple(int(d) for d in np.frombuffer(data, ">u4", ndim, 4))
    expected = header + int(np.prod(dims)) * dtype.itemsize
    if len(data) != expected:
        raise PrepareError(f"IDX file {path} has {len(data)} bytes but its header (shape {dims}, {dtype}) says "
                           f"{expected}: {'truncated' if len(data) < expected else 'trailing data'}")
    return np.frombuffer(data, dtype, offset=header).reshape(dims)


def _find_idx(source_dir: str, stem: str) -> str:
    for name in (stem + ".gz", stem):
        if os.path.isfile(os.path.join(source_dir, name)):
            return os.path.join(source_dir, name)
    raise PrepareError(f"Fashion-MNIST folder {source_dir} has no {stem}.gz (expected the four standard "
                       f"*-ubyte.gz files: {', '.join(s + '.gz' for pair in FASHION_MNIST_FILES.values() for s in pair)})")


def local_sha256(path: str) -> str:
    """sha256 of a local file this process reads or wrote itself, with ``open`` (as ``read_idx`` and ``ShardWriter``
    do): going through the shard readers' ``gopen`` would import webdataset, and with it torch, into every worker
    that writes shards."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def load_fashion_mnist(source_dir: str, split: str) -> tuple[np.ndarray, np.ndarray, dict]:
    """(images uint8 N×H×W, labels int64 N, {file name: sha256}) of one split, validated."""
    image_path, label_path = (_find_idx(source_dir, stem) for stem in FASHION_MNIST_FILES[split])
    images, labels = read_idx(image_path), read_idx(label_path)
    if images.dtype != np.uint8 or images.ndim != 3:
        raise PrepareError(f"{image_path}: expected uint8 images N×H×W, got {images.dtype} shape {images.shape}")
    if labels.dtype != np.uint8 or labels.ndim != 1:
        raise PrepareError(f"{label_path}: expected uint8 labels of shape (N,), got {labels.dtype} {labels.shape}")
    if len(images) != len(labels):
        raise PrepareError(f"{image_path} has {len(images)} images but {label_path} has {len(labels)} labels")
    if len(labels) and labels.max() >= len(FASHION_MNIST_CLASSES):
        raise PrepareError(f"{label_path} has label {labels.max()}, outside 0..{len(FASHION_MNIST_CLASSES) - 1}")
    hashes = {os.path.basename(p): local_sha256(p) for p in (image_path, label_path)}
    return images, labels.astype(np.int64), hashes


# ---------------------------------------------------------------------------------------------------------------
# Stages: (key, array, label) items -> corrupted items -> encoded samples.  A shard's samples come from a picklable
# ``partial`` of a source function, so shards can be written by worker processes.

Item = tuple[str, np.ndarray, int]


@dataclass
class ImageStats:
    """What a split's images look like, for the manifest's ``source`` (sizes, modes, stored fields)."""
    sizes: set = field(default_factory=set)
    modes: dict = field(default_factory=dict)
    fields: dict = field(default_factory=dict)

    def add(self, size: tuple[int, int], mode: str, image_field: str) -> None:
        self.sizes.add(tuple(size))
        self.modes[mode] = self.modes.get(mode, 0) + 1
        self.fields[image_field] = self.fields.get(image_field, 0) + 1

    def update(self, other: "ImageStats") -> None:
        self.sizes |= other.sizes
        for mine, theirs in ((self.modes, other.modes), (self.fields, other.fields)):
            for k, v in theirs.items():
                mine[k] = mine.get(k, 0) + v

    def to_source(self) -> dict:
        (w, h) = next(iter(self.sizes)) if len(self.sizes) == 1 else (None, None)
        return {"image_size": w if w == h else None, "sizes": [list(min(self.sizes)), list(max(self.sizes))],
                "channels": self.channels, "modes": self.modes, "fields": self.fields}

    @property
    def channels(self) -> int:
        """1 when every image is grey (L, LA, 16-bit grey, ...), else 3: what the manifest decodes all images to."""
        return max((mode_channels(mode) for mode in self.modes), default=1)


def idx_keys(prefix: str, rows: np.ndarray, total: int) -> list[str]:
    """Keys carry the original row index (``train_000123``) so a subset stays traceable to the source."""
    width = max(6, len(str(total - 1)))
    return [f"{prefix}_{int(i):0{width}d}" for i in rows]


def corrupted(items: Iterable[Item], name: str, severity: int, seed: int) -> Iterator[Item]:
    for key, image, label in items:
        yield key, corrupt(name, image, severity, seed, key), label


def encoded(items: Iterable[Item], stats: ImageStats) -> Iterator[dict]:
    for key, image, label in items:
        stats.add((image.shape[1], image.shape[0]), "L" if image.ndim == 2 else "RGB", "png")
        yield {"__key__": key, "png": encode_png(np.ascontiguousarray(image)), "cls": str(label).encode()}


def array_source(keys: list[str], images: np.ndarray, labels: np.ndarray, corruption: tuple | None,
                 stats: ImageStats) -> Iterator[dict]:
    """Samples of one shard of an in-memory array dataset, optionally corrupted ``(name, severity, seed)``."""
    items: Iterable[Item] = zip(keys, images, (int(y) for y in labels))
    if corruption is not None:
        items = corrupted(items, *corruption)
    return encoded(items, stats)


def select_per_class(labels: np.ndarray, per_class: int, seed: int, class_names: Sequence[str]) -> np.ndarray:
    """Sorted indices of ``per_class`` samples of every class; class c's choice depends only on (seed, c)."""
    if per_class <= 0:
        raise PrepareError(f"per_class must be positive, got {per_class}")
    chosen = []
    for c, name in enumerate(class_names):
        members = np.flatnonzero(labels == c)
        if len(members) < per_class:
            raise PrepareError(f"class {c} ({name!r}) has only {len(members)} samples, fewer than "
                               f"per_class={per_class}")
        chosen.append(np.random.default_rng([seed, c]).choice(members, per_class, replace=False))
    return np.sort(np.concatenate(chosen))


# ---------------------------------------------------------------------------------------------------------------
# Staged output: shards are written into a hidden folder, then published (moved + manifest) at the end

def recipe_digest(recipe: dict) -> str:
    return hashlib.sha256(json.dumps({"version": PREPARE_VERSION, **recipe}, sort_keys=True).encode()).hexdigest()


def reusable_manifest(path: str, recipe: str) -> tuple[Manifest | None, str]:
    """(manifest, "") if ``path`` holds an intact manifest made by ``recipe`` (shards checked), else (None, what is
    in the way) — so a rerun with the same input and options is a no-op and anything else is named."""
    try:
        manifest = Manifest.load(path)
        if manifest.source.get("recipe") != recipe:
            return None, f"{path} exists and was made from different input or options"
        verify_shards(manifest)
    except ManifestError as exc:
        return None, f"{path} exists but is not intact: {exc}"
    log.info("%s: already prepared from the same input and options (fingerprint %s…, %d samples); skipping",
             path, manifest.fingerprint[:16], manifest.num_samples)
    return manifest, ""


def existing_split(out_dir: str, name: str, recipe: str, force: bool) -> Manifest | None:
    """The already-prepared manifest of split ``name`` if it has this recipe and intact shards, else None.

    Raises PrepareError if something else is in the way and ``force`` is not set."""
    path, folder = os.path.join(out_dir, name + ".json"), os.path.join(out_dir, name)
    if not os.path.exists(path) and not os.path.exists(folder):
        return None
    problem = f"{folder} exists but has no manifest {path} (left by an interrupted run?)"
    if os.path.exists(path):
        manifest, problem = reusable_manifest(path, recipe)
        if manifest is not None:
            return manifest
    if not force:
        raise PrepareError(f"{problem}; refusing to overwrite without force=True (--force)")
    log.info("%s; replacing it (force)", problem)
    return None


@dataclass
class ShardResult:
    samples: int
    sha256: str
    stats: ImageStats
    size: int


def write_shard(path: str, source: Callable[[ImageStats], Iterable[dict]]) -> ShardResult:
    """Write the samples of ``source`` into one shard file (possibly in a worker process)."""
    stats = ImageStats()
    with ShardWriter(path + ".part%d", 1 << 62) as writer:
        for sample in source(stats):
            writer.write(sample)
    if not writer.written:
        raise PrepareError(f"no samples for shard {path}")
    os.replace(writer.written[0].path, path)
    return ShardResult(writer.written[0].samples, local_sha256(path), stats, os.path.getsize(path))


def default_workers() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


class Staging:
    """A hidden folder inside ``out_dir`` where splits are built; ``publish`` moves them into place."""

    def __init__(self, out_dir: str):
        self.out_dir, self.created = out_dir, not os.path.exists(out_dir)
        os.makedirs(out_dir, exist_ok=True)
        self.root = tempfile.mkdtemp(prefix=".partial-", dir=out_dir)

    def folder(self, name: str) -> str:
        return os.path.join(self.root, name)

    def build(self, splits: dict[str, list[Callable]], workers: int | None = None
              ) -> dict[str, tuple[list[ShardInfo], ImageStats]]:
        """Write every split's shards (one source per shard, in parallel over shards); shard URLs are relative
        to the split's manifest (``<split>/shard-000000.tar``)."""
        tasks = [(name, i, source) for name, sources in splits.items() for i, source in enumerate(sources)]
        for name in splits:
            os.makedirs(self.folder(name), exist_ok=True)
        paths = [os.path.join(self.folder(name), SHARD_PATTERN % i) for name, i, _ in tasks]
        workers = min(workers or default_workers(), len(tasks))
        progress = tqdm(total=len(tasks), desc="shards", unit="shard", disable=None)
        if workers <= 1:
            results = []
            for path, (_, _, source) in zip(paths, tasks):
                results.append(write_shard(path, source))
                progress.update()
        else:
            pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("forkserver"))
            try:
                futures = [pool.submit(write_shard, path, source) for path, (_, _, source) in zip(paths, tasks)]
                for future in as_completed(futures):
                    future.result()
                    progress.update()
                results = [future.result() for future in futures]
            finally:
                pool.shutdown(wait=True, cancel_futures=True)
        progress.close()
        built: dict[str, tuple[list[ShardInfo], ImageStats]] = {name: ([], ImageStats()) for name in splits}
        for (name, i, _), result in zip(tasks, results):
            shards, stats = built[name]
            shards.append(ShardInfo(f"{posixpath.basename(name)}/{SHARD_PATTERN % i}", result.samples, result.sha256,
                                    size=result.size))
            stats.update(result.stats)
        return built

    def publish(self, manifests: dict[str, Manifest]) -> None:
        """Per split: drop the old manifest, swap the shard folder, then write the manifest (atomically)."""
        for i, (name, manifest) in enumerate(manifests.items()):
            path, folder = os.path.join(self.out_dir, name + ".json"), os.path.join(self.out_dir, name)
            if os.path.exists(path):
                os.unlink(path)
            if os.path.exists(folder):
                os.rename(folder, os.path.join(self.root, f".old-{i}"))
            os.makedirs(os.path.dirname(folder), exist_ok=True)
            os.rename(self.folder(name), folder)
            manifest.save(path)

    def __enter__(self) -> "Staging":
        return self

    def __exit__(self, *exc) -> None:
        shutil.rmtree(self.root, ignore_errors=True)
        if self.created and not os.listdir(self.out_dir):   # a failed first run leaves nothing behind
            os.rmdir(self.out_dir)


def chunks(rows: np.ndarray, shard_size: int) -> list[np.ndarray]:
    if not isinstance(shard_size, (int, np.integer)) or shard_size <= 0:
        raise PrepareError(f"shard_size must be a positive integer, got {shard_size!r}")
    return [rows[i:i + shard_size] for i in range(0, len(rows), shard_size)]


# ---------------------------------------------------------------------------------------------------------------
# Fashion-MNIST

def prepare_fashion_mnist(source_dir: str, out_dir: str, shard_size: int = 5000, per_class: int | None = None,
                          seed: int = 0, corruptions: bool = False, severities: Sequence[int] = (1, 3, 5), *,
                          corruption_seed: int = 0, force: bool = False, workers: int | None = None
                          ) -> dict[str, Manifest]:
    """Fashion-MNIST IDX files -> ``train``, ``test`` and (optionally) ``corrupt/<name>-<severity>`` splits.

    ``per_class`` keeps N train images per class chosen by ``seed`` (the low-data regime); the test split and its
    corrupted copies are always complete, and their noise uses ``corruption_seed`` (not ``seed``) so evaluation
    sets are identical across subset seeds.  ``workers`` processes write shards (default: all cores).  Returns
    the manifests by split name (``train``, ``test``, ``corrupt/shift-1``, ...)."""
    if not os.path.isdir(source_dir):
        raise PrepareError(f"Fashion-MNIST source folder not found: {source_dir} (install the Debian package "
                           "dataset-fashion-mnist, or pass the folder holding the four *-ubyte.gz files)")
    severities = sorted(set(int(s) for s in severities))
    if corruptions and (not severities or not set(severities) <= set(SEVERITIES)):
        raise PrepareError(f"severities must be a non-empty subset of {SEVERITIES}, got {severities}")
    data = {split: load_fashion_mnist(source_dir, split) for split in FASHION_MNIST_FILES}

    plans: dict[str, tuple[dict, str, np.ndarray, tuple | None]] = {}   # name -> (source, split, rows, corruption)

    def plan(name: str, split: str, rows: np.ndarray, corrupt_with: tuple | None = None, **info) -> None:
        source = {"kind": "fashion-mnist", "split": split, "files": data[split][2], "shard_size": shard_size, **info}
        plans[name] = ({**source, "recipe": recipe_digest(source)}, split, rows, corrupt_with)

    def shard_sources(split: str, rows: np.ndarray, corruption: tuple | None) -> list[Callable]:
        images, labels, _ = data[split]
        keys = idx_keys(split, rows, len(labels))
        return [partial(array_source, [keys[i] for i in c], images[rows[c]], labels[rows[c]], corruption)
                for c in chunks(np.arange(len(rows)), shard_size)]

    train_labels = data["train"][1]
    train_rows = (np.arange(len(train_labels)) if per_class is None
                  else select_per_class(train_labels, per_class, seed, FASHION_MNIST_CLASSES))
    plan("train", "train", train_rows, per_class=per_class, seed=seed if per_class else None)
    test_rows = np.arange(len(data["test"][1]))
    plan("test", "test", test_rows)
    for name in CORRUPTIONS if corruptions else ():
        for severity in severities:
            plan(f"corrupt/{name}-{severity}", "test", test_rows, (name, severity, corruption_seed),
                 corruption=name, severity=severity, seed=corruption_seed)

    result = {name: existing_split(out_dir, name, plans[name][0]["recipe"], force) for name in plans}
    todo = [name for name, manifest in result.items() if manifest is None]
    if todo:
        with Staging(out_dir) as staging:
            built = staging.build({name: shard_sources(*plans[name][1:]) for name in todo}, workers)
            manifests = {}
            for name in todo:
                shards, stats = built[name]
                title = "fashion-mnist/" + name + (f"-pc{per_class}-s{seed}" if name == "train" and per_class else "")
                manifests[name] = Manifest(shards, len(FASHION_MNIST_CLASSES), list(FASHION_MNIST_CLASSES), title,
                                           source={**plans[name][0], **stats.to_source()}, channels=stats.channels)
            staging.publish(manifests)
        result.update(manifests)
    return result


# ---------------------------------------------------------------------------------------------------------------
# ImageFolder

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm", ".pgm", ".pbm"}
KEPT_FORMATS = {"PNG": "png", "JPEG": "jpg", "WEBP": "webp"}   # stored byte for byte; anything else -> PNG
_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")


def list_image_folder(root: str) -> tuple[list[str], list[tuple[str, int]], int]:
    """(class names, [(relative path, class id)] in sorted order, number of ignored non-image files)."""
    if not os.path.isdir(root):
        raise PrepareError(f"image folder not found: {root}")
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise PrepareError(f"image folder {root} has no class subfolders (expected one subfolder per class)")
    files, ignored = [], 0
    for label, name in enumerate(classes):
        found = []
        for folder, dirs, names in os.walk(os.path.join(root, name)):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            for file in sorted(names):
                if file.startswith("."):
                    continue
                if os.path.splitext(file)[1].lower() in IMAGE_SUFFIXES:
                    found.append((os.path.relpath(os.path.join(folder, file), root), label))
                else:
                    ignored += 1
        if not found:
            raise PrepareError(f"class folder {os.path.join(root, name)} has no images "
                               f"(suffixes {sorted(IMAGE_SUFFIXES)})")
        files += sorted(found)
    return classes, files, ignored


def unique_keys(paths: Sequence[str]) -> list[str]:
    """Keys from relative paths without suffix: unsafe characters (dots, slashes, spaces) -> '_', then
    deduplicated with a numeric suffix, so ``cat/a.b.png`` and ``cat/a_b.png`` get distinct keys."""
    keys, used = [], set()
    for path in paths:
        base = _UNSAFE.sub("_", os.path.splitext(path)[0]).strip("_") or "sample"
        key, n = base, 1
        while key in used:
            key, n = f"{base}_{n}", n + 1
        used.add(key)
        keys.append(key)
    return keys


def folder_sample(path: str, key: str, label: int, stats: ImageStats) -> dict:
    """One image file -> sample: PNG/JPEG/WebP bytes kept as they are, other formats re-encoded as PNG."""
    with open(path, "rb") as f:
        data = f.read()
    try:
        image = Image.open(io.BytesIO(data))
        fmt = image.format
        image.load()
    except Exception as exc:   # PIL raises many types for unreadable files
        raise PrepareError(f"cannot decode image file {path}: {exc}") from None
    if fmt in KEPT_FORMATS:
        stored = {KEPT_FORMATS[fmt]: data}     # decoded later by the readers' one decode, like any shard image
    else:
        image = to_channels(image, mode_channels(image.mode))
        stored = {"png": encode_png(np.asarray(image))}
    stats.add(image.size, image.mode, next(iter(stored)))
    return {"__key__": key, **stored, "cls": str(label).encode()}


def folder_source(entries: list[tuple[str, str, int]], stats: ImageStats) -> Iterator[dict]:
    """Samples of one shard of an image folder: entries are (file path, key, label)."""
    for path, key, label in entries:
        yield folder_sample(path, key, label, stats)


def prepare_image_folder(root: str, out_dir: str, split_name: str, shard_size: int = 5000,
                         per_class: int | None = None, seed: int = 0, *, force: bool = False,
                         workers: int | None = None) -> Manifest:
    """ImageFolder tree (one subfolder per class, sorted names -> ids) -> ``<out>/<split_name>`` shards.

    Samples are shuffled by ``seed`` before sharding so every shard holds a class mix; ``per_class`` keeps N
    images per class (chosen by ``seed``).  JPEG, PNG and WebP files are stored byte for byte (no re-encoding
    loss); other formats are decoded and stored as PNG."""
    if not split_name or _UNSAFE.search(split_name):
        raise PrepareError(f"split name must be non-empty letters, digits, '_' or '-', got {split_name!r}")
    classes, files, ignored = list_image_folder(root)
    labels = np.array([label for _, label in files])
    rows = np.arange(len(files)) if per_class is None else select_per_class(labels, per_class, seed, classes)
    order = rows[np.random.default_rng([seed, 0x51]).permutation(len(rows))]
    keys = unique_keys([path for path, _ in files])
    entries = [(os.path.join(root, files[i][0]), keys[i], files[i][1]) for i in order]
    sources = [partial(folder_source, [entries[i] for i in c]) for c in chunks(np.arange(len(entries)), shard_size)]

    listing = hashlib.sha256()
    for path, label in files:
        stat = os.stat(os.path.join(root, path))
        listing.update(f"{path}\x1f{label}\x1f{stat.st_size}\x1f{stat.st_mtime_ns}\n".encode())
    digest = recipe_digest({"kind": "image-folder", "listing": listing.hexdigest(), "classes": classes,
                            "per_class": per_class, "seed": seed, "shard_size": shard_size})
    existing = existing_split(out_dir, split_name, digest, force)
    if existing is not None:
        return existing
    with Staging(out_dir) as staging:
        shards, stats = staging.build({split_name: sources}, workers)[split_name]
        source = {"kind": "image-folder", "root": os.path.abspath(root), "split": split_name,
                  "per_class": per_class, "seed": seed, "shard_size": shard_size, "ignored_files": ignored,
                  **stats.to_source(), "recipe": digest}
        manifest = Manifest(shards, len(classes), classes, f"{os.path.basename(os.path.abspath(root))}/{split_name}",
                            source=source, channels=stats.channels)
        staging.publish({split_name: manifest})
    return manifest


# ---------------------------------------------------------------------------------------------------------------
# Existing shards

def expand_urls(urls_or_glob: str | Sequence[str]) -> list[str]:
    """Shard URLs from URLs, globs (``*?[``) and webdataset brace ranges (``shard-{000..009}.tar``), in order."""
    from braceexpand import braceexpand
    patterns = [urls_or_glob] if isinstance(urls_or_glob, str) else list(urls_or_glob)
    urls: list[str] = []
    for pattern in patterns:
        for url in braceexpand(pattern):
            if is_pipe(url):                     # a command: braces expanded as webdataset does, never globbed
                urls.append(url)
            elif any(c in url for c in "*?["):
                fs, path = fsspec.core.url_to_fs(url)
                matches = sorted(fs.glob(path))
                if not matches:
                    raise PrepareError(f"no shards match {url!r}")
                urls += [m if is_local(url) else fs.unstrip_protocol(m) for m in matches]
            else:
                urls.append(os.path.abspath(local_path(url)) if is_local(url) else url)
    duplicates = sorted({u for u in urls if urls.count(u) > 1})
    if duplicates:
        raise PrepareError(f"shard(s) listed more than once: {duplicates[:3]}")
    if not urls:
        raise PrepareError("no shards given")
    return urls


def relative_url(url: str, manifest_path: str) -> str:
    """``url`` relative to the manifest's folder when the shard lives under it, else unchanged (absolute)."""
    if is_pipe(url):
        return url
    if is_local(url) and is_local(manifest_path):
        url, folder = os.path.abspath(local_path(url)), os.path.dirname(os.path.abspath(local_path(manifest_path)))
        return os.path.relpath(url, folder) if url.startswith(folder + os.sep) else url
    folder = posixpath.dirname(manifest_path)
    return url[len(folder) + 1:] if url.startswith(folder + "/") else url


def check_sample(sample: dict, url: str, num_classes: int | None) -> tuple[int, Image.Image, str]:
    """(label, decoded image in its own mode, image field) of one sample, or ShardError naming shard and key."""
    key = sample["__key__"]
    fields = [f for f in sample if not f.startswith("__")]
    ext = next((e for e in IMAGE_EXTS if e in sample), None)
    if ext is None:
        dotted = [f for f in fields if "." in f]
        if dotted:
            raise ShardError(f"sample key {key + '.' + dotted[0].rsplit('.', 1)[0]!r} in shard {url} contains a "
                             "dot: webdataset cuts keys at the first dot, so its fields become "
                             f"{sorted(dotted)} of key {key!r}")
        raise ShardError(f"sample {key!r} in shard {url} has no image field (one of {IMAGE_EXTS}); "
                         f"fields: {sorted(fields)}")
    check_key(key, f"shard {url}")
    label = read_label(sample, url)
    if label < 0 or (num_classes is not None and label >= num_classes):
        limit = f"0..{num_classes - 1}" if num_classes is not None else "a non-negative class id"
        raise ShardError(f"sample {key!r} in shard {url} has cls={label}, outside {limit}")
    image = open_image(sample[ext], url, key)
    decode_image(sample[ext], url, key)        # the readers' conversion works for this mode (raises if not)
    return label, image, ext


def scan_shards(urls_or_glob: str | Sequence[str], out_manifest: str | None = None, num_classes: int | None = None,
                class_names: Sequence[str] | None = None, skip_bad: bool = False, *, name: str | None = None,
                force: bool = False, channels: int | None = None) -> Manifest:
    """Validate existing shards sample by sample and write a manifest for them (shards are only read).

    A bad sample raises ShardError naming shard and key; with ``skip_bad`` it goes to ``manifest.skipped``
    instead (and out of the shard's count; the reader skips it).  Unreadable shards and duplicate keys always
    raise.  ``num_classes`` defaults to ``len(class_names)``, else max cls + 1.  The manifest goes to
    ``out_manifest`` (default: ``manifest.json`` beside the first shard).  ``channels`` (1 or 3) is what every image
    will be decoded to; default 1 if every image is grey (L, LA, 16-bit grey), else 3 (RGB, RGBA, P, CMYK, ...)."""
    if channels not in (None, 1, 3):
        raise PrepareError(f"channels must be 1 or 3, got {channels}")
    urls = expand_urls(urls_or_glob)
    if class_names is not None:
        class_names = list(class_names)
        if num_classes is None:
            num_classes = len(class_names)
        if len(class_names) != num_classes:
            raise PrepareError(f"{len(class_names)} class names given for num_classes={num_classes}")
    if num_classes is not None and num_classes <= 0:
        raise PrepareError(f"num_classes must be positive, got {num_classes}")
    out_manifest = out_manifest or posixpath.join(posixpath.dirname(urls[0]), "manifest.json")
    stored = [relative_url(url, out_manifest) for url in urls]
    digest = recipe_digest({"kind": "scan", "shards": stored, "num_classes": num_classes,
                            "class_names": class_names, "skip_bad": skip_bad,
                            **({"channels": channels} if channels else {})})
    if fsspec.core.url_to_fs(out_manifest)[0].exists(out_manifest):
        existing, problem = reusable_manifest(out_manifest, digest)
        if existing is not None:
            return existing
        if not force:
            raise PrepareError(f"{problem}; refusing to overwrite without force=True (--force)")

    counts, skipped, seen = [], [], {}
    max_label, stats = -1, ImageStats()
    progress = tqdm(desc="scan", unit="img", disable=None, mininterval=1.0)
    for url, shard_url in zip(urls, stored):
        count = 0
        for sample in iter_shard(url):
            key = sample["__key__"]
            if key in seen:
                raise ShardError(f"duplicate key {key!r}: in shard {seen[key]} and shard {url} (keys must be unique)")
            seen[key] = url
            progress.update()
            try:
                label, image, ext = check_sample(sample, url, num_classes)
            except ShardError as exc:
                if not skip_bad:
                    raise
                skipped.append({"shard": shard_url, "key": key, "reason": str(exc)})
                continue
            count += 1
            max_label = max(max_label, label)
            stats.add(image.size, image.mode, ext)
        counts.append(count)
        if count == 0:
            log.warning("shard %s has no valid samples", url)
    progress.close()
    if not sum(counts):
        raise ShardError(f"no valid samples in {len(urls)} shard(s) starting with {urls[0]}")
    num_classes = num_classes if num_classes is not None else max_label + 1
    class_names = class_names or [str(i) for i in range(num_classes)]
    digests = [stream_digest(url) for url in urls]          # (sha256, bytes), also for pipe: shards
    shards = [ShardInfo(s, n, sha, size=size) for s, n, (sha, size) in zip(stored, counts, digests)]
    source = {"kind": "scan", **stats.to_source(), "skip_bad": skip_bad, "recipe": digest}
    if skipped:
        log.warning("skipped %d bad sample(s), e.g. %s", len(skipped), skipped[0]["reason"])
    manifest = Manifest(shards, num_classes, class_names, name or posixpath.basename(out_manifest).rsplit(".", 1)[0],
                        skipped=skipped, source=source, channels=channels or stats.channels)
    manifest.save(out_manifest)
    return manifest
