"""The unit runner: rendered batches -> every teacher on the device -> one packed host copy per batch; a
writer thread assembles each finished unit (finiteness checked, naming teacher and sample key) and hands it to a
sink (a store write)."""
from __future__ import annotations

import collections
import concurrent.futures
import sys
from dataclasses import dataclass, field

import numpy as np
import torch

from cache_builder.streams import UnitStream, make_loader
from cache_builder.teachers import TeacherRunner, check_finite, unpack_features, unpack_topk
from shared.augment import ViewSpec
from shared.cache_schema import CacheAttrs, LogitCache
from shared.manifest import Manifest


@dataclass
class _Unit:
    view: int
    chunk: int
    nbatches: int
    parts: dict = field(default_factory=dict)   # batch -> (host tensors, event, params, digests, keys)


def _write(sink, unit: _Unit, names: list[str], topk: int, num_classes: int, dims: list[int] | None = None) -> None:
    """Assemble a finished unit and hand it to ``sink(view, chunk, params, outputs, digests)`` (a store write).
    ``dims``: the teachers' feature widths when the unit carries features (``TeacherRunner.outputs``)."""
    hosts, params, digests, keys = [], [], [], []
    for b in range(unit.nbatches):
        host, event, p, d, k = unit.parts[b]
        if event is not None:
            event.synchronize()
        hosts.append([h.numpy() for h in host])
        params.append(p.numpy())
        digests.append(d.numpy().view(np.uint32))
        keys.extend(k)
    packed, *features = (np.concatenate(column) for column in zip(*hosts))
    outputs = {}
    where = f"view {unit.view}, chunk {unit.chunk}"
    for i, name in enumerate(names):
        out = unpack_topk(packed, i, topk, num_classes)
        check_finite(out, name, keys, where)
        if features:
            codes, scale, ok = unpack_features(*features, i, dims)
            check_finite((out[0], ok), name, keys, where, what="features")
            out[0].features, out[0].feature_scale = codes, scale
        outputs[name] = out[0]
    sink(unit.view, unit.chunk, np.concatenate(params), outputs, np.concatenate(digests))


def write_whole_unit(cache: LogitCache):
    """The sink of a build: every array of the unit, then its ``done`` element."""
    return lambda view, chunk, params, outputs, digests: cache.write_unit(view, chunk, params, outputs,
                                                                         digests=digests)


def _run_units(sink, runner: TeacherRunner, manifest: Manifest, spec: ViewSpec, seed: int,
               attrs: CacheAttrs, groups, batch_size: int, workers: int, progress: bool) -> tuple[int, int]:
    """Run the teachers over the units of ``groups`` ([(chunk, [views])]) and give each finished unit to ``sink``."""
    if not groups:
        return 0, 0
    device = runner.device
    names = [t.name for t in runner.teachers]
    dims = [t.record.feature_dim for t in runner.teachers] if runner.features else None
    total = sum((min((c + 1) * attrs.chunk_rows, attrs.num_samples) - c * attrs.chunk_rows) * len(vs)
                for c, vs in groups)
    stream = UnitStream(manifest, spec, seed, attrs.chunk_rows, batch_size, groups)
    loader = make_loader(stream, min(workers, len(groups)), device)
    units: dict[tuple[int, int], _Unit] = {}
    futures: collections.deque = collections.deque()
    built_units = built_views = 0
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=total, desc="cache build", unit="view", unit_scale=True, dynamic_ncols=True,
                   file=sys.stderr, smoothing=0.05)
    cuda = device.type == "cuda"
    with concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="cache-writer") as writer:
        try:
            with torch.inference_mode():
                for item in loader:
                    views = item["images"].to(device, non_blocking=True)
                    outputs = runner.outputs(views)
                    event = None
                    if cuda:
                        host = tuple(torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in outputs)
                        for h, t in zip(host, outputs):
                            h.copy_(t, non_blocking=True)
                        event = torch.cuda.Event()
                        event.record()
                    else:
                        host = outputs
                    key = (item["view"], item["chunk"])
                    unit = units.setdefault(key, _Unit(item["view"], item["chunk"], item["nbatches"]))
                    unit.parts[item["batch"]] = (host, event, item["params"], item["digests"], item["keys"])
                    rows = len(item["keys"])
                    built_views += rows
                    if bar is not None:
                        bar.update(rows)
                    if len(unit.parts) == unit.nbatches:
                        del units[key]
                        futures.append(writer.submit(_write, sink, unit, names, attrs.topk, attrs.num_classes,
                                                     dims))
                        built_units += 1
                    while futures and (futures[0].done() or len(futures) > 8):
                        futures.popleft().result()      # re-raises a writer error (NaN, storage) here
            while futures:
                futures.popleft().result()
        except BaseException:
            for f in futures:
                f.cancel()
            raise
        finally:
            if bar is not None:
                bar.close()
    return built_units, built_views
