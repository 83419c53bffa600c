"""Residual files: safetensors with kohya/ComfyUI LoRA keys plus PerRes metadata.

Per layer the file holds `<kohya prefix>.lora_up.weight` = A, `.lora_down.weight` = B and `.alpha` = r, so
that every LoRA loader computes W + strength·(alpha/r)·A·B = W + strength·ΔW exactly. The kohya prefix, the
factors' shape ((m, r, 1, 1) for SD1.x's 1×1 convs, (m, r) for the Linear layers of SDXL and the DiTs) and the
metadata other tools read (ss_base_model_version, modelspec.architecture) come from the model family
(perres_core.families).
Only safetensors are ever read: pickle files can run code when loaded.
"""
from __future__ import annotations

import json
import math
import os
import struct
import tempfile
from functools import lru_cache
from typing import Iterable, Mapping, Optional

import torch
from safetensors import safe_open

from .errors import PerResError
from .families import FAMILIES, ModelFamily, a_model, family_of_kohya_prefixes
from .residual import ConceptInfo, LowRankResidual, ResidualSet, family_of

FORMAT_VERSION = "1"
META_PREFIX = "perres."
UP, DOWN, ALPHA = ".lora_up.weight", ".lora_down.weight", ".alpha"
# The largest legitimate residual: Krea 2 at rank_ratio 1 (r = 379 on 56 layers) takes 1.5 GB in fp32 (at the
# default 0.05: 74 MB; SD1.5 full rank: 99 MB). Checkpoints and full models are larger; and a file is refused on
# its header (no PerRes metadata) before any tensor is read.
MAX_FILE_BYTES = 2 * 1024 ** 3
PICKLE_EXTENSIONS = (".pt", ".pth", ".ckpt", ".bin", ".pkl", ".pickle")
DAMAGED_FIX = "Copy the file again, or train and save the residual again with 'PerRes Save Residuals'."
MAX_HEADER_BYTES = 100 * 1024 * 1024
# A PerRes header (48 tensor entries plus metadata) is about 10 KB; listing never reads more than this per file.
LISTING_HEADER_BYTES = 1024 * 1024
# modelspec (the Stability AI model spec) is what A1111/Forge and model sites read; its architecture and
# implementation are the family's (what kohya's sd-scripts writes for that family's LoRAs).
MODELSPEC_VERSION = "1.0.0"
MODELSPEC_DATE = "modelspec.date"


def residuals_to_state_dict(residuals: ResidualSet) -> dict[str, torch.Tensor]:
    """Tensors in kohya LoRA layout (4-D factors for the 1×1 convs, as sd-scripts writes them)."""
    state = {}
    family = family_of(residuals)
    for path, layer in residuals.layers.items():
        known = family.layer_by_path.get(path)
        if known is None:
            raise PerResError(f"No file name is known for layer '{path}'; only {family.name}'s residual layers are "
                              "saved.")
        up = layer.up.detach().float().cpu().contiguous()
        down = layer.down.detach().float().cpu().contiguous()
        if layer.conv:
            up, down = up[..., None, None], down[..., None, None]
        state[known.lora_name + UP] = up.contiguous()
        state[known.lora_name + DOWN] = down.contiguous()
        state[known.lora_name + ALPHA] = torch.tensor(float(layer.rank))
    return state


def residuals_metadata(residuals: ResidualSet, pack_version: str) -> dict[str, str]:
    concept = residuals.concept
    meta = {
        "format": FORMAT_VERSION,
        "identifier": concept.identifier,
        "class_word": concept.class_word,
        "caption_template": concept.caption_template,
        "rank_ratio": repr(float(residuals.rank_ratio)),
        "base_model": residuals.base_model,
        "pack_version": pack_version,
        **{k: str(v) for k, v in residuals.training.items()},
    }
    out = {META_PREFIX + k: v for k, v in meta.items()}
    # Lets kohya-style tools recognise the file as a plain LoRA.
    out["ss_network_module"] = "networks.lora"
    out["ss_base_model_version"] = family_of(residuals).kohya_base_version
    out.update(modelspec_metadata(residuals))
    return out


def modelspec_metadata(residuals: ResidualSet) -> dict[str, str]:
    """The modelspec.* fields, so that the trigger words travel with the file into other tools."""
    concept, family = residuals.concept, family_of(residuals)
    words = f"{concept.identifier} {concept.class_word}"
    resolution = residuals.training.get("resolution", str(family.resolution))
    out = {"modelspec.sai_model_spec": MODELSPEC_VERSION, "modelspec.architecture": family.modelspec_architecture,
           "modelspec.implementation": family.modelspec_implementation,
           "modelspec.title": f"{words} (PerRes residual)", "modelspec.trigger_phrase": words,
           "modelspec.resolution": f"{resolution}x{resolution}"}
    if residuals.date:
        out[MODELSPEC_DATE] = residuals.date
    return out


