"""Adapters in shared/: what `check_archive` accepts (a peft or diffusers adapter directory, zipped
or tarred) and everything it refuses, each with a message naming the member; then registry
adapters, and how requests' adapter names resolve to stable ids and workers locate the files."""

from __future__ import annotations

import gzip
import io
import json
import os
import re
import stat
import tarfile
import tracemalloc
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from safetensors.numpy import save as save_safetensors

from genq.client import archive_adapter
from genq.services.adapter_archive import AdapterError, AdapterTooLarge, check_archive, parse_safetensors, read_archive
from genq.shared.registry import ModelSpec, model_spec
from genq.workers.tiny_lora import build_image_lora, build_text_lora

TEXT = model_spec("t", "text", "x")
IMAGE = model_spec("img", "image", "y")
BIG = 10 * 1024 * 1024


def _weights(rank: int = 4, prefix: str = "base_model.model.transformer.h.0.attn.c_attn") -> bytes:
    rng = np.random.default_rng(0)
    return save_safetensors({f"{prefix}.lora_A.weight": rng.standard_normal((rank, 8), dtype=np.float32),
                             f"{prefix}.lora_B.weight": rng.standard_normal((24, rank), dtype=np.float32)})


def _config(**fields: Any) -> bytes:
    return json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["c_attn"],
                       "task_type": "CAUSAL_LM", **fields}).encode()


def _peft(**config: Any) -> list[tuple[str, bytes]]:
    return [("adapter_config.json", _config(**config)), ("adapter_model.safetensors", _weights())]


