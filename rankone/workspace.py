"""The workspace directory: a manifest of what came from where, and atomic writes.

Every stage reads the files it needs through `Workspace.require`, which checks them
against the sha256 the manifest recorded, and writes through `Workspace.transaction`,
which stages files in a temporary folder and moves them into place only when the whole
stage succeeded. A failed stage therefore leaves the workspace exactly as it was.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import signal
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import _TYPES as SAFETENSORS_DTYPES, load_file, save_file  # _TYPES: its dtype names (F32, BOOL, ...)

from rankone.errors import RankoneError

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
JOURNAL_FILE = ".commit.json"
LOCK_FILE = ".lock"
STAGING_PREFIX = ".staging-"

# Which command writes each file, so a missing input can name the command to run first.
PRODUCERS = {
    "base.safetensors": "rankone fetch",
    "experts/": "rankone fetch",
    "task_vectors/": "rankone task-vectors",
    "pool.safetensors": "rankone build-pool",
    "merged/": "rankone merge",
    "adapted/": "rankone adapt",
    "heads/": "rankone eval (heads are built on first use)",
}


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 24), b""):
            digest.update(chunk)
    return digest.hexdigest()


def follow_umask(path: Path | str, directory: bool = False) -> None:
    """Give a file or folder made by mkstemp/mkdtemp (0600/0700) the mode any file the user writes gets."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, (0o777 if directory else 0o666) & ~mask)


def staging_folder(parent: Path, name: str) -> Path:
    """A fresh hidden folder beside `name` in `parent` (created if needed), to build something in and rename into place."""
    blocking = next((folder for folder in (parent, *parent.parents) if folder.exists()), None)
    if blocking is not None and not blocking.is_dir():
        raise RankoneError(f"--out {parent / name}: {blocking} is a file, not a folder")
    try:
        parent.mkdir(parents=True, exist_ok=True)
        folder = Path(tempfile.mkdtemp(dir=parent, prefix=f".{name}.staging-"))
    except OSError as error:
        raise RankoneError(f"--out {parent / name}: cannot write here ({_write_error_reason(error)})") from None
    follow_umask(folder, directory=True)
    return folder


# A file whose last write is older than this when its hash is recorded can be recognised later by
# its inode and modification time: any write after the commit gives it a later time, even on a
# file system whose clock only moves every few milliseconds.
SETTLED_NS = 50_000_000


def _file_record(path: Path) -> dict[str, Any]:
    """A manifest entry: sha256 and size, and (once the file has settled) its inode and modification time."""
    record: dict[str, Any] = {"sha256": sha256_file(path)}
    found = path.stat()
    record["size"] = found.st_size
    if found.st_mtime_ns < time.time_ns() - SETTLED_NS:
        record.update(inode=found.st_ino, mtime_ns=found.st_mtime_ns)
    return record


def _untouched(found: os.stat_result, recorded: dict[str, Any]) -> bool:
    """The same file, not written since its hash was recorded: no need to hash it again (a copied
    or rewritten file, or an entry without them, is hashed)."""
    return "mtime_ns" in recorded and (found.st_ino, found.st_mtime_ns) == (recorded.get("inode"), recorded["mtime_ns"])


def check_sha256(folder: Path, recorded: dict[str, str], record: str) -> None:
    """Every file `recorded` ({name: sha256}, written in `folder`'s `record`) is there, unchanged."""
    for name, digest in recorded.items():
        path = folder / name
        if not path.is_file():
            raise RankoneError(f"{path}: missing (listed in {record}); export again")
        if sha256_file(path) != digest:
            raise RankoneError(f"{path}: does not match the sha256 in {record} (changed or truncated); export again")


def replace_folder(staging: Path, target: Path) -> None:
    """Put the finished `staging` folder at `target`, replacing an earlier `target` folder.

    The old folder is moved aside first and removed only once the new one is in place, so at
    every moment `target` is either the old folder or the new one.
    """
    aside = None
    if target.exists():
        aside = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.old-"))
        os.replace(target, aside / target.name)
    os.replace(staging, target)
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)


def _write_error_reason(error: Exception) -> str:
    """What went wrong writing a file, in a few words (`No space left on device`), from an OSError or safetensors' error."""
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    text = (str(error).strip().splitlines() or [type(error).__name__])[0]
    found = re.search(r"I/O error: (.*?)(?: \(os error \d+\))?$", text)
    return found.group(1) if found else text


