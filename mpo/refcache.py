"""Reference log-prob cache: computed once per pair, so training holds no reference model.

TRL 1.16 raises on ``precompute_ref_log_probs`` for vision data and ms-swift / LLaMA-Factory have no
equivalent. Here ``mpo precompute-ref --config X`` runs the reference model over every
pair of ``data.meta_path`` (and ``data.eval_meta_path``) once and writes, in ``model.ref_cache``::

    shard-00000-of-00002.safetensors   keys (N, 32) uint8 sha256 digests, chosen (N,), rejected (N,) float64
    shard-00001-of-00002.safetensors
    manifest.json                      format, model identity, data settings, shard list, counts
                                       (written last: a folder without it is an unfinished cache)

Each pair is keyed by a content hash (question/chosen/rejected text, the bytes of every image or
video, a video's ``clip``, the pair's tile budget), so a re-ordered, re-mixed or repeated data set still finds its
values. What the values also depend on but is the same for every pair (reference weights and
dtype, tokenizer, system message, max_length/truncation, tiling settings) lives in the manifest
and is compared at load time: any difference is refused with an error naming it.

What the cache cannot hold: values for pixels that change between epochs. Datasets with
``data_augment`` are refused, and so is training with ``data.video_sampling=rand`` (a random
frame count and random frames per sample and epoch) on data whose cache holds video pairs: the
cache stores the deterministic view only (``mpo precompute-ref`` reads every pair as evaluation
does: the most frames that fit, segment middles), which ``data.video_sampling=middle`` trains on.
Per-epoch entries were the alternative: they would tie a cache to one run's seed and epoch count
and cost a reference pass per video pair and epoch, which is what ``model.reference=copy`` does
anyway. The manifest counts the video pairs of each meta file, so the refusal comes before
training starts; a video pair met in training without such a count is refused when it is read.

Launch on several processes (``torchrun --nproc_per_node N -m mpo.cli precompute-ref ...``): rank
r computes pairs r, r+N, ... and writes its own shard; rank 0 writes the manifest after a barrier.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mpo.data.events import DataEvents, gather_events
from mpo.data.mmpr import DataError
from mpo.files import sha256_file

CACHE_FORMAT = 2  # 2: video frame budget and clip in the key; video pairs counted
MANIFEST_NAME = "manifest.json"
_SAMPLE_BYTES = 1 << 20  # bytes hashed at each of three places in a weight file
_START_CHECK = 64  # pairs looked up when a cache is opened, to fail before training starts


class RefCacheError(ValueError):
    """The reference cache is missing, unfinished, or does not match this model / data."""


# ---- identity of what the values depend on ----------------------------------------------------


def _weight_fingerprint(path: Path) -> str:
    """sha256 of a weight file's size, safetensors header and three 1 MiB samples.

    A full hash of a 26B checkpoint would take minutes at every start; a fine-tune changes every
    tensor, and the header pins names, shapes and dtypes, so header + samples tell checkpoints
    apart at a fixed cost.
    """
    size = path.stat().st_size
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        if path.suffix == ".safetensors" and size >= 8:
            (header_len,) = struct.unpack("<Q", f.read(8))
            h.update(f.read(min(header_len, size - 8)))
        for offset in (0, max(0, size // 2 - _SAMPLE_BYTES // 2), max(0, size - _SAMPLE_BYTES)):
            f.seek(offset)
            h.update(f.read(_SAMPLE_BYTES))
    return h.hexdigest()


def _local_model_dir(path: str) -> Path:
    p = Path(path)
    if p.is_dir():
        return p
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:  # a hub id: use the locally cached snapshot the training run would load
        return Path(snapshot_download(path, local_files_only=True))
    except (HFValidationError, LocalEntryNotFoundError) as exc:
        raise RefCacheError(
            f"reference model {path}: not a local folder and not in the hub cache ({exc})"
        ) from exc


def model_identity(path: str, torch_dtype: str) -> dict[str, Any]:
    """What identifies the reference model's numbers: config.json, weight files, dtype."""
    root = _local_model_dir(path)
    config = root / "config.json"
    if not config.is_file():
        raise RefCacheError(f"reference model {path}: no config.json")
    weights = sorted(p for p in root.iterdir() if p.suffix in (".safetensors", ".bin") and p.is_file())
    if not weights:
        raise RefCacheError(f"reference model {path}: no .safetensors or .bin weight files")
    return {
        "config_sha256": sha256_file(config),
        "weights": {
            p.name: {"bytes": p.stat().st_size, "fingerprint": _weight_fingerprint(p)} for p in weights
        },
        "torch_dtype": torch_dtype,
    }


