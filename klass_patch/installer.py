"""The file installer: rewrite a user's Dream ``generation_utils.py`` / LLaDA ``generate.py`` to accept ``alg="klass"``.

A file is identified by its sha256 against the known upstream versions (``versions.KNOWN``; copies that
differ only in line endings, trailing spaces or the final newline are recognised by their normalised
text). That version's vendored diff (``vendored_diffs/<family>/<version>.patch``) appends a short block
that calls ``klass_patch.patch_installed`` at import time (so the rewritten file carries no copy of
KLASS) and, where klass_patch is not installed, keeps every upstream call working and makes only
``alg="klass"`` raise an error saying how to install it (a broken klass_patch raises its own error). The result is checked against the sha256 the
diff records, then written atomically; the original stays next to the file as ``<name>.klass-orig``
(a symlink stays a symlink: Hugging Face hub snapshots link into a shared ``blobs/``), and
``<name>.klass-patch.json`` records what was done. ``revert`` puts the original back byte for byte.
A diff also lists, as ``# earlier result`` lines, what older klass-patch releases (older shims) wrote, so
that files they rewrote are still recognised as patched, with or without their record. An unknown version
raises ``UnknownVersionError`` (discovery reports and skips those; named files fail).

Every change to a folder happens under an exclusive lock on that folder, in the order backup, file,
record: an interruption anywhere leaves the original or the complete patched file, never half of one.
"""
from __future__ import annotations

import contextlib
import datetime
import difflib
import json
import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterable, Iterator, List, Optional, Tuple

from .files import atomic_write
from .versions import KNOWN, UpstreamVersion, identify_bytes, normalized_sha256, sha256

try:
    import fcntl
except ImportError:  # not POSIX: no folder lock
    fcntl = None

FILENAME = {"llada": "generate.py", "dream": "generation_utils.py"}
LABEL = {"llada": "LLaDA's generate.py", "dream": "Dream's generation_utils.py"}
# A line every version of a family has (and the other family lacks): how discovery and the error for a
# file named with the wrong --dream/--llada tell the families apart.
SIGNATURE = {"llada": "def get_num_transfer_tokens", "dream": "class DreamGenerationMixin"}
BACKUP, RECORD = ".klass-orig", ".klass-patch.json"
DIFFS = Path(__file__).resolve().parent / "vendored_diffs"  # installed package data
if not DIFFS.is_dir():  # a source checkout
    DIFFS = Path(__file__).resolve().parents[1] / "vendored_diffs"

# The block a vendored diff appends. Without klass_patch importable, upstream calls pass through untouched.
SHIM = {
    "llada": '''

# --- klass-patch {version}: generate() also takes alg="klass" (KL-Adaptive Stability Sampling). ---
# Added by `klass-patch install`; `klass-patch revert` restores the original. Other calls are upstream's.
try:
    from klass_patch import patch_installed as _klass_patch
except ModuleNotFoundError as _missing:  # no klass_patch here: upstream's generate, an error for alg="klass"
    if _missing.name != "klass_patch":
        raise  # klass_patch is there but broken (e.g. a dependency missing): say so, do not hide it

    def _klass_patch(namespace, family, version):
        import functools
        upstream = namespace["generate"]

        @functools.wraps(upstream)
        def generate(*args, alg=None, **kwargs):
            if alg not in (None, "default"):
                raise ImportError(f"generate(alg={{alg!r}}) needs the klass_patch package in this environment; "
                                  "install it from a klass-patch checkout (pip install /path/to/klass-patch, or "
                                  "bash install.sh there). This file was rewritten by `klass-patch install`")
            return upstream(*args, **kwargs)
        namespace["generate"] = generate
_klass_patch(globals(), "llada", "{version}")
''',
    "dream": '''

# --- klass-patch {version}: diffusion_generate() also takes alg="klass" (KL-Adaptive Stability Sampling). ---
# Added by `klass-patch install`; `klass-patch revert` restores the original. Other calls are upstream's.
try:
    from klass_patch import patch_installed as _klass_patch
except ModuleNotFoundError as _missing:  # no klass_patch here: upstream's algorithms, an error for alg="klass"
    if _missing.name != "klass_patch":
        raise  # klass_patch is there but broken (e.g. a dependency missing): say so, do not hide it

    def _klass_patch(namespace, family, version):
        import functools
        upstream = DreamGenerationMixin.diffusion_generate

        @functools.wraps(upstream)
        def diffusion_generate(self, *args, **kwargs):
            config = kwargs.get("generation_config", args[1] if len(args) > 1 else None)
            alg = kwargs.get("alg", getattr(config or getattr(self, "generation_config", None), "alg", None))
            if alg == "klass":
                raise ImportError("diffusion_generate(alg='klass') needs the klass_patch package in this "
                                  "environment; install it from a klass-patch checkout (pip install "
                                  "/path/to/klass-patch, or bash install.sh there). This file was rewritten by "
                                  "`klass-patch install`")
            return upstream(self, *args, **kwargs)
        DreamGenerationMixin.diffusion_generate = diffusion_generate
_klass_patch(globals(), "dream", "{version}")
''',
}
MARK = "# --- klass-patch "


