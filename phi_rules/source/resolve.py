"""Resolve a rule's source into local files (or, for plans, into remote safetensors headers).

Hub files go through ``huggingface_hub`` (cache, ``HF_*`` variables, tokens, progress bars); local
folders are searched the way ``from_pretrained`` searches them. Every failure becomes one line.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from functools import cache
from pathlib import Path
from typing import Any

from phi_rules.errors import PhiRulesError
from phi_rules.language.expr import unfit
from phi_rules.language.rules import FileSpec, Rule
from phi_rules.options import SourceOptions
from phi_rules.source.checkpoint import Checkpoint
from phi_rules.source.header import TensorInfo, parse_safetensors_header

# What --tokenizer copies, and what counts as a usable tokenizer in an output folder.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "chat_template.jinja",
)
NO_TOKENIZER = (
    "the output has no tokenizer files (tokenizer.json, vocab.json + merges.txt or tokenizer.model): "
    "pipeline('text-generation') builds an empty GPT-2 tokenizer and echoes the prompt, vLLM refuses every "
    "prompt, TransformerLens tokenizes everything to [0] and llama.cpp's convert_hf_to_gguf.py stops; "
    "pass --tokenizer PATH or --tokenizer owner/name@revision (the base model the weights came from)"
)
# A side file that the writer derives (from config.json) when the source has none: never noted as absent.
GENERATION_CONFIG = "generation_config.json"
_HUB_ID = re.compile(r"(?P<repo>[\w.-]+/[\w.-]+)(?:@(?P<revision>[\w./-]+))?")


@dataclass(frozen=True)
class ResolvedSource:
    """Local files to convert, and where they came from."""

    origin: str
    revision: str | None
    weights: tuple[Path, ...]
    config_path: Path | None
    extras: tuple[Path, ...]
    pins: dict[Path, str] = field(default_factory=dict)
    notes: tuple[str, ...] = ()
    files: tuple[FileSpec, ...] = ()  # for hub sources: the weight files as named in the repository
    absent: tuple[str, ...] = ()  # extra files the source lacks (said in a note by ``resolve``)
    where: str = ""  # where they were looked for
    base_config: Path | None = None  # an adapter's base model's config.json (--base): fields the adapter lacks
    unlisted: tuple[Path, ...] = ()  # a local folder's other files, neither weights nor named by the rule
    prefixes: dict[Path, str] = field(default_factory=dict)  # adapter folders' weights -> their tensors' prefix
    part_configs: dict[str, Path] = field(default_factory=dict)  # source field -> an adapter folder's config

    def has_tokenizer(self) -> bool:
        """Whether the extra files make a tokenizer that transformers (and so vLLM, llama.cpp) can load."""
        names = {p.name for p in self.extras}
        return bool({"tokenizer.json", "tokenizer.model"} & names) or {"vocab.json", "merges.txt"} <= names

    def config(self) -> dict[str, Any] | None:
        """The source's config.json, with each adapter folder's adapter_config.json under its field name."""
        found = _json_object(self.config_path, "source") if self.config_path is not None else None
        if found is None or not self.part_configs:
            return found
        return {**found, **{k: _json_object(p, "adapter") for k, p in self.part_configs.items()}}

    def base(self) -> dict[str, Any] | None:
        """An adapter's base model's config (``--base``): the fields a rule reads that the adapter lacks."""
        return _json_object(self.base_config, "base model's") if self.base_config is not None else None


def _json_object(path: Path, what: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:  # ValueError: not JSON, not UTF-8, more digits than Python reads
        raise PhiRulesError(f"{path}: cannot read the {what} config: {exc}") from None
    if not isinstance(data, dict):
        raise PhiRulesError(f"{path}: the {what} config is not a JSON object")
    why = unfit(data)
    if why is not None:
        raise PhiRulesError(f"{path}: {why}")
    return data


# --- local folders ---------------------------------------------------------------------------------
ADAPTER_FILES = ("adapter_model.safetensors", "adapter_config.json")  # an adapter folder read with its model
WEIGHT_NAMES = (
    "model.safetensors.index.json",
    "model.safetensors",
    "pytorch_model.bin.index.json",
    "pytorch_model.bin",
)


def _index_files(index: Path) -> list[str]:
    """The shard names an index lists, each a plain file name beside it (never a path out of the folder)."""
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        names = list(dict.fromkeys(weight_map.values()))
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise PhiRulesError(f"{index}: not a valid index file ({type(exc).__name__}: {exc})") from None
    bad = [n for n in names if not isinstance(n, str) or Path(n).name != n or n in (".", "..")]
    if bad:
        raise PhiRulesError(f"{index}: weight_map names {bad[0]!r}, which is not a file beside the index")
    return names


def _weights_in_folder(folder: Path, rules: Rule) -> list[Path]:
    for name in WEIGHT_NAMES:
        if (folder / name).is_file():
            return [folder / f for f in _index_files(folder / name)] if name.endswith(".json") else [folder / name]
    named = [folder / f.name for f in rules.source.files if (folder / f.name).is_file()]
    if named:
        return named
    raise PhiRulesError(
        f"{folder}: no weights found: looked for {', '.join(WEIGHT_NAMES)} and the rule's files "
        f"({', '.join(f.name for f in rules.source.files) or 'none'})"
    )


def resolve_local(rules: Rule, path: Path) -> ResolvedSource:
    """A folder (weights found as from_pretrained finds them) or a single weights file."""
    if not path.exists():
        raise PhiRulesError(f"{path}: source not found")
    folder = path if path.is_dir() else path.parent
    weights = _weights_in_folder(path, rules) if path.is_dir() else [path]
    missing = [str(w) for w in weights if not w.is_file()]
    if missing:
        raise PhiRulesError(f"{path}: weight file(s) listed but missing: {', '.join(missing)}")
    config = folder / rules.source.config_file
    extras, absent = _local_extras(folder, [f.name for f in rules.source.extra_files])
    notes: list[str] = []
    pins = {
        folder / f.name: f.sha256
        for f in (*rules.source.files, *rules.source.extra_files)
        if f.sha256 and (folder / f.name).is_file()
    }
    if not config.is_file():
        notes.append(f"{config} not found: using the rule's config_defaults")
    config_path = config if config.is_file() else None
    named = {*(p.name for p in (*weights, *extras)), rules.source.config_file}
    others = tuple(_unlisted(folder, named)) if path.is_dir() else ()
    return ResolvedSource(
        str(path),
        None,
        tuple(weights),
        config_path,
        tuple(extras),
        pins,
        tuple(notes),
        (),
        tuple(absent),
        str(folder),
        unlisted=others,
    )


# Files of a model folder that are weights in some format (or their index): never side files.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack", ".onnx", ".index.json")


def _unlisted(folder: Path, named: set[str]) -> list[Path]:
    """The folder's plain files that are not weights, not hidden and not among ``named``: carried with a note."""
    return sorted(
        p
        for p in folder.iterdir()
        if p.is_file()
        and not p.name.startswith(".")
        and p.name not in named
        and p.name not in WEIGHT_NAMES
        and not p.name.endswith(_WEIGHT_SUFFIXES)
    )


