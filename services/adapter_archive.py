"""Checking uploaded LoRA adapter archives: reading their members and parsing what they hold.

An uploaded adapter is an archive (zip, tar or tar.gz) of a peft or diffusers adapter directory:
`adapter_config.json` and one `.safetensors` weights file, at the root or inside one top-level
directory, nothing else. Every member is checked as it is read (names, links, sizes against the
cap); pickle-based weights are refused without being opened; the safetensors header and
`adapter_config.json` are parsed here (no torch in the API), and the adapter must suit the model's
kind. Members are inflated in chunks into temporary files, never whole into memory, and an archive
may unpack to at most MAX_RATIO times its own size (checked while inflating: a zip bomb stops
there). `check_archive` returns a `CheckedAdapter`; genq.services.adapters stores it.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import re
import stat
import tarfile
import tempfile
import zipfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from types import TracebackType
from typing import IO, Any

from genq.shared.kinds import ADAPTER_KINDS
from genq.shared.registry import ModelSpec

CONFIG_NAME = "adapter_config.json"
# Stored weights names: the file peft's PeftModel and diffusers' load_lora_weights look for by default.
WEIGHTS_NAMES = {"text": "adapter_model.safetensors", "image": "pytorch_lora_weights.safetensors"}
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
MAX_CONFIG_BYTES = 1024 * 1024
MAX_HEADER_BYTES = 100 * 1024 * 1024  # safetensors' own limit
CHUNK = 1024 * 1024
# Unpacked bytes per archive byte, at most (Apache POI's ZipSecureFile refuses the same, 1/0.01):
# safetensors of trained weights hardly compress, a zip bomb inflates a thousandfold.
MAX_RATIO = 100
MIN_UNPACKED_ROOM = 1024 * 1024  # a tiny archive may unpack to this much whatever its ratio
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "I64": 8, "I32": 4,
               "I16": 2, "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1}
_FILE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]{0,199}$")
# lora_A / lora_B, lora_embedding_A / _B and DoRA's lora_magnitude_vector (peft), lora.down / lora.up and
# lora_linear_layer.down / .up (diffusers), lora_down / lora_up (kohya).
_LORA_TENSOR = re.compile(r"(^|[._])lora(_A|_B|_embedding_A|_embedding_B|_magnitude_vector|\.down|\.up|_down|_up"
                          r"|_linear_layer\.down|_linear_layer\.up)(\.|$)")
_IMAGE_PREFIXES = ("unet.", "text_encoder.", "text_encoder_2.", "lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")
_IMAGE_TARGETS = ("to_q", "to_k", "to_v", "to_out")


class AdapterError(ValueError):
    """A rejected adapter archive or adapter reference; the message names what and where."""

    def __init__(self, message: str, *, code: str = "invalid_adapter") -> None:
        super().__init__(message)
        self.message, self.code = message, code


class AdapterTooLarge(AdapterError):
    def __init__(self, limit: int) -> None:
        super().__init__(f"the adapter is over the limit of {limit} bytes (GENQ_MAX_ADAPTER_BYTES)",
                         code="file_too_large")


class AdapterBomb(AdapterError):
    def __init__(self, path: str) -> None:
        super().__init__(f"{path}: the archive unpacks to more than {MAX_RATIO} times its own size; a LoRA "
                         "adapter's weights hardly compress, so this looks like a decompression bomb")


@dataclass(frozen=True)
class Member:
    """An archive member as read: spooled to a temporary file (gone once closed), its size and hash."""

    file: IO[bytes]
    size: int
    sha256: str

    def close(self) -> None:
        self.file.close()


@dataclass(frozen=True)
class CheckedAdapter:
    """An archive that passed every check: its files under their stored names, and what they say.
    A context manager: leaving it closes (and so deletes) the files."""

    files: dict[str, Member]
    rank: int
    lora_alpha: float | None
    target_modules: list[str]

    def __enter__(self) -> CheckedAdapter:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        for member in self.files.values():
            member.close()


# --- reading archives -------------------------------------------------------------------------

Entry = tuple[str, str, int, Callable[[], IO[bytes] | None] | None]  # (path, what it is, size, opener)


def _zip_entries(zf: zipfile.ZipFile) -> Iterator[Entry]:
    for info in zf.infolist():
        mode = info.external_attr >> 16  # Unix mode bits, when the zip was written on Unix
        if info.flag_bits & 0x1:
            yield info.filename, "an encrypted file", 0, None
        elif stat.S_ISLNK(mode):
            yield info.filename, "a symbolic link", 0, None
        elif info.is_dir():
            yield info.filename, "dir", 0, None
        elif stat.S_IFMT(mode) not in (0, stat.S_IFREG):
            yield info.filename, "a special file", 0, None
        else:
            yield info.filename, "file", info.file_size, partial(zf.open, info)


def _tar_entries(tf: tarfile.TarFile) -> Iterator[Entry]:
    for member in tf:
        if member.isdir():
            yield member.name, "dir", 0, None
        elif member.issym():
            yield member.name, "a symbolic link", 0, None
        elif member.islnk():
            yield member.name, "a hard link", 0, None
        elif not member.isreg():
            yield member.name, "a device or special file", 0, None
        else:
            yield member.name, "file", member.size, partial(tf.extractfile, member)


def _parts(path: str) -> list[str]:
    if "\\" in path:
        raise AdapterError(f"{path}: backslashes are not allowed in archive paths")
    if path.startswith("/") or re.match(r"^[A-Za-z]:", path):
        raise AdapterError(f"{path}: absolute paths are not allowed in an adapter archive")
    parts = [p for p in path.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise AdapterError(f"{path}: '..' is not allowed in archive paths")
    return parts


def _check_file_name(name: str, path: str) -> None:
    lower = name.lower()
    if lower.endswith(PICKLE_SUFFIXES):
        raise AdapterError(f"{path}: pickle-based weights ({lower[lower.rfind('.'):]}) are not accepted, as "
                           "loading them can run code; save the adapter with safetensors "
                           "(save_pretrained(..., safe_serialization=True))")
    if name != CONFIG_NAME and not lower.endswith(".safetensors"):
        raise AdapterError(f"{path}: unexpected file; an adapter archive holds only {CONFIG_NAME} and one "
                           ".safetensors weights file")
    if not _FILE_NAME.match(name):
        raise AdapterError(f"{path}: file names may use only letters, digits, '.', '_' and '-'")


@dataclass(frozen=True)
class _Room:
    """How much an archive may unpack: GENQ_MAX_ADAPTER_BYTES, or less where its size times
    MAX_RATIO is less (then going over it is a bomb, not a large adapter)."""

    max_bytes: int
    archive_bytes: int

    @property
    def total(self) -> int:
        return min(self.max_bytes, self.by_ratio)

    @property
    def by_ratio(self) -> int:
        return max(MAX_RATIO * self.archive_bytes, MIN_UNPACKED_ROOM)

    def over(self, path: str) -> AdapterError:
        return AdapterBomb(path) if self.by_ratio < self.max_bytes else AdapterTooLarge(self.max_bytes)


def _spool(opener: Callable[[], IO[bytes] | None], path: str, cap: int, room: _Room) -> Member:
    """Inflate a member into a temporary file a chunk at a time, hashing it, and stop once it passes
    `cap` bytes whatever its header declared."""
    member = opener()
    assert member is not None  # regular files always open
    out = tempfile.TemporaryFile()
    digest, size = hashlib.sha256(), 0
    try:
        with member as fh:
            while chunk := fh.read(min(CHUNK, cap + 1 - size)):
                size += len(chunk)
                if size > cap:
                    raise room.over(path)
                out.write(chunk)
                digest.update(chunk)
    except BaseException:
        out.close()
        raise
    out.seek(0)
    return Member(out, size, digest.hexdigest())


def _collect(entries: Iterator[Entry], room: _Room, files: dict[str, tuple[str, Member]]) -> None:
    """Check every member as it is met; spool the files into `files` (flattened name -> (archive
    path, member)), which the caller closes whatever happens."""
    folders: set[str] = set()  # "" for files at the root
    total = 0
    for path, what, size, opener in entries:
        parts = _parts(path)
        if what == "dir" and len(parts) > 1 or what == "file" and len(parts) > 2:
            raise AdapterError(f"{path}: nested directories are not allowed; put the files at the root or "
                               "in one top-level directory")
        if what in ("dir", "file") and parts:
            folders.add(parts[0] if what == "dir" or len(parts) == 2 else "")
            if len(folders) > 1:
                raise AdapterError(f"{path}: the files must all sit at the root or all inside one top-level "
                                   "directory")
        if what == "dir":
            continue
        if what != "file":
            raise AdapterError(f"{path}: {what} is not allowed in an adapter archive")
        if not parts:
            raise AdapterError(f"{path!r}: a file needs a name")
        name = parts[-1]
        _check_file_name(name, path)
        if name in files:
            raise AdapterError(f"{path}: duplicate of {files[name][0]}")
        if size > room.total - total:
            raise room.over(path)
        assert opener is not None
        files[name] = (path, _spool(opener, path, room.total - total, room))
        total += files[name][1].size
    if not files:
        raise AdapterError(f"the archive holds no files; it needs {CONFIG_NAME} and one .safetensors weights file")


def read_archive(source: bytes | IO[bytes], *, max_bytes: int) -> dict[str, tuple[str, Member]]:
    """The files of a zip, tar or tar.gz archive by flattened name (with their archive paths),
    spooled to temporary files that the caller closes, after checking every member and the sizes
    (the archive's, the unpacked total and its ratio to the archive's)."""
    fh: IO[bytes] = io.BytesIO(source) if isinstance(source, bytes) else source
    fh.seek(0, io.SEEK_END)
    room = _Room(max_bytes, fh.tell())
    if room.archive_bytes > max_bytes:
        raise AdapterTooLarge(max_bytes)
    fh.seek(0)
    head = fh.read(512)
    fh.seek(0)
    files: dict[str, tuple[str, Member]] = {}
    try:
        if head.startswith((b"PK\x03\x04", b"PK\x05\x06")):
            with zipfile.ZipFile(fh) as zf:
                _collect(_zip_entries(zf), room, files)
                return files
        if head.startswith(b"\x1f\x8b") or head[257:262] == b"ustar":
            with tarfile.open(fileobj=fh, mode="r:gz" if head.startswith(b"\x1f\x8b") else "r:") as tf:
                _collect(_tar_entries(tf), room, files)
                return files
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, OSError, zlib.error, NotImplementedError) as exc:
        _close(files)
        raise AdapterError(f"the archive is damaged or unreadable: {exc}") from None
    except BaseException:
        _close(files)
        raise
    raise AdapterError("not a zip, tar or tar.gz archive (pack the adapter directory, e.g. "
                       "`tar czf adapter.tar.gz -C DIR .`)")


def _close(files: dict[str, tuple[str, Member]]) -> None:
    for _, member in files.values():
        member.close()


# --- safetensors and adapter_config.json ----------------------------------------------------------

@dataclass(frozen=True)
class Tensor:
    dtype: str
    shape: tuple[int, ...]


def parse_safetensors(source: bytes | IO[bytes], where: str) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Tensors and metadata of a safetensors file (its bytes, or a seekable file of which only the
    header is read), after checking that the header is sound: every tensor's dtype, shape and byte
    range agree, the ranges tile the data exactly.

    Parsed here rather than with safetensors.safe_open, which refuses the same files (the tests
    check it) but with messages that name neither the fault's numbers nor, mostly, the tensor
    ("incomplete metadata, file not fully covered" for both a range past the end and uncovered
    bytes), and which needs the upload written to a file first."""
    fh: IO[bytes] = io.BytesIO(source) if isinstance(source, bytes) else source
    length = fh.seek(0, io.SEEK_END)
    fh.seek(0)
    if length < 8:
        raise AdapterError(f"{where}: not a safetensors file (shorter than its 8-byte header length)")
    size = int.from_bytes(fh.read(8), "little")
    if size > MAX_HEADER_BYTES or 8 + size > length:
        raise AdapterError(f"{where}: the safetensors header length ({size}) runs past the end of the file "
                           f"({length} bytes): truncated or not a safetensors file")
    raw = fh.read(size)
    fh.seek(0)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise AdapterError(f"{where}: the safetensors header is not valid JSON") from None
    if not isinstance(header, dict):
        raise AdapterError(f"{where}: the safetensors header is not a JSON object")
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise AdapterError(f"{where}: __metadata__ must map names to strings")
    buffer = length - 8 - size
    tensors: dict[str, Tensor] = {}
    spans: list[tuple[int, int, str]] = []
    for name, info in header.items():
        if not isinstance(info, dict):
            raise AdapterError(f"{where}: tensor {name!r} has no dtype, shape and data_offsets")
        dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if dtype not in DTYPE_BYTES:
            raise AdapterError(f"{where}: tensor {name!r} has an unknown dtype {dtype!r}")
        if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
            raise AdapterError(f"{where}: tensor {name!r} has an invalid shape {shape!r}")
        if (not isinstance(offsets, list) or len(offsets) != 2 or not all(type(o) is int for o in offsets)
                or not 0 <= offsets[0] <= offsets[1] <= buffer):
            raise AdapterError(f"{where}: tensor {name!r} has data_offsets {offsets!r} outside the file's "
                               f"{buffer} data bytes")
        if offsets[1] - offsets[0] != math.prod(shape) * DTYPE_BYTES[dtype]:
            raise AdapterError(f"{where}: tensor {name!r} spans {offsets[1] - offsets[0]} bytes, but a "
                               f"{dtype} tensor of shape {shape} takes {math.prod(shape) * DTYPE_BYTES[dtype]}")
        tensors[name] = Tensor(dtype, tuple(shape))
        spans.append((offsets[0], offsets[1], name))
    if not tensors:
        raise AdapterError(f"{where}: the file holds no tensors")
    end = 0
    for begin, stop, name in sorted(spans):
        if begin != end:
            raise AdapterError(f"{where}: tensor {name!r} starts at byte {begin}, not where the previous one "
                               f"ends ({end}): overlapping or gapped data")
        end = stop
    if end != buffer:
        raise AdapterError(f"{where}: the tensors cover {end} bytes but the file holds {buffer} data bytes")
    return tensors, meta


