"""Model loading: timm names, the project's own zoo, TorchScript, torch.export, state dicts, pickles.

Every failure is an `MpdeployError` naming the fix. Full pickles (arbitrary code) load only with
`trust_pickle=True`; everything else goes through `torch.load(weights_only=True)` or safetensors.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mpdeploy.core.artifacts import sha256_file
from mpdeploy.core.errors import MpdeployError
from mpdeploy.models import files as model_files
from mpdeploy.models.files import load_weights_strict
from mpdeploy.models.spec import LoadedModel, ModelSpec, bounded_input_shape
from mpdeploy.models.timm_create import create_timm_model, timm_module

logger = logging.getLogger(__name__)

STATE_DICT_KEYS = ("state_dict", "model", "model_state_dict", "module", "ema", "state_dict_ema")




def _timm_input_shape(model: nn.Module) -> tuple[tuple[int, ...] | None, dict[str, Any]]:
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    try:
        data_config = timm_module().data.resolve_data_config({}, model=model)
    except Exception:
        data_config = {}
    shape = data_config.get("input_size") or cfg.get("input_size")
    # Models created with img_size / in_chans overrides report their real geometry here.
    patch = getattr(model, "patch_embed", None)
    if patch is not None and getattr(patch, "img_size", None) is not None:
        in_chans = patch.proj.in_channels if hasattr(patch, "proj") else (shape[0] if shape else 3)
        shape = (in_chans, *tuple(patch.img_size))
    if shape:
        # A model built with in_chans=N still reports its pretrained config's 3 channels.
        stem = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
        if stem is not None and stem.groups == 1 and stem.in_channels != shape[0]:
            shape = (stem.in_channels, *tuple(shape)[1:])
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
    return _extract_state_dict(model_files.torch_load_weights(path), path)


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


def _load_state_into_arch(state: dict[str, torch.Tensor], spec: ModelSpec, path: Path) -> tuple[nn.Module, dict]:
    if not spec.arch:
        raise MpdeployError(
            f"{path} is a state_dict; pass --arch NAME (a timm model name, or module:Class for your own "
            "nn.Module class) and --model-kwargs with the arguments it was built with"
        )
    kwargs = dict(spec.model_kwargs)
    if spec.num_classes is not None:
        kwargs["num_classes"] = spec.num_classes
    arch = spec.arch.removeprefix("timm:")
    if arch.startswith("zoo:"):
        source = {"kind": "zoo", "name": arch.removeprefix("zoo:")}
    elif ":" in arch:
        source = {"kind": "python", "name": arch, "kwargs": kwargs}
    else:
        source = {"kind": "timm", "name": arch, "kwargs": kwargs}
    # Named on this command line: no manifest in between, so no grant to ask for.
    model = create_python_model(arch, kwargs) if source["kind"] == "python" else recreate_architecture(source)
    load_weights_strict(model, state, where=str(path), arch=spec.arch)
    return model, source


def create_python_model(target: str, kwargs: dict[str, Any], recorded_in: str | None = None) -> nn.Module:
    """`--arch package.module:Class`: the user's own nn.Module class, importable from their PYTHONPATH.

    `recorded_in` names the manifest the name came from: then importing needs --allow-import / --trust-pickle
    on this command line (a manifest grants nothing). The attribute must be an nn.Module subclass before
    anything is called."""
    import importlib

    from mpdeploy.core import trust

    if recorded_in is not None and not trust.current().allows_import(target):
        raise MpdeployError(
            f"{recorded_in} records --arch {target!r} (recorded at prune time; a manifest grants no trust): "
            f"importing it runs that module's code; pass --allow-import {target} (or --trust-pickle) to this "
            "command if you trust it"
        )
    module_name, _, attr = target.partition(":")
    if not module_name.strip() or not attr.strip():
        raise MpdeployError(f"--arch {target!r} must be module:Class, e.g. my_models:Net (module on PYTHONPATH)")
    try:
        cls = importlib.import_module(module_name)
        for part in attr.split("."):
            cls = getattr(cls, part)
    except (ImportError, AttributeError) as exc:
        raise MpdeployError(
            f"cannot import --arch {target!r} ({type(exc).__name__}: {exc}); put its module on PYTHONPATH"
        ) from None
    except Exception as exc:  # noqa: BLE001 - the user's module raised while being imported
        raise MpdeployError(
            f"cannot import --arch {target!r}: importing {module_name} raised {type(exc).__name__}: "
            f"{_first_line(exc)}; fix that module"
        ) from None
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise MpdeployError(
            f"--arch {target!r} names a {type(cls).__name__}, not an nn.Module subclass; name your model class"
        )
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise MpdeployError(f"--arch {target!r} does not take --model-kwargs {kwargs} ({exc})") from None
    except Exception as exc:  # noqa: BLE001 - the user's __init__ raised
        raise MpdeployError(
            f"--arch {target!r} failed to build with --model-kwargs {kwargs} ({type(exc).__name__}: "
            f"{_first_line(exc)}); pass the arguments it was trained with"
        ) from None


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [""])[0][:200]


def load_model(spec: ModelSpec) -> LoadedModel:
    """Load a model for pruning/export. The returned module is in eval mode on CPU."""
    source = spec.source
    if source.startswith("timm:"):
        loaded = _load_timm(spec)
    elif source.startswith("zoo:"):
        from mpdeploy.models.zoo import load_zoo_model

        loaded = load_zoo_model(source.removeprefix("zoo:"))
    else:
        loaded = _load_file(spec)
    if spec.input_shape is not None:
        loaded.input_shape = tuple(spec.input_shape)
    loaded.input_shape = bounded_input_shape(loaded.input_shape)
    loaded.module.eval()
    probe_input(loaded.module, loaded.input_shape, loaded.name, bool(spec.model_kwargs))
    _attach_data(loaded, spec)
    return loaded


def _attach_data(loaded: LoadedModel, spec: ModelSpec) -> None:
    """Record the user's preprocessing with the model and check the data sources fit it."""
    from mpdeploy.models.data import check_source, shape_from_tensor_sources

    if spec.input_shape is None:  # a tensor file's size may be the one the model was trained at
        loaded.input_shape = shape_from_tensor_sources(spec.data_sources, loaded.input_shape,
                                                       lambda shape: _runs(loaded.module, shape))
    if "input_size" in loaded.data_config:  # timm's config keeps its pretrained 3x224x224
        loaded.data_config = {**loaded.data_config, "input_size": tuple(loaded.input_shape)}

    if spec.data_spec is not None and not spec.data_spec.is_default:
        # Recorded in the prune manifest with the model: audit and distill make inputs the same way.
        loaded.data_config = {**loaded.data_config, "data_spec": spec.data_spec.to_dict()}
    for source in spec.data_sources:
        check_source(source, loaded.input_shape, loaded.data_config)