def _local_extras(folder: Path, names: Iterable[str]) -> tuple[list[Path], list[str]]:
    """The named files that the folder has, and the names it lacks."""
    found = [folder / n for n in names if (folder / n).is_file()]
    return found, [n for n in names if not (folder / n).is_file()]


# --- the hub ---------------------------------------------------------------------------------------
def _revision(rules: Rule, opts: SourceOptions) -> str:
    revision = opts.revision or rules.source.revision
    if revision is None:
        raise PhiRulesError(
            f"{rules.display}: source.revision is unknown for {rules.source.repo} (its main branch now holds "
            "already-converted weights): pass --revision COMMIT, or --source PATH with the original files"
        )
    return revision


@contextmanager
def hub_errors(repo: str, revision: str, filename: str, opts: SourceOptions) -> Iterator[None]:
    """Turn huggingface_hub and transport errors into one actionable line."""
    import httpx2
    from huggingface_hub import constants, errors

    where = f"{repo}@{revision}"
    try:
        yield
    except errors.RepositoryNotFoundError:
        raise PhiRulesError(
            f"{repo}: repository not found on {constants.ENDPOINT} "
            "(or it is private or gated: pass --token or set HF_TOKEN)"
        ) from None
    except errors.RevisionNotFoundError:
        raise PhiRulesError(f"{repo}: revision {revision!r} not found on {constants.ENDPOINT}") from None
    except errors.RemoteEntryNotFoundError:
        raise PhiRulesError(f"{where}: file {filename!r} not found on {constants.ENDPOINT}") from None
    except errors.LocalEntryNotFoundError as exc:
        cache = opts.cache_dir or constants.HF_HUB_CACHE
        if opts.offline or constants.HF_HUB_OFFLINE:
            raise PhiRulesError(
                f"{where}: {filename} is not in the cache at {cache} and downloads are off "
                "(offline): run once online, or use --source"
            ) from None
        cause = _unreachable(constants.ENDPOINT) or _root_cause(exc)
        raise PhiRulesError(
            f"{where}: cannot reach {constants.ENDPOINT} to fetch {filename} and it is not in "
            f"the cache at {cache}: {cause}"
        ) from None
    except OSError as exc:
        if "Consistency check failed" not in str(exc):
            raise PhiRulesError(
                f"{where}: download of {filename} from {constants.ENDPOINT} failed: {_root_cause(exc)}"
            ) from None
        raise PhiRulesError(
            f"{where}: {filename} arrived truncated from {constants.ENDPOINT}: {str(exc).splitlines()[0]}"
        ) from None
    except (httpx2.TransportError, errors.HfHubHTTPError) as exc:
        raise PhiRulesError(
            f"{where}: download of {filename} from {constants.ENDPOINT} failed: {_root_cause(exc)}"
        ) from None