class InstallError(Exception):
    """A target that cannot be installed, reverted or read; the message says why and what to do."""


class LocalCopyError(InstallError):
    """transformers' modules-cache copy of a local folder's file (``local_copy_of``): not a target, since every
    load copies the folder's own file over it again. The message names the command to run on the folder."""


class UnknownVersionError(InstallError):
    """A file that is none of the known versions of its family: nothing is written. ``reason`` is the message
    without the path and sha256 (discovery reports it as a skipped file)."""

    def __init__(self, path: Path, digest: str, reason: str):
        super().__init__(f"{path} (sha256 {digest}): {reason}")
        self.path, self.sha256, self.reason = path, digest, reason


# ----------------------------------------------------------------------------------------------- diffs
def _lines(text: str) -> List[str]:
    return text.splitlines(keepends=True)


def _canonical(data: bytes) -> str:
    """The text a diff applies to: LF line endings, a final newline."""
    text = data.decode("utf-8").replace("\r\n", "\n")
    return text if text.endswith("\n") else text + "\n"


@dataclass
class Diff:
    family: str
    version: str
    hunks: List[tuple]  # (old_start, old_lines, new_lines), lines without their endings
    results: Dict[str, str]  # normalised sha256 of an original -> normalised sha256 of its patched text
    # (original, result) pairs of what earlier klass-patch releases (older shims) wrote: still recognised as patched
    earlier: List[Tuple[str, str]] = field(default_factory=list)

    def apply(self, text: str) -> str:
        """Apply to ``text`` (any line endings; added lines take the file's). Context must match exactly,
        modulo trailing spaces; a hunk is looked for at its line number first, then anywhere (once)."""
        lines = _lines(text)
        eol = "\r\n" if lines and lines[0].endswith("\r\n") else "\n"
        if lines and not lines[-1].endswith(("\n", "\r")):
            lines[-1] += eol
        key = [line.rstrip() for line in lines]
        shift = 0
        for start, old, new in self.hunks:
            want = [line.rstrip() for line in old]
            at = start - 1 + shift
            if key[at:at + len(want)] != want:
                hits = [i for i in range(len(key) - len(want) + 1) if key[i:i + len(want)] == want]
                if len(hits) != 1:
                    raise InstallError(f"the {self.version} diff does not apply (context at line {start} not found)")
                at = hits[0]
            lines[at:at + len(want)] = [line + eol for line in new]
            key[at:at + len(want)] = [line.rstrip() for line in new]
            shift += len(new) - len(want)
        return "".join(lines)


def shim(family: str, version: str) -> str:
    return SHIM[family].format(version=version)


def make_diff(family: str, version: str, originals: List[bytes], context: int = 2,
              earlier: Iterable[Tuple[str, str]] = ()) -> str:
    """The vendored diff of a version: its first file's canonical text + the shim, as a unified diff with
    ``context`` lines, and a header recording, for each original, the sha256 of the patched result (and the
    ``earlier`` results of older shims, original -> result, so that files they rewrote stay recognised)."""
    base = _canonical(originals[0])
    hunks = "".join(difflib.unified_diff(_lines(base), _lines(base + shim(family, version)),
                                         FILENAME[family], FILENAME[family], n=context))
    diff = parse_diff(hunks, family, version)
    header = [f"# klass-patch vendored diff: {family} {version}. Made by `python -m klass_patch.installer`\n"
              "# from the upstream files; do not edit by hand. Results (normalised sha256; 'earlier': what\n"
              "# older klass-patch releases wrote, still recognised as patched):\n"]
    results = {normalized_sha256(data): normalized_sha256(diff.apply(_canonical(data)).encode()) for data in originals}
    header += [f"# result {a} -> {b}\n" for a, b in results.items()]
    header += [f"# earlier result {a} -> {b}\n" for a, b in dict.fromkeys(earlier) if b not in results.values()]
    return "".join(header) + hunks


