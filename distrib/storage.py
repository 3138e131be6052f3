"""Where a run directory lives: a local folder, or a prefix on object storage named by a URI.

    run_dir: runs/{time}                     # a local folder: pathlib.Path, as always
    run_dir: s3://my-bucket/runs/{time}      # S3 (or MinIO, Ceph...: set AWS_ENDPOINT_URL)
    run_dir: gs://my-bucket/runs/{time}      # Google Cloud Storage
    run_dir: memory://runs/x                 # anything else pyarrow.fs or fsspec resolves

`locate` turns the string into a pathlib.Path for a local path (or file:// URI) and into a
RemotePath for any other URI. RemotePath has the few pathlib.Path members the run's code uses
(`/`, name, exists, is_file, is_dir, read_bytes, read_text, write_bytes, write_text, unlink,
iterdir, glob, mkdir), so most code reads either kind alike. Two things differ, and have
their own functions here: `write_whole` (an object store has no rename, so no atomic
replace) and `LineLog` (an object cannot be appended to).

The filesystem comes from the URI and the environment only, as pyarrow reads them
(credentials: AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN, AWS_PROFILE,
~/.aws, a web identity token, instance metadata; endpoint: AWS_ENDPOINT_URL); no secret is
ever in a config, a message or a log.
"""

from __future__ import annotations

import contextlib
import fnmatch
import os
import socket
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO
from urllib.parse import urlparse

import pyarrow
import pyarrow.fs as pafs

from distrib.errors import ConfigError, first_line


def is_uri(location: str | Path) -> bool:
    """Whether `location` names object storage (a scheme other than file://), not a local path."""
    return isinstance(location, RemotePath) or (isinstance(location, str) and "://" in location
                                                 and not location.startswith("file://"))


def locate(location: str | Path | RemotePath, *, what: str = "run_dir") -> Path | RemotePath:
    """A Path for a local path or file:// URI, a RemotePath for any other URI. ConfigError, naming
    `what` (the key or flag it came from), for a scheme neither pyarrow nor fsspec knows. Makes no
    request: a missing bucket or credentials show at the first read or write (see `check_writable`)."""
    if isinstance(location, (Path, RemotePath)):
        return location
    if location.startswith("file://"):
        return Path(location.removeprefix("file://"))
    if "://" not in location:
        return Path(location)
    uri = location.rstrip("/")
    filesystem, key = _filesystem(uri, what)
    return RemotePath(uri=uri, key=key.rstrip("/"), fs=filesystem)


def _filesystem(uri: str, what: str) -> tuple[pafs.FileSystem, str]:
    try:
        return pafs.FileSystem.from_uri(uri)
    except pyarrow.ArrowInvalid as err:
        if "Unrecognized filesystem type" not in str(err):
            raise ConfigError(f"{what}: {uri!r} is invalid: {err}") from None
    scheme = urlparse(uri).scheme
    try:  # pyarrow knows s3, gs, hdfs and abfs; fsspec knows many more (each its own package)
        import fsspec.core

        filesystem, path = fsspec.core.url_to_fs(uri)
    except (ImportError, ValueError) as err:
        raise ConfigError(f"{what}: {uri!r} is invalid: unknown scheme {scheme!r} ({err}); give a local path, "
                          "s3://BUCKET/PATH, gs://BUCKET/PATH or a URI that pyarrow.fs or fsspec resolves") from None
    return pafs.PyFileSystem(pafs.FSSpecHandler(filesystem)), path