def _root_cause(exc: BaseException) -> str:
    while exc.__cause__ is not None or exc.__context__ is not None:
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


_COMMIT = re.compile(r"[0-9a-f]{40}")
_PROBE_S = 5.0  # how long one look at the endpoint may take before the run goes on from the cache alone


def _cached(repo: str, opts: SourceOptions, revision: str, name: str) -> Path | bool | None:
    """A file the hub cache holds at ``revision`` (no network): its path, False when the cache knows the file
    does not exist there, None when the cache cannot tell."""
    from huggingface_hub import file_download, try_to_load_from_cache

    got = try_to_load_from_cache(repo, name, cache_dir=opts.cache_dir, revision=revision)
    if got is file_download._CACHED_NO_EXIST:
        return False
    return Path(got) if isinstance(got, str) else None


@cache
def _unreachable(endpoint: str) -> str | None:
    """Why the endpoint cannot be reached (one look, no retries), or None when it answers at all."""
    from huggingface_hub import get_session

    try:
        get_session().head(endpoint, timeout=_PROBE_S, follow_redirects=False)
    except Exception as exc:  # a transport error of any kind: no answer in time, refused, no route, no DNS
        return _root_cause(exc)
    return None


def _cache_only(opts: SourceOptions) -> tuple[str, bool] | None:
    """Why the hub cache alone is used, and whether the user asked for it (--offline, HF_HUB_OFFLINE) rather
    than the endpoint not answering (one look, in seconds, instead of the hub client's retries for every
    file: minutes); None when the network is used."""
    from huggingface_hub import constants

    if opts.offline or constants.HF_HUB_OFFLINE:
        return "downloads are off (offline)", True
    why = _unreachable(constants.ENDPOINT)
    return (f"cannot reach {constants.ENDPOINT} ({why})", False) if why else None


def local_only(opts: SourceOptions) -> bool:
    return _cache_only(opts) is not None


def offline_note(opts: SourceOptions) -> list[str]:
    """The note that says the cache alone is used because the endpoint does not answer, if so."""
    reason = _cache_only(opts)
    return [f"{reason[0]}: using the hub cache only"] if reason and not reason[1] else []


