"""Read MindEye2 checkpoints (MedARC-AI/MindEyeV2 ``last.pth``) and rt-mindeye's own, load them into the model.

Data-driven, in the manner of diffusers' ``single_file_utils``: probe keys say whether a state dict is a MindEye2
model, container keys are unwrapped by name, prefixes left by wrappers are stripped by a table, :func:`convert` is a
pure dict -> dict function, :func:`infer_config` reads the architecture from tensor shapes, and :func:`load_mindeye2`
loads strictly: every missing key, every unexpected key not on the declared drop list and every mis-shaped key is
reported in one :class:`~rt_mindeye.errors.CheckpointKeyError`.

Published layout facts this relies on (``tests/data/mindeye2_layout``, obtained by instantiating the original code):
keys start with ``ridge.``, ``backbone.`` or ``diffusion_prior.`` with no wrapper prefix; the ``.pth`` is a dict
``{epoch, model_state_dict, optimizer_state_dict, lr_scheduler, train_losses, test_losses, lrs}``; multisubject
checkpoints trained with ``--subj=1`` hold subjects 2..8 as ``ridge.linears.0..6``; tensors are probably fp16.

Fine-tuning a new subject drops every old ridge head (the declared drop list) and starts a fresh head for the new
subject's voxel count. (MindEyeV2's notebook popped only ``ridge.linears.0.weight`` and loaded with ``strict=False``,
so its new subject silently inherited subject 2's ridge bias; here the whole new head is freshly initialised.)

Reading is local-only and never executes code from the file: safetensors by extension, otherwise
``torch.load(weights_only=True, mmap=True)``. A published ``last.pth`` saved through DeepSpeed may also pickle
optimiser objects that ``weights_only`` refuses; then a restricted unpickler is used which rebuilds tensors and plain
containers and replaces every other object by an inert placeholder (it never calls anything outside a short
allow-list), and the placeholders' class names are reported.
"""

from __future__ import annotations

import io
import math
import pickle
import re
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch

from rt_mindeye.convert.loading import materialize
from rt_mindeye.errors import CheckpointError, CheckpointKeyError
from rt_mindeye.model.config import MindEyeConfig
from rt_mindeye.model.mindeye import PARTS, MindEyeModule, build_model
from rt_mindeye.model.prior import cosine_schedule_tensors

# -- layout tables -------------------------------------------------------------------------------------------------

# A state dict is a MindEye2 model when it has all of these (after unwrapping and prefix stripping).
PROBE_KEYS = ("backbone.backbone_linear.weight", "backbone.clip_proj.0.weight")
# Container dict keys that hold the model's state dict, tried in order.
CONTAINER_KEYS = ("model_state_dict", "state_dict", "model")
# Prefixes wrappers add to every key: DDP / DeepSpeed engines ("module.") and torch.compile ("_orig_mod.").
STRIP_PREFIXES = ("module.", "_orig_mod.")
# Key rename table (published name -> rt-mindeye name). The module tree mirrors the published one, so it is empty;
# it stays as the single place to record a rename if either side ever changes.
RENAMES: dict[str, str] = {}
# Top-level keys of the container MindEyeV2's Train.ipynb writes (save_ckpt).
CONTAINER_LAYOUT = ("epoch", "model_state_dict", "optimizer_state_dict", "lr_scheduler", "train_losses",
                    "test_losses", "lrs")
# Extra container key under which rt-mindeye stores its model configuration (ignored by the original code).
CONFIG_KEY = "rt_mindeye_config"

RIDGE_KEY = re.compile(r"^ridge\.linears\.(\d+)\.(weight|bias)$")
SCHEDULE_PREFIX = "diffusion_prior.noise_scheduler."