def data_settings(pair_dataset) -> dict[str, Any]:
    """Settings shared by every pair of a ``PairDataset`` that change its tokens or pixels."""
    cfg = pair_dataset.cfg
    tokenizer = pair_dataset.encoder.template.tokenizer
    backend = getattr(tokenizer, "backend_tokenizer", None)
    tok_text = backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True)
    vision = pair_dataset.encoder.vision
    return {
        "template": pair_dataset.encoder.template.spec.name,
        "system_message": cfg.system_message,
        "max_length": cfg.max_length,
        "truncation": cfg.truncation,
        "max_dynamic_patch": cfg.max_dynamic_patch,
        "min_dynamic_patch": cfg.min_dynamic_patch,
        "use_thumbnail": cfg.use_thumbnail,
        # Not video_sampling: the cache always holds the deterministic frames (module docstring).
        "video_min_frames": cfg.video_min_frames,
        "video_max_frames": cfg.video_max_frames,
        "image_size": vision.image_size,
        "tokens_per_tile": vision.tokens_per_tile,
        "tokenizer_sha256": hashlib.sha256(tok_text.encode()).hexdigest(),
    }


def _media_digest(root: Path, value: Any, where: str, field: str, follow_symlinks: bool) -> str:
    """sha256 of one image or video as the encoder reads it: a file under ``root``, or the bytes a
    HF ``datasets`` Image column holds (the same digest as the file they came from)."""
    from mpo.data.pairs import media_source

    source = media_source(root, value, where, field, follow_symlinks)
    if isinstance(source, bytes):
        return hashlib.sha256(source).hexdigest()
    if not source.is_file():
        raise RefCacheError(f"{where}: field '{field}': file not found: {source}")
    return sha256_file(source)


def pair_key(pair_dataset, index: int) -> bytes:
    """sha256 digest (32 bytes) of pair ``index``: texts, media bytes and its tile budget."""
    from mpo.data.pairs import media_fields, tile_budget

    spec, line_no, obj = pair_dataset.source.get(index)
    where = f"{spec.annotation}:{line_no}"
    follow = pair_dataset.cfg.follow_symlinks_outside_root
    media = [[f, _media_digest(spec.root, value, where, f, follow)] for f, value in media_fields(obj, where)]
    record = {
        "question": obj.get("question"),
        "chosen": obj.get("chosen"),
        "rejected": obj.get("rejected"),
        "media": media,
        "tile_budget": tile_budget(spec, pair_dataset.cfg),
    }
    if obj.get("clip") is not None:  # which part of a video is sampled
        record["clip"] = obj["clip"]
    return hashlib.sha256(json.dumps(record, sort_keys=True, ensure_ascii=False).encode()).digest()


# ---- reading a cache ---------------------------------------------------------------------------


def _diff(kind: str, cached: dict, expected: dict) -> list[str]:
    out = []
    for key in sorted(set(cached) | set(expected)):
        if cached.get(key) != expected.get(key):
            out.append(f"{kind}.{key}: cache has {cached.get(key)!r}, this run has {expected.get(key)!r}")
    return out