def _download(repo: str, opts: SourceOptions, revision: str, spec: FileSpec, *, required: bool) -> Path | None:
    from huggingface_hub import errors, hf_hub_download

    if _COMMIT.fullmatch(revision):  # a commit's files never change: a cached one needs no network at all
        cached = _cached(repo, opts, revision, spec.name)
        if isinstance(cached, Path) or (cached is False and not required):
            return cached or None
    with hub_errors(repo, revision, spec.name, opts):
        try:
            return Path(
                hf_hub_download(
                    repo,
                    spec.name,
                    revision=revision,
                    cache_dir=opts.cache_dir,
                    token=opts.token,
                    local_files_only=local_only(opts),
                )
            )
        except errors.EntryNotFoundError:
            if required:
                raise
            return None


def _required(repo: str, opts: SourceOptions, revision: str, spec: FileSpec) -> Path:
    path = _download(repo, opts, revision, spec, required=True)
    assert path is not None  # a required file that cannot be had raises instead
    return path


def _commit_of(path: Path, filename: str) -> str:
    """The snapshot folder a cached file lies in is named by its commit."""
    return path.parents[len(Path(filename).parts) - 1].name


def source_argument(text: str) -> tuple[Path | None, str | None]:
    """``--source``: an existing path, else a hub repository ``owner/name[@revision]``, else a missing path.

    A missing ``ckpt/msfT`` whose first part is a folder here is a mistyped path, not a repository: it is
    reported as not found at once instead of asking the network for a repository ``ckpt/msfT``."""
    path = Path(text)
    owner = text.split("/", 1)[0]
    looks_local = text.startswith((".", "/", "~")) or Path(owner).is_dir()
    if not path.exists() and _HUB_ID.fullmatch(text) and not looks_local:
        return None, text
    return path, None


@dataclass(frozen=True)
class _Hub:
    """Which hub repository and files: the rule's, or those of ``--source owner/name@revision``."""

    repo: str
    revision: str
    files: tuple[FileSpec, ...] | None  # None: found like from_pretrained finds them


def _hub(rules: Rule, opts: SourceOptions) -> _Hub:
    if opts.hub is None and rules.source.repo is None:
        raise PhiRulesError(
            f"{rules.display}: this rule has no source of its own: give --source PATH or --source owner/name@revision"
        )
    if opts.hub is None:
        return _Hub(str(rules.source.repo), _revision(rules, opts), rules.source.files)
    m = _HUB_ID.fullmatch(opts.hub)
    assert m is not None
    return _Hub(m.group("repo"), m.group("revision") or opts.revision or "main", None)


def _exists(hub: _Hub, name: str, opts: SourceOptions) -> bool:
    from huggingface_hub import HfApi

    cached = _cached(hub.repo, opts, hub.revision, name)
    if isinstance(cached, bool) or (cached is not None and _COMMIT.fullmatch(hub.revision)):
        return bool(cached)
    if local_only(opts):
        return _download(hub.repo, opts, hub.revision, FileSpec(name), required=False) is not None
    with hub_errors(hub.repo, hub.revision, name, opts):
        return HfApi(token=opts.token).file_exists(hub.repo, name, revision=hub.revision)


def _weight_files(hub: _Hub, opts: SourceOptions) -> tuple[FileSpec, ...]:
    """The weights in from_pretrained's order: an index and its shards, or a single file."""
    if hub.files is not None:
        return hub.files
    for name in WEIGHT_NAMES:
        if not name.endswith(".index.json"):
            if _exists(hub, name, opts):
                return (FileSpec(name),)
            continue
        index = _download(hub.repo, opts, hub.revision, FileSpec(name), required=False)
        if index is not None:
            return tuple(FileSpec(f) for f in _index_files(index))
    reason = _cache_only(opts)
    if reason is not None:
        from huggingface_hub import constants

        cache = opts.cache_dir or constants.HF_HUB_CACHE
        raise PhiRulesError(f"{hub.repo}@{hub.revision}: no weights in the hub cache at {cache}, and {reason[0]}")
    raise PhiRulesError(f"{hub.repo}@{hub.revision}: no weights found: looked for {', '.join(WEIGHT_NAMES)}")


