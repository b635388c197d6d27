"""Loading and saving whole Stable Diffusion models.

Three sources load (``load_model``): a diffusers folder (``model_index.json``, ``unet/``, ``vae/``,
``text_encoder/``, ``tokenizer/``, ``scheduler/``), an original single file (``.safetensors`` or a pickled
``.ckpt``, read with ``weights_only=True``), and a model name (``registry.py``: ``"toy"``, fixative's own
small model). Two formats save:
``save_diffusers`` (a folder diffusers' ``StableDiffusionPipeline.from_pretrained`` loads) and
``save_single_file`` (the original layout).

Loading is strict and streams: each network is built on the meta device, the file's tensors are renamed
and checked against it by shape first (a missing, unexpected or misshapen tensor is an error naming it and
the file), then read one at a time, cast to the target dtype and device, and assigned to the network.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import zipfile
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from . import single_file
from .compilation import compile_model
from .config import ModelConfig, architecture_problems
from .config_files import parse, read_configs, read_json
from .errors import FixativeError
from .model import SourceDetails, StableDiffusionModel, default_tokenizer
from .parameterization import PREDICTION_TYPES
from .registry import model_names, named_model_folder
from .text_encoder import CLIPTextModel
from .tokenizer import CLIPTokenizer
from .unet import UNet2DConditionModel
from .vae import AutoencoderKL

NETWORKS = {"unet": UNet2DConditionModel, "vae": AutoencoderKL, "text_encoder": CLIPTextModel}
WHAT = {"unet": "UNet", "vae": "VAE", "text_encoder": "text encoder"}
# weight file stems: (safetensors, legacy pickle)
STEMS = {
    "unet": ("diffusion_pytorch_model", "diffusion_pytorch_model"),
    "vae": ("diffusion_pytorch_model", "diffusion_pytorch_model"),
    "text_encoder": ("model", "pytorch_model"),
}
SUB_FOLDERS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
FOLDER_LAYOUT = "a diffusers model folder holds model_index.json, unet/, vae/, text_encoder/, tokenizer/ and scheduler/"
SINGLE_FILE_SUFFIXES = {".safetensors", ".ckpt", ".pt", ".pth", ".bin"}
# The diffusers release whose folder format we write (the format has been stable since).
DIFFUSERS_FORMAT_VERSION = "0.30.0"

_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}

Route = Callable[[str, torch.Tensor], "tuple[str, list | None] | None"]


class TensorFile:
    """The tensors of one checkpoint, read one at a time: a .safetensors file, a sharded set of them, or a
    pickled state dict (memory-mapped where the file allows). Shapes and dtypes are known without reading."""

    def __init__(self, label: str, shapes: dict, dtypes: dict, read: Callable[[str], torch.Tensor], metadata: dict):
        self.label = label  # the file, as error messages name it
        self.shapes = shapes
        self.dtypes = dtypes
        self.read = read
        self.metadata = metadata

    def meta(self, key: str) -> torch.Tensor:
        return torch.empty(self.shapes[key], dtype=self.dtypes[key], device="meta")

    @classmethod
    def open(cls, paths: list[Path], label: str) -> TensorFile:
        if paths[0].suffix == ".safetensors":
            return cls._open_safetensors(paths, label)
        return cls._open_pickle(paths[0], label)

    @classmethod
    def _open_safetensors(cls, paths: list[Path], label: str) -> TensorFile:
        handles, shapes, dtypes, metadata = {}, {}, {}, {}
        for path in paths:
            try:
                handle = safe_open(str(path), framework="pt", device="cpu")
            except (SafetensorError, OSError) as error:
                raise FixativeError(
                    f"{path} is not a readable .safetensors file ({error}); it may be truncated: "
                    "download or convert it again"
                ) from None
            metadata.update(handle.metadata() or {})
            for key in handle.keys():
                view = handle.get_slice(key)
                handles[key] = handle
                shapes[key] = tuple(view.get_shape())
                dtypes[key] = _SAFETENSORS_DTYPES.get(view.get_dtype(), torch.float32)
        return cls(label, shapes, dtypes, lambda key: handles[key].get_tensor(key), metadata)

    @classmethod
    def _open_pickle(cls, path: Path, label: str) -> TensorFile:
        try:
            # mmap: tensors stay on disk until read (zip-format files only, i.e. torch >= 1.6)
            content = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
        except Exception as error:  # noqa: BLE001 - torch raises many types for unreadable files
            if "Weights only load failed" in str(error):
                raise FixativeError(
                    f"{path} holds Python objects besides tensors, which fixative does not unpickle "
                    "(weights_only); convert it to .safetensors with a tool you trust"
                ) from None
            first_line = (str(error).strip().splitlines() or ["no message"])[0][:120]
            raise FixativeError(
                f"{path} is not a readable PyTorch checkpoint ({type(error).__name__}: "
                f"{first_line}); it may be empty or truncated: download it again"
            ) from None
        metadata = {}
        if isinstance(content, dict) and isinstance(content.get(single_file.METADATA_KEY), str):
            metadata[single_file.METADATA_KEY] = content[single_file.METADATA_KEY]
        if isinstance(content, dict) and isinstance(content.get("state_dict"), dict):
            content = content["state_dict"]  # Lightning / LDM training checkpoints
        tensors = {k: v for k, v in content.items() if isinstance(v, torch.Tensor)} if isinstance(content, dict) else {}
        if not tensors:
            raise FixativeError(f"{path} holds no tensors; expected a Stable Diffusion state dict")
        return cls(
            label,
            {k: tuple(v.shape) for k, v in tensors.items()},
            {k: v.dtype for k, v in tensors.items()},
            lambda key: tensors[key].clone(),
            metadata,
        )  # clone: the network must not live on the mapped file

    def stored_dtype(self, keys) -> str:
        names = sorted(
            {str(self.dtypes[key]).removeprefix("torch.") for key in keys if self.dtypes[key].is_floating_point}
        )
        return "+".join(names)


# ------------------------------------------------------------------------------------------- loading


def load_model(
    source: str | Path,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    prediction_type: str | None = None,
    config: str | Path | None = None,
    compile: bool = False,
) -> StableDiffusionModel:
    """A Stable Diffusion 1.x/2.x model from a diffusers folder, an original single file, or a model name
    (``registry.model_names()``: "toy").

    ``prediction_type`` ("epsilon", "v_prediction") overrides what the model's scheduler config says; a
    single file does not record it (epsilon is assumed). ``config`` (single files only) gives what tensor
    shapes cannot tell, as ``config_files.read_configs`` reads it: a diffusers folder, one sub-model's
    config, or an original LDM .yaml. ``device="meta"`` reads only shapes (for ``info``).
    ``compile=True`` compiles the UNet with torch.compile (``fixative.core.compilation.compile_model``).
    """
    model = _load_model(source, device, dtype, prediction_type, config)
    return compile_model(model) if compile else model


def _load_model(
    source: str | Path, device, dtype: torch.dtype, prediction_type: str | None, config: str | Path | None
) -> StableDiffusionModel:
    if prediction_type not in (None, *PREDICTION_TYPES):
        raise FixativeError(f"unknown prediction type {prediction_type!r}; use one of {', '.join(PREDICTION_TYPES)}")
    folder = named_model_folder(str(source))
    path = folder if folder is not None else Path(source).expanduser()
    if path.is_dir():
        if config is not None:
            raise FixativeError(
                f"{source} is a diffusers folder, which carries its own configs; --config applies to "
                "single-file checkpoints"
            )
        return _load_folder(path, device, dtype, prediction_type, name=str(source))
    if not path.exists():
        names = ", ".join(repr(name) for name in model_names())
        raise FixativeError(
            f"{source}: no such file or folder; give a diffusers model folder, a single-file "
            f".safetensors/.ckpt checkpoint, or a model name ({names or 'none registered'})"
        )
    if path.suffix not in SINGLE_FILE_SUFFIXES:
        raise FixativeError(
            f"{source} is not a model checkpoint; give a diffusers model folder or a "
            f"{'/'.join(sorted(SINGLE_FILE_SUFFIXES))} single file"
        )
    return _load_single_file(path, device, dtype, prediction_type, config)


def _weight_files(folder: Path, network: str) -> list[Path]:
    """The weight file(s) of one network sub-folder, by preference: safetensors (sharded or not, full precision
    before the fp16 variant), then legacy pickles."""
    safetensors, pickle = STEMS[network]
    for variant in ("", ".fp16"):
        if (folder / f"{safetensors}{variant}.safetensors").is_file():
            return [folder / f"{safetensors}{variant}.safetensors"]
        index = folder / f"{safetensors}.safetensors.index{variant}.json"
        if index.is_file():
            weight_map = read_json(index, "").get("weight_map", {})
            shards = [folder / name for name in dict.fromkeys(weight_map.values())]
            missing = [shard.name for shard in shards if not shard.is_file()]
            if not shards or missing:
                raise FixativeError(f"{index} lists shards that are not there ({', '.join(missing) or 'none listed'})")
            return shards
    for variant in ("", ".fp16"):
        if (folder / f"{pickle}{variant}.bin").is_file():
            return [folder / f"{pickle}{variant}.bin"]
    raise FixativeError(
        f"{folder} holds no weights (expected {safetensors}.safetensors or {pickle}.bin); is the download complete?"
    )


def _folder_route(network: str) -> Route:
    """Renames a diffusers folder's tensors to our keys: old VAE attention names, text_model. prefix."""
    if network == "vae":
        return lambda key, value: (network, _current_vae_key(key, value))
    if network == "text_encoder":
        return lambda key, value: (network, single_file.map_clip_key(key, value))
    return lambda key, value: (network, [(key, value)])