def _written(path: Path, write: Callable[[str], None], shown_as: Path | None = None) -> None:
    """Write `path` through a temporary file in the same folder, then rename.

    A full or read-only disk is one line naming `shown_as` (default `path`): the file the
    user will look for, not the staging copy.
    """
    shown = shown_as or path
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
    except OSError as error:
        raise RankoneError(f"{shown}: cannot write here ({_write_error_reason(error)})") from None
    try:
        write(tmp)
        follow_umask(tmp)
        os.replace(tmp, path)
    except (OSError, SafetensorError) as error:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise RankoneError(f"{shown}: could not be written ({_write_error_reason(error)})") from None
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_json_atomic(path: Path, data: Any, shown_as: Path | None = None) -> None:
    """Write JSON through a temporary file in the same folder, then rename."""
    def write(tmp: str) -> None:
        with open(tmp, "w") as handle:
            json.dump(data, handle, indent=2, sort_keys=False)
            handle.write("\n")

    _written(path, write, shown_as)


def save_tensors_atomic(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None,
                        shown_as: Path | None = None) -> None:
    """Save safetensors through a temporary file in the same folder, then rename."""
    contiguous = {name: tensor.detach().contiguous().cpu() for name, tensor in tensors.items()}
    _written(path, lambda tmp: save_file(contiguous, tmp, metadata=metadata), shown_as)


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Load a safetensors file, turning a corrupt or missing file into a one-line error."""
    if not path.is_file():
        raise RankoneError(f"{path}: file not found")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as error:
        raise RankoneError(f"{path}: not a readable safetensors file ({error})") from None


class LazyTensors(Mapping[str, torch.Tensor]):
    """The tensors of a safetensors file, each read from disk when asked for and never cached.

    Each access opens the file anew (through a descriptor held from the start, so a file
    replaced meanwhile by another stage's commit is not mixed in): safe_open maps the file,
    and pages it touched stay resident, counted in RSS, while its handle is open, so T
    handles kept open would hold T task vectors' pages by the end of a merge. Keys and
    shapes come from the header alone. Deleting a key hides it (AdaMerging's `consume`).
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        try:
            self._file = open(self.path, "rb")
            with safe_open(self._opened(), framework="pt") as handle:
                self._shapes = {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}
        except (SafetensorError, OSError, ValueError) as error:
            raise RankoneError(f"{self.path}: not a readable safetensors file ({error})") from None

    def _opened(self) -> str:
        # /dev/fd/N reopens the file this object opened first, whatever the path names now.
        return f"/dev/fd/{self._file.fileno()}"

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self._shapes:
            raise KeyError(key)
        try:
            with safe_open(self._opened(), framework="pt") as handle:
                return handle.get_tensor(key)
        except (SafetensorError, OSError, ValueError) as error:
            raise RankoneError(f"{self.path}: tensor {key} is not readable ({error})") from None

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._shapes))

    def __len__(self) -> int:
        return len(self._shapes)

    def __delitem__(self, key: str) -> None:
        del self._shapes[key]

    def shape(self, key: str) -> tuple[int, ...]:
        return self._shapes[key]

    def __del__(self) -> None:
        file = getattr(self, "_file", None)
        if file is not None:
            file.close()


def tensor_shape(tensors: Mapping[str, torch.Tensor], key: str) -> tuple[int, ...]:
    """The shape of `tensors[key]`, without reading its data when `tensors` is lazy (has a `shape(key)` method)."""
    shape = getattr(tensors, "shape", None)
    return tuple(shape(key)) if callable(shape) else tuple(tensors[key].shape)


