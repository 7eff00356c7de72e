"""Reading a checkpoint without running anything it holds: the one way fastross reads checkpoint files.

Every reader of a checkpoint goes through here: the resume (fastross.checkpoint.Checkpointer.load),
`model.init_from` (fastross.weights.load_model_weights, also behind fastross.generate and fastross.eval),
fastross.export (both formats) and the reference importer (fastross.ross_format's `.bin` files).

What a crafted file could do, and what stops it:
- `.metadata` (a pickle): unpickled with only DCP's own metadata classes allowed (`read_metadata`).
- A *bytes* item (DCP's default planner unpickles these without any restriction): fastross saves
  exactly one kind of them, an optimizer `param_groups` entry (`optim.param_groups.<i>.<field>`: a number, a
  flag, a name list). `check_kinds` refuses a `.metadata` that declares any other key as bytes (a model entry is
  always a tensor), and `load_into` reads every bytes item with `torch.load(weights_only=True)` and keeps it only
  when it is a plain value of the kind the live optimizer holds (`check_bytes_items`, and again in the planner
  DCP calls, `_VettedPlanner.load_bytes`). Tensors DCP reads with `weights_only=True` already.
- A storage entry pointing outside the checkpoint folder, or at a stream transform: refused (`check_kinds`).
- `rng_rank{r}.pt`, `mm_projector.bin`: `read_tensor_file`, `torch.load(weights_only=True)`, a dict of tensors.
- `trainer.json`: strict UTF-8 JSON, an object with the keys and types fastross writes (`check_trainer_state`,
  `check_scheduler_state` against the live scheduler's own state), so that nothing else reaches
  `LambdaLR.load_state_dict`, which copies whatever it is given into the scheduler's attributes.
- `config.yaml`: fastross.config reads it with `yaml.safe_load`, which builds no Python objects from tags.

Every refusal is a CheckpointError whose message starts with the file and names the key.
"""

from __future__ import annotations

import io
import json
import pickle
import re
import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import metadata as dcp_metadata
from torch.distributed.checkpoint._nested_dict import flatten_state_dict
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.filesystem import FileSystemReader
from torch.distributed.checkpoint.planner import ReadItem
from torch.distributed.checkpoint.protocol import _is_checkpointable_tensor


class CheckpointError(RuntimeError):
    """A checkpoint cannot be trusted or found: the message names the file and what to do."""


# The only keys fastross stores as bytes (pickled plain values): the optimizer's param_groups entries.
BYTES_KEY = re.compile(r"^optim\.param_groups\.\d+\.[A-Za-z_][A-Za-z0-9_]*$")
_PLAIN = (type(None), bool, int, float, str)
_TAMPERED = (
    "this checkpoint was not written by fastross or was tampered with: delete its folder or move it away "
    "to resume from an earlier one"
)

# What a DCP `.metadata` pickle may name: DCP's own metadata classes and the plain values inside them.
_METADATA_GLOBALS = {
    *(
        ("torch.distributed.checkpoint.metadata", n)
        for n, v in vars(dcp_metadata).items()
        if isinstance(v, type) and v.__module__ == dcp_metadata.__name__
    ),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    *(("torch", n) for n, v in vars(torch).items() if isinstance(v, torch.dtype)),
    ("torch.serialization", "_get_layout"),  # a lookup of torch.strided etc. by name
    *(("pathlib", n) for n in ("Path", "PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath")),
    ("collections", "OrderedDict"),
}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) not in _METADATA_GLOBALS:
            raise pickle.UnpicklingError(f"{module}.{name} is not part of DCP's checkpoint metadata")
        return super().find_class(module, name)


