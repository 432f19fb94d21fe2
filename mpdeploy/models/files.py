"""Reading model files safely: format detection, the --trust-pickle gate, and re-opening a file later.

No code from a model file runs without `trust_pickle=True`, whatever its format:
- full pickles (`torch.save(model)`) run code by design;
- TorchScript (`torch.jit.load`) runs the file's own TorchScript code (methods, `__setstate__`);
- torch.export `.pt2` (`torch.export.load`) unpickles entries flagged `use_pickle`, opaque constants,
  and falls back to `torch.load(weights_only=False)` for example inputs and for its legacy format.
Plain weights (state dicts through `torch.load(weights_only=True)`, safetensors) need no trust.

A later stage rebuilds a pickle / TorchScript / `.pt2` model by re-opening the original file, after
checking it still has the recorded sha256, and only with --trust-pickle on its own command line
(`mpdeploy.core.trust`): what the prune manifest records about trust is information, not permission.
"""

from __future__ import annotations

import logging
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mpdeploy.core.artifacts import sha256_file
from mpdeploy.core.errors import MpdeployError
from mpdeploy.models import programs

logger = logging.getLogger(__name__)

CODE_FORMATS = ("pickle", "torchscript", "exported_program")
_WHY = {
    "pickle": "a full pickle runs code from the file when loaded",
    "torchscript": "TorchScript runs the file's own program (and its __setstate__ methods) when loaded",
    "exported_program": "torch.export.load unpickles parts of a .pt2 archive, which can run code from the file",
}


def require_trust(path: Path, kind: str, trust: bool) -> None:
    if not trust:
        raise MpdeployError(
            f"{path}: {_WHY[kind]}; pass --trust-pickle only if you trust its author, or save plain weights "
            "(model.state_dict() as .safetensors / .pth) and pass --arch"
        )


def _zip_names(path: Path) -> list[str]:
    try:
        with zipfile.ZipFile(path) as zf:
            return zf.namelist()
    except (zipfile.BadZipFile, OSError):
        return []


def detect_format(path: Path) -> str:
    """safetensors | torchscript | exported_program | torch (a torch.save file) | unknown."""
    if path.suffix == ".safetensors":
        return "safetensors"
    names = _zip_names(path) if zipfile.is_zipfile(path) else []
    if names:
        if any(n.endswith("constants.pkl") for n in names) and any("/code/" in n for n in names):
            return "torchscript"
        if any(n.endswith("serialized_exported_program.json") or ("/models/" in n and n.endswith(".json"))
               or n.endswith("archive_format") for n in names):
            return "exported_program"
        if any(n.endswith("data.pkl") for n in names):
            return "torch"
    if path.suffix == ".pt2":
        return "exported_program"
    with open(path, "rb") as f:
        head = f.read(2)
    # torch.save's legacy (non-zip) format is a pickle stream: protocol 2+ starts with 0x80.
    if head[:1] == b"\x80":
        return "torch"
    return "unknown"


def not_readable(path: Path, why: str = "") -> MpdeployError:
    detail = f" ({why})" if why else ""
    return MpdeployError(
        f"{path} is not a readable checkpoint{detail}; it may be truncated or corrupt: re-save it "
        "(torch.save(model.state_dict(), ...) or safetensors)"
    )


class PickleNeedsTrust(Exception):
    """torch.load(weights_only=True) met a pickled object that is not plain tensors."""


def torch_load_weights(path: Path) -> Any:
    """torch.load with weights_only=True; a file that needs full unpickling raises PickleNeedsTrust."""
    if detect_format(path) != "torch":
        raise not_readable(path, "neither a torch.save zip archive nor a pickle stream")
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        text = str(exc)
        if "Unsupported global" in text or "Unsupported operand" in text or "GLOBAL" in text:
            raise PickleNeedsTrust(text) from None
        raise not_readable(path, f"{type(exc).__name__}: {text.splitlines()[0][:120] if text else ''}") from None


def load_pickle_module(path: Path, trust: bool) -> Any:
    require_trust(path, "pickle", trust)
    logger.warning("unpickling %s with --trust-pickle: this runs code from the file", path)
    try:
        return torch.load(str(path), map_location="cpu", weights_only=False)
    except Exception as exc:
        raise MpdeployError(f"{path} failed to unpickle ({type(exc).__name__}: {exc}); is its code importable?") from None