def resolve_hub(rules: Rule, opts: SourceOptions, *, weights: bool = True) -> ResolvedSource:
    """Download (or find in the cache) the source's files at its revision; ``weights=False``: all but weights."""
    hub = _hub(rules, opts)
    files = _weight_files(hub, opts)
    src = rules.source
    paths = [_required(hub.repo, opts, hub.revision, f) for f in files] if weights else []
    config = _download(hub.repo, opts, hub.revision, FileSpec(src.config_file), required=False)
    extras = [(f, _download(hub.repo, opts, hub.revision, f, required=False)) for f in src.extra_files]
    where = f"{hub.repo}@{hub.revision}"
    absent = [f.name for f, p in extras if p is None]
    notes = offline_note(opts)
    if config is None:
        notes.append(f"{src.config_file}: not in {where}: using the rule's config_defaults")
    first = next((p for p in [*paths, config, *(p for _, p in extras)] if p is not None), None)
    commit = _commit_of(first, first.name) if first is not None else hub.revision
    if commit != hub.revision:
        notes.append(f"{where} is commit {commit}")
    pins = {p: f.sha256 for f, p in [*zip(files, paths, strict=False), *extras] if p is not None and f.sha256}
    return ResolvedSource(
        f"{hub.repo}@{commit}",
        commit,
        tuple(p for p in paths if p),
        config,
        tuple(p for _, p in extras if p is not None),
        pins,
        tuple(notes),
        files,
        tuple(absent),
        where,
    )


def resolve(rules: Rule, opts: SourceOptions) -> ResolvedSource:
    """The one way in: ``--source`` beats the rule's ``path``, which beats its hub ``repo``."""
    if opts.source is not None:
        resolved = resolve_local(rules, opts.source)
    elif rules.source.path is not None and opts.hub is None:
        resolved = resolve_local(rules, rules.source.path)
    else:
        resolved = resolve_hub(rules, opts)
    if opts.tokenizer is not None:
        files, notes = resolve_tokenizer(opts.tokenizer, opts)
        kept = tuple(p for p in resolved.extras if p.name not in TOKENIZER_FILES)
        others = tuple(p for p in resolved.unlisted if p.name not in TOKENIZER_FILES)
        resolved = replace(resolved, extras=kept + files, notes=resolved.notes + notes, unlisted=others)
    return _noting_absent(_with_base(_with_parts(resolved, rules), opts), opts)


def _with_parts(resolved: ResolvedSource, rules: Rule) -> ResolvedSource:
    """``source.parts``: the adapter folders beside a local model, read with it; a folder that is not there
    leaves its config field null, for the rule to refuse or accept."""
    if not rules.source.parts or resolved.revision is not None or not resolved.where:
        return resolved
    root = Path(resolved.where)
    there = [p for p in rules.source.parts if all((root / p / f).is_file() for f in ADAPTER_FILES)]
    weights = {root / p / ADAPTER_FILES[0]: f"{p}/" for p in there}
    configs = {rules.source.parts[p]: root / p / ADAPTER_FILES[1] for p in there}
    return replace(resolved, weights=(*resolved.weights, *weights), prefixes=weights, part_configs=configs)


def _with_base(resolved: ResolvedSource, opts: SourceOptions) -> ResolvedSource:
    """``--base``: the config.json of an adapter's base model, from its folder or hub repository."""
    if opts.base is None:
        return resolved
    folder, hub = source_argument(opts.base)
    if folder is not None:
        if not (folder / "config.json").is_file():
            raise PhiRulesError(f"--base {opts.base}: no config.json there (the base model's folder is needed)")
        return replace(resolved, base_config=folder / "config.json")
    m = _HUB_ID.fullmatch(str(hub))
    assert m is not None
    repo, revision = m.group("repo"), m.group("revision") or "main"
    path = _required(repo, opts, revision, FileSpec("config.json"))
    note = f"base config from {repo}@{_commit_of(path, 'config.json')}"
    return replace(resolved, base_config=path, notes=(*resolved.notes, note))