@dataclass(frozen=True, order=True)
class RemotePath:
    """A file or folder on object storage: its URI (what messages and `str` show) and its key on
    `fs` (bucket/path for S3). Object stores have no folders: a folder exists while an object
    under it does."""

    uri: str
    key: str
    fs: pafs.FileSystem = field(compare=False, repr=False)

    def __str__(self) -> str:
        return self.uri

    def __truediv__(self, name: str) -> RemotePath:
        return RemotePath(uri=f"{self.uri}/{name}", key=f"{self.key}/{name}", fs=self.fs)

    @property
    def name(self) -> str:
        return self.key.rsplit("/", 1)[-1]

    def resolve(self) -> RemotePath:
        return self

    def with_suffix(self, suffix: str) -> RemotePath:
        """This path with its name's suffix replaced, as pathlib's."""
        name = self.name
        renamed = (name.rsplit(".", 1)[0] if "." in name.lstrip(".") else name) + suffix
        return RemotePath(uri=self.uri[:-len(name)] + renamed, key=self.key[:-len(name)] + renamed, fs=self.fs)

    def _type(self) -> pafs.FileType:
        return self.fs.get_file_info(self.key).type

    def exists(self) -> bool:
        return self._type() != pafs.FileType.NotFound

    def is_file(self) -> bool:
        return self._type() == pafs.FileType.File

    def is_dir(self) -> bool:
        return self._type() == pafs.FileType.Directory

    def mkdir(self, parents: bool = False, exist_ok: bool = False) -> None:
        """Nothing to do: a folder appears with its first object."""

    def read_bytes(self) -> bytes:
        """The whole object, in one GET after a HEAD for its size. (A stream's read() of a 94 MB
        checkpoint took 1.1-2.4 s and 0.5 s of CPU from a local S3 server, 10 s from moto's;
        this, 0.3-0.4 s and 0.2 s.)"""
        with self.fs.open_input_file(self.key) as file:
            return file.read()

    def read_text(self) -> str:
        return self.read_bytes().decode()

    def write_bytes(self, data: bytes) -> None:
        write_whole(self, [data])

    def write_text(self, text: str) -> None:
        write_whole(self, [text.encode()])

    def unlink(self, missing_ok: bool = False) -> None:
        try:
            self.fs.delete_file(self.key)
        except FileNotFoundError:
            if not missing_ok:
                raise

    def iterdir(self) -> Iterator[RemotePath]:
        selector = pafs.FileSelector(self.key, allow_not_found=True)
        for info in self.fs.get_file_info(selector):
            yield self / info.base_name

    def glob(self, pattern: str) -> Iterator[RemotePath]:
        """The direct children whose names match `pattern` (no ** and no subfolders)."""
        return (child for child in self.iterdir() if fnmatch.fnmatchcase(child.name, pattern))


def write_whole(path: Path | RemotePath, chunks: Sequence[bytes], *, durable: bool = False) -> None:
    """Write the concatenated `chunks` as `path`, which readers see whole or as it was before.

    Local: a temporary file renamed over `path` (with `durable`, fsynced before and its folder
    after, so the rename survives a power cut). Object storage has no rename; it does not need
    one: an object appears under its name only once its upload completes, so a process killed
    mid-upload leaves nothing there. An upload that *fails* is another matter: pyarrow cannot
    abort one, and a stream closed (or collected) after an error completes it with what was
    sent, so we close it and delete that object; readers of checkpoints are guarded besides by
    their sha256 and the "latest" marker (checkpoint.py)."""
    if isinstance(path, Path):
        _write_local(path, chunks, durable=durable)
        return
    stream = path.fs.open_output_stream(path.key)
    try:
        for chunk in chunks:
            stream.write(chunk)
    except BaseException:
        try:
            stream.close()
            path.unlink(missing_ok=True)
        except Exception:
            pass  # the first error is the one to report
        raise
    stream.close()


def _write_local(path: Path, chunks: Sequence[bytes], *, durable: bool) -> None:
    tmp = path.with_name(path.name + ".tmp")
    try:
        with tmp.open("wb") as f:
            for chunk in chunks:
                f.write(chunk)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):  # the write's own error is the one to report
            tmp.unlink(missing_ok=True)  # a full disk must not keep a checkpoint's worth of a failed write
        raise
    if durable:
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)  # the rename itself survives a power cut only once the folder is synced
        finally:
            os.close(dir_fd)


PART_BYTES = 4 << 20
"""On object storage a line log is kept in parts of about this size: metrics.jsonl, then
metrics.1.jsonl, metrics.2.jsonl, ... Each upload rewrites only the last part, so it costs the
same however long the run. (One object rewritten whole grew with every step: 38 MB at 100,000
steps, uploaded from the driver's loop every 10 s.)"""


def line_parts(path: Path | RemotePath) -> list[Path | RemotePath]:
    """The files holding the lines of the log at `path`, in order: `path` itself and, on object
    storage, each further part there is (see PART_BYTES)."""
    parts = [path]
    if isinstance(path, RemotePath):
        while (following := _part(path, len(parts))).is_file():
            parts.append(following)
    return parts


def read_lines(path: Path | RemotePath) -> str:
    """The text of the line log at `path`, its parts joined."""
    return "".join(part.read_text() for part in line_parts(path))