_OLD_VAE_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def _current_vae_key(key: str, value: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """diffusers < 0.14 named the VAE attention query/key/value/proj_attn, some converted folders kept the
    original 1x1-convolution shapes (out, in, 1, 1)."""
    module, _, leaf = key.rpartition(".")
    parent, _, name = module.rpartition(".")
    if ".attentions." in key and name in _OLD_VAE_ATTENTION:
        key = f"{parent}.{_OLD_VAE_ATTENTION[name]}.{leaf}"
    if ".attentions." in key and value.ndim == 4 and key.endswith(single_file.VAE_ATTENTION_LINEARS):
        value = value[:, :, 0, 0]
    return [(key, value)]


def _load_folder(
    folder: Path, device, dtype: torch.dtype, prediction_type: str | None, name: str
) -> StableDiffusionModel:
    index = read_json(folder / "model_index.json", FOLDER_LAYOUT)
    if "text_encoder_2" in index or "XL" in str(index.get("_class_name", "")):
        raise FixativeError(
            f"{folder / 'model_index.json'} describes {index.get('_class_name', 'an SDXL pipeline')}; "
            "fixative supports Stable Diffusion 1.x/2.x only"
        )
    for sub in SUB_FOLDERS:
        if not (folder / sub).is_dir():
            raise FixativeError(f"{folder / sub} is missing; {FOLDER_LAYOUT}")
    config = ModelConfig(
        *(
            parse(folder / network / "config.json", network, f"the {WHAT[network]} needs its config")
            for network in NETWORKS
        )
    )
    problems = architecture_problems(config)
    if problems:
        raise FixativeError(f"{folder}: its configs describe networks that cannot be built ({problems[0]})")
    scheduler_config = read_json(folder / "scheduler" / "scheduler_config.json", "the scheduler needs its settings")
    notes = []
    if prediction_type is not None and prediction_type != scheduler_config.get("prediction_type", "epsilon"):
        notes.append(
            f"prediction type set to {prediction_type} (the folder says "
            f"{scheduler_config.get('prediction_type', 'epsilon')})"
        )
        scheduler_config["prediction_type"] = prediction_type
    tokenizer = CLIPTokenizer.from_folder(folder / "tokenizer")
    networks, stored = {}, {}
    for network in NETWORKS:
        files = _weight_files(folder / network, network)
        label = str(files[0]) if len(files) == 1 else f"{files[0].parent}/{STEMS[network][0]}.safetensors shards"
        tensors = TensorFile.open(files, label)
        built, dtypes = _build(tensors, _folder_route(network), config, [network], device, dtype, original_names=False)
        networks.update(built)
        stored.update(dtypes)
    return StableDiffusionModel(
        networks["unet"],
        networks["vae"],
        networks["text_encoder"],
        tokenizer,
        scheduler_config,
        source=name,
        details=SourceDetails("diffusers folder", stored, notes),
    )


def _load_single_file(
    path: Path, device, dtype: torch.dtype, prediction_type: str | None, config_path: str | Path | None
) -> StableDiffusionModel:
    tensors = TensorFile.open([path], str(path))
    try:
        if single_file.METADATA_KEY in tensors.metadata:  # written by fixative: the exact configs
            config, scheduler_config = single_file.config_from_metadata(tensors.metadata[single_file.METADATA_KEY])
            notes = []
        else:
            config, scheduler_config, notes = single_file.infer_model_config(tensors.shapes, prediction_type)
    except FixativeError as error:
        raise FixativeError(f"{path}: {error}") from None
    given = read_configs(config_path) if config_path is not None else {}
    config = ModelConfig(*(given.get(network, getattr(config, network)) for network in NETWORKS))
    if "scheduler" in given:
        scheduler_config = dict(given["scheduler"])
        notes = [note for note in notes if not note.startswith("prediction type assumed")]
    if given:
        notes.append(f"{', '.join(given)} config from {config_path}")
    if prediction_type is not None:
        scheduler_config["prediction_type"] = prediction_type
    problems = architecture_problems(config)
    if problems:
        origin = f"the config from {config_path}" if given else "the architecture inferred from its tensor shapes"
        raise FixativeError(
            f"{path}: {origin} cannot be built ({problems[0]}); a single file does not record "
            "GroupNorm groups or head counts: give the model's config with --config (a diffusers "
            "folder or an LDM .yaml)"
        )
    networks, stored = _build(
        tensors,
        lambda key, value: single_file.map_original_key(key, value, config),
        config,
        list(NETWORKS),
        device,
        dtype,
        original_names=True,
    )
    kind = "safetensors" if path.suffix == ".safetensors" else "weights-only pickle"
    return StableDiffusionModel(
        networks["unet"],
        networks["vae"],
        networks["text_encoder"],
        default_tokenizer(config.text_encoder),
        scheduler_config,
        source=str(path),
        details=SourceDetails(f"original single file, {kind}", stored, notes),
    )


def _convert(
    keys, route: Route, read: Callable[[str], torch.Tensor], device, dtype: torch.dtype
) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, list[str]], dict[str, list[str]]]:
    """The tensors under our names, grouped by network; per network, the file's keys that went into it and
    those that have no place in it. Tensors are read, renamed and cast one at a time."""
    converted, sources, unexpected = defaultdict(dict), defaultdict(list), defaultdict(list)
    for key in keys:
        routed = route(key, read(key))
        if routed is None:
            continue
        network, items = routed
        if items is None:
            unexpected[network].append(key)
        elif items:  # [] marks a known tensor the network does not use
            sources[network].append(key)
        for ours, value in items or ():
            converted[network][ours] = value.to(device=device, dtype=dtype if value.is_floating_point() else None)
    return converted, sources, unexpected