def _config(member: Member, where: str) -> dict[str, Any]:
    if member.size > MAX_CONFIG_BYTES:
        raise AdapterError(f"{where}: over {MAX_CONFIG_BYTES} bytes")
    data = member.file.read()
    member.file.seek(0)
    try:
        config = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise AdapterError(f"{where}: not valid JSON") from None
    if not isinstance(config, dict):
        raise AdapterError(f"{where}: must be a JSON object")
    if config.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"{where}: peft_type is {config['peft_type']!r}; only LORA adapters are served")
    rank = config.get("r")
    if type(rank) is not int or rank < 1:
        raise AdapterError(f"{where}: r must be a positive integer, got {rank!r}")
    alpha = config.get("lora_alpha")
    if alpha is not None and (isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or alpha <= 0):
        raise AdapterError(f"{where}: lora_alpha must be a positive number, got {alpha!r}")
    return config


def _targets(config: dict[str, Any] | None, tensors: dict[str, Tensor]) -> list[str]:
    raw = (config or {}).get("target_modules")
    if isinstance(raw, list):
        return sorted({str(t) for t in raw})
    if isinstance(raw, str):
        return [raw]
    modules = set()
    for name in tensors:
        match = _LORA_TENSOR.search(name)
        if match:
            parts = re.split(r"[._]", name[:match.start()]) if name.startswith("lora_") else \
                name[:match.start()].split(".")
            leaf = ".".join(parts[-2:]) if len(parts) > 1 and parts[-1].isdigit() else parts[-1]
            modules.add(leaf)
    return sorted(modules)