def _alignment(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def write_tensor_stream(path: Path, items: Iterable[tuple[str, torch.Tensor]], metadata: dict[str, str] | None = None) -> None:
    """A safetensors file from (name, tensor) pairs produced one at a time, never all in memory.

    Each tensor's bytes go to a spool file of its element size as it arrives; the header is
    written once every name is known, and the spools are appended behind it largest element
    size first, so every tensor stays aligned to its element size as safetensors expects.
    """
    names = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}
    header: dict[str, Any] = {}
    spools: dict[int, Any] = {}
    sizes: dict[int, int] = {}
    order: dict[int, list[str]] = {}
    try:
        for name, tensor in items:
            if name in header:
                raise ValueError(f"tensor {name} given twice")
            data = tensor.detach().cpu().contiguous()
            size = _alignment(data.dtype)
            if size not in spools:
                spools[size] = tempfile.TemporaryFile(dir=path.parent)
                sizes[size], order[size] = 0, []
            raw = data.reshape(-1).view(torch.uint8).numpy() if data.numel() else b""
            spools[size].write(raw)
            header[name] = {"dtype": names[data.dtype], "shape": list(data.shape), "start": sizes[size], "size": size}
            sizes[size] += data.numel() * size
            order[size].append(name)
        offset = 0
        layout: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
        for size in sorted(spools, reverse=True):
            for name in order[size]:
                entry = header[name]
                length = _tensor_nbytes(entry["shape"], size)
                layout[name] = {"dtype": entry["dtype"], "shape": entry["shape"],
                                "data_offsets": [offset + entry["start"], offset + entry["start"] + length]}
            offset += sizes[size]
        text = json.dumps(layout, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)  # safetensors pads the header so the data starts 8-byte aligned
        with open(path, "wb") as out:
            out.write(len(text).to_bytes(8, "little"))
            out.write(text)
            for size in sorted(spools, reverse=True):
                spools[size].seek(0)
                shutil.copyfileobj(spools[size], out, 1 << 24)
    finally:
        for spool in spools.values():
            spool.close()


def _tensor_nbytes(shape: list[int], element_size: int) -> int:
    count = 1
    for size in shape:
        count *= size
    return count * element_size


def save_tensor_stream_atomic(path: Path, items: Iterable[tuple[str, torch.Tensor]], metadata: dict[str, str] | None = None,
                              shown_as: Path | None = None) -> None:
    """`write_tensor_stream` through a temporary file in the same folder, then rename (as `save_tensors_atomic`)."""
    _written(path, lambda tmp: write_tensor_stream(Path(tmp), items, metadata), shown_as)


def index_name(file_name: str) -> str:
    """The shard index beside sharded `file_name` (`model.safetensors` → `model.safetensors.index.json`)."""
    return f"{file_name}.index.json"


def tensor_bytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def save_sharded(folder: Path, file_name: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None,
                 max_shard_bytes: int | None = None) -> list[str]:
    """`file_name` in `folder`, or, past `max_shard_bytes`, shards with an index as transformers and mergekit write them.

    Shards are `STEM-00001-of-0000N.safetensors`, filled in order up to the limit (a tensor
    larger than the limit gets a shard of its own); the index maps each tensor to its shard
    and records the total size. Returns the files written, index first.
    """
    total = sum(tensor_bytes(tensor) for tensor in tensors.values())
    if max_shard_bytes is None or total <= max_shard_bytes:
        save_tensors_atomic(folder / file_name, tensors, metadata)
        return [file_name]
    shards: list[dict[str, torch.Tensor]] = [{}]
    filled = 0
    for name, tensor in tensors.items():
        if shards[-1] and filled + tensor_bytes(tensor) > max_shard_bytes:
            shards.append({})
            filled = 0
        shards[-1][name] = tensor
        filled += tensor_bytes(tensor)
    stem = file_name.removesuffix(".safetensors")
    names = [f"{stem}-{index + 1:05d}-of-{len(shards):05d}.safetensors" for index in range(len(shards))]
    for name, shard in zip(names, shards):
        save_tensors_atomic(folder / name, shard, metadata)
    index = {"metadata": {"total_size": total},
             "weight_map": {tensor: name for name, shard in zip(names, shards) for tensor in shard}}
    write_json_atomic(folder / index_name(file_name), index)
    return [index_name(file_name), *names]