@dataclass
class CheckpointContents:
    """What :func:`read_checkpoint` found in a file."""

    state_dict: dict[str, torch.Tensor]
    container: dict[str, Any] = field(default_factory=dict)  # the other top-level entries (epoch, optimiser, ...)
    placeholders: list[str] = field(default_factory=list)  # classes replaced by inert placeholders
    path: Path | None = None
    memory_mapped: bool = False  # tensors live in a private read-only file mapping (torch.load(mmap=True))


@dataclass
class LoadedModel:
    """Result of :func:`load_mindeye2`."""

    model: MindEyeModule
    config: MindEyeConfig
    checkpoint_config: MindEyeConfig  # the architecture the file holds (before a new subject replaced the ridge)
    dropped: list[str]  # keys dropped on purpose (old subjects' ridge heads)
    initialised: list[str]  # keys freshly initialised (the new subject's ridge head)
    dtypes: dict[str, int]  # tensor count per dtype in the file
    placeholders: list[str]


# -- reading -------------------------------------------------------------------------------------------------------


class _Placeholder:
    """Stands in for any pickled object outside the allow-list; holds its arguments and state, runs no code."""

    qualified_name = "?"

    def __init__(self, *args, **kwargs):
        self.args = args

    def __setstate__(self, state):
        self.state = state

    def __setitem__(self, key, value):  # dict-like objects rebuilt with SETITEMS
        pass

    def append(self, value):  # list-like objects rebuilt with APPENDS
        pass

    def extend(self, values):
        pass

    def __repr__(self):
        return f"<placeholder {self.qualified_name}>"


_REBUILD_FUNCTIONS = {"_rebuild_tensor", "_rebuild_tensor_v2", "_rebuild_tensor_v3", "_rebuild_parameter",
                      "_rebuild_parameter_with_state"}
_SAFE_BUILTINS = {"set", "frozenset", "list", "dict", "tuple", "int", "float", "complex", "bool", "str", "bytes",
                  "bytearray", "slice", "range"}


def _restricted_pickle_module(seen: list[str]) -> types.ModuleType:
    """A pickle module whose Unpickler resolves only tensor-rebuilding names and plain types."""

    class RestrictedUnpickler(pickle.Unpickler):
        def find_class(self, module: str, name: str):
            if module == "collections" and name == "OrderedDict":
                import collections
                return collections.OrderedDict
            if module == "builtins" and name in _SAFE_BUILTINS:
                import builtins
                return getattr(builtins, name)
            if module == "torch._utils" and name in _REBUILD_FUNCTIONS:
                import torch._utils
                return getattr(torch._utils, name)
            if module == "torch":
                value = getattr(torch, name, None)
                if isinstance(value, torch.dtype) or name.endswith("Storage") or name in ("Size", "device"):
                    return value
            if module == "torch.storage" and name in ("UntypedStorage", "TypedStorage", "_LegacyStorage"):
                return getattr(torch.storage, name)
            if module == "torch.nn.parameter" and name == "Parameter":
                return torch.nn.Parameter
            qualified = f"{module}.{name}"
            seen.append(qualified)
            return type(name, (_Placeholder,), {"qualified_name": qualified})

    module = types.ModuleType("rt_mindeye_restricted_pickle")
    module.Unpickler = RestrictedUnpickler
    module.load = lambda f, **kw: RestrictedUnpickler(f, **kw).load()
    module.loads = lambda data, **kw: RestrictedUnpickler(io.BytesIO(data), **kw).load()
    module.__dict__["UnpicklingError"] = pickle.UnpicklingError
    return module