def parse_diff(text: str, family: str, version: str) -> Diff:
    hunks, results, earlier, current = [], {}, [], None
    for line in text.splitlines():
        m = re.match(r"# (earlier )?result ([0-9a-f]{64}) -> ([0-9a-f]{64})$", line)
        if m and m.group(1):
            earlier.append((m.group(2), m.group(3)))
        elif m:
            results[m.group(2)] = m.group(3)
        elif line.startswith("@@"):
            start = int(re.match(r"@@ -(\d+)", line).group(1))
            current = (start, [], [])
            hunks.append(current)
        elif current is not None and line[:1] in (" ", "-", "+"):
            if line[0] in " -":
                current[1].append(line[1:])
            if line[0] in " +":
                current[2].append(line[1:])
        elif current is not None and line == "":  # an empty context line stripped of its space
            current[1].append("")
            current[2].append("")
    return Diff(family, version, hunks, results, earlier)


# --------------------------------------------------------------------------------------------- catalog
@dataclass
class Catalog:
    """The known versions and the folder of their diffs (tests pass their own)."""
    versions: List[UpstreamVersion] = field(default_factory=lambda: list(KNOWN))
    diffs: Optional[Path] = None  # default: the vendored diffs

    def __post_init__(self):
        self.diffs = Path(self.diffs) if self.diffs is not None else DIFFS

    def identify(self, data: bytes, family: str) -> Optional[UpstreamVersion]:
        return identify_bytes(data, family, self.versions)

    def diff(self, family: str, version: str) -> Diff:
        path = self.diffs / family / f"{version}.patch"
        if not path.is_file():
            raise InstallError(f"no vendored diff for {version} ({path} is missing)")
        return parse_diff(path.read_text(), family, version)

    def patched_version(self, data: bytes, family: str) -> Optional[str]:
        """The version whose vendored diff produced ``data`` (today's shim or an earlier one), if one did."""
        norm = normalized_sha256(data)
        for version in self.ids(family):
            with contextlib.suppress(InstallError):
                diff = self.diff(family, version)
                if norm in diff.results.values() or norm in (result for _, result in diff.earlier):
                    return version
        return None

    def other_family(self, data: bytes, family: str) -> Optional[str]:
        """When ``data`` is not ``family``'s file but looks like the other family's: a sentence saying so."""
        other = "dream" if family == "llada" else "llada"
        known = self.identify(data, other)
        version = known.id if known else self.patched_version(data, other)
        text = data.decode("utf-8", errors="replace")
        if version is None and (SIGNATURE[other] not in text or SIGNATURE[family] in text):
            return None
        what = f"{LABEL[other]} ({version})" if version else LABEL[other]
        return f"it looks like {what}: pass it with --{other}, not --{family}"

    def ids(self, family: str) -> List[str]:
        return sorted({v.id for v in self.versions if v.family == family})


# --------------------------------------------------------------------------------------------- targets
LOCAL_COPY = "modules cache, copy of a local folder"


@dataclass(frozen=True)
class Target:
    family: str
    path: Path  # the file (not resolved: a hub snapshot file is a symlink)
    origin: str = "named"


def resolve(family: str, path) -> Target:
    """``--dream PATH`` / ``--llada PATH``: the file itself, or the folder holding it."""
    if family not in FILENAME:
        raise InstallError(f"family must be one of {', '.join(FILENAME)}, got {family!r}")
    p = Path(path).expanduser()
    p = Path(os.path.abspath(p))  # absolute, symlinks kept
    if p.is_dir():
        p = p / FILENAME[family]
    if not p.exists() and not p.is_symlink():
        raise InstallError(f"{p}: no such file (--{family} takes {FILENAME[family]} or the folder holding it)")
    return Target(family, p)


def _hf_home(env) -> Path:
    xdg = env.get("XDG_CACHE_HOME", os.path.join(os.path.expanduser("~"), ".cache"))
    return Path(env.get("HF_HOME", os.path.join(xdg, "huggingface"))).expanduser()


def hub_cache(env=os.environ) -> Path:
    explicit = env.get("HF_HUB_CACHE") or env.get("HUGGINGFACE_HUB_CACHE")
    return Path(explicit).expanduser() if explicit else _hf_home(env) / "hub"


def modules_cache(env=os.environ) -> Path:
    explicit = env.get("HF_MODULES_CACHE")
    return Path(explicit).expanduser() if explicit else _hf_home(env) / "modules"