class RefCache:
    """A finished cache folder: ``lookup(key) -> (ref_chosen_logps, ref_rejected_logps)``."""

    def __init__(self, folder: str | os.PathLike):
        from safetensors.numpy import load_file

        self.folder = Path(folder)
        path = self.folder / MANIFEST_NAME
        if not path.is_file():
            raise RefCacheError(
                f"{self.folder}: no {MANIFEST_NAME}; not a reference cache, or `mpo precompute-ref` did not finish"
            )
        self.manifest = json.loads(path.read_text())
        if self.manifest.get("format") != CACHE_FORMAT:
            raise RefCacheError(
                f"{path}: cache format {self.manifest.get('format')!r}, expected {CACHE_FORMAT}; recompute it"
            )
        self.values: dict[bytes, tuple[float, float]] = {}
        for name in self.manifest["shards"]:
            shard = self.folder / name
            if not shard.is_file():
                raise RefCacheError(f"{self.folder}: shard {name} listed in the manifest is missing")
            arrays = load_file(str(shard))
            for key, c, r in zip(arrays["keys"], arrays["chosen"].tolist(), arrays["rejected"].tolist()):
                self.values[key.tobytes()] = (c, r)
        if len(self.values) != self.manifest["num_unique_pairs"]:
            raise RefCacheError(
                f"{self.folder}: shards hold {len(self.values)} pairs, manifest says {self.manifest['num_unique_pairs']}"
            )

    def check(self, identity: dict[str, Any], settings: dict[str, Any]) -> None:
        """Refuse a cache made with another reference model or other data settings."""
        problems = _diff("model", self.manifest["model_identity"], identity)
        problems += _diff("data", self.manifest["data_settings"], settings)
        if problems:
            raise RefCacheError(
                f"reference cache {self.folder} does not match this run (rerun `mpo precompute-ref`):\n  - "
                + "\n  - ".join(problems)
            )

    def video_pairs(self, meta_path) -> int:
        """Video pairs the cache was computed from for ``meta_path`` (all its meta files' when it
        was computed from another path)."""
        counts = dict(zip(self.manifest.get("meta_paths", []), self.manifest.get("video_pairs", [])))
        return int(counts.get(str(meta_path), sum(counts.values())))

    def lookup(self, key: bytes, where: str = "") -> tuple[float, float]:
        try:
            return self.values[key]
        except KeyError:
            raise RefCacheError(
                f"{where or 'a pair'} is not in the reference cache {self.folder} (the data changed since "
                "`mpo precompute-ref`; rerun it)"
            ) from None


class RefCachedDataset(torch.utils.data.Dataset):
    """A ``PairDataset`` whose pairs also carry ``ref_chosen_logps`` / ``ref_rejected_logps``."""

    def __init__(self, pairs, cache: RefCache):
        self.pairs = pairs
        self.cache = cache

    def __len__(self) -> int:
        return len(self.pairs)

    @property
    def source(self):
        return self.pairs.source

    @property
    def meta_path(self) -> Path:
        return self.pairs.meta_path

    def __getitem__(self, index: int):
        pair, events = self.pairs[index]
        if pair is None:  # a skipped sample: the collator drops it
            return pair, events
        if pair.get("video", {}).get("sampling") == "rand":
            raise RefCacheError(
                random_frames_message(self.pairs.meta_path, f"{pair['dataset']} line {pair['line']}")
            )
        i = int(index) % len(self.pairs)  # the training sampler tags indices with the epoch
        spec, line_no, _ = self.pairs.source.get(i)
        c, r = self.cache.lookup(pair_key(self.pairs, i), f"{spec.annotation}:{line_no}")
        return {**pair, "ref_chosen_logps": c, "ref_rejected_logps": r}, events


def random_frames_message(meta_path, what: str) -> str:
    return (
        f"model.reference=cache with data.video_sampling=rand: {meta_path} has {what}, whose frames "
        "are drawn anew for every sample and epoch, while the cache holds the reference log-probs of "
        "the deterministic frames (the most that fit, segment middles); train with "
        "data.video_sampling=middle, or use model.reference=copy"
    )