def serialize_safetensors(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> bytes:
    """Safetensors bytes with sorted header keys, so equal residuals give byte-identical files.

    (safetensors' own writer orders the metadata by a hash map, which differs between runs.)
    """
    header: dict = {"__metadata__": dict(sorted(metadata.items()))}
    chunks, offset = [], 0
    for name in sorted(tensors):
        tensor = tensors[name].detach().to("cpu", torch.float32).contiguous()
        raw = tensor.numpy().astype("<f4").tobytes()
        header[name] = {"dtype": "F32", "shape": list(tensor.shape), "data_offsets": [offset, offset + len(raw)]}
        chunks.append(raw)
        offset += len(raw)
    encoded = json.dumps(header, separators=(",", ":")).encode("utf-8")
    encoded += b" " * (-len(encoded) % 8)  # the format aligns the data to 8 bytes
    return struct.pack("<Q", len(encoded)) + encoded + b"".join(chunks)


def save_residual_file(residuals: ResidualSet, path: str, pack_version: str) -> str:
    """Write `path` atomically and never over an existing file. Returns the path written."""
    data = serialize_safetensors(residuals_to_state_dict(residuals), residuals_metadata(residuals, pack_version))
    directory = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(directory, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".perres-", suffix=".partial", dir=directory)
    except OSError as exc:
        raise _not_written(path, exc) from exc
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        _publish_without_overwrite(tmp, path)
    except OSError as exc:  # full disk, no permission, ...: the temp file goes, the final name never appears
        raise _not_written(path, exc) from exc
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def _not_written(path: str, exc: OSError) -> PerResError:
    return PerResError(f"could not write '{path}' ({exc.strerror or exc}); nothing was saved. "
                       "Free disk space or fix the folder's permissions, then run the workflow again.")


def _publish_without_overwrite(tmp: str, path: str) -> None:
    """Give the finished temp file its final name; fail if that name is already taken."""
    try:
        os.link(tmp, path)  # atomic, and refuses an existing name
    except FileExistsError:
        raise PerResError(f"'{path}' already exists and is never overwritten; choose another filename_prefix.")
    except OSError:  # file systems without hard links
        if os.path.exists(path):
            raise PerResError(f"'{path}' already exists and is never overwritten; choose another filename_prefix.")
        os.replace(tmp, path)


def check_loadable_path(path: str) -> None:
    """Refuse anything but a reasonably sized .safetensors file before a single byte is parsed."""
    name = os.path.basename(path)
    lowered = name.lower()
    if lowered.endswith(PICKLE_EXTENSIONS):
        raise PerResError(f"'{name}' is a pickle file; PerRes never unpickles files because that can run code. "
                          "Only .safetensors residuals are loaded.")
    if not lowered.endswith(".safetensors"):
        raise PerResError(f"'{name}' is not a .safetensors file; PerRes loads only .safetensors residuals.")
    if not os.path.isfile(path):
        raise PerResError(f"Residual file '{path}' does not exist.")
    size = os.path.getsize(path)
    if size > MAX_FILE_BYTES:
        raise PerResError(f"'{name}' is {size / 2**20:.0f} MiB; a PerRes residual is at most "
                          f"{MAX_FILE_BYTES / 2**20:.0f} MiB. This is not a residual (a checkpoint or a full LoRA?).")


def read_header(path: str, limit: int = MAX_HEADER_BYTES) -> dict:
    """The safetensors JSON header only (8-byte length, then JSON); the tensors are never read."""
    size = os.path.getsize(path)
    with open(path, "rb") as handle:
        raw = handle.read(8)
        if len(raw) < 8:
            raise PerResError(f"'{os.path.basename(path)}' is truncated or not a safetensors file. {DAMAGED_FIX}")
        (header_len,) = struct.unpack("<Q", raw)
        if header_len > size - 8 or header_len > limit:
            raise PerResError(f"'{os.path.basename(path)}' is truncated or corrupt (bad safetensors header). "
                              f"{DAMAGED_FIX}")
        try:
            header = json.loads(handle.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError):
            header = None
    if not isinstance(header, dict) or not isinstance(header.get("__metadata__") or {}, dict):
        raise PerResError(f"'{os.path.basename(path)}' is corrupt: its safetensors header is not a valid JSON "
                          f"object. {DAMAGED_FIX}")
    return header


def is_residual_file(path: str) -> bool:
    """Whether `path` is a .safetensors file whose header carries PerRes metadata (for file lists).

    Cached by path, modification time and size, so a list of hundreds of LoRAs reads each header once.
    """
    if not path.lower().endswith(".safetensors"):
        return False
    try:
        stat = os.stat(path)
    except OSError:
        return False
    return _has_perres_metadata(path, stat.st_mtime_ns, stat.st_size)


@lru_cache(maxsize=4096)
def _has_perres_metadata(path: str, mtime_ns: int, size: int) -> bool:
    if size > MAX_FILE_BYTES:  # checkpoints and full LoRAs: not even their header is read
        return False
    try:
        metadata = read_header(path, LISTING_HEADER_BYTES).get("__metadata__") or {}
    except (OSError, PerResError):
        return False
    return META_PREFIX + "format" in metadata


def load_residual_file(path: str) -> ResidualSet:
    """Read and validate a PerRes residual file; every problem becomes a PerResError that names it."""
    check_loadable_path(path)
    name = os.path.basename(path)
    try:
        header = read_header(path)
    except OSError as exc:
        raise PerResError(f"'{name}' cannot be read ({exc.strerror or exc}); check that the file is readable.") from exc
    metadata = header.get("__metadata__") or {}
    require_perres_format([key for key in header if key != "__metadata__"], metadata, name)  # before any tensor
    try:
        with safe_open(path, framework="pt", device="cpu") as handle:
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except Exception as exc:  # safetensors raises several types for damaged files
        raise PerResError(f"'{name}' is truncated or corrupt and cannot be read ({exc}). {DAMAGED_FIX}") from exc
    return residuals_from_state_dict(tensors, metadata, name)


def require_perres_format(keys: Iterable[str], metadata: Mapping[str, str], name: str) -> None:
    """Refuse a file without PerRes metadata (an ordinary LoRA, a checkpoint) or of another format version."""
    if metadata.get(META_PREFIX + "format") is None:
        kind = "an ordinary LoRA, not" if any(k.endswith(UP) or "lora" in k for k in keys) else "not"
        raise PerResError(f"'{name}' is {kind} a PerRes residual (it has no PerRes metadata). "
                          "Load LoRAs with ComfyUI's LoraLoader, or pick a file saved by 'PerRes Save Residuals'.")
    if metadata[META_PREFIX + "format"] != FORMAT_VERSION:
        raise PerResError(f"'{name}' uses PerRes file format {metadata[META_PREFIX + 'format']!r}; "
                          f"this version of the pack reads format {FORMAT_VERSION}. Update the pack.")


def residuals_from_state_dict(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str],
                              name: str = "residual") -> ResidualSet:
    require_perres_format(tensors, metadata, name)
    family = _family_of_tensors(tensors, name)
    stated = metadata.get(META_PREFIX + "base_model", family.name)
    if stated != family.name:
        raise PerResError(f"'{name}' says it was trained on {stated!r} but holds {family.name} layers; the file is "
                          f"damaged. {DAMAGED_FIX}")
    layers = _layers_from_tensors(tensors, family, name)
    concept, rank_ratio, training = _metadata_fields(metadata, name)
    date = metadata.get(MODELSPEC_DATE, "")
    return ResidualSet(layers=layers, concept=concept, rank_ratio=rank_ratio, base_model=family.name,
                       training=training, date=date if isinstance(date, str) else "")