def load_torchscript(path: Path, trust: bool) -> torch.jit.ScriptModule:
    require_trust(path, "torchscript", trust)
    try:
        return torch.jit.load(str(path), map_location="cpu")
    except Exception as exc:
        raise MpdeployError(f"{path} looks like TorchScript but failed to load ({type(exc).__name__}); re-save it") from None


def check_pt2_structure(path: Path) -> None:
    """Refuse a file that is not a complete .pt2 archive before asking anything about trust."""
    names = _zip_names(path) if zipfile.is_zipfile(path) else []
    if not any(n.endswith(".json") and "/models/" in n or n.endswith("serialized_exported_program.json")
               for n in names):
        raise not_readable(path, "not a complete torch.export .pt2 archive")
    try:
        with zipfile.ZipFile(path) as zf:
            bad = zf.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        raise not_readable(path, f"damaged zip archive: {exc}") from None
    if bad is not None:
        raise not_readable(path, f"damaged archive entry {bad}")


def load_exported(path: Path, trust: bool):
    require_trust(path, "exported_program", trust)
    if not zipfile.is_zipfile(path):
        raise not_readable(path, "not a .pt2 zip archive")
    try:
        with programs.torch_quiet():
            return torch.export.load(str(path))
    except Exception as exc:
        raise MpdeployError(
            f"{path} looks like a torch.export program but failed to load ({type(exc).__name__}); "
            "it may be truncated, or saved by another torch version: re-save it"
        ) from None


def example_input_shape(program) -> tuple[int, ...] | None:
    example = getattr(program, "example_inputs", None)
    if example:
        args = example[0] if isinstance(example, tuple) else ()
        if args and isinstance(args[0], torch.Tensor) and args[0].dim() == 4:
            return tuple(int(d) for d in args[0].shape[1:])
    return None


def _granted_for(path: Path, kind: str) -> bool:
    """Re-opening needs --trust-pickle on this command line: the manifest's `trust_pickle` (which anyone
    can write and re-hash) grants nothing."""
    from mpdeploy.core import trust

    if not trust.current().pickle:
        raise MpdeployError(
            f"the pruned manifest records model file {path} ({kind}, loaded with --trust-pickle at prune time; a "
            f"manifest grants no trust): {_WHY[kind]}; pass --trust-pickle to this command if you trust that file"
        )
    return True


def reopen(source: dict[str, Any]) -> nn.Module:
    """The model of a pickle / TorchScript / .pt2 source, re-opened under its recorded trust and hash."""
    kind = source["kind"]
    path = Path(source["path"])
    if not path.is_file():
        raise MpdeployError(
            f"the model file this artifact was pruned from is gone: {path}; put it back, or re-run prune"
        )
    if source.get("sha256") and sha256_file(path) != source["sha256"]:
        raise MpdeployError(
            f"{path} changed since it was pruned (sha256 differs from the manifest); re-run prune on the new file"
        )
    trust = _granted_for(path, kind)
    if kind == "pickle":
        obj = load_pickle_module(path, trust)
        if not isinstance(obj, nn.Module):
            raise MpdeployError(f"{path} no longer holds a module; re-run prune")
        return obj
    shape = tuple(source["input_shape"])
    if kind == "torchscript":
        return programs.torchscript_module(load_torchscript(path, trust), shape, str(path))
    return programs.program_module(load_exported(path, trust), shape, str(path))


def load_weights_strict(model: nn.Module, state: dict[str, torch.Tensor], where: str, arch: str) -> None:
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    mismatched = sorted(k for k in set(own) & set(state) if tuple(own[k].shape) != tuple(state[k].shape))
    if missing or unexpected or mismatched:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
        if mismatched:
            k = mismatched[0]
            parts.append(f"{len(mismatched)} with other shapes (e.g. {k}: {tuple(state[k].shape)} vs {tuple(own[k].shape)})")
        raise MpdeployError(
            f"weights in {where} do not fit architecture {arch!r}: {'; '.join(parts)}; "
            "pass the --arch (and --num-classes) the weights were trained with"
        )
    model.load_state_dict(state, strict=True)