def open_ref_cache(
    folder: str | os.PathLike, pair_dataset, ref_path: str, torch_dtype: str
) -> RefCachedDataset:
    """Open ``folder``, check it against the reference model and the data, wrap ``pair_dataset``.

    A sample of pairs is looked up now so a cache made for other data fails before training
    starts; every other pair is checked when it is loaded.
    """
    augmented = [s.name for s in pair_dataset.source.specs if s.data_augment]
    if augmented:
        raise RefCacheError(
            f"model.reference=cache: dataset(s) {augmented} in {pair_dataset.meta_path} set data_augment: true, "
            "so their pixels change every epoch and no cached reference log-prob fits them; use "
            "model.reference=copy, or set data_augment to false in the meta file"
        )
    cache = RefCache(folder)
    cache.check(model_identity(ref_path, torch_dtype), data_settings(pair_dataset))
    if pair_dataset.train and pair_dataset.cfg.video_sampling == "rand":
        videos = cache.video_pairs(pair_dataset.meta_path)
        if videos:
            raise RefCacheError(random_frames_message(pair_dataset.meta_path, f"{videos} video pair(s)"))
    n = len(pair_dataset)
    sample = np.linspace(0, n - 1, num=min(n, _START_CHECK), dtype=np.int64).tolist() if n else []
    missing = []
    for i in sample:
        try:
            spec, line_no, _ = pair_dataset.source.get(i)
            key = pair_key(pair_dataset, i)
        except (DataError, RefCacheError):
            if pair_dataset.cfg.on_bad_sample == "error":
                raise
            continue  # a bad record: the dataset skips it, so the cache never had it
        if key not in cache.values:
            missing.append(f"{spec.annotation}:{line_no}")
    # With on_bad_sample=skip a record may be unreadable only when encoded; a few misses are
    # left to the per-item check, a cache that has none of the sampled pairs is refused now.
    if missing and (pair_dataset.cfg.on_bad_sample == "error" or len(missing) == len(sample)):
        raise RefCacheError(
            f"{len(missing)} of {len(sample)} sampled pairs are not in the reference cache {cache.folder}, "
            f"e.g. {missing[0]} (the data changed since `mpo precompute-ref`; rerun it)"
        )
    return RefCachedDataset(pair_dataset, cache)


# ---- computing a cache -------------------------------------------------------------------------


class _Keyed(torch.utils.data.Dataset):
    """Pairs ``indices`` of a PairDataset, each item tagged with its content key."""

    def __init__(self, pairs, indices: list[int]):
        self.pairs, self.indices = pairs, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, k: int):
        pair, events = self.pairs[self.indices[k]]
        if pair is not None:
            pair = {**pair, "cache_key": pair_key(self.pairs, self.indices[k])}
        return pair, events


def shard_indices(pair_datasets: Iterable, rank: int, world: int) -> list[tuple[int, int]]:
    """(dataset number, index) of every pair, strided over ranks: rank r takes r, r+world, ..."""
    flat = [(d, i) for d, ds in enumerate(pair_datasets) for i in range(len(ds))]
    return flat[rank::world]


@torch.no_grad()
def compute_shard(
    model, pair_datasets: list, rank: int, world: int, batch_size: int, chunk_size: int, device
) -> tuple[dict[bytes, tuple[float, float]], DataEvents, list[int]]:
    """Reference log-probs of this rank's share of the pairs, keyed by content hash, the events
    (skips) of reading them, and how many of its pairs were video pairs, per dataset."""
    from mpo.data.collate import PairCollator
    from mpo.logprobs import batch_logps

    out: dict[bytes, tuple[float, float]] = {}
    skipped = DataEvents()
    videos = [0] * len(pair_datasets)
    todo = shard_indices(pair_datasets, rank, world)
    for d, ds in enumerate(pair_datasets):
        collator = PairCollator(ds.encoder.template.tokenizer.pad_token_id)
        indices = [i for dd, i in todo if dd == d]
        loader = torch.utils.data.DataLoader(
            _Keyed(ds, indices), batch_size=batch_size, collate_fn=lambda x: x
        )
        for items in loader:
            skipped.add(DataEvents.total(ev for _, ev in items))
            videos[d] += sum(1 for p, _ in items if p is not None and "video" in p)
            items = [(p, ev) for p, ev in items if p is not None and p["cache_key"] not in out]
            if not items:
                continue
            batch, _ = collator(items)
            batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
            chosen, rejected = batch_logps(model, batch, chunk_size).split()
            for (p, _), c, r in zip(items, chosen.double().tolist(), rejected.double().tolist()):
                out[p["cache_key"]] = (c, r)
    return out, skipped, videos


def shard_name(rank: int, world: int) -> str:
    return f"shard-{rank:05d}-of-{world:05d}.safetensors"