def _tar(members: list[tuple[str, bytes]], *, gz: bool = True, special: dict[str, bytes] | None = None) -> bytes:
    """A tar(.gz) of regular files, plus entries of other types: name -> tarfile type (SYMTYPE, ...)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz" if gz else "w") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        for name, kind in (special or {}).items():
            info = tarfile.TarInfo(name)
            info.type = kind
            info.linkname = "adapter_model.safetensors" if kind in (tarfile.SYMTYPE, tarfile.LNKTYPE) else ""
            tf.addfile(info)
    return buf.getvalue()


def _zip(members: list[tuple[str, bytes]], symlinks: tuple[str, ...] = ()) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, data in members:
            zf.writestr(name, data)
        for name in symlinks:
            info = zipfile.ZipInfo(name)
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            zf.writestr(info, "adapter_model.safetensors")
    return buf.getvalue()


def _refused(data: bytes, *words: str, model: ModelSpec = TEXT, max_bytes: int = BIG) -> str:
    with pytest.raises(AdapterError) as info:
        check_archive(data, model=model, max_bytes=max_bytes)
    for word in words:
        assert word in info.value.message, info.value.message
    return info.value.message


@pytest.fixture(scope="module")
def built(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("adapters")
    return {"text": build_text_lora(tiny_dir / "tiny-gpt2", out / "text", seed=1),
            "image": build_image_lora(tiny_dir / "tiny-sd", out / "image", seed=1)}


# --- accepted -----------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["tar.gz", "zip", "tar"])
def test_real_peft_and_diffusers_adapters_are_accepted(built: dict[str, Path], fmt: str) -> None:
    text = check_archive(archive_adapter(built["text"], fmt), model=TEXT, max_bytes=BIG)
    assert list(text.files) == ["adapter_config.json", "adapter_model.safetensors"]
    weights = text.files["adapter_model.safetensors"].file.read()
    assert weights == (built["text"] / "adapter_model.safetensors").read_bytes()
    assert (text.rank, text.lora_alpha, text.target_modules) == (4, 8, ["c_attn", "c_fc", "c_proj"])
    image = check_archive(archive_adapter(built["image"], fmt), model=IMAGE, max_bytes=BIG)
    assert list(image.files) == ["pytorch_lora_weights.safetensors"]  # no adapter_config.json needed
    assert image.rank == 4 and image.target_modules == ["to_k", "to_out.0", "to_q", "to_v"]


@pytest.mark.parametrize("names", [
    ["my-lora/adapter_config.json", "my-lora/weights.safetensors"],  # one top-level directory
    ["./adapter_config.json", "./weights.safetensors"],  # as `tar czf x.tgz -C DIR .` writes
])
def test_files_in_one_top_level_directory_are_flattened_and_weights_renamed(names: list[str]) -> None:
    data = _tar(list(zip(names, [_config(), _weights()], strict=True)),
                special={names[0].rsplit("/", 1)[0] + "/": tarfile.DIRTYPE})
    checked = check_archive(data, model=TEXT, max_bytes=BIG)
    # Stored under the name peft's loader looks for, whatever the upload called it.
    assert list(checked.files) == ["adapter_config.json", "adapter_model.safetensors"]


# --- refused: what is in the archive --------------------------------------------------------------

@pytest.mark.parametrize("member", ["adapter_model.bin", "adapter_model.pt", "lora.ckpt", "w.pkl", "sub.pth"])
def test_pickle_weights_are_refused_by_name(member: str) -> None:
    members = [("adapter_config.json", _config()), (member, b"\x80\x04\x95 pickle bytes")]
    for data in (_tar(members), _zip(members)):
        message = _refused(data, member, "pickle-based weights", "safetensors")
        assert message.startswith(member)


def test_an_extra_file_is_refused() -> None:
    _refused(_tar([*_peft(), ("README.md", b"# my adapter")]), "README.md", "unexpected file")


@pytest.mark.parametrize("kind, words", [
    (tarfile.SYMTYPE, "symbolic link"), (tarfile.LNKTYPE, "hard link"), (tarfile.CHRTYPE, "device"),
    (tarfile.FIFOTYPE, "device or special file"),
])
def test_links_and_devices_in_a_tar_are_refused(kind: bytes, words: str) -> None:
    _refused(_tar(_peft(), special={"link.safetensors": kind}), "link.safetensors", words)


def test_a_symlink_in_a_zip_is_refused() -> None:
    _refused(_zip([("adapter_config.json", _config())], symlinks=("adapter_model.safetensors",)),
             "adapter_model.safetensors", "symbolic link")


@pytest.mark.parametrize("name, words", [
    ("../adapter_model.safetensors", "'..'"),
    ("a/../../adapter_model.safetensors", "'..'"),
    ("/etc/adapter_model.safetensors", "absolute"),
    ("a\\adapter_model.safetensors", "backslash"),
    ("a/b/adapter_model.safetensors", "nested directories"),
])
def test_unsafe_or_nested_paths_are_refused(name: str, words: str) -> None:
    members = [("adapter_config.json", _config()), (name, _weights())]
    for data in (_tar(members), _zip(members)):
        _refused(data, name, words)


def test_files_split_between_root_and_a_directory_are_refused() -> None:
    _refused(_tar([("adapter_config.json", _config()), ("x/adapter_model.safetensors", _weights())]),
             "x/adapter_model.safetensors", "one top-level directory")


def test_duplicate_names_are_refused() -> None:
    _refused(_tar([*_peft(), ("adapter_model.safetensors", _weights())]), "duplicate of adapter_model.safetensors")


def test_two_weights_files_are_refused() -> None:
    _refused(_tar([*_peft(), ("more.safetensors", _weights())]), "exactly one .safetensors",
             "adapter_model.safetensors", "more.safetensors")


def test_a_text_adapter_needs_its_config() -> None:
    _refused(_tar([("adapter_model.safetensors", _weights())]), "adapter_config.json is missing", "text model")


@pytest.mark.parametrize("config, words", [
    (b"{not json", "not valid JSON"),
    (b"[1, 2]", "JSON object"),
    (_config(r=0), "r must be a positive integer"),
    (_config(r="4"), "r must be a positive integer"),
    (_config(peft_type="IA3"), "only LORA"),
    (_config(lora_alpha=-1), "lora_alpha"),
    (_config(r=8), "rank r=8"),  # the tensors have rank 4
])
def test_a_bad_config_is_refused(config: bytes, words: str) -> None:
    _refused(_tar([("adapter_config.json", config), ("adapter_model.safetensors", _weights())]), words)


def test_empty_and_non_archives_are_refused() -> None:
    _refused(_tar([]), "holds no files")
    _refused(_zip([]), "holds no files")
    _refused(b"just some text, not an archive", "not a zip, tar or tar.gz archive")
    _refused(_weights(), "not a zip, tar or tar.gz archive")  # a bare safetensors file
    _refused(_tar(_peft())[:200], "damaged")  # a cut-off gzip stream
    _refused(_zip(_peft())[:-30], "damaged")


def test_the_adapter_must_suit_the_model_kind(built: dict[str, Path]) -> None:
    _refused(archive_adapter(built["image"]), "adapter_config.json is missing", model=TEXT)
    _refused(archive_adapter(built["text"]), "not a Stable Diffusion adapter", "image model", model=IMAGE)
    sd_names = _tar([("adapter_config.json", _config(task_type=None)),
                     ("adapter_model.safetensors", _weights(prefix="unet.mid_block.attn1.to_q"))])
    _refused(sd_names, "not an adapter for a causal language model", "unet", model=TEXT)
    with pytest.raises(AdapterError, match="does not serve adapters"):
        check_archive(_tar(_peft()), model=model_spec("g", "gan", "z"), max_bytes=BIG)


# --- refused: the weights file ----------------------------------------------------------------------

def _with_weights(data: bytes) -> bytes:
    return _tar([("adapter_config.json", _config()), ("adapter_model.safetensors", data)])


def _raw_safetensors(header: dict[str, Any], data: bytes, declared: int | None = None) -> bytes:
    text = json.dumps(header).encode()
    return (declared if declared is not None else len(text)).to_bytes(8, "little") + text + data


def test_non_lora_tensor_names_are_refused() -> None:
    full = save_safetensors({"transformer.h.0.attn.c_attn.weight": np.zeros((4, 4), dtype=np.float32)})
    _refused(_with_weights(full), "adapter_model.safetensors", "'transformer.h.0.attn.c_attn.weight'",
             "not a LoRA weight")


CORRUPT_SAFETENSORS = [
    (_weights()[:5], "shorter than its 8-byte header length"),
    (_weights()[:60], "runs past the end of the file"),  # truncated inside the header
    (_raw_safetensors({}, b"", declared=2**40), "runs past the end"),
    (b"\x05\x00\x00\x00\x00\x00\x00\x00{oops", "not valid JSON"),
    (_raw_safetensors({"x.lora_A.weight": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 4),
     "outside the file"),
    (_raw_safetensors({"x.lora_A.weight": {"dtype": "F32", "shape": [4], "data_offsets": [0, 8]}}, b"\0" * 8),
     "takes 16"),
    (_raw_safetensors({"x.lora_A.weight": {"dtype": "Q4", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8),
     "unknown dtype"),
    (_raw_safetensors({"x.lora_A.weight": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, b"\0" * 8),
     "invalid shape"),
    (_raw_safetensors({"x.lora_A.weight": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                       "x.lora_B.weight": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, b"\0" * 12),
     "overlapping"),
    (_raw_safetensors({"x.lora_A.weight": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 12),
     "cover 8 bytes but the file holds 12"),
    (_raw_safetensors({}, b""), "holds no tensors"),
]


@pytest.mark.parametrize("weights, words", CORRUPT_SAFETENSORS)
def test_a_corrupt_safetensors_file_is_refused(weights: bytes, words: str) -> None:
    message = _refused(_with_weights(weights), words)
    assert message.startswith("adapter_model.safetensors: ")


def test_parse_safetensors_reads_what_the_library_wrote() -> None:
    tensors, meta = parse_safetensors(save_safetensors({"a.lora_A.weight": np.zeros((2, 3), dtype=np.float16)},
                                                       metadata={"format": "pt"}), "w")
    assert tensors["a.lora_A.weight"].dtype == "F16" and tensors["a.lora_A.weight"].shape == (2, 3)
    assert meta == {"format": "pt"}


@pytest.mark.parametrize("weights, words", CORRUPT_SAFETENSORS)
def test_the_safetensors_library_refuses_what_parse_safetensors_refuses(weights: bytes, words: str,
                                                                       tmp_path: Path) -> None:
    """genq's parser is kept for its messages; the library's own reader must not accept a file it
    refuses (an empty one aside: the library opens it, an adapter needs tensors)."""
    from safetensors import SafetensorError, safe_open

    path = tmp_path / "w.safetensors"
    path.write_bytes(weights)
    if words == "holds no tensors":
        with safe_open(str(path), framework="numpy") as st:
            assert list(st.keys()) == []
        return
    with pytest.raises(SafetensorError):
        safe_open(str(path), framework="numpy")


def test_parse_safetensors_agrees_with_the_library_on_real_files(built: dict[str, Path]) -> None:
    from safetensors import safe_open

    for path in [built["text"] / "adapter_model.safetensors", *built["image"].glob("*.safetensors")]:
        tensors, meta = parse_safetensors(path.read_bytes(), path.name)
        with safe_open(str(path), framework="numpy") as st:
            assert {n: (t.dtype, list(t.shape)) for n, t in tensors.items()} == {
                n: (st.get_slice(n).get_dtype(), st.get_slice(n).get_shape()) for n in st.keys()}
            assert meta == (st.metadata() or {})


# --- sizes ---------------------------------------------------------------------------------------------

def test_an_archive_over_the_limit_is_refused() -> None:
    data = _tar(_peft())
    with pytest.raises(AdapterTooLarge):
        check_archive(data, model=TEXT, max_bytes=len(data) - 1)
    assert check_archive(data, model=TEXT, max_bytes=len(data) + 4096).rank == 4


def test_a_decompression_bomb_stops_at_the_limit() -> None:
    # 50 MB of zeros packs into ~50 kB; the unpacked size is checked against the limit while reading.
    bomb = _tar([("adapter_config.json", _config()), ("adapter_model.safetensors", bytes(50_000_000))])
    assert len(bomb) < 200_000
    with pytest.raises(AdapterTooLarge):
        check_archive(bomb, model=TEXT, max_bytes=1_000_000)
    zbomb = _zip([("adapter_config.json", _config()), ("adapter_model.safetensors", bytes(50_000_000))])
    with pytest.raises(AdapterTooLarge):
        read_archive(zbomb, max_bytes=1_000_000)


def _zip_of_zeros(size: int) -> bytes:
    """A zip whose weights member is `size` zero bytes, written a chunk at a time."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("adapter_config.json", _config())
        with zf.open("adapter_model.safetensors", "w") as member:
            for _ in range(size // (1 << 20)):
                member.write(bytes(1 << 20))
    return buf.getvalue()


def test_a_zip_bomb_under_the_size_limit_is_refused_by_its_ratio_in_bounded_memory() -> None:
    # 64 MiB of zeros packs into ~64 kB: far under GENQ_MAX_ADAPTER_BYTES's 1 GiB, but a thousandfold
    # inflation; it is refused once the unpacked bytes pass MAX_RATIO times the archive's, and what
    # was inflated went to a temporary file, not memory.
    bomb = _zip_of_zeros(64 << 20)
    tracemalloc.start()
    try:
        with pytest.raises(AdapterError, match="decompression bomb") as refused:
            check_archive(bomb, model=TEXT, max_bytes=1 << 30)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert not isinstance(refused.value, AdapterTooLarge) and refused.value.code == "invalid_adapter"
    assert "adapter_model.safetensors" in refused.value.message
    assert peak < 8 << 20, f"checking the bomb held {peak >> 20} MiB"


def test_members_are_spooled_to_files_not_held_in_memory() -> None:
    name = "base_model.model.transformer.h.0.attn.c_attn.lora_A.weight"
    weights = _raw_safetensors({name: {"dtype": "F32", "shape": [4, 1 << 20], "data_offsets": [0, 16 << 20]}},
                               os.urandom(16 << 20))
    data = _tar([("adapter_config.json", _config()), ("adapter_model.safetensors", weights)], gz=False)
    tracemalloc.start()
    try:
        with check_archive(data, model=TEXT, max_bytes=1 << 30) as checked:
            peak = tracemalloc.get_traced_memory()[1]
            member = checked.files["adapter_model.safetensors"]
            assert member.size == len(weights) and member.file.read() == weights
    finally:
        tracemalloc.stop()
    assert peak < 4 << 20, f"checking a {len(weights) >> 20} MiB member held {peak >> 20} MiB"


def test_a_member_declaring_more_than_the_limit_is_refused_before_reading() -> None:
    # Rewrite a small stored member's declared (uncompressed) size, in the local and central headers,
    # to 2 GB: the declared size alone stops it. (A member bigger than it declares fails zipfile's own
    # size and CRC checks as a damaged archive.)
    data = bytearray(_zip_stored("adapter_model.safetensors", _weights()))
    for sig, offset in ((b"PK\x03\x04", 22), (b"PK\x01\x02", 24)):
        at = data.find(sig)
        data[at + offset:at + offset + 4] = (2**31).to_bytes(4, "little")
    with pytest.raises(AdapterTooLarge):
        read_archive(bytes(data), max_bytes=1_000_000)


def _zip_stored(name: str, data: bytes) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as zf:
        zf.writestr(name, data)
    return buf.getvalue()


def test_gzip_of_something_else_is_damaged_not_accepted() -> None:
    _refused(gzip.compress(b"hello, not a tar"), "damaged")


# --- registry adapters, resolution and lookup ----------------------------------------------------------

REGISTRY_TOML = """
[models.t]
kind = "text"
source = "x"
[models.t2]
kind = "text"
source = "x"
[models.img]
kind = "image"
source = "y"
[models.g]
kind = "gan"
source = "z"
[adapters.shared-style]
model = "t"
source = "./loras/style"
"""


def test_registry_adapters_are_parsed_with_sources_resolved(tmp_path: Path) -> None:
    from genq.shared.registry import AdapterSpec, Registry, parse_registry

    registry = parse_registry(REGISTRY_TOML, tmp_path)
    assert registry.adapters == {"shared-style": AdapterSpec("shared-style", "t", str(tmp_path / "loras/style"))}
    assert registry.names() == ["t", "t2", "img", "g"]  # adapters are not models
    assert Registry({}).adapters == {}  # existing code that builds a Registry keeps working


@pytest.mark.parametrize("table, words", [
    ('[adapters.x]\nmodel = "nope"\nsource = "/a"', "adapters.x.model must name a registered model"),
    ('[adapters.x]\nmodel = "g"\nsource = "/a"', "kind gan, which does not serve adapters"),
    ('[adapters."Bad Name"]\nmodel = "t"\nsource = "/a"', "adapter name 'Bad Name'"),
    ('[adapters.x]\nmodel = "t"', "adapters.x.source must be a local directory"),
    ('[adapters.x]\nmodel = "t"\nsource = "org/hub-lora"', "absolute or starting with ./"),
    ('[adapters.x]\nmodel = "t"\nsource = "/a"\nscale = 2', "unknown keys scale"),
    ("[adapters]\nx = 3", "adapters.x must be a table with model and source"),
])
def test_bad_registry_adapters_are_refused(table: str, words: str) -> None:
    from genq.shared.registry import RegistryError, parse_registry

    with pytest.raises(RegistryError, match=re.escape(words)):
        parse_registry('[models.t]\nkind = "text"\nsource = "x"\n[models.g]\nkind = "gan"\nsource = "z"\n'
                       + table, Path("."), "reg.toml")


@pytest.fixture()
def db(tmp_path: Path) -> Any:
    from genq.shared.db import session_factory
    from genq.shared.migrate import upgrade

    url = f"sqlite:///{tmp_path}/adapters.db"
    upgrade(url)
    return session_factory(url)


def _store(db: Any, storage: Any, tenant: str | None, name: str, model: ModelSpec) -> Any:
    from genq.services import adapters

    checked = check_archive(_tar(_peft()), model=model, max_bytes=BIG)
    with db() as session:
        return adapters.create(session, storage, tenant=tenant, name=name, model=model, checked=checked)


def test_resolve_finds_own_uploads_and_registry_adapters_only(db: Any, tmp_path: Path) -> None:
    from genq.services.adapters import AdapterCatalog
    from genq.shared.registry import parse_registry
    from genq.shared.storage import FileStorage

    registry = parse_registry(REGISTRY_TOML, tmp_path)
    storage = FileStorage(tmp_path / "objects")
    mine = _store(db, storage, "acme", "style", registry.models["t"])
    _store(db, storage, "beta", "other", registry.models["t"])
    no_tenant = _store(db, storage, None, "style", registry.models["t"])
    with db() as session:
        def ok(ref: str, tenant: str | None = "acme", model: str = "t") -> str:
            return AdapterCatalog(session, registry, tenant).resolve(model=model, ref=ref)

        def refused(ref: str, *words: str, tenant: str | None = "acme", model: str = "t") -> None:
            with pytest.raises(AdapterError) as info:
                ok(ref, tenant, model)
            assert all(w in info.value.message for w in words), info.value.message

        assert ok("style") == ok(mine.id) == mine.id
        assert ok("style", tenant=None) == no_tenant.id  # auth off: the adapters of no tenant
        assert ok("shared-style") == ok("shared-style", tenant="beta") == "shared-style"
        refused("other", "adapter 'other' is not registered")  # beta's
        refused(no_tenant.id, "not registered")
        refused("style", "adapter 'style' is for model 't', not 't2'", model="t2")
        refused("shared-style", "is for model 't', not 'img'", model="img")
        refused("style", "model 'g' is a gan model, which does not serve adapters", model="g")


def test_locate_gives_storage_keys_or_the_registry_directory(db: Any, tmp_path: Path) -> None:
    from genq.shared.adapters import AdapterSource, locate
    from genq.shared.registry import parse_registry
    from genq.shared.storage import FileStorage

    registry = parse_registry(REGISTRY_TOML, tmp_path)
    storage = FileStorage(tmp_path / "objects")
    row = _store(db, storage, "acme", "style", registry.models["t"])
    with db() as session:
        found = locate(session, registry, row.id)
        assert found == AdapterSource(id=row.id, model="t", kind="text", local_dir=None, storage_keys={
            "adapter_config.json": f"adapters/{row.id}/adapter_config.json",
            "adapter_model.safetensors": f"adapters/{row.id}/adapter_model.safetensors"})
        assert storage.get(found.storage_keys["adapter_model.safetensors"]) == _weights()
        assert locate(session, registry, "shared-style") == AdapterSource(
            id="shared-style", model="t", kind="text", local_dir=tmp_path / "loras/style")
        assert locate(session, registry, "adapter_gone") is None
        assert locate(session, registry, "no-such") is None


def test_a_second_upload_of_a_name_steps_back(db: Any, tmp_path: Path) -> None:
    """Two uploads racing past the name check: the later one removes its row and files again."""
    from genq.services import adapters
    from genq.shared.registry import parse_registry
    from genq.shared.storage import FileStorage

    registry = parse_registry(REGISTRY_TOML, tmp_path)
    storage = FileStorage(tmp_path / "objects")
    first = _store(db, storage, "acme", "style", registry.models["t"])
    assert _store(db, storage, "acme", "style", registry.models["t"]) is None
    with db() as session:
        assert [r.id for r in adapters.list_uploaded(session, tenant="acme")] == [first.id]
    assert sorted(p.parent.name for p in (tmp_path / "objects" / "adapters").glob("*/*")) == [first.id] * 2
    with db() as session:
        adapters.delete(session, storage, session.get(adapters.Adapter, first.id))
    assert not list((tmp_path / "objects" / "adapters").glob("*/*"))


def test_an_upload_that_steps_back_takes_its_idempotency_key_with_it(db: Any, tmp_path: Path) -> None:
    """A retry of the upload that lost the name race is refused by name again, not answered 404."""
    from genq.services import adapters
    from genq.services.idempotency import remember
    from genq.shared.db import IdempotencyKey
    from genq.shared.registry import parse_registry
    from genq.shared.storage import FileStorage

    registry = parse_registry(REGISTRY_TOML, tmp_path)
    storage = FileStorage(tmp_path / "objects")
    _store(db, storage, "acme", "style", registry.models["t"])
    checked = check_archive(_tar(_peft()), model=registry.models["t"], max_bytes=BIG)
    with db() as session:
        lost = adapters.create(session, storage, tenant="acme", name="style", model=registry.models["t"],
                               checked=checked, remember=lambda i: remember(session, "acme", "k", "fp", "adapter", i))
        assert lost is None and session.get(IdempotencyKey, ("acme", "k")) is None


def test_a_batch_reads_the_tenants_adapters_once(db: Any, tmp_path: Path) -> None:
    from sqlalchemy import event

    from genq.services.adapters import AdapterCatalog
    from genq.services.validation import validate_batch
    from genq.shared.registry import parse_registry
    from genq.shared.storage import FileStorage

    registry = parse_registry(REGISTRY_TOML, tmp_path)
    row = _store(db, FileStorage(tmp_path / "objects"), "acme", "style", registry.models["t"])
    lines = [(i, {"custom_id": str(i), "url": "/v1/completions",
                  "body": {"model": "t", "prompt": "hi", "adapter": "style" if i % 2 else row.id}})
             for i in range(1, 51)]
    with db() as session:
        queries: list[str] = []
        event.listen(session.get_bind(), "before_cursor_execute", lambda *a: queries.append(a[2]))
        valid, errors = validate_batch(lines, registry, max_lines=100, adapters=AdapterCatalog(session, registry,
                                                                                                "acme"))
        assert errors == [] and {v.body.adapter for v in valid} == {row.id}  # type: ignore[attr-defined]
        assert len(queries) == 1