_INITIALISERS = (
    "normal_",
    "uniform_",
    "kaiming_uniform_",
    "kaiming_normal_",
    "xavier_uniform_",
    "xavier_normal_",
    "trunc_normal_",
    "zeros_",
    "ones_",
    "constant_",
)


@contextmanager
def _meta_without_init() -> Iterator[None]:
    """Modules built inside live on the meta device and skip their random initialisers: their weights are
    assigned next, and a meta-device normal_ would import torch._dynamo (seconds) on first use."""
    saved = {name: getattr(nn.init, name) for name in _INITIALISERS}
    try:
        for name in saved:
            setattr(nn.init, name, lambda tensor, *args, **kwargs: tensor)
        with torch.device("meta"):
            yield
    finally:
        for name, initialiser in saved.items():
            setattr(nn.init, name, initialiser)


def _names(keys: list[str], limit: int = 5) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def _build(
    tensors: TensorFile,
    route: Route,
    config: ModelConfig,
    names: list[str],
    device,
    dtype: torch.dtype,
    original_names: bool,
) -> tuple[dict[str, nn.Module], dict[str, str]]:
    """The named networks from one file, checked by key and shape on the meta device first, then read tensor by
    tensor; also the dtype(s) each network is stored in. ``original_names``: report missing tensors under
    their single-file names."""
    converted, sources, unexpected = _convert(tensors.shapes, route, tensors.meta, "meta", dtype)
    networks = {}
    for network in names:
        with _meta_without_init():
            networks[network] = NETWORKS[network](getattr(config, network))
        expected = networks[network].state_dict()
        found = converted[network]
        missing = [k for k in expected if k not in found]
        if original_names:
            missing = list(dict.fromkeys(single_file.original_key(network, k, config) or k for k in missing))
        extra = unexpected[network] + [k for k in found if k not in expected]
        problem = (
            f"is missing {len(missing)} {WHAT[network]} tensor(s): {_names(missing)}"
            if missing
            else f"has {len(extra)} unexpected {WHAT[network]} tensor(s): {_names(extra)}"
            if extra
            else None
        )
        if problem:
            raise FixativeError(f"{tensors.label} {problem}; is this a Stable Diffusion 1.x/2.x {WHAT[network]}?")
        for key, value in found.items():
            if value.shape != expected[key].shape:
                raise FixativeError(
                    f"{tensors.label}: {WHAT[network]} tensor {key} has shape {tuple(value.shape)}, "
                    f"its config asks for {tuple(expected[key].shape)}; the config does not match "
                    "the weights"
                )
    if str(device) != "meta":  # now read, skipping what the networks do not use (EMA copies, training state)
        converted, _, _ = _convert(
            [key for network in names for key in sources[network]], route, tensors.read, device, dtype
        )
    for network, module in networks.items():
        module.load_state_dict(converted[network], strict=True, assign=True)
        module.eval()
    return networks, {network: tensors.stored_dtype(sources[network]) for network in names}


