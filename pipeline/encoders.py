"""Frame encoders: per-backbone feature maps of a frame -> one vector. Every kind dprgb knows is
one entry of `ENCODER_KINDS`, which loading (`load_encoder`), recording in a policy file
(`encoder_record`) and rebuilding from one (`rebuild_encoder`) all read: a new kind is one entry.

- `reference`, `spatial`, `pooled` (`dprgb.pipeline.builtin_encoders`): built from options alone.
- an RGB2PC checkpoint, `.pt`/`.pth` (`dprgb.pipeline.rgb2pc`, `rgb2pc_checkpoint`): the trained
  features_model encoder.
- a TorchScript file (any suffix, detected by its content), kept whole in a policy file.
- `module:factory`: a plugin the user names; a policy file records it but never imports it.

Every encoder is an `nn.Module` with the `FrameEncoder` interface. A policy file carries its
encoder as data (`encoder_record` + the state dict, and a TorchScript archive's bytes);
`rebuild_encoder` makes the module again from that alone. It never imports what a record names:
a plugin's module comes from the caller.
"""

from __future__ import annotations

import hashlib
import importlib
import io
import re
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from dprgb.errors import DprgbError
from dprgb.pipeline.builtin_encoders import PooledEncoder, ReferenceEncoder, SpatialEncoder, spatial_stats
from dprgb.pipeline.rgb2pc import RGB2PCEncoder
from dprgb.pipeline.rgb2pc_checkpoint import describe_rgb2pc, load_rgb2pc, read_checkpoint

__all__ = [
    "ENCODER_KINDS",
    "FrameEncoder",
    "PooledEncoder",
    "RGB2PCEncoder",
    "ReferenceEncoder",
    "ScriptedEncoder",
    "SpatialEncoder",
    "build_plugin",
    "describe_rgb2pc",
    "encoder_kind",
    "encoder_record",
    "is_torchscript",
    "load_encoder",
    "load_rgb2pc",
    "rebuild_encoder",
    "spatial_stats",
]


@runtime_checkable
class FrameEncoder(Protocol):
    """What every dprgb encoder (an nn.Module) provides."""

    backbones: list[str]  # backbone names it consumes, in its order
    out_dim: int  # D

    def forward(self, features: dict[str, Tensor]) -> Tensor:
        """features[name]: (B, Hf, Wf, C_name), one entry per backbone -> (B, D)."""
        ...


class ScriptedEncoder(nn.Module):
    """A TorchScript module behind the FrameEncoder interface, as a plain nn.Module (a
    ScriptModule refuses some nn.Module methods, e.g. requires_grad_). State dict under
    `module.`."""

    def __init__(self, module: torch.jit.ScriptModule, backbones: list[str], out_dim: int,
                 archive: bytes = b""):
        super().__init__()
        self.module = module
        self.archive = archive  # the TorchScript file's bytes: its code, for a policy file
        self.backbones = list(backbones)
        self.out_dim = int(out_dim)

    def forward(self, features: dict[str, Tensor]) -> Tensor:
        return self.module(features)


_FACTORY_SPEC = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
_RGB2PC_OPTIONS = {"backbone_order", "nhead", "num_tokens", "token_seed", "moe_activation"}
_REFERENCE_OPTIONS = {"out_dim", "seed"}
_SPATIAL_OPTIONS = {"grid", "channels", "seed"}
# Options the loader supplies (the stores' map shapes), not the user: kept out of fingerprints;
# what they decide (the spatial encoder's cells) is in the architecture, which is hashed.
_LOADER_OPTIONS = {"frame_shapes"}