COMMIT = re.compile(r"[0-9a-f]{40}")  # a hub model's copy: transformers_modules/<org>/<repo>/<commit>/
SOURCE_HASH = re.compile(r"[0-9a-f]{16}")  # a local folder's copy on 5.x: <folder name>/<hash of its sources>/


def local_copy_of(path, env=os.environ) -> Optional[str]:
    """When ``path`` is transformers' modules-cache copy of a local folder's file: the folder's name as far as
    transformers kept it ("" when it kept none); otherwise None. transformers copies a hub model's files
    into ``transformers_modules/<org>/<repo>/<commit>/`` once; a local folder's into ``<folder name>/``
    (4.x) or ``<folder name>/<hash of its sources>/`` (5.x), and at every load copies the folder's file over
    that copy when they differ. So a change there is undone by the next load: the folder is the target.
    transformers records the folder's name only (5.x: with ``-``/``.`` spelled ``_hyphen_``/``_dot_``)."""
    root = os.path.realpath(modules_cache(env) / "transformers_modules")
    folder = os.path.realpath(Path(path).parent)
    if os.path.commonpath([root, folder]) != root:
        return None
    parts = Path(folder).relative_to(root).parts
    if any(COMMIT.fullmatch(part) for part in parts):
        return None
    if len(parts) >= 2 and SOURCE_HASH.fullmatch(parts[-1]):
        parts = parts[:-1]
    return parts[-1].replace("_hyphen_", "-").replace("_dot_", ".") if parts else ""


def copy_advice(target: Target, name: str, command: str) -> str:
    """What to say about a local folder's copy (``local_copy_of``) to ``command`` (install, revert, status)."""
    named = f" named {name!r}" if name else ""
    lead = {"install": "not installed, nothing written: ", "revert": "patched (as its folder was when loaded), "
            "not reverted here: "}.get(command, "")
    tail = "; that also removes this copy" if command == "revert" else ""
    return (f"{target.path}: {lead}transformers' copy of a local folder{named}, not a target (every load copies "
            f"the folder's own {FILENAME[target.family]} over it). Use the folder itself: klass-patch {command} "
            f"--{target.family} FOLDER, FOLDER being the folder you loaded the model from{tail}")


def _is_family(path: Path, family: str) -> bool:
    with contextlib.suppress(OSError, UnicodeDecodeError):
        return SIGNATURE[family] in path.read_text()
    return False


def discover(env=os.environ, cwd=None) -> List[Target]:
    """Dream files in the hub cache's snapshots and in the modules cache; LLaDA's generate.py in ``cwd``.
    Modules-cache copies come first: installing a hub snapshot refreshes its stale copies there. Copies of
    local folders are listed as such (origin ``LOCAL_COPY``): install and revert leave them alone."""
    found = []
    modules = modules_cache(env) / "transformers_modules"
    if modules.is_dir():
        found += [Target("dream", p, LOCAL_COPY if local_copy_of(p, env) is not None else "modules cache")
                  for p in sorted(modules.rglob(FILENAME["dream"])) if _is_family(p, "dream")]
    hub = hub_cache(env)
    if hub.is_dir():
        found += [Target("dream", p, "hub cache") for p in sorted(hub.glob(f"models--*/snapshots/*/{FILENAME['dream']}"))
                  if _is_family(p, "dream")]
    local = Path(cwd or os.getcwd()) / FILENAME["llada"]
    if local.is_file() and _is_family(local, "llada"):
        found.append(Target("llada", Path(os.path.abspath(local)), "current directory"))
    return found


# ------------------------------------------------------------------------------------------ file state
@dataclass
class State:
    target: Target
    kind: str  # "original", "patched", "unknown"
    version: Optional[str]
    sha256: str
    record: Optional[dict]

    def describe(self) -> str:
        where = f" [{self.target.origin}]" if self.target.origin != "named" else ""
        if self.kind == "original":
            return f"{self.target.path}{where}: {self.version}, not patched"
        if self.kind == "patched":
            when = f", installed {self.record['installed_at']}" if self.record else ", no install record"
            return f"{self.target.path}{where}: patched by klass-patch ({self.version}{when})"
        return f"{self.target.path}{where}: unknown version (sha256 {self.sha256}), not patched"


def _sidecar(path: Path, suffix: str) -> Path:
    return path.with_name(path.name + suffix)


def _read_record(path: Path) -> Optional[dict]:
    try:
        return json.loads(_sidecar(path, RECORD).read_text())
    except (OSError, ValueError):
        return None


