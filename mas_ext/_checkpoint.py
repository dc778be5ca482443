"""Checkpoints of a MAS object: the validation of a state_dict before anything is loaded, and an atomic
file write."""
import collections
import json
import os

import torch

KEYS = {"config", "importance", "star", "task_importance", "num_samples", "num_tasks"}
CONFIG_KEYS = {"lam", "mode", "per_sample", "merge", "alpha"}
_SECTIONS = ("importance", "star", "task_importance")  # the tensor sections, {name: tensor} each


IncompatibleKeys = collections.namedtuple("IncompatibleKeys", ["missing_keys", "unexpected_keys"])


def validate(state_dict, params, strict=True):
    """Raises a ValueError listing every problem of ``state_dict`` against the tracked ``params``
    ({name: parameter}): missing or unexpected keys and names (``strict``), wrong shapes, non-finite values, an
    invalid config. Returns the :data:`IncompatibleKeys` (the names of ``params`` it lacks, the names it has that
    ``params`` lack) when it can be loaded whole."""
    if not isinstance(state_dict, dict) or set(state_dict) != KEYS:
        got = sorted(state_dict) if isinstance(state_dict, dict) else type(state_dict).__name__
        raise ValueError(f"not a mas_ext state_dict: expected keys {sorted(KEYS)}, got {got}")
    problems = _config_problems(state_dict["config"])
    for k in ("num_samples", "num_tasks"):
        v = state_dict[k]
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            problems.append(f"{k}: expected a non-negative int, got {v!r}")
    names = set()
    for section in _SECTIONS:
        problems += _section_problems(section, state_dict[section], params, strict)
        if isinstance(state_dict[section], dict):
            names |= set(state_dict[section])
    if (isinstance(state_dict["importance"], dict) and isinstance(state_dict["star"], dict)
            and set(state_dict["importance"]) != set(state_dict["star"])):
        problems.append("importance and star name different parameters")
    if problems:
        names_only = all(" missing " in p or " unexpected " in p for p in problems)
        raise ValueError("cannot load the MAS state_dict (nothing was loaded): " + "; ".join(problems) + (
            " (a model that gained or lost parameters since: load_state_dict(..., strict=False) loads the names "
            "both have)" if names_only else ""))
    return IncompatibleKeys(sorted(set(params) - names), sorted(names - set(params)))


def _config_problems(cfg):
    if not isinstance(cfg, dict) or set(cfg) != CONFIG_KEYS:
        got = sorted(cfg) if isinstance(cfg, dict) else type(cfg).__name__
        return [f"config: expected keys {sorted(CONFIG_KEYS)}, got {got}"]
    problems = []
    if cfg["mode"] not in ("global", "local"):
        problems.append(f"config.mode: {cfg['mode']!r} is not 'global' or 'local'")
    if cfg["merge"] not in ("sum", "ema"):
        problems.append(f"config.merge: {cfg['merge']!r} is not 'sum' or 'ema'")
    if not isinstance(cfg["per_sample"], bool):
        problems.append(f"config.per_sample: {cfg['per_sample']!r} is not a bool")
    for k in ("lam", "alpha"):
        v = cfg[k] if isinstance(cfg[k], (int, float)) and not isinstance(cfg[k], bool) else float("nan")
        if not abs(v) < float("inf") or v < 0 or (k == "alpha" and v > 1.0):
            problems.append(f"config.{k}: invalid value {cfg[k]!r}")
    return problems


def _section_problems(section, entries, params, strict=True):
    if not isinstance(entries, dict):
        return [f"{section}: expected a dict of tensors, got {type(entries).__name__}"]
    problems = []
    want = set(params) if section == "task_importance" or entries else set()
    missing, unexpected = sorted(want - set(entries)), sorted(set(entries) - set(params))
    if missing and strict:
        problems.append(f"{section}: missing {missing}")
    if unexpected and strict:
        problems.append(f"{section}: unexpected {unexpected}")
    for g, t in entries.items():
        if not torch.is_tensor(t):
            problems.append(f"{section}.{g}: not a tensor ({type(t).__name__})")
        elif g in params and tuple(t.shape) != tuple(params[g].shape):
            problems.append(f"{section}.{g}: shape {tuple(t.shape)} != {tuple(params[g].shape)}")
        elif not torch.isfinite(t).all():
            problems.append(f"{section}.{g}: non-finite values")
    return problems



def write(state_dict, path):
    """Saves ``state_dict`` to ``path`` atomically (a temporary file, fsync, then rename): a crash mid-save
    leaves the previous file whole. A path ending in ``.safetensors`` gets a safetensors file (the tensors
    as ``<section>/<name>``, config and counts as JSON metadata), anything else ``torch.save``'s format."""
    path = os.fspath(path)
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            if path.endswith(".safetensors"):
                f.write(_safetensors_bytes(state_dict, path))
            else:
                torch.save(state_dict, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def read(path):
    """A state_dict written by :func:`write`, its tensors on the CPU (weights only: no pickled code runs).
    A file that cannot be read whole (truncated, not a mas_ext file) raises a ValueError naming it."""
    path = os.fspath(path)
    if not path.endswith(".safetensors"):
        return torch.load(path, map_location="cpu", weights_only=True)
    _require_safetensors(path)
    from safetensors import SafetensorError
    from safetensors.torch import load

    with open(path, "rb") as f:
        data = f.read()
    try:
        tensors = load(data)
        meta = json.loads(_safetensors_metadata(data).get("mas_ext", "null"))
    except (SafetensorError, ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not a readable safetensors file ({e}); nothing was loaded") from e
    if not isinstance(meta, dict) or set(meta) != {"config", "num_samples", "num_tasks"}:
        raise ValueError(f"{path}: a safetensors file without mas_ext's metadata; nothing was loaded")
    state = {section: {} for section in _SECTIONS}
    for key, t in tensors.items():
        section, _, name = key.partition("/")
        if section not in state:
            raise ValueError(f"{path}: unexpected tensor {key!r}; nothing was loaded")
        state[section][name] = t
    return {**state, **meta}


def _require_safetensors(path):
    """An ImportError saying what to install where ``path`` asks for a safetensors file without the package."""
    try:
        import safetensors  # noqa: F401
    except ImportError as e:
        raise ImportError(f"{path}: a .safetensors file needs the safetensors package (pip install safetensors); "
                          "any other name writes torch.save's format") from e


def _safetensors_bytes(state_dict, path):
    _require_safetensors(path)
    from safetensors.torch import save

    tensors = {f"{section}/{name}": t.detach().cpu().contiguous()
               for section in _SECTIONS for name, t in state_dict[section].items()}
    meta = {k: state_dict[k] for k in ("config", "num_samples", "num_tasks")}
    return save(tensors, metadata={"mas_ext": json.dumps(meta)})


def _safetensors_metadata(data):
    """The ``__metadata__`` of a safetensors file's header (an 8-byte little-endian length, then JSON)."""
    if len(data) < 8:
        raise ValueError("shorter than a safetensors header")
    size = int.from_bytes(data[:8], "little")
    return json.loads(data[8:8 + size].decode("utf-8")).get("__metadata__") or {}