def _torch_load(path: Path, placeholders: list[str]) -> tuple[Any, bool]:
    """(loaded object, whether its tensors are memory-mapped)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True), True
    except RuntimeError as exc:
        if "mmap" not in str(exc) and "zip" not in str(exc):
            raise CheckpointError(path, f"cannot read: {exc}") from exc
        # Legacy (non-zip) torch.save format: cannot be memory-mapped; read it whole.
        return _torch_load_plain(path, placeholders), False
    except pickle.UnpicklingError:
        pickle_module = _restricted_pickle_module(placeholders)
        try:
            return torch.load(path, map_location="cpu", weights_only=False, mmap=True,
                              pickle_module=pickle_module), True
        except RuntimeError:
            return torch.load(path, map_location="cpu", weights_only=False, pickle_module=pickle_module), False


def _torch_load_plain(path: Path, placeholders: list[str]) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        return torch.load(path, map_location="cpu", weights_only=False,
                          pickle_module=_restricted_pickle_module(placeholders))


def read_checkpoint(path: str | Path) -> CheckpointContents:
    """Read a local checkpoint file and unwrap the model's state dict (no conversion yet)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(path, "no such file (checkpoints are read from local paths only)")
    placeholders: list[str] = []
    mapped = False
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            obj: Any = load_file(str(path), device="cpu")
        except Exception as exc:  # safetensors raises its own SafetensorError for a corrupt header
            raise CheckpointError(path, f"not a readable safetensors file: {exc}") from exc
    else:
        try:
            obj, mapped = _torch_load(path, placeholders)
        except (pickle.UnpicklingError, EOFError, ValueError, OSError, IndexError, KeyError, RuntimeError) as exc:
            # A truncated or foreign file fails deep in the unpickler, with whatever error its bytes lead to.
            raise CheckpointError(path, f"not a readable torch checkpoint: {type(exc).__name__}: {exc}") from exc
    state_dict, container = unwrap(obj, path)
    return CheckpointContents(state_dict=state_dict, container=container, placeholders=sorted(set(placeholders)),
                              path=path, memory_mapped=mapped)