def state(target: Target, catalog: Optional[Catalog] = None) -> State:
    catalog = catalog or Catalog()
    try:
        data = target.path.read_bytes()
    except OSError as e:
        raise InstallError(f"{target.path}: cannot read ({e.strerror})") from None
    digest, record = sha256(data), _read_record(target.path)
    if record and record.get("patched_sha256") == digest:
        return State(target, "patched", record["upstream"], digest, record)
    known = catalog.identify(data, target.family)
    if known:
        return State(target, "original", known.id, digest, None)
    version = catalog.patched_version(data, target.family)
    if version:
        return State(target, "patched", version, digest, None)
    return State(target, "unknown", None, digest, None)


# --------------------------------------------------------------------------------------------- writing
@contextlib.contextmanager
def _locked(folder: Path) -> Iterator[None]:
    """An exclusive lock on the folder itself (nothing is created): concurrent installs take turns."""
    if fcntl is None:
        yield
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _atomic_symlink(path: Path, link: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.klass-tmp")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)
    os.symlink(link, tmp)
    try:
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _writable(path: Path) -> None:
    if not path.is_symlink() and not path.stat().st_mode & stat.S_IWUSR:
        raise InstallError(f"{path} is read-only; make it writable (chmod u+w) to install, or leave the file "
                           "alone and call klass_patch.apply() at run time instead")
    if not os.access(path.parent, os.W_OK):
        raise InstallError(f"{path.parent} is not writable: the file cannot be replaced there; use "
                           "klass_patch.apply() at run time instead")


@dataclass
class Result:
    target: Target
    action: str  # "installed", "already patched", "would install", "reverted", "not patched"
    version: Optional[str]
    diff: str = ""
    notes: List[str] = field(default_factory=list)

    def describe(self) -> str:
        lines = [f"{self.target.path}: {self.action} ({self.version})"] + [f"  {n}" for n in self.notes]
        return "\n".join(lines + ([self.diff.rstrip("\n")] if self.diff else []))


def install(target: Target, dry_run: bool = False, catalog: Optional[Catalog] = None, env=os.environ) -> Result:
    """Rewrite one file (see the module docstring). Unknown versions raise ``InstallError``; nothing is written."""
    catalog = catalog or Catalog()
    local = local_copy_of(target.path, env)
    if local is not None:
        raise LocalCopyError(copy_advice(target, local, "install"))
    with _locked(target.path.parent):
        st = state(target, catalog)
        if st.kind == "patched":
            return Result(target, "already patched", st.version, notes=["nothing changed"])
        original = target.path.read_bytes()
        if st.kind == "unknown":
            reason = catalog.other_family(original, target.family) or (
                f"not a known {target.family} version; known: {', '.join(catalog.ids(target.family))}. "
                "klass_patch.apply() patches a compatible unknown version at run time instead (with a warning "
                "naming it)")
            raise UnknownVersionError(target.path, st.sha256, f"{reason}. Nothing was written.")
        diff = catalog.diff(target.family, st.version)
        new = diff.apply(original.decode("utf-8")).encode("utf-8")
        expected = diff.results.get(normalized_sha256(original))
        if normalized_sha256(new) != expected:
            raise InstallError(f"{target.path}: the {st.version} diff gave an unexpected result "
                               f"(sha256 {normalized_sha256(new)}, expected {expected}); nothing was written")
        if dry_run:
            shown = "".join(difflib.unified_diff(_lines(original.decode()), _lines(new.decode()),
                                                 str(target.path), f"{target.path} (patched)", n=2))
            return Result(target, "would install", st.version, diff=shown)
        _writable(target.path)
        link = os.readlink(target.path) if target.path.is_symlink() else None
        mode = stat.S_IMODE(target.path.stat().st_mode)
        backup = _sidecar(target.path, BACKUP)
        if link is not None:  # a hub snapshot: the backup is the same link; the blob is never written
            _atomic_symlink(backup, link)
        else:
            atomic_write(backup, original, mode)
        atomic_write(target.path, new, mode)
        record = dict(tool="klass-patch", family=target.family, upstream=st.version, original_sha256=sha256(original),
                      patched_sha256=sha256(new), backup=backup.name, symlink=link,
                      installed_at=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
        atomic_write(_sidecar(target.path, RECORD), (json.dumps(record, indent=1) + "\n").encode(), 0o644)
    notes = [f"backup: {backup}"] + _refresh_copies(target, original, env)
    return Result(target, "installed", st.version, notes=notes)


def revert(target: Target, catalog: Optional[Catalog] = None, env=os.environ) -> Result:
    """Put the backup back (sha256 checked) and remove it and the record. A local folder's copy in the modules
    cache (``local_copy_of``) without a backup raises ``LocalCopyError`` naming the command for the folder."""
    catalog = catalog or Catalog()
    local = local_copy_of(target.path, env)
    with _locked(target.path.parent):
        st = state(target, catalog)
        if st.kind != "patched":
            notes = _leftovers(target, st) if local is not None else []
            return Result(target, "not patched", st.version, notes=notes or ["nothing changed"])
        backup = _sidecar(target.path, BACKUP)
        if not backup.exists() and local is not None:  # a copy of an installed folder's file: no backup here
            raise LocalCopyError(copy_advice(target, local, "revert"))
        if not backup.exists():
            raise InstallError(f"{target.path}: patched, but its backup {backup} is gone; restore the original "
                               "from upstream (e.g. re-download it)")
        data = backup.read_bytes()
        want = st.record["original_sha256"] if st.record else None
        ok = sha256(data) == want if want else catalog.identify(data, target.family) is not None
        if not ok:
            raise InstallError(f"{target.path}: the backup {backup} is not the original (sha256 {sha256(data)}); "
                               "nothing was changed")
        _writable(target.path)
        patched = target.path.read_bytes()
        os.replace(backup, target.path)  # atomic; a symlink backup restores the link
        with contextlib.suppress(FileNotFoundError):
            os.unlink(_sidecar(target.path, RECORD))
    notes = [f"restored sha256 {sha256(target.path.read_bytes())}"] + _refresh_copies(target, patched, env)
    return Result(target, "reverted", st.version, notes=notes)


def _leftovers(target: Target, st: State) -> List[str]:
    """A local folder's copy that an earlier klass-patch installed into, since put back to the original by a
    load: the backup and record left next to it go (the file is the original they recorded)."""
    record = _read_record(target.path)
    if not record or record.get("original_sha256") != st.sha256:
        return []
    for suffix in (BACKUP, RECORD):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(_sidecar(target.path, suffix))
    return [f"removed the {BACKUP} and {RECORD} an earlier install left here (the file is the original again)"]


def _refresh_copies(target: Target, old: bytes, env) -> List[str]:
    """Remove the modules cache's stale copies of a Dream file that just changed: transformers re-copies a
    hub model's files only when missing, so a stale copy would shadow the change. Copies with their own
    install record are targets in their own right and are left alone."""
    if target.family != "dream":
        return []
    root = modules_cache(env) / "transformers_modules"
    notes = []
    if not root.is_dir() or root in target.path.parents:
        return notes
    for copy in root.rglob(FILENAME["dream"]):
        with _locked(copy.parent):
            if copy.is_file() and _read_record(copy) is None and copy.read_bytes() == old:
                copy.unlink()
                notes.append(f"removed stale copy {copy} (transformers copies the new file on the next load)")
    return notes


def main(argv=None) -> int:
    """Maintainers: regenerate vendored_diffs/ from a folder of upstream files (the tests' layout)."""
    import argparse
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("upstream", help="folder with llada/<name>/generate.py and dream/<name>/generation_utils.py")
    parser.add_argument("--out", default=str(DIFFS))
    args = parser.parse_args(argv)
    files = {}
    for family, name in FILENAME.items():
        for path in sorted((Path(args.upstream) / family).rglob(name)):
            files[sha256(path.read_bytes())] = path.read_bytes()
    by_version: Dict[tuple, List[bytes]] = {}
    for v in KNOWN:  # in KNOWN's order; one original per distinct normalised text
        group = by_version.setdefault((v.family, v.id), [])
        if v.sha256 in files and all(normalized_sha256(d) != v.normalized_sha256 for d in group):
            group.append(files[v.sha256])
    for (family, version), group in by_version.items():
        if not group:
            print(f"skipped {version}: no upstream file given")
            continue
        out = Path(args.out) / family / f"{version}.patch"
        out.parent.mkdir(parents=True, exist_ok=True)
        earlier = []  # what the diff being replaced produced: files rewritten by it stay recognised as patched
        if out.is_file():
            old = parse_diff(out.read_text(), family, version)
            earlier = old.earlier + list(old.results.items())
        out.write_text(make_diff(family, version, group, earlier=earlier))
        print(f"wrote {out} ({len(group)} original(s))")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
