"""Checkpoints of a MAS object: the validation of a state_dict before anything is loaded, and an atomic
file write."""
import os

import torch

KEYS = {"config", "importance", "star", "task_sum", "num_samples", "num_tasks"}
CONFIG_KEYS = {"lam", "mode", "per_sample", "merge", "alpha"}


def validate(state_dict, params):
    """Raises a ValueError listing every problem of ``state_dict`` against the tracked ``params``
    ({name: parameter}): missing or unexpected keys and names, wrong shapes, non-finite values, an invalid
    config. Returns nothing when it can be loaded whole."""
    if not isinstance(state_dict, dict) or set(state_dict) != KEYS:
        got = sorted(state_dict) if isinstance(state_dict, dict) else type(state_dict).__name__
        raise ValueError(f"not a mas_ext state_dict: expected keys {sorted(KEYS)}, got {got}")
    problems = _config_problems(state_dict["config"])
    for k in ("num_samples", "num_tasks"):
        v = state_dict[k]
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            problems.append(f"{k}: expected a non-negative int, got {v!r}")
    for section in ("importance", "star", "task_sum"):
        problems += _section_problems(section, state_dict[section], params)
    if (isinstance(state_dict["importance"], dict) and isinstance(state_dict["star"], dict)
            and set(state_dict["importance"]) != set(state_dict["star"])):
        problems.append("importance and star name different parameters")
    if problems:
        raise ValueError("cannot load the MAS state_dict (nothing was loaded): " + "; ".join(problems))


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
        if not abs(v) < float("inf") or (k == "alpha" and not 0.0 <= v <= 1.0):
            problems.append(f"config.{k}: invalid value {cfg[k]!r}")
    return problems


def _section_problems(section, entries, params):
    if not isinstance(entries, dict):
        return [f"{section}: expected a dict of tensors, got {type(entries).__name__}"]
    problems = []
    want = set(params) if section == "task_sum" or entries else set()
    missing, unexpected = sorted(want - set(entries)), sorted(set(entries) - set(params))
    if missing:
        problems.append(f"{section}: missing {missing}")
    if unexpected:
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
    """``torch.save`` to ``path`` atomically (a temporary file, fsync, then rename): a crash mid-save leaves
    the previous file whole."""
    path = os.fspath(path)
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            torch.save(state_dict, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def read(path):
    """A state_dict written by :func:`write`, its tensors on the CPU (weights only: no pickled code runs)."""
    return torch.load(path, map_location="cpu", weights_only=True)