def _part(path: RemotePath, index: int) -> RemotePath:
    return path if index == 0 else path.with_suffix(f".{index}{Path(path.name).suffix}")


class LineLog:
    """Text lines appended to one file of a run directory (metrics.jsonl, events.jsonl).

    Local: a file opened for appending and flushed per line, so a reader sees each line at once.
    Object storage cannot append: the lines of the log's last part (PART_BYTES) are kept in
    memory and that part rewritten whole at most every `upload_every_s` seconds, and on `flush`
    and `close` -- a request per batch, not per step (0: every line at once, for rare lines such
    as events). A crash loses the lines since the last upload; RunDir flushes before each
    checkpoint, so none before the step a resume starts from is lost. `create`: make the file
    now, even with no line yet. Read the log with `read_lines`."""

    def __init__(self, path: Path | RemotePath, *, upload_every_s: float, create: bool):
        self.path = path
        self.upload_every_s = upload_every_s
        self._file: IO[str] | None = None
        self._lines: list[str] | None = None  # object storage only: the last part's lines
        self._part_index = 0
        self._part_chars = 0  # in self._lines
        self._uploaded_at = time.monotonic()
        self._dirty = False
        if isinstance(path, RemotePath):
            exists = path.is_file()
            parts = line_parts(path) if exists else [path]
            self._part_index = len(parts) - 1
            self._lines = parts[-1].read_text().splitlines(keepends=True) if exists else []
            self._part_chars = sum(map(len, self._lines))
            self._dirty = create and not exists
            self.flush()
        elif create:
            self._file = _open_to_append(path)

    def append(self, line: str) -> None:
        """Add `line` (one line, no newline)."""
        if self._lines is None:
            if self._file is None:
                self._file = _open_to_append(self.path)
            self._file.write(line + "\n")
            self._file.flush()
            return
        self._lines.append(line + "\n")
        self._part_chars += len(line) + 1
        self._dirty = True
        if self._part_chars >= PART_BYTES:  # the part is full: upload it, start the next
            self.flush()
            self._part_index, self._lines, self._part_chars = self._part_index + 1, [], 0
        elif time.monotonic() - self._uploaded_at >= self.upload_every_s:
            self.flush()

    def keep(self, wanted: Callable[[str], bool]) -> None:
        """Keep only the lines `wanted` says yes to (a rewind), and write that now."""
        if self._lines is None:
            if self._file is not None:
                self._file.close()
            text = _whole_lines(self.path.read_text()) if self.path.is_file() else ""
            write_whole(self.path, ["".join(line + "\n" for line in text.splitlines() if wanted(line)).encode()])
            self._file = self.path.open("a")
            return
        self.flush()
        old = [part.read_text() for part in line_parts(self.path)] if self.path.is_file() else []
        new: list[list[str]] = [[]]
        chars = 0  # in new[-1]
        for line in _whole_lines("".join(old)).splitlines(keepends=True):
            if wanted(line.rstrip("\n")):
                if chars >= PART_BYTES:
                    new.append([])
                    chars = 0
                new[-1].append(line)
                chars += len(line)
        for index, lines in enumerate(new):  # the parts that changed, then those no longer needed
            if index >= len(old) or old[index] != "".join(lines):
                write_whole(_part(self.path, index), ["".join(lines).encode()])
        for index in reversed(range(len(new), len(old))):
            _part(self.path, index).unlink(missing_ok=True)
        self._part_index, self._lines, self._part_chars = len(new) - 1, new[-1], chars

    def flush(self) -> None:
        """Upload the last part's lines, if any is new (object storage; local lines are flushed
        as written)."""
        if self._lines is not None and self._dirty:
            write_whole(_part(self.path, self._part_index), ["".join(self._lines).encode()])
            self._dirty = False
            self._uploaded_at = time.monotonic()

    def close(self) -> None:
        self.flush()
        if self._file is not None:
            self._file.close()
            self._file = None


def _whole_lines(text: str) -> str:
    """`text` up to its last newline: without a line that a crash cut short."""
    return text[:text.rfind("\n") + 1]


def _open_to_append(path: Path) -> IO[str]:
    """`path` opened to append lines, less a last line that a killed writer cut short (no
    newline): the next line would join it, and neither would parse."""
    if path.is_file() and path.stat().st_size:
        with path.open("rb+") as file:
            file.seek(-1, os.SEEK_END)
            if file.read(1) != b"\n":
                file.seek(0)
                file.truncate(file.read().rfind(b"\n") + 1)
    return path.open("a")


