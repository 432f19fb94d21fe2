"""Model loading: timm names, the project's own zoo, TorchScript, torch.export, state dicts, pickles.

Every failure is an `MpdeployError` naming the fix. Full pickles (arbitrary code) load only with
`trust_pickle=True`; everything else goes through `torch.load(weights_only=True)` or safetensors.
"""

from __future__ import annotations

import argparse
import logging
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mpdeploy.errors import MpdeployError

logger = logging.getLogger(__name__)

STATE_DICT_KEYS = ("state_dict", "model", "model_state_dict", "module", "ema", "state_dict_ema")


@dataclass(frozen=True)
class ModelSpec:
    """What to load. `source` is `timm:NAME`, `zoo:NAME`, or a file path."""

    source: str
    arch: str | None = None
    checkpoint: Path | None = None
    input_shape: tuple[int, ...] | None = None  # (C, H, W), without batch
    num_classes: int | None = None
    weights: str = "auto"  # for timm names: auto (pretrained if reachable) | pretrained | random
    trust_pickle: bool = False
    model_kwargs: tuple[tuple[str, Any], ...] = ()


@dataclass
class LoadedModel:
    module: nn.Module
    input_shape: tuple[int, ...]  # (C, H, W)
    name: str
    source: dict[str, Any] = field(default_factory=dict)  # enough to re-create the architecture
    data_config: dict[str, Any] = field(default_factory=dict)  # timm mean/std/interpolation

    @property
    def num_classes(self) -> int | None:
        return getattr(self.module, "num_classes", None)


def parse_input_shape(text: str | None) -> tuple[int, ...] | None:
    if text is None:
        return None
    try:
        dims = tuple(int(x) for x in str(text).replace("x", ",").split(",") if x.strip())
    except ValueError:
        raise MpdeployError(f"cannot parse --input-shape {text!r}: write C,H,W, e.g. 3,224,224") from None
    if len(dims) != 3 or min(dims) < 1:
        raise MpdeployError(f"--input-shape {text!r} must be three positive integers C,H,W, e.g. 3,224,224")
    return dims


def _timm():
    try:
        import timm
    except ImportError:
        raise MpdeployError("timm is not installed; run `pip install timm` (the README's setup does this)") from None
    return timm


def create_timm_model(name: str, weights: str = "random", **kwargs: Any) -> tuple[nn.Module, str]:
    """Create a timm model; returns (model, what weights it got)."""
    timm = _timm()
    if not timm.is_model(name):
        close = timm.list_models(f"*{name.split('.')[0][:12]}*")[:5]
        hint = f" (similar: {', '.join(close)})" if close else ""
        raise MpdeployError(f"unknown timm model {name!r}{hint}; see `timm.list_models()` for valid names")
    if weights not in ("auto", "pretrained", "random"):
        raise MpdeployError(f"--weights must be auto, pretrained or random, not {weights!r}")
    if weights == "auto" and not _hub_reachable():
        logger.warning("model hub unreachable; %s gets random init (pass --checkpoint FILE for real weights)", name)
        weights = "random"
    if weights in ("auto", "pretrained"):
        try:
            return timm.create_model(name, pretrained=True, **kwargs), "pretrained"
        except Exception as exc:  # no network, no weights for this tag, hub error
            if weights == "pretrained":
                raise MpdeployError(
                    f"cannot fetch pretrained weights for {name!r} ({type(exc).__name__}: {exc}); "
                    "pass --checkpoint FILE with local weights, or --weights random"
                ) from None
            logger.warning("pretrained weights for %s unreachable (%s); using random init", name, type(exc).__name__)
    return timm.create_model(name, pretrained=False, **kwargs), "random"


def _hub_reachable(timeout: float = 2.0) -> bool:
    """Cheap probe so `--weights auto` does not sit through the hub client's retries when offline."""
    import os
    import socket

    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", ""):
        return False
    try:
        with socket.create_connection(("huggingface.co", 443), timeout=timeout):
            return True
    except OSError:
        return False


def _timm_input_shape(model: nn.Module) -> tuple[tuple[int, ...] | None, dict[str, Any]]:
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    try:
        data_config = _timm().data.resolve_data_config({}, model=model)
    except Exception:
        data_config = {}
    shape = data_config.get("input_size") or cfg.get("input_size")
    # Models created with img_size / in_chans overrides report their real geometry here.
    patch = getattr(model, "patch_embed", None)
    if patch is not None and getattr(patch, "img_size", None) is not None:
        in_chans = patch.proj.in_channels if hasattr(patch, "proj") else (shape[0] if shape else 3)
        shape = (in_chans, *tuple(patch.img_size))
    return (tuple(int(x) for x in shape) if shape else None), dict(data_config)


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise MpdeployError("reading .safetensors needs the safetensors package: pip install safetensors") from None
        try:
            return load_file(str(path))
        except Exception as exc:
            raise MpdeployError(f"{path} is not a readable safetensors file ({exc}); check the file is complete") from None
    obj = _torch_load_safe(path)
    return _extract_state_dict(obj, path)