def is_torchscript(path: str | Path) -> bool:
    """A zip archive with TorchScript's code/ folder or constants.pkl (torch.save archives
    have neither), so plain checkpoints never reach torch.jit.load."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
    return any(n.endswith("/constants.pkl") or "/code/" in n for n in names)


def _check_options(options: dict, allowed: set[str], what: str) -> None:
    unknown = sorted(set(options) - allowed - _LOADER_OPTIONS)
    if unknown:
        raise DprgbError(f"unknown {what} encoder options {unknown}; known: {sorted(allowed)}")


# ---- the builders: (spec, backbone_dims, options) -> (module, the options its fingerprint hashes)


def _build_reference(spec: str, backbone_dims: dict[str, int] | None,
                     options: dict) -> tuple[nn.Module, dict]:
    _check_options(options, _REFERENCE_OPTIONS, "reference")
    if not backbone_dims:
        raise DprgbError("the reference encoder needs backbone_dims (name -> channels)")
    encoder = ReferenceEncoder(
        backbone_dims, out_dim=options.get("out_dim", 256), seed=options.get("seed", 0)
    )
    return encoder, {
        "encoder": "reference",
        "backbone_dims": encoder.backbone_dims,
        "out_dim": encoder.out_dim,
        "seed": encoder.seed,
    }


def _build_spatial(spec: str, backbone_dims: dict[str, int] | None,
                   options: dict) -> tuple[nn.Module, dict]:
    _check_options(options, _SPATIAL_OPTIONS, "spatial")
    if not backbone_dims:
        raise DprgbError("the spatial encoder needs backbone_dims (name -> channels)")
    kwargs = {k: options[k] for k in _SPATIAL_OPTIONS if k in options}
    if options.get("frame_shapes"):  # the stores' maps: square cells, none finer than a map's own
        kwargs["cells"] = SpatialEncoder.cells_for(options["frame_shapes"], kwargs.get("grid", 8))
    encoder = SpatialEncoder(backbone_dims, **kwargs)
    return encoder, {"encoder": "spatial", **encoder.architecture()}


def _build_pooled(spec: str, backbone_dims: dict[str, int] | None, options: dict) -> tuple[nn.Module, dict]:
    _check_options(options, set(), "pooled")
    if not backbone_dims:
        raise DprgbError("the pooled encoder needs backbone_dims (name -> channels)")
    encoder = PooledEncoder(backbone_dims)
    # no weights to hash: the backbones, in order, are everything that shapes its output
    return encoder, {"encoder": "pooled", **encoder.architecture()}


def _build_rgb2pc(spec: str, backbone_dims: dict[str, int] | None, options: dict) -> tuple[nn.Module, dict]:
    path = Path(spec)
    _check_options(options, _RGB2PC_OPTIONS, "RGB2PC")
    kwargs = {k: v for k, v in options.items() if k in _RGB2PC_OPTIONS}
    encoder = load_rgb2pc(path, **kwargs)
    for name, dim in zip(encoder.backbones, encoder.backbone_dims, strict=True):
        if backbone_dims and name in backbone_dims and backbone_dims[name] != dim:
            raise DprgbError(
                f"the checkpoint's {name} adapter takes C={dim} but the {name} features have "
                f"C={backbone_dims[name]}; check the backbone order",
                path=path,
            )
    resolved: dict[str, Any] = {
        "encoder": "rgb2pc",
        "backbones": encoder.backbones,
        "num_tokens": encoder.num_tokens,
        "student_pool": encoder.student_pool,
    }
    # Only options that reach the outputs of this particular checkpoint.
    if encoder.student_pool != "mean":
        resolved["token_seed"] = encoder.token_seed
    if encoder.context_encoder is not None:
        resolved["nhead"] = encoder.nhead
    if encoder.fusion_kind == "moe":
        resolved["moe_activation"] = options.get("moe_activation", "gelu")
    return encoder, resolved


def _build_torchscript(spec: str, backbone_dims: dict[str, int] | None,
                       options: dict) -> tuple[nn.Module, dict]:
    path = Path(spec)
    _check_options(options, set(), "TorchScript")
    try:
        module = torch.jit.load(str(path), map_location="cpu")
    except RuntimeError as exc:
        raise DprgbError(f"cannot load TorchScript encoder ({exc})", path=path) from exc
    # Its code is part of what it computes and is not in the state dict: hash the file.
    file_hash = hashlib.sha256(path.read_bytes()).hexdigest()
    return module, {"encoder": "torchscript", "file_sha256": file_hash}


def build_plugin(spec: str, kwargs: dict) -> nn.Module:
    """`module:factory`, imported and called with `kwargs`: only ever for a spec the user
    wrote (config, command line, a caller's argument), never one read from a file."""
    if not _FACTORY_SPEC.match(spec):
        raise DprgbError(f"encoder plugin {spec!r} is not of the form module:factory")
    module_name, factory_name = spec.split(":")
    try:
        factory = getattr(importlib.import_module(module_name), factory_name)
    except (ImportError, AttributeError) as exc:
        raise DprgbError(f"cannot find encoder factory {spec!r} ({exc})") from exc
    try:
        module = factory(**kwargs)
    except Exception as exc:  # the plugin's own error, reported on one line
        raise DprgbError(f"encoder factory {spec!r} failed: {exc!r}") from exc
    if not isinstance(module, nn.Module):
        raise DprgbError(f"encoder factory {spec!r} returned {type(module).__name__}, not a Module")
    return module


def _build_factory(spec: str, backbone_dims: dict[str, int] | None, options: dict) -> tuple[nn.Module, dict]:
    kwargs = {k: v for k, v in options.items() if k not in _LOADER_OPTIONS}
    module = build_plugin(spec, kwargs)
    # The factory's code is not hashed: a plugin can expose `version` to mark changes.
    resolved = {"encoder": "factory", "factory": spec, "kwargs": kwargs}
    if getattr(module, "version", None) is not None:
        resolved["version"] = module.version
    return module, resolved


# ---- the registry -----------------------------------------------------------------------------


def _from_architecture(cls: type[nn.Module]) -> Callable[[dict, bytes | None], nn.Module]:
    return lambda record, archive: cls(**record["architecture"])


def _rebuild_torchscript(record: dict, archive: bytes | None) -> nn.Module:
    if not archive:
        raise DprgbError("the policy file's TorchScript encoder has no encoder_archive")
    module = torch.jit.load(io.BytesIO(bytes(archive)), map_location="cpu")
    return ScriptedEncoder(module, record["backbones"], record["out_dim"], bytes(archive))


def _is_file_with(suffixes: tuple[str, ...] | None) -> Callable[[str], bool]:
    """A spec naming an existing file: a TorchScript archive (suffixes None), else a checkpoint
    with one of `suffixes` that is not TorchScript."""
    def matches(spec: str) -> bool:
        path = Path(spec)
        if not path.is_file():
            return False
        if suffixes is None:
            return is_torchscript(path)
        return path.suffix in suffixes and not is_torchscript(path)
    return matches


@dataclass(frozen=True)
class EncoderKind:
    """One kind of encoder: how a config's `encoder:` names it, how it is built, how a policy file
    records and rebuilds it."""

    name: str  # what a policy file records as the encoder's kind
    named_by: str  # how a config names it, for messages
    matches: Callable[[str], bool]  # does this `encoder:` spec name this kind
    build: Callable[[str, dict[str, int] | None, dict], tuple[nn.Module, dict]]
    module_type: type | None  # an encoder of this type is of this kind (None: any other module)
    rebuild: Callable[[dict, bytes | None], nn.Module] | None  # None: the caller builds it
    takes_weights: bool = True  # `encoder_weights` may be loaded into it


ENCODER_KINDS: tuple[EncoderKind, ...] = (
    EncoderKind("reference", "'reference'", lambda spec: spec == "reference", _build_reference,
                ReferenceEncoder, _from_architecture(ReferenceEncoder)),
    EncoderKind("spatial", "'spatial'", lambda spec: spec == "spatial", _build_spatial,
                SpatialEncoder, _from_architecture(SpatialEncoder)),
    EncoderKind("pooled", "'pooled'", lambda spec: spec == "pooled", _build_pooled,
                PooledEncoder, _from_architecture(PooledEncoder)),
    EncoderKind("torchscript", "a TorchScript file", _is_file_with(None), _build_torchscript,
                ScriptedEncoder, _rebuild_torchscript),
    EncoderKind("rgb2pc", "an RGB2PC checkpoint (.pt/.pth)", _is_file_with((".pt", ".pth")), _build_rgb2pc,
                RGB2PCEncoder, _from_architecture(RGB2PCEncoder), takes_weights=False),
    EncoderKind("plugin", "'module:factory'", lambda spec: bool(_FACTORY_SPEC.match(spec)), _build_factory,
                None, None),
)


def encoder_kind(spec: str) -> EncoderKind:
    """The kind a config's `encoder:` names; one line listing the kinds otherwise."""
    for kind in ENCODER_KINDS:
        if kind.matches(spec):
            return kind
    if Path(spec).is_file():
        raise DprgbError("not a TorchScript archive nor a .pt/.pth checkpoint", path=Path(spec))
    named = [kind.named_by for kind in ENCODER_KINDS]
    raise DprgbError(f"encoder spec {spec!r} is not {', '.join(named[:-1])} or {named[-1]}")


def _load_weights(encoder: nn.Module, weights: str | Path) -> None:
    state = read_checkpoint(weights)  # weights_only=True, refuses foreign globals
    if isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    try:
        encoder.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise DprgbError(f"weights do not fit the encoder: {exc}", path=weights) from exc


def _dry_run_dim(encoder: nn.Module, backbones: list[str], frame_shapes: dict) -> int:
    """out_dim from one all-zero frame per backbone, shapes frame_shapes[name] = (Hf, Wf, C)."""
    missing = [name for name in backbones if name not in frame_shapes]
    if missing:
        raise DprgbError(f"options['frame_shapes'] lacks {missing} for the encoder's dry run")
    features = {name: torch.zeros(1, *frame_shapes[name]) for name in backbones}
    with torch.no_grad():
        out = encoder(features)
    if not isinstance(out, Tensor) or out.ndim != 2 or out.shape[0] != 1:
        shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise DprgbError(f"encoder returned {shape} for one frame; expected (1, D)")
    return int(out.shape[1])


def _interface(
    encoder: nn.Module, backbone_dims: dict[str, int] | None, frame_shapes: dict | None
) -> tuple[list[str], int]:
    """(backbones, out_dim) of a plugin: its own attributes, else inferred (backbones from
    backbone_dims in the caller's order; out_dim by a dry run on frame_shapes)."""
    backbones = getattr(encoder, "backbones", None)
    if backbones is None:
        if not backbone_dims:
            raise DprgbError("encoder has no `backbones` attribute; pass backbone_dims")
        backbones = list(backbone_dims)
    backbones = [str(name) for name in backbones]
    if backbone_dims is not None:
        lacking = [name for name in backbones if name not in backbone_dims]
        if lacking:
            raise DprgbError(f"encoder needs backbones {lacking} that the data does not have")
    out_dim = getattr(encoder, "out_dim", None)
    if out_dim is None:
        if not frame_shapes:
            raise DprgbError(
                "encoder has no `out_dim` attribute; pass options['frame_shapes'] "
                "({name: (Hf, Wf, C)}) so dprgb can find it with a dry run"
            )
        out_dim = _dry_run_dim(encoder, backbones, frame_shapes)
    return backbones, int(out_dim)


def load_encoder(
    spec: str,
    *,
    backbone_dims: dict[str, int] | None = None,
    weights: str | None = None,
    options: dict | None = None,
) -> tuple[nn.Module, dict]:
    """Build the encoder named by spec (see `ENCODER_KINDS`); returns (encoder in eval mode,
    the options its fingerprint hashes with the weights).

    options: the kind's own (reference: out_dim, seed; RGB2PC: backbone_order, nhead, num_tokens,
    token_seed, moe_activation; a plugin's factory gets them as keyword arguments).
    weights: a state dict file (weights_only=True) loaded strictly into the module.
    options["frame_shapes"] = {name: (Hf, Wf, C)} is only used to find a plugin's out_dim by a
    dry run when it has no `out_dim` attribute; a plugin without `backbones` consumes
    backbone_dims' names. Parameters are frozen (requires_grad False).
    """
    options = dict(options or {})
    kind = encoder_kind(spec)
    if weights is not None and not kind.takes_weights:
        raise DprgbError(f"{kind.named_by} holds its own weights; drop weights", path=Path(spec))
    encoder, resolved = kind.build(spec, backbone_dims, options)
    if weights is not None:
        _load_weights(encoder, weights)
    encoder.eval()  # before any dry run: dropout and batch-norm behave as they will in use
    backbones, out_dim = _interface(encoder, backbone_dims, options.get("frame_shapes"))
    if isinstance(encoder, torch.jit.ScriptModule):
        encoder = ScriptedEncoder(encoder, backbones, out_dim, Path(spec).read_bytes()).eval()
    else:
        encoder.backbones, encoder.out_dim = backbones, out_dim
    encoder.requires_grad_(False)
    return encoder, resolved


# ---- as data, in a policy file -------------------------------------------------------------------


def encoder_record(encoder: nn.Module, spec: str) -> dict[str, Any]:
    """What rebuilds `encoder` without the files it came from: its kind, interface and
    constructor arguments (`rebuild_encoder` with its state dict, and for TorchScript the
    archive). `spec` is kept to say where it came from, never to load from."""
    record: dict[str, Any] = {"backbones": list(encoder.backbones), "out_dim": int(encoder.out_dim),
                              "source": str(spec)}
    kind = next((k for k in ENCODER_KINDS if k.module_type is not None and type(encoder) is k.module_type),
                ENCODER_KINDS[-1])
    record["kind"] = kind.name
    if hasattr(encoder, "architecture") and kind.module_type is not None:
        record["architecture"] = encoder.architecture()
    return record


def rebuild_encoder(record: dict[str, Any], state: dict[str, Tensor], archive: bytes | None = None,
                    plugin: nn.Module | None = None) -> nn.Module:
    """The encoder a policy file describes, with its weights, frozen and in eval mode.

    A plugin's module must come from the caller (`plugin`): a file never decides what code
    runs. For the other kinds `plugin` replaces the rebuilt module when given.
    """
    kind = next((k for k in ENCODER_KINDS if k.name == record.get("kind")), None)
    if plugin is not None:
        encoder = plugin
    elif kind is None:
        raise DprgbError(f"the policy file's encoder record is not one dprgb knows: "
                         f"kind={record.get('kind')!r}")
    elif kind.rebuild is None:
        raise DprgbError(
            f"the policy's encoder is a plugin ({record.get('source')!r}); a policy file never "
            "imports code: build the module yourself and pass it, from_checkpoint(path, "
            "encoder=module) or encoder='module:factory'"
        )
    else:
        encoder = kind.rebuild(record, archive)
    try:
        encoder.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise DprgbError(f"the policy's encoder weights do not fit the encoder: {exc}") from None
    encoder.backbones, encoder.out_dim = list(record["backbones"]), int(record["out_dim"])
    return encoder.requires_grad_(False).eval()