# ---- the checks before a run: one line each, before Ray starts ----------------------------------
_AWS_CREDENTIAL_VARIABLES = (
    "AWS_ACCESS_KEY_ID", "AWS_PROFILE", "AWS_WEB_IDENTITY_TOKEN_FILE",  # keys, a named profile, EKS IRSA
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", "AWS_CONTAINER_CREDENTIALS_FULL_URI",  # ECS, EKS pod identity
)


def check_writable(location: str, *, what: str = "run_dir") -> None:
    """ConfigError, in a second or so, for a URI that can never be written: an unknown scheme,
    no credentials (S3, GCS), a bucket that does not exist, a store that cannot be reached."""
    path = locate(location, what=what)
    if not isinstance(path, RemotePath):
        return
    if isinstance(path.fs, pafs.S3FileSystem) and "anonymous=" not in location and not _aws_credentials_found():
        raise ConfigError(f"{what}: {location!r} is invalid: no S3 credentials found; set AWS_ACCESS_KEY_ID and "
                          "AWS_SECRET_ACCESS_KEY (or AWS_PROFILE, or run where a role gives them)")
    if isinstance(path.fs, pafs.GcsFileSystem) and "anonymous=" not in location and not _gcs_credentials_found():
        raise ConfigError(f"{what}: {location!r} is invalid: no GCS credentials found; set "
                          "GOOGLE_APPLICATION_CREDENTIALS to a key file (or run `gcloud auth application-default "
                          "login`, or run where the metadata server gives them)")
    bucket = path.key.split("/", 1)[0]
    try:
        found = path.fs.get_file_info(bucket).type != pafs.FileType.NotFound
    except OSError as err:
        raise ConfigError(f"{what}: {location!r} cannot be reached: {first_line(err)}") from None
    if not found:
        raise ConfigError(f"{what}: {location!r} is invalid: bucket {bucket!r} does not exist; create it first "
                          "(distrib does not create buckets) or fix the name")


def write_refused(path: Path | RemotePath, err: OSError) -> str:
    """One line for a run directory the store would not let the driver write to, with the fix."""
    reason = first_line(err)
    if "MissingContentLength" in reason:  # a server older than the AWS SDK's default request checksums
        return (f"run_dir: {str(path)!r} cannot be written: the S3 server refused the upload's checksum "
                "encoding (MissingContentLength); set AWS_REQUEST_CHECKSUM_CALCULATION=when_required")
    return f"run_dir: {str(path)!r} cannot be written: {reason}; check the path and its permissions"


def _aws_credentials_found() -> bool:
    """Whether the AWS SDK's default chain can find credentials: variables, a credentials or config
    file, else the instance metadata service (EC2; skipped with AWS_EC2_METADATA_DISABLED=true)."""
    if any(os.environ.get(name) for name in _AWS_CREDENTIAL_VARIABLES):
        return True
    files = (os.environ.get("AWS_SHARED_CREDENTIALS_FILE", "~/.aws/credentials"),
             os.environ.get("AWS_CONFIG_FILE", "~/.aws/config"))
    if any(Path(name).expanduser().is_file() for name in files):
        return True
    if os.environ.get("AWS_EC2_METADATA_DISABLED", "").lower() == "true":
        return False
    return _metadata_server_answers()


def _gcs_credentials_found() -> bool:
    """Whether Google's default credentials can be found: GOOGLE_APPLICATION_CREDENTIALS, gcloud's
    application-default file, else the metadata server (GCE, GKE; skipped with NO_GCE_CHECK=true,
    as google-auth skips it)."""
    if os.environ.get("GOOGLE_APPLICATION_CREDENTIALS"):
        return True
    gcloud = Path(os.environ.get("CLOUDSDK_CONFIG", "~/.config/gcloud")).expanduser()
    if (gcloud / "application_default_credentials.json").is_file():
        return True
    if os.environ.get("NO_GCE_CHECK", "").lower() == "true":
        return False
    return _metadata_server_answers()


def _metadata_server_answers() -> bool:
    """A cloud VM's metadata server (EC2, GCE: the same link-local address) takes a connection;
    off a cloud VM nothing answers there."""
    try:
        socket.create_connection(("169.254.169.254", 80), timeout=0.3).close()
        return True
    except OSError:
        return False