def _torch_load_safe(path: Path) -> Any:
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        text = str(exc)
        if "weights_only" in text or "Unsupported global" in text or "WeightsUnpickler" in text:
            raise _PickleNeedsTrust(str(exc)) from None
        raise MpdeployError(
            f"{path} could not be read as a PyTorch file ({type(exc).__name__}: {text.splitlines()[0][:160]}); "
            "it may be truncated or corrupt: re-save it"
        ) from None


class _PickleNeedsTrust(Exception):
    pass


def _extract_state_dict(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(obj, dict):
        for key in STATE_DICT_KEYS:
            if key in obj and isinstance(obj[key], dict):
                obj = obj[key]
                break
        tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
        if tensors:
            # DataParallel / DDP checkpoints prefix every key with "module.".
            if all(k.startswith("module.") for k in tensors):
                tensors = {k[len("module."):]: v for k, v in tensors.items()}
            return tensors
    raise MpdeployError(f"{path} holds no state_dict (found {type(obj).__name__}); save `model.state_dict()`")


def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as zf:
        names = zf.namelist()
    return any(n.endswith("constants.pkl") for n in names) and any("/code/" in n for n in names)


def _is_exported_program(path: Path) -> bool:
    if path.suffix == ".pt2":
        return True
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as zf:
        return any(n.endswith("serialized_exported_program.json") or "/models/" in n and n.endswith(".json") for n in zf.namelist())


def _load_state_into_arch(state: dict[str, torch.Tensor], spec: ModelSpec, path: Path) -> tuple[nn.Module, dict]:
    if not spec.arch:
        raise MpdeployError(f"{path} is a state_dict; pass --arch NAME (a timm model name) so it can be built")
    kwargs = dict(spec.model_kwargs)
    if spec.num_classes is not None:
        kwargs["num_classes"] = spec.num_classes
    arch = spec.arch.removeprefix("timm:")
    if arch.startswith("zoo:"):
        from mpdeploy.zoo import create_zoo_model

        model = create_zoo_model(arch.removeprefix("zoo:"), trained=False)
        source = {"kind": "zoo", "name": arch.removeprefix("zoo:")}
    else:
        model, _ = create_timm_model(arch, weights="random", **kwargs)
        source = {"kind": "timm", "name": arch, "kwargs": kwargs}
    load_weights_strict(model, state, where=str(path), arch=spec.arch)
    return model, source


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


def load_model(spec: ModelSpec) -> LoadedModel:
    """Load a model for pruning/export. The returned module is in eval mode on CPU."""
    source = spec.source
    if source.startswith("timm:"):
        loaded = _load_timm(spec)
    elif source.startswith("zoo:"):
        from mpdeploy.zoo import load_zoo_model

        loaded = load_zoo_model(source.removeprefix("zoo:"))
    else:
        loaded = _load_file(spec)
    if spec.input_shape is not None:
        loaded.input_shape = tuple(spec.input_shape)
    if loaded.source.get("kind") != "exported_program":
        # torch.export programs keep the mode they were exported in and refuse .eval().
        loaded.module.eval()
    return loaded


def _load_timm(spec: ModelSpec) -> LoadedModel:
    name = spec.source.removeprefix("timm:")
    kwargs = dict(spec.model_kwargs)
    if spec.num_classes is not None:
        kwargs["num_classes"] = spec.num_classes
    weights = "random" if spec.checkpoint else spec.weights
    model, got = create_timm_model(name, weights=weights, **kwargs)
    if spec.checkpoint:
        path = _existing_file(spec.checkpoint)
        try:
            state = _read_state_dict(path)
        except _PickleNeedsTrust:
            raise MpdeployError(
                f"{path} is a full pickle, not plain weights; re-save it as a state_dict or safetensors, "
                "or pass --trust-pickle if you trust its author (it can run code)"
            ) from None
        load_weights_strict(model, state, where=str(path), arch=name)
        got = f"checkpoint:{path.name}"
    shape, data_config = _timm_input_shape(model)
    if shape is None and spec.input_shape is None:
        raise MpdeployError(f"cannot tell the input shape of {name}; pass --input-shape C,H,W")
    return LoadedModel(
        module=model,
        input_shape=shape or spec.input_shape,
        name=name.replace("/", "_"),
        source={"kind": "timm", "name": name, "kwargs": kwargs, "weights": got},
        data_config=data_config,
    )


def _existing_file(path: Path | str) -> Path:
    path = Path(path)
    if not path.exists():
        raise MpdeployError(f"model file not found: {path}; check the path")
    if not path.is_file():
        raise MpdeployError(f"{path} is a directory, not a model file")
    if path.stat().st_size == 0:
        raise MpdeployError(f"{path} is empty; re-save the model")
    return path


def _load_file(spec: ModelSpec) -> LoadedModel:
    path = _existing_file(spec.source)
    name = path.stem
    if path.suffix == ".safetensors":
        model, source = _load_state_into_arch(_read_state_dict(path), spec, path)
        return _finish_file_model(model, spec, name, source)
    if _is_torchscript(path):
        try:
            model = torch.jit.load(str(path), map_location="cpu")
        except Exception as exc:
            raise MpdeployError(f"{path} looks like TorchScript but failed to load ({exc}); re-save it") from None
        return _finish_file_model(model, spec, name, {"kind": "torchscript", "path": str(path.resolve())})
    if _is_exported_program(path):
        try:
            program = torch.export.load(str(path))
        except Exception as exc:
            raise MpdeployError(f"{path} looks like a torch.export program but failed to load ({exc}); re-save it") from None
        module = program.module()
        shape = spec.input_shape
        example = getattr(program, "example_inputs", None)
        if shape is None and example:
            args = example[0] if isinstance(example, tuple) else ()
            if args and isinstance(args[0], torch.Tensor):
                shape = tuple(args[0].shape[1:])
        return _finish_file_model(module, spec, name, {"kind": "exported_program", "path": str(path.resolve())}, shape)
    if not zipfile.is_zipfile(path) and path.suffix not in (".pt", ".pth", ".bin", ".ckpt"):
        raise MpdeployError(
            f"{path}: unknown model format; pass a .pt/.pth (state_dict, TorchScript or pickle), .pt2 or .safetensors"
        )
    try:
        state = _read_state_dict(path)
    except _PickleNeedsTrust:
        if not spec.trust_pickle:
            raise MpdeployError(
                f"{path} is a full pickle that can run arbitrary code when loaded; pass --trust-pickle only if "
                "you trust its author, or re-save it as a state_dict / TorchScript / safetensors"
            ) from None
        logger.warning("unpickling %s with --trust-pickle: this runs code from the file", path)
        try:
            obj = torch.load(str(path), map_location="cpu", weights_only=False)
        except Exception as exc:
            raise MpdeployError(f"{path} failed to unpickle ({type(exc).__name__}: {exc}); is its code importable?") from None
        if isinstance(obj, nn.Module):
            return _finish_file_model(obj, spec, name, {"kind": "pickle", "path": str(path.resolve())})
        state = _extract_state_dict(obj, path)
    model, source = _load_state_into_arch(state, spec, path)
    return _finish_file_model(model, spec, name, source)


def _finish_file_model(model, spec, name, source, shape=None) -> LoadedModel:
    data_config: dict[str, Any] = {}
    if shape is None and source.get("kind") in ("timm", "zoo"):
        shape, data_config = _timm_input_shape(model)
    shape = spec.input_shape or shape
    if shape is None:
        raise MpdeployError(f"cannot tell the input shape of {name}; pass --input-shape C,H,W (e.g. 3,224,224)")
    return LoadedModel(module=model, input_shape=tuple(shape), name=name, source=source, data_config=data_config)


def add_model_arguments(parser: argparse.ArgumentParser, required: bool = True) -> None:
    """The model-loading flags shared by analyze / prune / build."""
    nargs = None if required else "?"
    parser.add_argument(
        "model", nargs=nargs, default=None,
        help="timm:NAME, zoo:NAME, or a model file (.pt/.pth/.pt2/.safetensors)",
    )
    group = parser.add_argument_group("model loading")
    group.add_argument("--arch", help="timm architecture for a state_dict / safetensors file")
    group.add_argument("--checkpoint", type=Path, help="local weights for a timm: model (.safetensors or .pth)")
    group.add_argument("--input-shape", help="input C,H,W when the model cannot tell (e.g. 3,224,224)")
    group.add_argument("--num-classes", type=int, help="classifier size for --arch / timm models")
    group.add_argument("--weights", default="auto", choices=["auto", "pretrained", "random"],
                       help="timm weights: auto = pretrained when reachable, else random init (default: auto)")
    group.add_argument("--trust-pickle", action="store_true",
                       help="allow loading a fully pickled module (runs code from the file)")


def spec_from_args(args: argparse.Namespace, default: str | None = None) -> ModelSpec:
    source = args.model or default
    if source is None:
        raise MpdeployError("no model given; pass timm:NAME, zoo:NAME or a model file")
    return ModelSpec(
        source=source,
        arch=args.arch,
        checkpoint=args.checkpoint,
        input_shape=parse_input_shape(args.input_shape),
        num_classes=args.num_classes,
        weights=args.weights,
        trust_pickle=args.trust_pickle,
    )


def load_model_from_args(args: argparse.Namespace, default: str | None = None) -> LoadedModel:
    return load_model(spec_from_args(args, default))


def recreate_architecture(source: dict[str, Any]) -> nn.Module:
    """Build the (untrained) architecture a pruned artifact was made from, to load its weights into."""
    kind = source.get("kind")
    if kind == "timm":
        model, _ = create_timm_model(source["name"], weights="random", **source.get("kwargs", {}))
        return model
    if kind == "zoo":
        from mpdeploy.zoo import create_zoo_model

        return create_zoo_model(source["name"], trained=False)
    raise MpdeployError(
        f"artifacts from a {kind!r} model cannot be rebuilt from weights alone; load it from a timm name, "
        "zoo name, or a state_dict with --arch"
    )