def _layer_prefix(key: str) -> Optional[str]:
    for suffix in (UP, DOWN, ALPHA):
        if key.endswith(suffix):
            return key[: -len(suffix)]
    return None


def _family_of_tensors(tensors: Mapping[str, torch.Tensor], name: str) -> ModelFamily:
    """The one family every tensor of the file belongs to (its kohya layer names say which)."""
    prefixes = {_layer_prefix(key) for key in tensors}
    family = family_of_kohya_prefixes(prefixes) if None not in prefixes else None
    if family is not None:
        return family
    if not tensors:
        raise PerResError(f"'{name}' contains no residual tensors.")
    known = set().union(*(f.layer_by_lora for f in FAMILIES))
    unknown = sorted(key for key in tensors if _layer_prefix(key) not in known)
    if unknown:
        unets = " or ".join(f.name for f in FAMILIES if not f.is_dit)
        dits = " or ".join(f.name for f in FAMILIES if f.is_dit)
        raise PerResError(f"'{name}' has {len(unknown)} key(s) that are not proj_out residuals of {unets}, nor "
                          f"block-output residuals of {dits}, e.g. {unknown[:3]}. It is not a PerRes residual; "
                          "pick a file saved by 'PerRes Save Residuals'.")
    raise PerResError(f"'{name}' mixes layers of several model families; it is not a PerRes residual. {DAMAGED_FIX}")


