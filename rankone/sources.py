"""Where models and test data come from: SOURCE strings, presets, Hub parquet datasets; `fetch`.

A SOURCE is one of
  hf:ORG/NAME[@REVISION]   a Hugging Face Hub repo, through huggingface_hub's own cache
                           (HF_HOME / HF_HUB_CACHE, HF_HUB_OFFLINE=1 are honoured)
  DIR                      a transformers CLIP directory (config.json + model.safetensors)
                           or an open_clip one (open_clip_config.json + open_clip_model.safetensors)
  FILE.safetensors         a single weights file in either layout; architecture from the base
  open_clip:MODEL:TAG      one of open_clip's pretrained tags (open_clip downloads and caches it)
Everything is converted to open_clip's layout (`rankone.convert`) and floats are stored as
float32, so task vectors are differences of like with like. Pickled weights (.bin, .pt)
are read only with `trust_pickle=True` (CLI: --trust-pickle), and then with
`torch.load(weights_only=True)`.

`fetch` writes base.safetensors, experts/<task>.safetensors and optional data/<task>/ in one
workspace transaction. Running it again on a workspace replaces the models and removes
every file the later stages derived from them (task vectors, pool, merges, heads, reports);
test images already fetched stay for tasks that are still present and not fetched again.
"""

from __future__ import annotations

import copy
import dataclasses
import io
import json
import pickle
import re
import warnings
from fnmatch import fnmatch
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

# huggingface_hub loads a submodule on first attribute access: naming it at call time keeps
# snapshot_download (0.4 s of imports) out of every command's start-up.
import huggingface_hub
import pyarrow.parquet as pq
import torch
from PIL import Image, UnidentifiedImageError
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from rankone.convert import architecture_from_config, convert_state_dict, is_transformers_layout
from rankone.errors import RankoneError, RankoneNote
from rankone.models import build_clip, named_architecture, open_clip, visual_state
from rankone.progress import shown
from rankone.workspace import Staging, Workspace, index_name, load_sharded, load_tensors

HF_SCHEME = "hf:"
OPEN_CLIP_SCHEME = "open_clip:"
TRANSFORMERS_CONFIG = "config.json"
TRANSFORMERS_WEIGHTS = "model.safetensors"
TRANSFORMERS_PICKLE = "pytorch_model.bin"
OPEN_CLIP_CONFIG = "open_clip_config.json"
OPEN_CLIP_WEIGHTS = "open_clip_model.safetensors"
OPEN_CLIP_PICKLE = "open_clip_pytorch_model.bin"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth")
PRESETS_FILE = "presets.json"
DATA_DIR = "data"
# Tensors an expert may lack: FusionBench's experts are CLIPVisionModels, which have no
# projection; the base's is used, so its task vector is zero.
OPTIONAL_EXPERT_TENSORS = ("visual.proj",)
# Files of the Hub's parquet conversion of a test split ("data/test-00000-of-00001.parquet").
TEST_SPLIT_PATTERNS = ["*test-*.parquet", "*test/*.parquet", "*test.parquet"]

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+._-]*):")


@dataclass
class LoadedSource:
    """A model read from a SOURCE, converted to open_clip's layout."""

    source: str
    architecture: dict[str, Any] | None  # None for a single file (taken from the base)
    state_dict: dict[str, torch.Tensor]
    revision: str | None = None  # the resolved commit for hf: sources
    kind: str = ""  # hf-transformers, transformers-dir, open_clip-dir, file, open_clip-pretrained, ...
    files: list[str] = field(default_factory=list)

    def record(self) -> dict[str, Any]:
        """What the manifest keeps about this source."""
        entry: dict[str, Any] = {"source": self.source, "kind": self.kind}
        if self.revision is not None:
            entry["revision"] = self.revision
        if self.files:
            entry["files"] = self.files
        return entry


# -- presets -------------------------------------------------------------------------------