def _check_kind(kind: str, model: str, config: dict[str, Any] | None, tensors: dict[str, Tensor],
                where: str) -> None:
    image_names = any(n.startswith(_IMAGE_PREFIXES) for n in tensors)
    task = (config or {}).get("task_type")
    if kind == "text":
        if config is None:
            raise AdapterError(f"{CONFIG_NAME} is missing: model {model} is a text model, whose adapters are "
                               f"peft directories with {CONFIG_NAME}")
        if task not in (None, "CAUSAL_LM") or image_names:
            why = (f"task_type is {task!r}" if task not in (None, "CAUSAL_LM")
                   else "its tensors are for unet/text_encoder")
            raise AdapterError(f"{where}: not an adapter for a causal language model ({why}), but model {model} "
                               "is a text model")
        return
    targets = _targets(config, {}) if config else []
    image_targets = any(i in t for t in targets for i in _IMAGE_TARGETS)
    if task == "CAUSAL_LM" or not (image_names or image_targets):
        raise AdapterError(f"{where}: not a Stable Diffusion adapter (tensors under unet./text_encoder. or targets "
                           f"like to_q), but model {model} is an image model")


def check_archive(source: bytes | IO[bytes], *, model: ModelSpec, max_bytes: int) -> CheckedAdapter:
    """Check an uploaded adapter archive for `model` (text or image); raise AdapterError naming the
    offending member, or AdapterTooLarge. The caller closes the result (`with`)."""
    if model.kind not in ADAPTER_KINDS:
        raise AdapterError(f"model {model.name} is a {model.kind} model, which does not serve adapters")
    files = read_archive(source, max_bytes=max_bytes)
    try:
        return _check_files(files, model)  # which keeps every file: the config and the one weights file
    except BaseException:
        _close(files)
        raise


