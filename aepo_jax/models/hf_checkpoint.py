"""Files of a Hugging Face model directory: config.json and (single or sharded) safetensors.

Model-agnostic: the model module maps tensor names to its parameters. Reading validates that every expected
tensor is present exactly once and nothing unexpected is there; writing is atomic (a temporary directory
beside the target, renamed into place), so a failed save never leaves a half-written directory.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Any, Collection, Iterator, Mapping

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

CONFIG = "config.json"
SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"


def read_config(path: str) -> dict[str, Any]:
    """The parsed config.json of an HF directory; errors name the file."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"checkpoint directory {path!r} does not exist")
    file = os.path.join(path, CONFIG)
    if not os.path.isfile(file):
        raise FileNotFoundError(f"{file}: missing (an HF checkpoint directory needs config.json)")
    try:
        with open(file) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{file}: not valid JSON ({e})") from None


def _shard_files(path: str) -> dict[str, list[str]]:
    """safetensors file -> tensor names in it, from the index (sharded) or the single file."""
    index = os.path.join(path, INDEX)
    if os.path.isfile(index):
        with open(index) as f:
            try:
                weight_map = json.load(f)["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise ValueError(f"{index}: expected JSON with a 'weight_map' object ({e!r})") from None
        files: dict[str, list[str]] = {}
        for name, file in weight_map.items():
            files.setdefault(file, []).append(name)
        return files
    single = os.path.join(path, SINGLE)
    if os.path.isfile(single):
        with safe_open(single, "numpy") as f:
            return {SINGLE: list(f.keys())}
    raise FileNotFoundError(f"{path}: no {SINGLE} and no {INDEX}")


def iter_tensors(path: str, expected: Collection[str]) -> Iterator[tuple[str, np.ndarray, str]]:
    """Yields (name, array, file) for every tensor of the directory, after checking the name set.

    Raises ValueError naming the file(s) when an expected tensor is missing or an unexpected one (for
    example a mixture-of-experts weight) is present.
    """
    files = _shard_files(path)
    found = {name: file for file, names in files.items() for name in names}
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    if missing:
        raise ValueError(f"{path}: missing tensors {missing[:8]}{' ...' if len(missing) > 8 else ''} "
                         f"(looked in {sorted(files)})")
    if unexpected:
        raise ValueError(f"{path}: unexpected tensors {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''} "
                         f"in {sorted({found[n] for n in unexpected})}; the config does not describe them")
    for file, names in files.items():
        full = os.path.join(path, file)
        if not os.path.isfile(full):
            raise FileNotFoundError(f"{full}: listed in {INDEX} but missing")
        with safe_open(full, "numpy") as f:
            for name in names:
                yield name, f.get_tensor(name), full


def _shards(tensors: Mapping[str, np.ndarray], max_shard_bytes: int) -> list[dict[str, np.ndarray]]:
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for name, array in tensors.items():
        if shards[-1] and size + array.nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = array
        size += array.nbytes
    return shards


def _ordinary_permissions(directory: str) -> None:
    """mkdtemp makes a 0700 directory (and some writers 0600 files): give the export the permissions a
    plain mkdir / open would (0777 / 0666 less the umask), so others can read it on a shared disk."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(directory, 0o777 & ~umask)
    for name in os.listdir(directory):
        os.chmod(os.path.join(directory, name), 0o666 & ~umask)


def write_directory(path: str, config: Mapping[str, Any], tensors: Mapping[str, np.ndarray], *,
                    overwrite: bool = False, max_shard_bytes: int = 5 * 2**30) -> None:
    """Writes config.json and safetensors (sharded with an index past max_shard_bytes) atomically."""
    path = os.path.abspath(os.fspath(path))
    if os.path.exists(path) and not os.path.isdir(path):
        raise FileExistsError(f"{path} exists and is not a directory")
    if os.path.isdir(path) and os.listdir(path) and not overwrite:
        raise FileExistsError(f"{path} exists and is not empty; pass overwrite=True to replace it")
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-", dir=parent)
    try:
        with open(os.path.join(tmp, CONFIG), "w") as f:
            json.dump(config, f, indent=2)
        shards = _shards(tensors, max_shard_bytes)
        if len(shards) == 1:
            save_file(shards[0], os.path.join(tmp, SINGLE), metadata={"format": "pt"})
        else:
            weight_map = {}
            for i, shard in enumerate(shards):
                file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                save_file(shard, os.path.join(tmp, file), metadata={"format": "pt"})
                weight_map.update({name: file for name in shard})
            total = sum(a.nbytes for a in tensors.values())
            with open(os.path.join(tmp, INDEX), "w") as f:
                json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
        _ordinary_permissions(tmp)
        if os.path.isdir(path):
            old = tempfile.mkdtemp(prefix=".old-", dir=parent)
            os.rename(path, os.path.join(old, "previous"))
            os.rename(tmp, path)
            shutil.rmtree(old)
        else:
            os.rename(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