def unwrap(obj: Any, path: str | Path | None = None) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split a loaded object into (state dict, other container entries)."""
    if not isinstance(obj, Mapping):
        raise CheckpointError(path, f"expected a dict, found {type(obj).__name__}")
    container: dict[str, Any] = {}
    for key in CONTAINER_KEYS:
        if key in obj and isinstance(obj[key], Mapping):
            container = {k: v for k, v in obj.items() if k != key}
            obj = obj[key]
            break
    state_dict = dict(obj)
    not_tensors = [k for k, v in state_dict.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise CheckpointError(path, f"the state dict holds non-tensor entries: {', '.join(not_tensors[:5])}")
    return state_dict, container


# -- conversion ----------------------------------------------------------------------------------------------------


def is_mindeye2(state_dict: Mapping[str, Any]) -> bool:
    return all(k in state_dict for k in PROBE_KEYS)


def convert(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Published (or wrapper-prefixed) MindEye2 keys -> rt-mindeye keys. Pure: the input is not modified."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        changed = True
        while changed:  # a compiled model inside DDP has both prefixes
            changed = False
            for prefix in STRIP_PREFIXES:
                if key.startswith(prefix):
                    key = key[len(prefix):]
                    changed = True
        out[RENAMES.get(key, key)] = value
    return out


def _shape(state_dict: Mapping[str, torch.Tensor], key: str) -> tuple[int, ...]:
    if key not in state_dict:
        raise CheckpointKeyError(None, missing=[key])
    return tuple(state_dict[key].shape)


def _count_indexed(state_dict: Mapping[str, Any], pattern: str) -> int:
    regex = re.compile(pattern)
    indices = {int(m.group(1)) for k in state_dict if (m := regex.match(k))}
    if indices and indices != set(range(len(indices))):
        raise CheckpointError(None, f"keys matching {pattern} are not numbered 0..n-1: {sorted(indices)}")
    return len(indices)


def infer_config(state_dict: Mapping[str, torch.Tensor], subject_names: tuple[str, ...] = ()) -> MindEyeConfig:
    """The architecture of a (converted) MindEye2 state dict, from its tensor shapes.

    Everything is read from shapes except the low-level decoder's GroupNorm group count, which shapes do not
    determine: it is taken as min(32, narrowest decoder block), which gives MindEye2's 32.
    """
    if not is_mindeye2(state_dict):
        raise CheckpointError(None, f"not a MindEye2 state dict: probe keys {', '.join(PROBE_KEYS)} not all present")
    n_ridge = _count_indexed(state_dict, r"^ridge\.linears\.(\d+)\.weight$")
    if n_ridge == 0:
        raise CheckpointKeyError(None, missing=["ridge.linears.0.weight"])
    subject_voxels = tuple(_shape(state_dict, f"ridge.linears.{i}.weight")[1] for i in range(n_ridge))
    hidden = _shape(state_dict, "ridge.linears.0.weight")[0]
    n_blocks = _count_indexed(state_dict, r"^backbone\.mixer_blocks1\.(\d+)\.0\.weight$")
    token_dim = _shape(state_dict, "backbone.clip_proj.0.weight")[0]
    out_features = _shape(state_dict, "backbone.backbone_linear.weight")[0]
    if out_features % token_dim:
        raise CheckpointError(None, f"backbone.backbone_linear has {out_features} outputs, not a multiple of the "
                                    f"token width {token_dim}")
    fields: dict[str, Any] = dict(subject_voxels=subject_voxels, hidden_dim=hidden, n_blocks=max(n_blocks, 1),
                                  token_seq=out_features // token_dim, token_dim=token_dim,
                                  subject_names=tuple(subject_names) if len(subject_names) == n_ridge else ())
    fields["blurry_recon"] = "backbone.blin1.weight" in state_dict
    if fields["blurry_recon"]:
        channels = _shape(state_dict, "backbone.bnorm.weight")[0]
        seed_size = _shape(state_dict, "backbone.blin1.weight")[0]
        grid = math.isqrt(seed_size // channels)
        if grid * grid * channels != seed_size:
            raise CheckpointError(None, f"backbone.blin1 has {seed_size} outputs, not {channels} x a square grid")
        n_up = _count_indexed(state_dict, r"^backbone\.bupsampler\.up_blocks\.(\d+)\.resnets\.0\.conv2\.weight$")
        widths = tuple(_shape(state_dict, f"backbone.bupsampler.up_blocks.{j}.resnets.0.conv2.weight")[0]
                       for j in range(n_up))[::-1]
        fields.update(blurry_channels=channels, blurry_grid=grid,
                      blurry_out_channels=_shape(state_dict, "backbone.bupsampler.conv_out.weight")[0],
                      blurry_decoder_channels=widths, blurry_norm_groups=min(32, min(widths)),
                      blurry_aux_dim=_shape(state_dict, "backbone.b_maps_projector.6.weight")[0])
    fields["use_prior"] = any(k.startswith("diffusion_prior.") for k in state_dict)
    if fields["use_prior"]:
        net = "diffusion_prior.net."
        seq, dim = _shape(state_dict, net + "learned_query")
        if (seq, dim) != (fields["token_seq"], token_dim):
            raise CheckpointKeyError(None, mismatched=[(net + "learned_query", (fields["token_seq"], token_dim),
                                                        (seq, dim))])
        layer0 = net + "causal_transformer.layers.0."
        dim_head = _shape(state_dict, layer0 + "0.null_kv")[1]
        fields.update(
            prior_depth=_count_indexed(state_dict, r"^diffusion_prior\.net\.causal_transformer\.layers\.(\d+)\.0\."
                                                   r"to_q\.weight$"),
            prior_dim_head=dim_head,
            prior_heads=_shape(state_dict, layer0 + "0.to_q.weight")[0] // dim_head,
            prior_ff_mult=_shape(state_dict, layer0 + "1.5.weight")[1] // dim,
            prior_timesteps=_shape(state_dict, SCHEDULE_PREFIX + "betas")[0],
        )
    try:
        return MindEyeConfig(**fields)
    except ValueError as exc:
        raise CheckpointError(None, f"inferred configuration is invalid: {exc}") from exc


# -- checking and loading ------------------------------------------------------------------------------------------


def expected_layout(config: MindEyeConfig) -> dict[str, tuple[int, ...]]:
    """Every state-dict key and shape of the model for ``config``, in order (built on the meta device: no memory)."""
    return {k: tuple(v.shape) for k, v in build_model(config, "meta").state_dict().items()}


def check_keys(expected: Mapping[str, tuple[int, ...]], state_dict: Mapping[str, torch.Tensor],
               drop: tuple[str, ...] | list[str] = (), path: str | Path | None = None) -> None:
    """Raise CheckpointKeyError listing missing, unexpected (not on ``drop``) and mis-shaped keys."""
    drop_set = set(drop)
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected and k not in drop_set]
    mismatched = [(k, tuple(expected[k]), tuple(v.shape)) for k, v in state_dict.items()
                  if k in expected and tuple(v.shape) != tuple(expected[k])]
    if missing or unexpected or mismatched:
        raise CheckpointKeyError(path, missing, unexpected, mismatched)


def dtype_counts(state_dict: Mapping[str, torch.Tensor]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for value in state_dict.values():
        name = str(value.dtype).replace("torch.", "")
        counts[name] = counts.get(name, 0) + 1
    return counts


def part_numel(state_dict: Mapping[str, torch.Tensor]) -> dict[str, int]:
    """Numbers stored per top-level part (tied tensors counted once per key, as the file stores them)."""
    counts = {part: 0 for part in PARTS}
    for key, value in state_dict.items():
        part = key.split(".", 1)[0]
        counts[part] = counts.get(part, 0) + value.numel()
    return {k: v for k, v in counts.items() if v}


def _check_schedule(state_dict: Mapping[str, torch.Tensor], config: MindEyeConfig, path) -> None:
    """The schedule buffers must be the cosine schedule (within fp16 rounding): they are recomputed in fp32."""
    reference = cosine_schedule_tensors(config.prior_timesteps)
    for name, value in reference.items():
        stored = state_dict.get(SCHEDULE_PREFIX + name)
        if stored is None:
            continue
        if not torch.allclose(stored.float(), value, rtol=2e-3, atol=1e-4):
            worst = (stored.float() - value).abs().max().item()
            raise CheckpointError(path, f"{SCHEDULE_PREFIX}{name} is not the cosine schedule of "
                                        f"{config.prior_timesteps} steps (max difference {worst:.3g})")


def load_mindeye2(source: str | Path | Mapping[str, torch.Tensor], *, new_subject_voxels: int | None = None,
                  new_subject_name: str | None = None, config: MindEyeConfig | None = None,
                  device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                  seed: int = 0) -> LoadedModel:
    """Load a MindEye2 checkpoint (file or state dict) into a :class:`MindEyeModule`.

    Args:
        source: a ``.pth``/``.pt``/``.ckpt`` (torch) or ``.safetensors`` file, or a state dict.
        new_subject_voxels: fine-tuning mode: drop every ridge head of the file and start a fresh one for a new
            subject with this many voxels.
        new_subject_name: label of the new subject.
        config: the architecture to load into; default: inferred from the shapes (or the config stored by
            rt-mindeye's trainer, whose shapes are then still checked).
        device, dtype: where and in what precision the model lives (default: the file's dtype, on CPU).
        seed: seeds the new ridge head's initialisation.

    The model is built on the meta device and the file's tensors are assigned into it (``assign=True``) after
    :func:`~rt_mindeye.convert.loading.materialize` has put each one, in turn, on ``device`` in ``dtype``: a
    memory-mapped checkpoint already in that dtype is not copied, and one in another dtype is converted tensor by
    tensor with the source pages released, so the peak memory stays near the model's size in ``dtype`` (measured by
    ``rt-mindeye model check --load`` and ``bench/load.py``).
    """
    path = None
    placeholders: list[str] = []
    mapped = False
    if isinstance(source, (str, Path)):
        contents = read_checkpoint(source)
        path, raw, placeholders = contents.path, contents.state_dict, contents.placeholders
        mapped = contents.memory_mapped
        stored = contents.container.get(CONFIG_KEY)
        if isinstance(stored, Mapping) and config is None:
            config = MindEyeConfig.from_dict(stored, source=str(path))
    else:
        raw = dict(source)
    state_dict = convert(raw)
    if not is_mindeye2(state_dict):
        raise CheckpointError(path, f"not a MindEye2 checkpoint: probe keys {', '.join(PROBE_KEYS)} not all present")
    try:
        checkpoint_config = config if config is not None else infer_config(state_dict)
    except CheckpointError as exc:
        raise _with_path(exc, path) from exc

    target_config = checkpoint_config
    drop: list[str] = []
    fresh: dict[str, torch.Tensor] = {}
    if new_subject_voxels is not None:
        drop = [k for k in state_dict if RIDGE_KEY.match(k)]
        target_config = checkpoint_config.replace(
            subject_voxels=(int(new_subject_voxels),),
            subject_names=(new_subject_name,) if new_subject_name else ())
        generator_state = torch.random.get_rng_state()
        torch.manual_seed(seed)
        head = torch.nn.Linear(int(new_subject_voxels), target_config.hidden_dim)
        torch.random.set_rng_state(generator_state)
        fresh = {"ridge.linears.0.weight": head.weight.detach(), "ridge.linears.0.bias": head.bias.detach()}

    expected = expected_layout(target_config)
    kept = {k: v for k, v in state_dict.items() if k not in set(drop)}
    check_keys(expected, {**kept, **fresh}, path=path)
    if target_config.use_prior:
        _check_schedule(kept, target_config, path)

    model = build_model(target_config, "meta")
    file_dtype = next(iter(kept.values())).dtype
    fresh = {k: v.to(file_dtype) for k, v in fresh.items()}
    # The schedule is replaced below by the exact fp32 one; its file copy needs no conversion.
    weights = {k: v for k, v in {**kept, **fresh}.items() if not k.startswith(SCHEDULE_PREFIX)}
    weights = materialize(weights, dtype=dtype, device=device, file_backed=mapped)
    if target_config.use_prior:
        schedule = cosine_schedule_tensors(target_config.prior_timesteps)
        weights.update({SCHEDULE_PREFIX + name: value.to(device) for name, value in schedule.items()})
    model.load_state_dict(weights, strict=True, assign=True)
    del weights
    return LoadedModel(model=model, config=target_config, checkpoint_config=checkpoint_config, dropped=drop,
                       initialised=sorted(fresh), dtypes=dtype_counts(kept), placeholders=placeholders)


def inference_dtype(device: str | torch.device) -> torch.dtype:
    """The precision a decoder runs the model in: float16 on a GPU (as MindEye2's inference under fp16 autocast),
    float32 on a CPU (whose float16 matrix products are slow)."""
    return torch.float16 if torch.device(device).type == "cuda" else torch.float32


def load_for_inference(path: str | Path, device: str | torch.device = "cpu",
                       dtype: torch.dtype | None = None) -> LoadedModel:
    """Load a checkpoint as the decoder service does: on ``device`` in :func:`inference_dtype` (unless ``dtype``),
    in eval mode with gradients off."""
    loaded = load_mindeye2(path, device=device, dtype=dtype or inference_dtype(device))
    loaded.model.eval().requires_grad_(False)
    return loaded


def _with_path(exc: CheckpointError, path: Path | None) -> CheckpointError:
    """The same error, naming the file (inference works on bare state dicts and cannot know it)."""
    if isinstance(exc, CheckpointKeyError):
        return CheckpointKeyError(path, exc.missing, exc.unexpected, exc.mismatched)
    return CheckpointError(path, exc.problem)


# -- writing -------------------------------------------------------------------------------------------------------


def save_container(path: str | Path, model: MindEyeModule, *, epoch: int = 0, optimizer_state: dict | None = None,
                   lr_scheduler_state: dict | None = None, train_losses: list[float] | None = None,
                   test_losses: list[float] | None = None, lrs: list[float] | None = None,
                   extra: Mapping[str, Any] | None = None) -> Path:
    """Write a checkpoint in MindEyeV2's ``last.pth`` container layout (plus rt-mindeye's config and ``extra``).

    Everything in it is tensors, numbers, strings, lists and dicts, so it reads back with ``weights_only=True``.
    The file is written to a temporary name and renamed, so a crash never leaves a half-written checkpoint.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload: dict[str, Any] = {
        "epoch": int(epoch),
        "model_state_dict": model.state_dict(),
        "optimizer_state_dict": optimizer_state or {},
        "lr_scheduler": lr_scheduler_state or {},
        "train_losses": [float(x) for x in (train_losses or [])],
        "test_losses": [float(x) for x in (test_losses or [])],
        "lrs": [float(x) for x in (lrs or [])],
        CONFIG_KEY: model.config.to_dict(),
    }
    payload.update(extra or {})
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    tmp.replace(path)
    return path


# -- inspection (``rt-mindeye model check``) ------------------------------------------------------------------------


@dataclass
class CheckReport:
    """A checkpoint that fits the model: its configuration and what it holds."""

    path: Path
    config: MindEyeConfig
    parameters: dict[str, int]  # unique parameters per part of the model this config builds
    stored: dict[str, int]  # numbers stored per part in the file
    keys: dict[str, int]  # state-dict keys per part
    dtypes: dict[str, int]
    container_keys: list[str]
    placeholders: list[str]


def check_checkpoint(path: str | Path, new_subject_voxels: int | None = None) -> CheckReport:
    """Read a checkpoint (memory-mapped), infer its configuration and check every key and shape on the meta device.

    Raises CheckpointKeyError naming the missing, unexpected and mis-shaped keys when the file does not fit.
    """
    contents = read_checkpoint(path)
    state_dict = convert(contents.state_dict)
    if not is_mindeye2(state_dict):
        raise CheckpointError(contents.path, "not a MindEye2 checkpoint: probe keys "
                                             f"{', '.join(PROBE_KEYS)} not all present")
    stored_config = contents.container.get(CONFIG_KEY)
    try:
        config = MindEyeConfig.from_dict(stored_config, source=str(path)) if isinstance(stored_config, Mapping) \
            else infer_config(state_dict)
    except CheckpointError as exc:
        raise _with_path(exc, contents.path) from exc
    drop: list[str] = []
    fresh: dict[str, tuple[int, ...]] = {}
    if new_subject_voxels is not None:
        drop = [k for k in state_dict if RIDGE_KEY.match(k)]
        config = config.replace(subject_voxels=(int(new_subject_voxels),), subject_names=())
    meta = build_model(config, "meta")
    expected = {k: tuple(v.shape) for k, v in meta.state_dict().items()}
    kept = {k: v for k, v in state_dict.items() if k not in set(drop)}
    if new_subject_voxels is not None:
        fresh = {k: expected[k] for k in expected if RIDGE_KEY.match(k)}
        kept.update({k: torch.empty(shape, device="meta") for k, shape in fresh.items()})
    check_keys(expected, kept, path=contents.path)
    if config.use_prior:
        _check_schedule(kept, config, contents.path)
    keys: dict[str, int] = {}
    for key in state_dict:
        part = key.split(".", 1)[0]
        keys[part] = keys.get(part, 0) + 1
    return CheckReport(path=contents.path, config=config, parameters=meta.parameter_counts(),
                       stored=part_numel(state_dict), keys=keys, dtypes=dtype_counts(state_dict),
                       container_keys=sorted(contents.container), placeholders=contents.placeholders)