def _layers_from_tensors(tensors: Mapping[str, torch.Tensor], family: ModelFamily,
                         name: str) -> dict[str, LowRankResidual]:
    prefixes: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        prefix = _layer_prefix(key)
        prefixes.setdefault(prefix, {})[key[len(prefix):]] = tensor
    layers = {}
    for prefix, parts in sorted(prefixes.items()):
        known = family.layer_by_lora[prefix]
        path = known.path
        kind = path.split(".", 2)[-1] if family.is_dit else "proj_out"  # e.g. "attn.wo" of blocks.3
        if UP not in parts or DOWN not in parts:
            raise PerResError(f"'{name}': layer {path} lacks its lora_up or lora_down tensor.")
        up, down = parts[UP].float(), parts[DOWN].float()
        if up.dim() not in (2, 4) or down.dim() not in (2, 4):
            raise PerResError(f"'{name}': layer {path} has up {tuple(up.shape)} and down "
                              f"{tuple(down.shape)}, which are not low-rank factors. {DAMAGED_FIX}")
        conv = up.dim() == 4
        up2, down2 = up.flatten(1), down.flatten(1)
        m, r = up2.shape
        if (conv and (up.shape[2:] != (1, 1) or down.dim() != 4 or down.shape[2:] != (1, 1))) \
                or down2.shape[0] != r or m != known.out_features or down2.shape[1] != known.in_features:
            raise PerResError(f"'{name}': layer {path} has up {tuple(up.shape)} and down {tuple(down.shape)}, "
                              f"which do not fit {family.name}'s {known.out_features}×{known.in_features} {kind}. The "
                              f"file was made for another model; train the residual again on {a_model(family.name)}.")
        if not (torch.isfinite(up2).all() and torch.isfinite(down2).all()):
            raise PerResError(f"'{name}': layer {path} contains NaN or Inf values; the file is damaged "
                              "or came from a diverged training run. Train it again with a lower learning rate.")
        alpha = parts.get(ALPHA)
        if alpha is not None and alpha.numel() != 1:
            raise PerResError(f"'{name}': layer {path} has an alpha of shape {tuple(alpha.shape)} "
                              f"instead of one number. {DAMAGED_FIX}")
        scale = 1.0 if alpha is None else float(alpha) / r
        if not math.isfinite(scale):
            raise PerResError(f"'{name}': layer {path} has a non-finite alpha. {DAMAGED_FIX}")
        layer = LowRankResidual(m, down2.shape[1], r, conv=known.conv)
        with torch.no_grad():
            layer.up.copy_(up2 * scale)  # fold alpha/r so that ΔW = up·down
            layer.down.copy_(down2)
        layer.requires_grad_(False)
        layers[path] = layer
    return layers


def _metadata_fields(metadata: Mapping[str, str], name: str) -> tuple[ConceptInfo, float, dict[str, str]]:
    def field(key: str, default: str) -> str:
        value = metadata.get(META_PREFIX + key, default)
        if not isinstance(value, str):
            raise PerResError(f"'{name}': metadata '{key}' is garbled.")
        return value

    identifier, class_word = field("identifier", "").strip(), field("class_word", "").strip()
    template = field("caption_template", "a photo of a {identifier} {class_word}")
    if not identifier or not class_word:
        raise PerResError(f"'{name}': the metadata lacks the identifier or class word; the file is damaged. "
                          "Re-save it with 'PerRes Save Residuals'.")
    try:
        template.format(identifier=identifier, class_word=class_word)
        rank_ratio = float(field("rank_ratio", "0.05"))
        if not 0.0 < rank_ratio <= 1.0:  # also refuses nan
            raise ValueError(f"rank_ratio {rank_ratio} is not in (0, 1]")
    except (KeyError, IndexError, ValueError) as exc:
        raise PerResError(f"'{name}': garbled metadata ({exc}). Re-save the residual.") from exc
    known = {"format", "identifier", "class_word", "caption_template", "rank_ratio", "base_model"}
    training = {k[len(META_PREFIX):]: v for k, v in metadata.items()
                if k.startswith(META_PREFIX) and k[len(META_PREFIX):] not in known}
    return ConceptInfo(identifier, class_word, template), rank_ratio, training