def write_shard(folder: Path, rank: int, world: int, values: dict[bytes, tuple[float, float]]) -> Path:
    from safetensors.numpy import save_file

    keys = sorted(values)
    arrays = {
        "keys": np.frombuffer(b"".join(keys), dtype=np.uint8).reshape(len(keys), 32).copy(),
        "chosen": np.array([values[k][0] for k in keys], dtype=np.float64),
        "rejected": np.array([values[k][1] for k in keys], dtype=np.float64),
    }
    path = folder / shard_name(rank, world)
    tmp = path.with_suffix(".tmp")
    save_file(arrays, str(tmp))
    os.replace(tmp, path)
    return path


def write_manifest(
    folder: Path, world: int, identity: dict, settings: dict, num_pairs: int, extra: dict | None = None
) -> Path:
    """Merge step (rank 0): count the shards' unique keys and write the manifest last."""
    from safetensors.numpy import load_file

    shards = [shard_name(r, world) for r in range(world)]
    keys: set[bytes] = set()
    for name in shards:
        if not (folder / name).is_file():
            raise RefCacheError(f"{folder}: shard {name} was not written (did a rank fail?)")
        keys.update(k.tobytes() for k in load_file(str(folder / name))["keys"])
    manifest = {
        "format": CACHE_FORMAT,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "model_identity": identity,
        "data_settings": settings,
        "shards": shards,
        "num_pairs": num_pairs,
        "num_unique_pairs": len(keys),
        **(extra or {}),
    }
    path = folder / MANIFEST_NAME
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(manifest, indent=1, ensure_ascii=False))
    os.replace(tmp, path)
    # Shards of a same-key value on two ranks hold identical numbers; duplicates are harmless.
    return path


def _clear(folder: Path) -> None:
    for p in [folder / MANIFEST_NAME, *folder.glob("shard-*-of-*.safetensors")]:
        p.unlink(missing_ok=True)


def precompute_ref(cfg, batch_size: int | None = None) -> Path:
    """Compute and write the reference cache for ``cfg`` (train + eval pairs); returns the folder."""
    import torch.distributed as dist

    from mpo.data.pairs import PairDataset
    from mpo.data.tiling import VisionSpec
    from mpo.model.loading import load_model, load_tokenizer

    if not cfg.model.ref_cache:
        raise RefCacheError("model.ref_cache is not set: the folder to write the cache into")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    folder = Path(cfg.model.ref_cache)
    if rank == 0:
        folder.mkdir(parents=True, exist_ok=True)
        _clear(folder)
    if world > 1:
        dist.barrier()

    ref_path = cfg.model.ref_path or cfg.model.path
    tokenizer = load_tokenizer(cfg.model.path)  # the training run's tokenizer makes the token ids
    model = load_model(ref_path, cfg.model.torch_dtype, cfg.model.attn_implementation).to(device).eval()
    vision = VisionSpec.from_config(model.config)
    datasets = [PairDataset(cfg.data.meta_path, tokenizer, vision, cfg.data)]
    if cfg.data.eval_meta_path:
        datasets.append(PairDataset(cfg.data.eval_meta_path, tokenizer, vision, cfg.data))
    bs = batch_size or int(cfg.training.get("per_device_eval_batch_size", 1))
    values, events, videos = compute_shard(
        model, datasets, rank, world, bs, cfg.model.logprob_chunk_size, device
    )
    write_shard(folder, rank, world, values)
    events = gather_events(events)  # collective; also a barrier: every shard is written
    if world > 1:
        parts: list[Any] = [None] * world
        dist.all_gather_object(parts, videos)
        videos = [sum(col) for col in zip(*parts)]
    if rank == 0:
        skipped = dict(events.skipped)
        write_manifest(
            folder,
            world,
            model_identity(ref_path, cfg.model.torch_dtype),
            data_settings(datasets[0]),
            sum(len(d) for d in datasets),
            {
                "ref_path": ref_path,
                "skipped": skipped,
                "meta_paths": [str(cfg.data.meta_path), str(cfg.data.eval_meta_path)],
                "video_pairs": videos,  # per meta path: training with random frames is refused
            },
        )
    if world > 1:
        dist.barrier()
    return folder