def read_metadata(path: Path) -> dcp_metadata.Metadata:
    """A DCP `.metadata` file, unpickled with only DCP's metadata classes allowed: a crafted one cannot run code."""
    try:
        md = _MetadataUnpickler(io.BytesIO(Path(path).read_bytes())).load()
    except (pickle.UnpicklingError, EOFError, AttributeError, ValueError, TypeError, IndexError, KeyError) as e:
        raise CheckpointError(
            f"{path}: refused to load, it is not DCP checkpoint metadata ({e}); a checkpoint not written by "
            "torch.distributed.checkpoint must be converted first: load it in a trusted Python session and save its "
            "tensors with safetensors or dcp.save"
        ) from None
    if not isinstance(md, dcp_metadata.Metadata):
        raise CheckpointError(f"{path}: refused to load, it holds a {type(md).__name__}, not DCP checkpoint metadata")
    return md


def check_kinds(md: dcp_metadata.Metadata, folder: Path) -> None:
    """Every key is what fastross saves: a tensor, or bytes for an `optim.param_groups.<i>.<field>` only; every
    storage entry is a plain file of the folder, read without a stream transform."""
    where = Path(folder) / ".metadata"
    if not isinstance(md.state_dict_metadata, dict) or not isinstance(md.storage_data, dict):
        raise CheckpointError(f"{where}: refused to load, its tables are not dicts; {_TAMPERED}")
    for fqn, kind in md.state_dict_metadata.items():
        if not isinstance(fqn, str):
            raise CheckpointError(f"{where}: refused to load, key {fqn!r} is not a name; {_TAMPERED}")
        if isinstance(kind, dcp_metadata.BytesStorageMetadata):
            if not BYTES_KEY.match(fqn):
                raise CheckpointError(
                    f"{where}: refused to load key {fqn}: it is declared as bytes (a pickle), fastross saves it as a "
                    f"tensor (only optim.param_groups.<i>.<field> entries are bytes); {_TAMPERED}"
                )
        elif not isinstance(kind, dcp_metadata.TensorStorageMetadata):
            raise CheckpointError(
                f"{where}: refused to load key {fqn}: its kind {type(kind).__name__} is no kind "
                f"fastross saves; {_TAMPERED}"
            )
    for index, info in md.storage_data.items():
        name = getattr(info, "relative_path", None)
        fqn = getattr(index, "fqn", index)
        if not isinstance(name, str) or not name or "/" in name or "\\" in name or name in (".", ".."):
            raise CheckpointError(
                f"{where}: refused to load key {fqn}: its data file {name!r} is not a file of {folder}; {_TAMPERED}"
            )
        if getattr(info, "transform_descriptors", None):
            raise CheckpointError(
                f"{where}: refused to load key {fqn}: its data passes through the stream transforms "
                f"{info.transform_descriptors}, which fastross never writes; {_TAMPERED}"
            )


def _plain(value, depth: int = 0) -> bool:
    """None, bools, numbers, strings, and lists/tuples of them (an optimizer's betas, a param group's names)."""
    if isinstance(value, _PLAIN):
        return type(value) in _PLAIN
    if type(value) in (list, tuple) and depth == 0:
        return all(_plain(v, 1) for v in value)
    return False


def _same_kind(value, template) -> bool:
    """`value` can stand where the live object holds `template`: numbers for numbers, flags for flags (None and a
    flag interchange: torch writes None for "not set"), strings for strings, sequences of the same length."""
    if value is None or template is None:
        return value is None and template is None or isinstance(template if value is None else value, bool)
    if isinstance(template, bool) or isinstance(value, bool):
        return isinstance(template, bool) and isinstance(value, bool)
    if isinstance(template, (int, float)):
        return isinstance(value, (int, float))
    if isinstance(template, str):
        return isinstance(value, str)
    if isinstance(template, (list, tuple)):
        return (
            isinstance(value, (list, tuple))
            and len(value) == len(template)
            and all(_same_kind(v, t) for v, t in zip(value, template))
        )
    if isinstance(template, dict):
        return (
            isinstance(value, dict)
            and value.keys() == template.keys()
            and all(_same_kind(value[k], template[k]) for k in template)
        )
    return False