def _runs(module: nn.Module, input_shape: tuple[int, ...]) -> bool:
    try:
        probe_input(module, input_shape, "the model")
    except MpdeployError:
        return False
    return True


def probe_input(module: nn.Module, input_shape: tuple[int, ...], name: str, kwargs_given: bool = False) -> None:
    """One tiny forward pass, so a shape or channel mismatch is one line before any work starts."""
    import contextlib
    import io

    try:  # (an fx GraphModule prints its own traceback to stderr when a call fails)
        with torch.no_grad(), contextlib.redirect_stderr(io.StringIO()):
            module(torch.zeros(1, *input_shape))
    except (RuntimeError, ValueError, AssertionError, IndexError, TypeError) as exc:
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        raise MpdeployError(
            f"input {','.join(map(str, input_shape))} does not fit {name} ({type(exc).__name__}: {first}); "
            "pass the --input-shape C,H,W (channels first) the model was trained with"
            + (" and check --model-kwargs" if kwargs_given else "")
        ) from None


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
        except model_files.PickleNeedsTrust:
            raise MpdeployError(
                f"{path} is a full pickle, not plain weights; re-save it as a state_dict or safetensors "
                "(or, if you trust its author, pass the pickle itself as MODEL with --trust-pickle)"
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
    try:
        with open(path, "rb"):
            pass
    except PermissionError:
        raise MpdeployError(f"cannot read model file {path}: permission denied; make it readable for this user "
                            "(or copy it somewhere you can read)") from None
    return path


def _load_file(spec: ModelSpec) -> LoadedModel:
    path = _existing_file(spec.source)
    name = path.stem
    fmt = model_files.detect_format(path)

    def code_source() -> dict[str, Any]:
        # Formats that carry code are re-opened by later stages: record the file and the trust given.
        return {"path": str(path.resolve()), "sha256": sha256_file(path),
                "trust_pickle": bool(spec.trust_pickle)}

    if fmt == "safetensors":
        model, source = _load_state_into_arch(_read_state_dict(path), spec, path)
        return _finish_file_model(model, spec, name, source)
    if fmt == "torchscript":
        from mpdeploy.models.programs import torchscript_module

        script = model_files.load_torchscript(path, spec.trust_pickle)
        if spec.input_shape is None:  # (checked after the trust gate: that question comes first)
            raise MpdeployError(f"TorchScript does not record its input shape; pass --input-shape C,H,W for {path}")
        shape = bounded_input_shape(spec.input_shape)
        module = torchscript_module(script, shape, str(path))
        return _finish_file_model(module, spec, name, {"kind": "torchscript", **code_source(),
                                                       "input_shape": list(shape)})
    if fmt == "exported_program":
        from mpdeploy.models.programs import program_module

        model_files.check_pt2_structure(path)  # a damaged file is "not readable", not a trust question
        program = model_files.load_exported(path, spec.trust_pickle)
        shape = spec.input_shape or model_files.example_input_shape(program)
        if shape is None:
            raise MpdeployError(f"cannot tell the input shape of {path}; pass --input-shape C,H,W")
        shape = bounded_input_shape(shape)
        module = program_module(program, shape, str(path))
        return _finish_file_model(module, spec, name, {"kind": "exported_program", **code_source(),
                                                       "input_shape": list(shape)}, shape)
    if fmt == "unknown":
        if path.suffix in (".pt", ".pth", ".bin", ".ckpt", ".pt2"):
            raise model_files.not_readable(path, "neither a torch.save archive, TorchScript nor .pt2")
        raise MpdeployError(
            f"{path}: unknown model format; pass a .pt/.pth (state_dict, TorchScript or pickle), .pt2 or .safetensors"
        )
    try:
        state = _read_state_dict(path)
    except model_files.PickleNeedsTrust:
        obj = model_files.load_pickle_module(path, spec.trust_pickle)
        if isinstance(obj, nn.Module):
            return _finish_file_model(obj, spec, name, {"kind": "pickle", **code_source()})
        state = _extract_state_dict(obj, path)
    model, source = _load_state_into_arch(state, spec, path)
    return _finish_file_model(model, spec, name, source)


def _finish_file_model(model, spec, name, source, shape=None) -> LoadedModel:
    data_config: dict[str, Any] = {}
    # A pickled or --arch timm model carries its input size and channels in its pretrained config.
    if shape is None and (source.get("kind") in ("timm", "zoo") or hasattr(model, "pretrained_cfg")):
        shape, data_config = _timm_input_shape(model)
    shape = spec.input_shape or shape
    if shape is None:
        raise MpdeployError(f"cannot tell the input shape of {name}; pass --input-shape C,H,W (e.g. 3,224,224)")
    return LoadedModel(module=model, input_shape=tuple(shape), name=name, source=source, data_config=data_config)


def recreate_architecture(source: dict[str, Any]) -> nn.Module:
    """Build the architecture a pruned artifact was made from, to load its weights into.

    timm / zoo / module:Class sources are built from their recorded arguments; pickle, TorchScript
    and `.pt2` sources re-open the original file (same sha256) under the trust recorded at prune time.
    """
    if not isinstance(source, dict) or not isinstance(source.get("kwargs", {}), dict):
        raise MpdeployError("the pruned manifest's model source is damaged; re-run prune")
    kind = source.get("kind")
    if kind == "timm":
        model, _ = create_timm_model(source["name"], weights="random", **source.get("kwargs", {}))
        return model
    if kind == "zoo":
        from mpdeploy.models.zoo import create_zoo_model

        return create_zoo_model(source["name"], trained=False)
    if kind == "python":
        return create_python_model(str(source["name"]), dict(source.get("kwargs", {})),
                                   recorded_in="the pruned manifest")
    if kind in model_files.CODE_FORMATS:
        return model_files.reopen(source)
    raise MpdeployError(f"artifact records an unknown model source {kind!r}; re-run prune")