def _check_files(files: dict[str, tuple[str, Member]], model: ModelSpec) -> CheckedAdapter:
    weights = [(name, path, member) for name, (path, member) in files.items() if name != CONFIG_NAME]
    if len(weights) != 1:
        found = ", ".join(path for _, path, _ in weights) or "none"
        raise AdapterError(f"the archive needs exactly one .safetensors weights file, found {found}")
    _, weights_path, weights_file = weights[0]
    config = _config(files[CONFIG_NAME][1], files[CONFIG_NAME][0]) if CONFIG_NAME in files else None
    tensors, meta = parse_safetensors(weights_file.file, weights_path)
    for name in tensors:
        if not _LORA_TENSOR.search(name) and not name.endswith(".alpha"):
            raise AdapterError(f"{weights_path}: tensor {name!r} is not a LoRA weight (LoRA tensors are named "
                               "lora_A/lora_B, lora.down/lora.up or lora_down/lora_up)")
    _check_kind(model.kind, model.name, config, tensors, weights_path)
    downs = [t for n, t in tensors.items() if re.search(r"lora(_A|\.down|_down|_linear_layer\.down)(\.|$)", n)]
    if config is not None:
        rank = int(config["r"])
        if not config.get("rank_pattern") and any(t.shape and t.shape[0] != rank for t in downs):
            raise AdapterError(f"{weights_path}: LoRA down/A tensors do not have rank r={rank} as "
                               f"{CONFIG_NAME} says")
    elif downs and downs[0].shape:
        rank = downs[0].shape[0]
    else:
        raise AdapterError(f"{weights_path}: no lora_A / lora_down tensor to read the rank from")
    alpha = (config or {}).get("lora_alpha")
    if alpha is None and meta.get("lora_alpha"):  # some trainers record it in the metadata
        try:
            alpha = float(meta["lora_alpha"])
        except ValueError:
            alpha = None
    stored = {WEIGHTS_NAMES[model.kind]: weights_file}
    if CONFIG_NAME in files:
        stored = {CONFIG_NAME: files[CONFIG_NAME][1], **stored}
    return CheckedAdapter(files=stored, rank=rank, lora_alpha=alpha, target_modules=_targets(config, tensors))