def _noting_absent(resolved: ResolvedSource, opts: SourceOptions) -> ResolvedSource:
    """The note on extra files the source lacks; a tokenizer file only while the output would have no tokenizer."""
    complete = opts.tokenizer is not None or resolved.has_tokenizer()
    missing = [n for n in resolved.absent if not (complete and n in TOKENIZER_FILES) and n != GENERATION_CONFIG]
    said = (f"not in {resolved.where}, not copied: {', '.join(missing)}",) if missing else ()
    return replace(resolved, notes=said + resolved.notes)


def resolve_tokenizer(spec: str, opts: SourceOptions) -> tuple[tuple[Path, ...], tuple[str, ...]]:
    """Tokenizer files from a local folder, or from a hub repository (``owner/name@revision``)."""
    folder = Path(spec)
    if folder.is_dir():
        found = _local_extras(folder, TOKENIZER_FILES)[0]
        if not found:
            raise PhiRulesError(f"--tokenizer {spec}: the folder has none of {', '.join(TOKENIZER_FILES)}")
        return tuple(found), (f"tokenizer files from {folder}: {', '.join(p.name for p in found)}",)
    m = _HUB_ID.fullmatch(spec)
    if m is None or folder.exists():
        raise PhiRulesError(f"--tokenizer {spec}: neither a folder nor a hub repository owner/name@revision")
    repo, revision = m.group("repo"), m.group("revision") or "main"
    got = [p for n in TOKENIZER_FILES if (p := _download(repo, opts, revision, FileSpec(n), required=False))]
    if not got:
        raise PhiRulesError(f"--tokenizer {spec}: {repo}@{revision} has none of {', '.join(TOKENIZER_FILES)}")
    commit = _commit_of(got[0], got[0].name)
    return tuple(got), (f"tokenizer files from {repo}@{commit}: {', '.join(p.name for p in got)}",)


def remote_tensors(
    rules: Rule, opts: SourceOptions, note: Callable[[str], None]
) -> tuple[dict[str, TensorInfo], ResolvedSource]:
    """Tensor metadata of hub safetensors files from their headers alone (HTTP range requests)."""
    from huggingface_hub import HfApi

    resolved = _noting_absent(_with_base(resolve_hub(rules, opts, weights=False), opts), opts)
    hub = _hub(rules, opts)
    revision = str(resolved.revision)
    api = HfApi(token=opts.token)
    tensors: dict[str, TensorInfo] = {}
    local: list[Path] = []
    offline = local_only(opts)
    for n in offline_note(opts):
        note(n)
    for spec in resolved.files:
        cached = _cached(hub.repo, opts, revision, spec.name)
        if isinstance(cached, Path):  # a header already on disk is read there, never over the network
            local.append(cached)
            continue
        if not spec.name.endswith(".safetensors") or offline:
            if not offline:
                note(f"{spec.name}: a pickle has no header to read remotely: downloading it in full")
            local.append(_required(hub.repo, opts, revision, spec))
            continue
        with hub_errors(hub.repo, revision, spec.name, opts):
            meta = api.parse_safetensors_file_metadata(hub.repo, spec.name, revision=revision)
        header = {
            name: {"dtype": t.dtype, "shape": t.shape, "data_offsets": list(t.data_offsets)}
            for name, t in meta.tensors.items()
        }
        tensors.update(parse_safetensors_header(json.dumps(header).encode(), f"{hub.repo}/{spec.name}"))
    return tensors, replace(resolved, weights=tuple(local))


def headers_only(rules: Rule, src: SourceOptions) -> bool:
    """Whether :func:`source_tensors` reads a hub source by its headers (and so resolves less than a conversion)."""
    return src.source is None and (src.hub is not None or rules.source.path is None)


def source_tensors(
    rules: Rule, src: SourceOptions, note: Callable[[str], None]
) -> tuple[dict[str, TensorInfo], ResolvedSource]:
    """The source's tensor metadata without reading tensor bytes: hub safetensors by header only."""
    if headers_only(rules, src):
        tensors, resolved = remote_tensors(rules, src, note)
        with Checkpoint(resolved.weights) as local:
            return {**tensors, **local.tensors}, resolved
    resolved = resolve(rules, src)
    with Checkpoint(resolved.weights, resolved.prefixes) as ckpt:
        return dict(ckpt.tensors), resolved