# -------------------------------------------------------------------------------------------- saving


def _staging_folder(folder: Path, overwrite: bool) -> Path:
    if folder.exists() and not overwrite:
        raise FixativeError(f"{folder} already exists; choose another destination or remove it first")
    folder.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".partial", dir=folder.parent))


def _state_for_saving(module: nn.Module, dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    return {
        key: value.detach().to("cpu", dtype=dtype if dtype and value.is_floating_point() else None).contiguous()
        for key, value in module.state_dict().items()
    }


def save_diffusers(
    model: StableDiffusionModel, folder: str | Path, dtype: torch.dtype | None = None, overwrite: bool = False
) -> Path:
    """Writes ``model`` as a diffusers folder (what ``StableDiffusionPipeline.from_pretrained`` loads).

    The folder appears whole or not at all: it is written next to its destination and renamed into place.
    ``dtype`` casts the stored weights (e.g. torch.float16); None keeps the model's.
    """
    folder = Path(folder)
    staging = _staging_folder(folder, overwrite)
    try:
        scheduler_class = model.scheduler_config.get("_class_name", "PNDMScheduler")
        index = {
            "_class_name": "StableDiffusionInpaintPipeline" if model.is_inpainting else "StableDiffusionPipeline",
            "_diffusers_version": DIFFUSERS_FORMAT_VERSION,
            "feature_extractor": [None, None],
            "safety_checker": [None, None],
            "requires_safety_checker": False,
            "scheduler": ["diffusers", scheduler_class],
            "text_encoder": ["transformers", "CLIPTextModel"],
            "tokenizer": ["transformers", "CLIPTokenizer"],
            "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"],
        }
        _write_json(staging / "model_index.json", index)
        for network, module in model.networks().items():
            state = _state_for_saving(module, dtype)
            config = module.config.to_diffusers()  # says float32 whatever the stored dtype, as released folders do
            if network != "text_encoder":
                config["_diffusers_version"] = DIFFUSERS_FORMAT_VERSION
            (staging / network).mkdir()
            _write_json(staging / network / "config.json", config)
            save_file(state, staging / network / f"{STEMS[network][0]}.safetensors", metadata={"format": "pt"})
        model.tokenizer.save(staging / "tokenizer")
        (staging / "scheduler").mkdir()
        _write_json(
            staging / "scheduler" / "scheduler_config.json",
            {
                "_class_name": scheduler_class,
                "_diffusers_version": DIFFUSERS_FORMAT_VERSION,
                **{k: v for k, v in model.scheduler_config.items() if not k.startswith("_")},
            },
        )
        if folder.exists():
            previous = folder.with_name(staging.name.removesuffix(".partial") + ".old")
            folder.rename(previous)
            staging.rename(folder)
            shutil.rmtree(previous)
        else:
            staging.rename(folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def save_single_file(
    model: StableDiffusionModel, path: str | Path, dtype: torch.dtype | None = None, overwrite: bool = False
) -> Path:
    """Writes ``model`` as one original-layout checkpoint: ``.safetensors``, or a weights-only ``.ckpt`` pickle.

    The exact configs go into the file's metadata, so fixative reloads what shapes cannot show (head counts,
    image size, prediction type); other tools read the tensors as they read any SD 1.x/2.x file.
    """
    path = Path(path)
    if path.suffix not in (".safetensors", ".ckpt"):
        raise FixativeError(f"{path}: a single-file checkpoint ends in .safetensors or .ckpt")
    if path.exists() and not overwrite:
        raise FixativeError(f"{path} already exists; choose another destination or remove it first")
    state = single_file.to_original(
        {name: _state_for_saving(module, dtype) for name, module in model.networks().items()}, model.config
    )
    state = {key: value.contiguous() for key, value in state.items()}
    metadata = single_file.config_metadata(model.config, model.scheduler_config)
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, staging = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    os.close(descriptor)
    try:
        if path.suffix == ".safetensors":
            save_file(state, staging, metadata={"format": "pt", single_file.METADATA_KEY: metadata})
        else:
            torch.save({"state_dict": state, single_file.METADATA_KEY: metadata}, staging)
        os.replace(staging, path)
    finally:
        if os.path.exists(staging):
            os.remove(staging)
    return path


def _write_json(path: Path, content: dict) -> None:
    path.write_text(json.dumps(content, indent=2, sort_keys=True) + "\n", encoding="utf-8")