def load_sharded(folder: Path, file_name: str) -> tuple[dict[str, torch.Tensor], list[str]]:
    """(tensors, files read) of `file_name` in `folder`, or of its shards when only the index is there."""
    if (folder / file_name).is_file() or not (folder / index_name(file_name)).is_file():
        return load_tensors(folder / file_name), [file_name]
    index_path = folder / index_name(file_name)
    try:
        weight_map = json.loads(index_path.read_text())["weight_map"]
        shards = sorted(set(weight_map.values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        raise RankoneError(f"{index_path}: not a shard index ({type(error).__name__}: {error})") from None
    if not shards:
        raise RankoneError(f"{index_path}: lists no shards")
    tensors: dict[str, torch.Tensor] = {}
    for shard in shards:
        if Path(shard).name != shard:
            raise RankoneError(f"{index_path}: shard {shard!r} is not a file beside the index")
        tensors.update(load_tensors(folder / shard))
    missing = [name for name in weight_map if name not in tensors]
    if missing:
        raise RankoneError(f"{index_path}: tensor {missing[0]} is in no shard")
    return tensors, [index_name(file_name), *shards]


def read_tensors_metadata(path: Path) -> dict[str, str]:
    try:
        with safe_open(str(path), framework="pt") as handle:
            return dict(handle.metadata() or {})
    except (SafetensorError, OSError, ValueError) as error:
        raise RankoneError(f"{path}: not a readable safetensors file ({error})") from None


def producer_of(relpath: str) -> str:
    """The command that writes `relpath` (with its --method for a method's own file)."""
    folder, _, name = relpath.partition("/")
    if folder in ("merged", "adapted") and name.endswith(".safetensors") and "/" not in name:
        return f"{PRODUCERS[folder + '/']} --method {name.removesuffix('.safetensors')}"
    for prefix, command in PRODUCERS.items():
        if relpath == prefix or (prefix.endswith("/") and relpath.startswith(prefix)):
            return command
    return "the stage that writes it"


class Staging:
    """Files a stage is about to write; moved into the workspace on commit."""

    def __init__(self, root: Path, target: Path | None = None) -> None:
        self.root = root
        self.target = target or root  # the workspace the files will be in, for messages
        self.written: list[str] = []
        self.removed: list[str] = []

    def path(self, relpath: str) -> Path:
        """A path to write `relpath` to by hand (for files that are not tensors or JSON)."""
        target = self.root / relpath
        target.parent.mkdir(parents=True, exist_ok=True)
        if relpath not in self.written:
            self.written.append(relpath)
        return target

    def save_tensors(self, relpath: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
        save_tensors_atomic(self.path(relpath), tensors, metadata, shown_as=self.target / relpath)

    def save_tensor_stream(self, relpath: str, items: Iterable[tuple[str, torch.Tensor]],
                           metadata: dict[str, str] | None = None) -> None:
        """Save tensors produced one at a time (`write_tensor_stream`): the file's tensors are never all in memory."""
        save_tensor_stream_atomic(self.path(relpath), items, metadata, shown_as=self.target / relpath)

    def write_json(self, relpath: str, data: Any) -> None:
        write_json_atomic(self.path(relpath), data, shown_as=self.target / relpath)

    def remove(self, relpath: str) -> None:
        """Delete `relpath` from the workspace (and the manifest) when the stage commits."""
        self.removed.append(relpath)


class Workspace:
    """A workspace directory and its manifest."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)

    # -- manifest -------------------------------------------------------------------
    @property
    def manifest_path(self) -> Path:
        return self.root / MANIFEST

    def exists(self) -> bool:
        return self.manifest_path.is_file()

    def manifest(self) -> dict[str, Any]:
        """The manifest, after completing a commit that a killed stage left half done."""
        if not self.exists() and not (self.root / JOURNAL_FILE).is_file():
            if self.root.exists() and not self.root.is_dir():
                raise RankoneError(f"-w {self.root}: exists and is not a folder (a workspace is a folder)")
            raise RankoneError(f"{self.root}: no workspace here (no {MANIFEST}); run `rankone fetch` first")
        if (self.root / JOURNAL_FILE).is_file():
            with self.locked():
                self._roll_forward()
        return self._read_manifest()

    def _read_manifest(self) -> dict[str, Any]:
        try:
            manifest = json.loads(self.manifest_path.read_text())
        except json.JSONDecodeError as error:
            raise RankoneError(f"{self.manifest_path}: corrupt manifest ({error})") from None
        except OSError as error:
            raise RankoneError(f"{self.manifest_path}: not readable ({error.strerror})") from None
        if not isinstance(manifest, dict):
            raise RankoneError(f"{self.manifest_path}: corrupt manifest (not a JSON object)")
        if manifest.get("format") != FORMAT_VERSION:
            raise RankoneError(f"{self.manifest_path}: unsupported manifest format {manifest.get('format')!r}")
        for key, kind in (("files", dict), ("architecture", dict), ("tasks", list)):
            if key in manifest and not isinstance(manifest[key], kind):
                raise RankoneError(f"{self.manifest_path}: corrupt manifest ({key!r} is not a JSON {kind.__name__})")
        return manifest

    def _required_key(self, key: str) -> Any:
        manifest = self.manifest()
        if key not in manifest:
            raise RankoneError(f"{self.manifest_path}: corrupt manifest (no {key!r}); fetch into a new workspace")
        return manifest[key]

    @property
    def architecture(self) -> dict[str, Any]:
        return self._required_key("architecture")

    @property
    def tasks(self) -> list[str]:
        return list(self._required_key("tasks"))

    def path(self, relpath: str) -> Path:
        return self.root / relpath

    def has(self, relpath: str) -> bool:
        return relpath in self.manifest().get("files", {}) and self.path(relpath).is_file()

    def require(self, relpath: str) -> Path:
        """The path of a recorded file, after checking it still matches the manifest."""
        path = self.path(relpath)
        for attempt in range(2):
            files = self.manifest().get("files", {})
            if relpath not in files or not path.exists():
                raise RankoneError(f"{path}: missing; run `{producer_of(relpath)}` first")
            recorded = files[relpath]
            found = path.stat()
            if found.st_size == recorded.get("size") and (_untouched(found, recorded) or sha256_file(path) == recorded.get("sha256")):
                return path
            if attempt == 0:
                # Another stage may be committing this file right now: wait for its commit, then look again.
                with self.locked(shared=True):
                    pass
        raise RankoneError(
            f"{path}: does not match the workspace manifest (changed since `{producer_of(relpath)}` wrote it); "
            f"rerun `{producer_of(relpath)}`"
        )

    def load_tensors(self, relpath: str) -> dict[str, torch.Tensor]:
        return load_tensors(self.require(relpath))

    def lazy_tensors(self, relpath: str) -> LazyTensors:
        """A recorded safetensors file, checked as `require` checks it, whose tensors are read only when asked for."""
        return LazyTensors(self.require(relpath))

    def read_json(self, relpath: str) -> Any:
        return json.loads(self.require(relpath).read_text())

    # -- writing --------------------------------------------------------------------
    @contextlib.contextmanager
    def transaction(self, manifest_updates: dict[str, Any] | None = None, create: bool = False) -> Iterator[Staging]:
        """Stage files, then commit them with their hashes, all or nothing (see `commit` for the protocol).

        `manifest_updates` (top-level keys) are merged into the manifest on commit; the
        dict may be filled in while the stage runs.
        """
        created_root = create and not self.root.exists()
        if create:
            if self.root.exists() and not self.root.is_dir():
                raise RankoneError(f"-w {self.root}: exists and is not a folder")
            self.root.mkdir(parents=True, exist_ok=True)
        elif not self.exists():
            self.manifest()  # the one-line "no workspace here"
        self.recover()
        try:
            staging_root = Path(tempfile.mkdtemp(dir=self.root, prefix=f"{STAGING_PREFIX}{os.getpid()}-"))
        except OSError as error:
            raise RankoneError(f"-w {self.root}: cannot write here ({error.strerror or error})") from None
        staging = Staging(staging_root, self.root)
        try:
            yield staging
            self.commit(staging, manifest_updates or {})
        finally:
            shutil.rmtree(staging_root, ignore_errors=True)
            if created_root and not self.exists():
                shutil.rmtree(self.root, ignore_errors=True)

    @contextlib.contextmanager
    def locked(self, shared: bool = False) -> Iterator[None]:
        """The workspace's commit lock (flock on `.lock`): commits are serialised, and so is recovery."""
        try:
            handle = open(self.root / LOCK_FILE, "a")
        except OSError as error:
            if shared:  # a workspace no one can write to has no commit to wait for
                yield
                return
            raise RankoneError(f"-w {self.root}: cannot write here ({_write_error_reason(error)})") from None
        with handle:
            fcntl.flock(handle, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def check_writable(self, relpaths: list[str]) -> None:
        """Nothing stands where these files go: no folder at a file's place, no file at a folder's."""
        for relpath in relpaths:
            target = self.path(relpath)
            blocking = next((path for path in (target, *target.parents) if path == self.root or path.exists()), self.root)
            if blocking == target and target.is_dir():
                raise RankoneError(f"{target}: is a folder where this stage writes a file; move it out of the workspace")
            if blocking not in (target, self.root) and not blocking.is_dir():
                raise RankoneError(f"{blocking}: is a file where this stage needs a folder; move it out of the workspace")

    def commit(self, staging: Staging, manifest_updates: dict[str, Any]) -> None:
        """Make a stage's files and its manifest entries visible together.

        Under the commit lock: read the manifest as it is now (another stage may have
        committed since this one started: its entries are kept, never lost), apply this
        stage's changes to it, and write the journal, `.commit.json`, holding the new
        manifest and the moves. Writing the journal is the commit point. Then the staged
        files are renamed into place, the manifest is written and the journal removed. A
        stage killed before the journal exists leaves the workspace as it was (its staging
        folder is removed by the next stage); one killed after it is completed by the next
        command that reads the workspace (`recover`).
        """
        hashes = {relpath: _file_record(staging.root / relpath) for relpath in staging.written}
        # Once the journal is written the moves must succeed, so anything in their way is refused first.
        self.check_writable(staging.written)
        with self.locked():
            self._roll_forward()
            manifest = self._read_manifest() if self.exists() else {"format": FORMAT_VERSION, "files": {}}
            files = dict(manifest.get("files", {}))
            for relpath in staging.removed:
                files.pop(relpath, None)
            files.update(hashes)
            manifest.update(manifest_updates)
            manifest["files"] = dict(sorted(files.items()))
            fault_point("before-journal")
            write_json_atomic(self.root / JOURNAL_FILE, {"staging": staging.root.name, "written": staging.written,
                                                         "removed": staging.removed, "manifest": manifest})
            fault_point("after-journal")
            self._roll_forward()

    def _roll_forward(self) -> None:
        """Finish a commit whose journal exists (the caller holds the lock); idempotent."""
        journal_path = self.root / JOURNAL_FILE
        if not journal_path.is_file():
            return
        try:
            journal = json.loads(journal_path.read_text())
            staging_root = self.root / journal["staging"]
            written, removed, manifest = journal["written"], journal["removed"], journal["manifest"]
        except (OSError, ValueError, KeyError, TypeError):
            # A journal is written atomically, so an unreadable one was never a commit.
            journal_path.unlink(missing_ok=True)
            return
        for relpath in removed:
            if relpath not in written and not self.path(relpath).is_dir():
                self.path(relpath).unlink(missing_ok=True)
        for index, relpath in enumerate(written):
            source, target = staging_root / relpath, self.path(relpath)
            if source.is_file():
                target.parent.mkdir(parents=True, exist_ok=True)
                os.replace(source, target)
            if index == 0:
                fault_point("after-first-move")
        write_json_atomic(self.manifest_path, manifest)
        journal_path.unlink()
        shutil.rmtree(staging_root, ignore_errors=True)

    def recover(self) -> None:
        """Complete an interrupted commit and remove staging folders left by killed stages."""
        if not self.root.is_dir():
            return
        if (self.root / JOURNAL_FILE).is_file():
            with self.locked():
                self._roll_forward()
        for entry in self.root.iterdir():
            if entry.name.startswith(STAGING_PREFIX) and entry.is_dir() and not process_alive(_staging_pid(entry.name)):
                shutil.rmtree(entry, ignore_errors=True)


def _staging_pid(name: str) -> int | None:
    try:
        return int(name[len(STAGING_PREFIX):].split("-", 1)[0])
    except ValueError:
        return None


def process_alive(pid: int | None) -> bool:
    """Whether process `pid` still runs on this machine; a zombie (killed, not yet reaped by its parent) does not."""
    if pid is None:
        return False
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False
    except OSError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def fault_point(name: str) -> None:
    """Tests kill a stage at a named point of the commit (`RANKONE_TEST_KILL_AT=after-journal`) to check recovery."""
    if os.environ.get("RANKONE_TEST_KILL_AT") == name:
        os.kill(os.getpid(), signal.SIGKILL)