def unpickle_bytes_item(data: bytes, file: Path, fqn: str, template=None):
    """One DCP bytes item -> its plain value, read with `torch.load(weights_only=True)`; anything else refused."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "Detected pickle protocol 4": the refusal below says what matters
            value = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001  (the unpickler's refusals come as several types)
        raise CheckpointError(
            f"{file}: refused to load key {fqn}: it is not a plain value that "
            f"torch.load(weights_only=True) reads ({_first_line(e)}); {_TAMPERED}"
        ) from None
    if not _plain(value):
        raise CheckpointError(
            f"{file}: refused to load key {fqn}: it holds a {type(value).__name__}, fastross saves a "
            f"plain value there (a number, a flag, a list of names); {_TAMPERED}"
        )
    if template is not None and not _same_kind(value, template):
        raise CheckpointError(
            f"{file}: refused to load key {fqn}: it holds {value!r}, where this optimizer holds "
            f"{template!r}; {_TAMPERED}"
        )
    return value


def check_bytes_items(folder: Path, md: dcp_metadata.Metadata, templates: dict[str, object]) -> dict[str, object]:
    """Read every bytes item named in `templates` (flattened key -> the live value) straight from its file and vet it
    (`unpickle_bytes_item`), before DCP reads anything: a refusal is a plain error on every rank."""
    out = {}
    for fqn, template in templates.items():
        info = md.storage_data.get(dcp_metadata.MetadataIndex(fqn))
        if info is None:
            raise CheckpointError(
                f"{Path(folder) / '.metadata'}: key {fqn} is declared but has no storage entry; {_TAMPERED}"
            )
        file = Path(folder) / info.relative_path
        try:
            with open(file, "rb") as f:
                f.seek(info.offset)
                data = f.read(info.length)
        except (OSError, ValueError, TypeError, OverflowError) as e:
            raise CheckpointError(f"{file}: cannot read key {fqn} ({_first_line(e)})") from None
        if len(data) != info.length:
            raise CheckpointError(f"{file}: key {fqn} runs past the end of the file; {_TAMPERED}")
        out[fqn] = unpickle_bytes_item(data, file, fqn, template)
    return out


class SafeReader(FileSystemReader):
    """DCP's file reader, with `.metadata` read by `read_metadata` (and vetted by `check_kinds`) instead of a plain
    `pickle.load`. Tensors it reads as DCP does, with `torch.load(weights_only=True)`."""

    def read_metadata(self, *args, **kwargs) -> dcp_metadata.Metadata:
        md = read_metadata(Path(self._get_metadata_path(kwargs.get("rank"))))
        check_kinds(md, Path(self.path))
        if getattr(md, "storage_meta", None) is None:
            md.storage_meta = dcp_metadata.StorageMeta()
        md.storage_meta.load_id = self.load_id
        return md


class _VettedPlanner(DefaultLoadPlanner):
    """DCP's default load planner, but a bytes item is read with weights_only=True and kept only as a plain value of
    the kind the state dict holds at its key (DefaultLoadPlanner.load_bytes unpickles without restriction)."""

    def __init__(self, folder: Path):
        super().__init__()
        self.folder = Path(folder)

    def set_up_planner(self, state_dict, metadata=None, is_coordinator: bool = False) -> None:
        super().set_up_planner(state_dict, metadata, is_coordinator)
        check_kinds(metadata, self.folder)
        check_template(self.state_dict, metadata, self.folder)

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        fqn = read_item.dest_index.fqn
        info = self.metadata.storage_data.get(read_item.storage_index)
        file = self.folder / (info.relative_path if info is not None else ".metadata")
        if not BYTES_KEY.match(fqn):
            raise CheckpointError(f"{file}: refused to load key {fqn} as bytes; {_TAMPERED}")
        obj = unpickle_bytes_item(value.getvalue(), file, fqn, self.state_dict.get(fqn))
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[fqn], obj)
        else:
            self.state_dict[fqn] = obj


def check_template(flat: dict, md: dcp_metadata.Metadata, folder: Path) -> dict[str, object]:
    """The checkpoint declares every key of the (flattened) state to load with the kind the state holds there: a
    tensor of the same shape for a tensor, bytes for a plain value. Returns the bytes keys and their live values."""
    where = Path(folder) / ".metadata"
    plain = {}
    for fqn, obj in flat.items():
        kind = md.state_dict_metadata.get(fqn)
        if kind is None:
            raise CheckpointError(
                f"{where}: key {fqn} is missing: the checkpoint does not hold this model's or "
                "optimizer's state (is model.* the checkpoint's config's?)"
            )
        if isinstance(obj, torch.Tensor) or _is_checkpointable_tensor(obj):
            if not isinstance(kind, dcp_metadata.TensorStorageMetadata):
                raise CheckpointError(
                    f"{where}: refused to load key {fqn}: the checkpoint declares it as "
                    f"{type(kind).__name__}, this model holds a tensor there; {_TAMPERED}"
                )
            shape = torch.Size(obj.global_shape) if _is_checkpointable_tensor(obj) else obj.size()
            if kind.size != shape:
                raise CheckpointError(
                    f"{where}: key {fqn} has shape {tuple(kind.size)} in the checkpoint, "
                    f"{tuple(shape)} in this model (is model.* the checkpoint's config's?)"
                )
        else:
            if not isinstance(kind, dcp_metadata.BytesStorageMetadata) or not BYTES_KEY.match(fqn):
                raise CheckpointError(
                    f"{where}: refused to load key {fqn}: the checkpoint declares it as "
                    f"{type(kind).__name__}, fastross saves a plain value there; {_TAMPERED}"
                )
            plain[fqn] = obj
    return plain


def load_into(state: dict, folder: str | Path) -> None:
    """The one way fastross reads a DCP checkpoint: fill `state` (nested dicts of tensors and plain values, as
    `get_state_dict` gives them; DCP's collective when a process group is up) from `folder`, refusing whatever
    fastross would not have written there (see the module's header). Refusals raise CheckpointError, naming the
    file and the key, before DCP reads any data."""
    folder = Path(folder)
    md = read_metadata(folder / ".metadata")
    check_kinds(md, folder)
    flat, _ = flatten_state_dict(state)
    check_bytes_items(folder, md, check_template(flat, md, folder))
    dcp.load(state, storage_reader=SafeReader(str(folder)), planner=_VettedPlanner(folder))


def read_state(folder: str | Path, prefix: str | None = "model") -> dict:
    """The entries under `prefix.` of a DCP checkpoint (names without the prefix; prefix None: every entry under its
    full name), on the host, in one process: tensors read by `load_into` into templates built from the `.metadata`,
    bytes items as the plain values `check_bytes_items` lets through."""
    folder = Path(folder)
    md = read_metadata(folder / ".metadata")
    check_kinds(md, folder)
    head = "" if prefix is None else prefix + "."
    tensors, values = {}, {}
    for fqn, kind in md.state_dict_metadata.items():
        if fqn.startswith(head):
            if isinstance(kind, dcp_metadata.TensorStorageMetadata):
                tensors[fqn] = torch.empty(kind.size, dtype=kind.properties.dtype)
            else:
                values[fqn] = None  # check_kinds: a param_groups entry; no live value to compare its kind with
    if not tensors and not values:
        raise CheckpointError(f"{folder / '.metadata'}: holds no {head}* entries: not a fastross checkpoint")
    values = check_bytes_items(folder, md, values)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "assuming the intent is to load in a single process": it is
        load_into(tensors, folder)  # flat keys: DCP's flattening leaves them as they are
    return {fqn[len(head) :]: v for fqn, v in (tensors | values).items()}


# ---------------------------------------------------------------- the checkpoint's other files


def read_tensor_file(path: str | Path) -> dict[str, torch.Tensor]:
    """A torch.save file of {name: tensor} (rng_rank{r}.pt, a reference mm_projector.bin), read with
    `torch.load(weights_only=True)`: a crafted pickle is refused and runs nothing."""
    path = Path(path)
    try:
        out = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001  (the unpickler's refusals come as several types)
        raise CheckpointError(
            f"{path}: refused to load, it holds more than tensors (fastross reads only a "
            f"torch.save of name -> tensor, with weights_only=True); {_TAMPERED} "
            f"({_first_line(e)})"
        ) from None
    if not isinstance(out, dict):
        raise CheckpointError(
            f"{path}: refused to load, it holds a {type(out).__name__}, expected a dict of name -> tensor"
        )
    for k, v in out.items():
        if not isinstance(k, str) or not isinstance(v, torch.Tensor):
            raise CheckpointError(f"{path}: refused to load key {k!r}: a {type(v).__name__}, expected a tensor")
    return out


def read_json_object(path: str | Path) -> dict:
    """A JSON object from a strict UTF-8 file; anything else raises CheckpointError naming the file."""
    path = Path(path)
    try:
        out = json.loads(path.read_bytes().decode("utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing: the checkpoint was not written by fastross's trainer") from None
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise CheckpointError(f"{path}: not valid UTF-8 JSON ({_first_line(e)}); {_TAMPERED}") from None
    if not isinstance(out, dict):
        raise CheckpointError(f"{path}: holds a JSON {type(out).__name__}, expected an object; {_TAMPERED}")
    return out


def _int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_trainer_state(state: dict, path: str | Path) -> dict:
    """A trainer.json as fastross.train writes it: step, data position and scheduler state, with their types."""

    def refuse(key: str, want: str):
        got = "missing" if key not in state else f"{state[key]!r}"
        raise CheckpointError(f"{path}: key {key} is {got}, expected {want}; {_TAMPERED}")

    if not _int(state.get("step")) or state["step"] < 0:
        refuse("step", "the step number (an integer >= 0)")
    data = state.get("data")
    if (
        not isinstance(data, dict)
        or set(data) != {"epoch", "step_in_epoch"}
        or not all(_int(v) and v >= 0 for v in data.values())
    ):
        refuse("data", "{epoch, step_in_epoch} as integers >= 0")
    if not isinstance(state.get("scheduler"), dict):
        refuse("scheduler", "the learning-rate schedule's state (an object)")
    for key in ("world_size", "bad_in_a_row"):
        if key in state and (not _int(state[key]) or state[key] < 0):
            refuse(key, "an integer >= 0")
    return state


def check_scheduler_state(state: dict, reference: dict, path: str | Path) -> dict:
    """trainer.json's `scheduler` has exactly the keys and kinds of the live scheduler's own state_dict():
    LambdaLR.load_state_dict copies whatever it gets into the scheduler's attributes."""
    extra, missing = sorted(state.keys() - reference.keys()), sorted(reference.keys() - state.keys())
    if extra or missing:
        key = (extra or missing)[0]
        raise CheckpointError(
            f"{path}: key scheduler.{key} is {'not one the schedule has' if extra else 'missing'}; {_TAMPERED}"
        )
    for key, want in reference.items():
        if not _same_kind(state[key], want):
            raise CheckpointError(
                f"{path}: key scheduler.{key} is {state[key]!r}, expected the kind of {want!r}; {_TAMPERED}"
            )
    return state


def _first_line(e: BaseException) -> str:
    """The line of an error that says what is wrong (for torch.load's refusals: the global it did not allow)."""
    text = [t.strip() for t in str(e).strip().splitlines() if t.strip()]
    named = [t for t in text if "GLOBAL" in t or "Unsupported" in t]
    return (named or text or [type(e).__name__])[0].split(" Please use ")[0]