def presets() -> dict[str, dict[str, Any]]:
    """The preset table: name → {"description", "base", "experts": {task: SOURCE}}."""
    text = resources.files("rankone").joinpath(PRESETS_FILE).read_text()
    return {name: entry for name, entry in json.loads(text).items() if not name.startswith("_")}


def preset(name: str) -> tuple[str, dict[str, str]]:
    """(base SOURCE, {task: SOURCE}) of a preset."""
    table = presets()
    if name not in table:
        raise RankoneError(f"--preset {name!r}: unknown preset; known presets: {', '.join(table)}")
    return table[name]["base"], dict(table[name]["experts"])


# -- reading weights -----------------------------------------------------------------------

def _as_float32(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {key: value.float() if value.is_floating_point() else value for key, value in state_dict.items()}


def _first_line(error: Exception) -> str:
    return (str(error).strip().splitlines() or [""])[0]


def read_weights(path: Path, trust_pickle: bool = False) -> dict[str, torch.Tensor]:
    """Tensors of a .safetensors file, or of a pickle file when `trust_pickle` allows it."""
    if path.suffix == ".safetensors":
        return load_tensors(path)
    if path.suffix in PICKLE_SUFFIXES:
        if not path.is_file():
            raise RankoneError(f"{path}: file not found")
        if not trust_pickle:
            raise RankoneError(f"{path}: pickle file; pass --trust-pickle to load it (prefer .safetensors)")
        try:
            loaded = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:
            # It holds objects besides tensors; --trust-pickle is the user's word that the file is theirs to run.
            try:
                loaded = torch.load(path, map_location="cpu", weights_only=False)
            except Exception as error:  # a full unpickling can fail in any way the file's code does
                raise RankoneError(f"{path}: not a loadable pickle ({type(error).__name__}: {_first_line(error)})") from None
            warnings.warn(f"{path}: holds objects besides tensors; loaded as a full pickle because of --trust-pickle", RankoneNote)
        except Exception as error:  # torch raises several types for a file that is no pickle at all
            raise RankoneError(f"{path}: not a loadable pickle ({type(error).__name__}: {_first_line(error)})") from None
        if isinstance(loaded, dict) and isinstance(loaded.get("state_dict"), dict):
            loaded = loaded["state_dict"]
        if not isinstance(loaded, dict) or not all(isinstance(value, torch.Tensor) for value in loaded.values()):
            raise RankoneError(f"{path}: does not hold a state dict of tensors")
        return loaded
    raise RankoneError(f"{path}: not a weights file (expected .safetensors, or .bin/.pt with --trust-pickle)")


def _strip_module_prefix(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # Checkpoints saved from DistributedDataParallel prefix every key with "module.".
    if state_dict and all(key.startswith("module.") for key in state_dict):
        return {key[len("module."):]: value for key, value in state_dict.items()}
    return state_dict


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise RankoneError(f"{path}: not valid JSON ({error})") from None
    if not isinstance(data, dict):
        raise RankoneError(f"{path}: expected a JSON object")
    return data


def _transformers_weights(folder: Path, trust_pickle: bool) -> tuple[dict[str, torch.Tensor], list[str]]:
    if (folder / TRANSFORMERS_WEIGHTS).is_file() or (folder / index_name(TRANSFORMERS_WEIGHTS)).is_file():
        return load_sharded(folder, TRANSFORMERS_WEIGHTS)
    if (folder / TRANSFORMERS_PICKLE).is_file():
        return read_weights(folder / TRANSFORMERS_PICKLE, trust_pickle), [TRANSFORMERS_PICKLE]
    raise RankoneError(f"{folder}: has {TRANSFORMERS_CONFIG} but no {TRANSFORMERS_WEIGHTS}")


def load_transformers_dir(folder: Path, trust_pickle: bool = False) -> tuple[dict[str, Any], dict[str, torch.Tensor], list[str]]:
    """(architecture, open_clip state dict, files read) of a transformers CLIP directory."""
    config = _read_json(folder / TRANSFORMERS_CONFIG)
    tensors, files = _transformers_weights(folder, trust_pickle)
    architecture = architecture_from_config(config)
    try:
        state_dict = convert_state_dict(tensors)
    except RankoneError as error:
        raise RankoneError(f"{folder}: {error}") from None
    return architecture, state_dict, [TRANSFORMERS_CONFIG, *files]


def load_open_clip_dir(folder: Path, trust_pickle: bool = False) -> tuple[dict[str, Any], dict[str, torch.Tensor], list[str]]:
    """(architecture, state dict, files read) of an open_clip directory (the Hub's open_clip layout)."""
    config = _read_json(folder / OPEN_CLIP_CONFIG)
    if not isinstance(config.get("model_cfg"), dict):
        raise RankoneError(f"{folder / OPEN_CLIP_CONFIG}: has no model_cfg")
    architecture = copy.deepcopy(config["model_cfg"])
    architecture.setdefault("quick_gelu", False)
    if isinstance(config.get("model_name"), str):
        architecture["name"] = config["model_name"]
    if (folder / OPEN_CLIP_WEIGHTS).is_file():
        weights = OPEN_CLIP_WEIGHTS
    elif (folder / OPEN_CLIP_PICKLE).is_file():
        weights = OPEN_CLIP_PICKLE
    else:
        raise RankoneError(f"{folder}: has {OPEN_CLIP_CONFIG} but no {OPEN_CLIP_WEIGHTS}")
    state_dict = _strip_module_prefix(read_weights(folder / weights, trust_pickle))
    if is_transformers_layout(state_dict):
        raise RankoneError(f"{folder / weights}: holds transformers keys, not open_clip's")
    return architecture, state_dict, [OPEN_CLIP_CONFIG, weights]


def load_directory(folder: Path, trust_pickle: bool = False) -> tuple[dict[str, Any], dict[str, torch.Tensor], str, list[str]]:
    """(architecture, state dict, kind, files) of a model directory in either layout.

    A directory with both (many Hub repos ship both) is read as open_clip, which needs no
    conversion, when its open_clip weights are there.
    """
    has_open_clip = (folder / OPEN_CLIP_CONFIG).is_file() and (
        (folder / OPEN_CLIP_WEIGHTS).is_file() or (trust_pickle and (folder / OPEN_CLIP_PICKLE).is_file())
    )
    if has_open_clip or ((folder / OPEN_CLIP_CONFIG).is_file() and not (folder / TRANSFORMERS_CONFIG).is_file()):
        architecture, state_dict, files = load_open_clip_dir(folder, trust_pickle)
        return architecture, state_dict, "open_clip", files
    if (folder / TRANSFORMERS_CONFIG).is_file():
        architecture, state_dict, files = load_transformers_dir(folder, trust_pickle)
        return architecture, state_dict, "transformers", files
    raise RankoneError(
        f"{folder}: not a model directory (expected {TRANSFORMERS_CONFIG} + {TRANSFORMERS_WEIGHTS} "
        f"or {OPEN_CLIP_CONFIG} + {OPEN_CLIP_WEIGHTS})"
    )


def load_weights_file(path: Path, trust_pickle: bool = False) -> dict[str, torch.Tensor]:
    """A single weights file in either key layout, as an open_clip state dict."""
    state_dict = _strip_module_prefix(read_weights(path, trust_pickle))
    if is_transformers_layout(state_dict):
        try:
            return convert_state_dict(state_dict)
        except RankoneError as error:
            raise RankoneError(f"{path}: {error}") from None
    return state_dict


# -- the Hub ---------------------------------------------------------------------------------

def parse_hf(source: str) -> tuple[str, str | None]:
    """`hf:ORG/NAME[@REVISION]` → (repo id, revision or None)."""
    spec = source[len(HF_SCHEME):]
    repo_id, _, revision = spec.partition("@")
    if repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise RankoneError(f"{source}: expected hf:ORG/NAME[@REVISION]")
    return repo_id, revision or None


def hf_snapshot(source: str, allow_patterns: list[str], repo_type: str = "model") -> tuple[Path, str]:
    """(local snapshot folder, resolved commit) of a Hub repo, via huggingface_hub's cache.

    huggingface_hub does the caching, revision resolution and offline mode
    (HF_HUB_OFFLINE=1 serves only what the cache holds).
    """
    repo_id, revision = parse_hf(source)
    try:
        folder = Path(huggingface_hub.snapshot_download(repo_id, repo_type=repo_type, revision=revision, allow_patterns=allow_patterns))
    except Exception as error:  # huggingface_hub raises many types (HTTP, offline, cache); all mean "not available"
        message = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise RankoneError(
            f"{source}: could not get {repo_type} repo {repo_id}{'@' + revision if revision else ''} "
            f"({type(error).__name__}: {message})"
        ) from None
    # The snapshot folder is named after the commit the revision resolved to.
    return folder, folder.name


def _load_hf_model(source: str, trust_pickle: bool) -> LoadedSource:
    patterns = ["*.json", "*.safetensors"] + (["*.bin"] if trust_pickle else [])
    folder, commit = hf_snapshot(source, patterns)
    if not any(folder.glob("*.safetensors")) and not trust_pickle:
        raise RankoneError(f"{source}: no .safetensors weights in the repo; pass --trust-pickle to allow pickle (.bin) files")
    architecture, state_dict, kind, files = load_directory(folder, trust_pickle)
    return LoadedSource(source, architecture, state_dict, commit, f"hf-{kind}", files)


def _load_open_clip_pretrained(source: str, trust_pickle: bool) -> LoadedSource:
    spec = source[len(OPEN_CLIP_SCHEME):]
    model, _, tag = spec.partition(":")
    if model not in open_clip.list_models():
        raise RankoneError(f"{source}: unknown open_clip model {model!r}; see `open_clip.list_models()`")
    tags = open_clip.list_pretrained_tags_by_model(model)
    if not tag or not open_clip.get_pretrained_cfg(model, tag):
        raise RankoneError(f"{source}: give one of open_clip's pretrained tags for {model}: {', '.join(tags) or 'none'}")
    pretrained_cfg = open_clip.get_pretrained_cfg(model, tag)
    try:
        path = open_clip.download_pretrained(pretrained_cfg)
    except Exception as error:  # network, offline mode, or cache problems inside open_clip / the Hub
        raise RankoneError(
            f"{source}: open_clip could not download or find the weights in its cache "
            f"(offline? HF_HUB_OFFLINE=1 serves only cached files) ({type(error).__name__}: {error})"
        ) from None
    if not path:
        raise RankoneError(f"{source}: open_clip has no download for this tag")
    path = Path(path)
    state_dict = _strip_module_prefix(read_weights(path, trust_pickle))
    architecture = named_architecture(model)
    architecture["quick_gelu"] = bool(pretrained_cfg.get("quick_gelu", architecture.get("quick_gelu", False)))
    return LoadedSource(source, architecture, state_dict, None, "open_clip-pretrained", [path.name])


# -- SOURCE strings -------------------------------------------------------------------------

def load_source(source: str, *, base_architecture: dict[str, Any] | None = None, trust_pickle: bool = False) -> LoadedSource:
    """Read a SOURCE (see the module doc) as an open_clip state dict with float32 weights.

    A single weights file carries no architecture: `base_architecture` is recorded for it.
    """
    if source.startswith(HF_SCHEME):
        loaded = _load_hf_model(source, trust_pickle)
    elif source.startswith(OPEN_CLIP_SCHEME):
        loaded = _load_open_clip_pretrained(source, trust_pickle)
    else:
        path = Path(source).expanduser()
        scheme = _SCHEME.match(source)
        if not path.exists() and scheme and len(scheme.group(1)) > 1:
            raise RankoneError(
                f"{source}: unknown source scheme {scheme.group(1)!r}; use hf:ORG/NAME[@REVISION], "
                "open_clip:MODEL:TAG, a model directory or a .safetensors file"
            )
        if path.is_dir():
            architecture, state_dict, kind, files = load_directory(path, trust_pickle)
            loaded = LoadedSource(source, architecture, state_dict, None, f"{kind}-dir", files)
        elif path.is_file():
            state_dict = load_weights_file(path, trust_pickle)
            loaded = LoadedSource(source, copy.deepcopy(base_architecture) if base_architecture else None, state_dict, None, "file", [path.name])
        else:
            raise RankoneError(f"{source}: no such file or directory")
    if not loaded.state_dict:
        raise RankoneError(f"{source}: holds no tensors")
    loaded.state_dict = _as_float32(loaded.state_dict)
    return loaded


# -- checks ---------------------------------------------------------------------------------

def expected_shapes(architecture: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Every tensor an open_clip CLIP of `architecture` has, with its shape (built on `meta`)."""
    with torch.device("meta"):
        model = build_clip(architecture)
    return {key: tuple(value.shape) for key, value in model.state_dict().items()}


def check_base(loaded: LoadedSource) -> dict[str, torch.Tensor]:
    """The base's full state dict, after checking it is a complete CLIP with a text tower."""
    if loaded.architecture is None:
        raise RankoneError(f"base {loaded.source}: a single weights file has no architecture; use a model directory, hf: or open_clip:")
    if not loaded.architecture.get("text_cfg"):
        raise RankoneError(f"base {loaded.source}: has no text tower (a CLIPVisionModel); the base must be a full CLIP, heads need its text encoder")
    if loaded.architecture.get("custom_text") or loaded.architecture["text_cfg"].get("hf_model_name"):
        raise RankoneError(f"base {loaded.source}: custom text towers are not supported; the base needs open_clip's standard text transformer")
    shapes = expected_shapes(loaded.architecture)
    state_dict = loaded.state_dict
    for key, shape in shapes.items():
        if key not in state_dict:
            raise RankoneError(f"base {loaded.source}: tensor {key} is missing")
        if tuple(state_dict[key].shape) != shape:
            raise RankoneError(f"base {loaded.source}: tensor {key} has shape {tuple(state_dict[key].shape)}, the architecture needs {shape}")
    extra = [key for key in state_dict if key not in shapes]
    if extra:
        raise RankoneError(f"base {loaded.source}: unexpected tensor {extra[0]} for its architecture")
    return state_dict


def _vision_signature(architecture: dict[str, Any]) -> dict[str, Any]:
    """The image-tower settings with open_clip's defaults filled in, for comparison."""
    try:
        vision = dataclasses.asdict(open_clip.model.CLIPVisionCfg(**architecture["vision_cfg"]))
    except TypeError as error:
        raise RankoneError(f"architecture vision_cfg not understood by open_clip: {error}") from None
    vision["quick_gelu"] = bool(architecture.get("quick_gelu", False))
    return vision


def check_expert(task: str, loaded: LoadedSource, base_visual: dict[str, torch.Tensor], base_architecture: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The expert's image tower (`visual.*`), checked against the base's.

    Raises when a tensor is missing or shaped differently, when the image-tower settings
    differ (head count and activation are invisible in shapes), or when the tower equals
    the base exactly (its task vector would be all zeros).
    """
    if loaded.architecture is not None:
        ours, theirs = _vision_signature(loaded.architecture), _vision_signature(base_architecture)
        for name in theirs:
            if ours[name] != theirs[name]:
                raise RankoneError(f"expert {task} ({loaded.source}): {name} is {ours[name]!r}, the base's is {theirs[name]!r}")
    visual = visual_state(loaded.state_dict)
    if not visual:
        raise RankoneError(f"expert {task} ({loaded.source}): has no image tower tensors")
    for key, base_tensor in base_visual.items():
        if key not in visual:
            if key in OPTIONAL_EXPERT_TENSORS:
                visual[key] = base_tensor.clone()
                continue
            raise RankoneError(f"expert {task} ({loaded.source}): tensor {key} is missing")
        if visual[key].shape != base_tensor.shape:
            raise RankoneError(
                f"expert {task} ({loaded.source}): tensor {key} has shape {tuple(visual[key].shape)}, "
                f"the base's is {tuple(base_tensor.shape)}"
            )
    extra = [key for key in visual if key not in base_visual]
    if extra:
        raise RankoneError(f"expert {task} ({loaded.source}): tensor {extra[0]} has no counterpart in the base")
    if all(torch.equal(visual[key], base_visual[key]) for key in base_visual):
        raise RankoneError(f"expert {task} ({loaded.source}): image tower equals the base exactly (its task vector would be all zeros)")
    return visual


# -- datasets ---------------------------------------------------------------------------------

@dataclass
class ParquetSplit:
    """A test split as parquet shards with its class names and columns."""

    source: str
    files: list[Path]
    class_names: list[str]
    image_column: str
    label_column: str
    rows: int
    revision: str | None = None


def _features(path: Path) -> dict[str, Any]:
    try:
        metadata = pq.ParquetFile(path).schema_arrow.metadata or {}
    except Exception as error:  # pyarrow raises ArrowInvalid/OSError for a damaged file
        raise RankoneError(f"{path}: not a readable parquet file ({error})") from None
    if b"huggingface" not in metadata:
        raise RankoneError(f"{path}: no Hugging Face datasets metadata (schema key 'huggingface') with the class names")
    try:
        info = json.loads(metadata[b"huggingface"])
        return info["info"]["features"]
    except (json.JSONDecodeError, KeyError, TypeError):
        raise RankoneError(f"{path}: schema metadata 'huggingface' lacks info.features") from None


def read_parquet_split(source: str, files: list[Path], revision: str | None = None) -> ParquetSplit:
    """Class names and columns of parquet shards written by Hugging Face `datasets`."""
    if not files:
        raise RankoneError(f"{source}: empty dataset (no test split parquet files, e.g. data/test-00000-of-00001.parquet)")
    features = _features(files[0])
    labels = [name for name, feature in features.items() if isinstance(feature, dict) and feature.get("_type") == "ClassLabel"]
    images = [name for name, feature in features.items() if isinstance(feature, dict) and feature.get("_type") == "Image"]
    if not images:
        raise RankoneError(f"{files[0]}: no Image column in the dataset features")
    if not labels:
        raise RankoneError(f"{files[0]}: no ClassLabel column in the dataset features (class names are needed)")
    label_column = "label" if "label" in labels else labels[0]
    class_names = features[label_column].get("names") or []
    if not class_names:
        raise RankoneError(f"{files[0]}: ClassLabel column {label_column!r} lists no class names")
    rows = 0
    for path in files:
        try:
            rows += pq.ParquetFile(path).metadata.num_rows
        except Exception as error:  # pyarrow raises ArrowInvalid/OSError for a damaged file
            raise RankoneError(f"{path}: not a readable parquet file ({error})") from None
    if rows == 0:
        raise RankoneError(f"{source}: empty dataset (the test split has no rows)")
    return ParquetSplit(source, files, [str(name) for name in class_names], images[0], label_column, rows, revision)


def locate_dataset(source: str) -> ParquetSplit:
    """A dataset SOURCE: `hf:ORG/NAME[@REVISION]` (a Hub dataset repo's parquet test split),
    a local .parquet file, or a local folder holding test-split parquet files."""
    if source.startswith(HF_SCHEME):
        folder, commit = hf_snapshot(source, TEST_SPLIT_PATTERNS, repo_type="dataset")
        return read_parquet_split(source, _test_parquet_files(folder), commit)
    path = Path(source).expanduser()
    if path.is_file():
        return read_parquet_split(source, [path])
    if path.is_dir():
        return read_parquet_split(source, _test_parquet_files(path))
    scheme = _SCHEME.match(source)
    if scheme and len(scheme.group(1)) > 1:
        raise RankoneError(f"{source}: unknown dataset scheme {scheme.group(1)!r}; use hf:ORG/NAME[@REVISION] or a parquet file/folder")
    raise RankoneError(f"{source}: no such file or directory")


def _test_parquet_files(folder: Path) -> list[Path]:
    found = sorted(
        path for path in folder.rglob("*.parquet")
        if any(fnmatch(path.relative_to(folder).as_posix(), pattern) for pattern in TEST_SPLIT_PATTERNS)
    )
    parents = sorted({path.parent for path in found})
    if len(parents) > 1:
        listed = ", ".join(str(parent.relative_to(folder)) for parent in parents)
        raise RankoneError(f"{folder}: test splits of several configurations ({listed}); point at one folder")
    return found


def class_folder_name(name: str) -> str:
    """A class name made safe as one folder name (path separators and leading dots removed)."""
    safe = name.replace("/", "_").replace("\\", "_").replace("\0", "").strip().lstrip(".")
    return safe or "_"


def iter_examples(split: ParquetSplit) -> Iterator[tuple[bytes, int]]:
    """(encoded image bytes, label) of every row, shard by shard, in batches."""
    for path in split.files:
        handle = pq.ParquetFile(path)
        for batch in handle.iter_batches(batch_size=256, columns=[split.image_column, split.label_column]):
            images = batch.column(0).to_pylist()
            labels = batch.column(1).to_pylist()
            for image, label in zip(images, labels):
                data = image.get("bytes") if isinstance(image, dict) else image
                if not data:
                    raise RankoneError(f"{path}: an image has no embedded bytes (path {image.get('path') if isinstance(image, dict) else None!r})")
                if label is None or not 0 <= int(label) < len(split.class_names):
                    raise RankoneError(f"{path}: label {label!r} outside the {len(split.class_names)} classes")
                yield data, int(label)


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def write_image_folder(staging: Staging, task: str, split: ParquetSplit, advance: Callable[[], None] | None = None) -> int:
    """Write `data/<task>/<class name>/<index>.png` into the staging area; returns the count."""
    folders = [class_folder_name(name) for name in split.class_names]
    if len(set(folders)) != len(folders):
        raise RankoneError(f"{split.source}: class names collide as folder names")
    count = 0
    for index, (data, label) in enumerate(iter_examples(split)):
        target = staging.path(f"{DATA_DIR}/{task}/{folders[label]}/{index}.png")
        if data.startswith(PNG_SIGNATURE):
            target.write_bytes(data)
        else:
            try:
                with Image.open(io.BytesIO(data)) as image:
                    image.save(target, format="PNG")
            except (UnidentifiedImageError, OSError) as error:
                raise RankoneError(f"{split.source}: row {index} is not a readable image ({error})") from None
        count += 1
        if advance:
            advance()
    return count


# -- fetch ----------------------------------------------------------------------------------

@contextmanager
def _progress(enabled: bool) -> Iterator[Any]:
    if not enabled:
        yield None
        return
    with shown(Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        console=Console(stderr=True), transient=False)) as progress:
        yield progress


def fetch(
    workspace: Workspace,
    base: str,
    experts: dict[str, str],
    *,
    trust_pickle: bool = False,
    datasets: dict[str, str] | None = None,
    progress: bool = True,
) -> None:
    """Load the base and every expert, check them, and write them to `workspace` at once.

    Writes base.safetensors (both towers), experts/<task>.safetensors (`visual.*`) and, per
    `datasets` entry, data/<task>/<class>/<n>.png; the manifest records architecture, tasks,
    sources (with resolved revisions) and datasets. Re-running replaces the models and drops
    everything derived from them (see the module doc). Any error leaves the workspace as it was.
    """
    datasets = dict(datasets or {})
    if not experts:
        raise RankoneError("--expert: give at least one TASK=SOURCE (or --preset)")
    for task in list(experts) + list(datasets):
        if not task or "/" in task or "\\" in task or task.startswith("."):
            raise RankoneError(f"task name {task!r}: must be a plain name (no slashes, not starting with a dot)")
    unknown = [task for task in datasets if task not in experts]
    if unknown:
        raise RankoneError(f"--dataset {unknown[0]}: not one of the experts' tasks ({', '.join(experts)})")
    previous = workspace.manifest() if workspace.exists() else None

    sources: dict[str, Any] = {"base": {}, "experts": {}}
    updates: dict[str, Any] = {"architecture": None, "tasks": list(experts), "sources": sources, "datasets": {}}
    # Test splits are checked first: reading their metadata is cheap, loading models is not.
    splits = {task: locate_dataset(source) for task, source in datasets.items()}
    with _progress(progress) as bars, workspace.transaction(updates, create=True) as staging:
        models_bar = bars.add_task("models", total=1 + len(experts)) if bars else None

        def advance_models() -> None:
            if bars:
                bars.advance(models_bar)

        loaded_base = load_source(base, trust_pickle=trust_pickle)
        base_state = check_base(loaded_base)
        architecture = loaded_base.architecture
        staging.save_tensors("base.safetensors", base_state)
        sources["base"] = loaded_base.record()
        base_visual = visual_state(base_state)
        del loaded_base, base_state
        advance_models()
        for task, source in experts.items():
            loaded = load_source(source, base_architecture=architecture, trust_pickle=trust_pickle)
            expert_visual = check_expert(task, loaded, base_visual, architecture)
            staging.save_tensors(f"experts/{task}.safetensors", expert_visual)
            sources["experts"][task] = loaded.record()
            del loaded, expert_visual
            advance_models()

        images_bar = bars.add_task("test images", total=sum(split.rows for split in splits.values())) if bars and splits else None
        for task, split in splits.items():
            count = write_image_folder(staging, task, split, (lambda: bars.advance(images_bar)) if images_bar is not None else None)
            entry: dict[str, Any] = {"source": split.source, "split": "test", "images": count,
                                     "classes": split.class_names, "files": [path.name for path in split.files]}
            if split.revision:
                entry["revision"] = split.revision
            updates["datasets"][task] = entry

        updates["architecture"] = architecture
        if previous is not None:
            kept = {task: entry for task, entry in (previous.get("datasets") or {}).items() if task in experts and task not in datasets}
            updates["datasets"] = {**kept, **updates["datasets"]}
            kept_prefixes = tuple(f"{DATA_DIR}/{task}/" for task in kept)
            for relpath in previous.get("files", {}):
                if relpath not in staging.written and not relpath.startswith(kept_prefixes):
                    staging.remove(relpath)
    _remove_empty_folders(workspace.root / DATA_DIR)


def _remove_empty_folders(root: Path) -> None:
    """Class folders emptied by a re-fetch would read as classes without images."""
    if not root.is_dir():
        return
    for folder in sorted((path for path in root.rglob("*") if path.is_dir()), key=lambda path: len(path.parts), reverse=True):
        if not any(folder.iterdir()):
            folder.rmdir()


def describe_presets() -> list[tuple[str, str, int]]:
    """(name, description, number of experts) of every preset, for listings."""
    return [(name, entry.get("description", ""), len(entry["experts"])) for name, entry in presets().items()]


__all__ = [
    "LoadedSource",
    "ParquetSplit",
    "check_base",
    "check_expert",
    "fetch",
    "hf_snapshot",
    "load_directory",
    "load_source",
    "load_weights_file",
    "locate_dataset",
    "preset",
    "presets",
    "read_parquet_split",
    "write_image_folder",
]
