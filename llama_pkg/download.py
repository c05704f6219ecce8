"""Fetching a model folder: from the Hugging Face hub (`hf://owner/repo@revision`), an HTTP(S) base URL
serving the files and a `SHA256SUMS` manifest, or an HTTP(S) URL of a .tar/.tar.gz of the folder
(`#sha256=...` checks it). Parallel byte ranges, resumed after a broken connection, retried with backoff.
Only a verified folder ever appears at DEST (one rename); work in progress lives in `.DEST.partial`,
kept for a resume unless a file is corrupt.
"""

import contextlib
import hashlib
import json
import os
import re
import shutil
import sys
import tarfile
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from . import weights
from .weights import sha256_file

HF_FILES = ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "tokenizer.model",
            "special_tokens_map.json", "quantize_config.json", "*.safetensors", "model.safetensors.index.json"]
BLOCK = 1 << 20


class DownloadError(RuntimeError):
    """resumable: the staging folder was kept and running the same download again continues it."""

    def __init__(self, message, resumable=False):
        super().__init__(message)
        self.resumable = resumable


def parse_manifest(text):
    """weights.parse_manifest, failing as a download does (a refused manifest removes the staging folder)."""
    try:
        return weights.parse_manifest(text)
    except weights.WeightsError as e:
        raise DownloadError(str(e)) from None


class Progress:
    def __init__(self, total, enabled):
        self.total, self.done, self.enabled = total, 0, enabled
        self.start = self.shown = time.monotonic()
        self.lock = threading.Lock()

    def add(self, n):
        with self.lock:
            self.done += n
            now = time.monotonic()
            if self.enabled and (now - self.shown > 0.5 or self.done == self.total):
                self.shown = now
                rate = self.done / max(now - self.start, 1e-6)
                print(f"\r{self.done / 1e9:.2f}/{self.total / 1e9:.2f} GB  {rate / 1e6:.0f} MB/s  "
                      f"{100 * self.done / max(self.total, 1):.0f}%", end="", file=sys.stderr, flush=True)


class UrlSource:
    def __init__(self, base, retries=3, backoff=0.5, timeout=30, chunk_size=64 << 20, workers=8, progress=True):
        self.base = base.rstrip("/") + "/"
        self.retries, self.backoff, self.timeout = retries, backoff, timeout
        self.chunk_size, self.workers, self.show_progress = chunk_size, workers, progress

    def _with_retries(self, what, action):
        for attempt in range(self.retries + 1):
            try:
                return action()
            except (urllib.error.URLError, OSError, ConnectionError) as e:
                if isinstance(e, urllib.error.HTTPError) and e.code < 500:
                    raise DownloadError(f"{what}: HTTP {e.code} from {e.url}") from None
                if attempt == self.retries:
                    reason = getattr(e, "reason", e)
                    raise DownloadError(f"{what}: {reason} after {attempt + 1} attempts ({self.base})",
                                        resumable=True) from None
                time.sleep(self.backoff * 2**attempt)

    def _open(self, name, headers=None, method="GET"):
        req = urllib.request.Request(self.base + urllib.request.pathname2url(name), headers=headers or {}, method=method)
        return urllib.request.urlopen(req, timeout=self.timeout)

    def fetch(self, staging):
        text = self._with_retries("SHA256SUMS", lambda: self._open("SHA256SUMS").read().decode())
        (staging / "SHA256SUMS").write_text(text)
        self.download(staging, parse_manifest(text), identity=text)

    def download(self, staging, manifest, identity):
        """The files {name: sha256, or None for unchecked} under the base URL into staging, in parallel
        byte ranges; a record of the bytes done (for `identity`, the manifest) lets a later run resume."""
        done = RangesDone(staging / ".progress.json", {"source": self.base, "manifest": identity})
        sizes = {}
        for name in manifest:
            def head(name=name):
                with self._open(name, method="HEAD") as r:
                    if r.headers.get("Content-Length") is None:
                        raise DownloadError(f"{name}: the server gives no Content-Length")
                    return int(r.headers["Content-Length"]), r.headers.get("Accept-Ranges") == "bytes"
            sizes[name] = self._with_retries(name, head)
        jobs = []
        for name, (size, ranged) in sizes.items():
            path = staging / name
            path.parent.mkdir(parents=True, exist_ok=True)
            if not path.exists() or path.stat().st_size != size:
                with open(path, "wb") as f:
                    f.truncate(size)
            step = self.chunk_size if ranged else max(size, 1)
            jobs += [(name, start, min(start + step, size)) for start in range(0, size, step)]
        progress = Progress(sum(s for s, _ in sizes.values()), self.show_progress)
        try:
            with ThreadPoolExecutor(self.workers) as pool:
                futures = [pool.submit(self._fetch_range, staging / n, n, a, b, progress, done) for n, a, b in jobs]
                for future in futures:
                    future.result()
        finally:
            done.save()
        if self.show_progress:
            print(file=sys.stderr)
        for name, expected in manifest.items():
            got = sha256_file(staging / name) if expected else None
            if got != expected:
                raise DownloadError(f"{name}: sha256 mismatch (expected {expected}, got {got}): the file is corrupt")

    def _fetch_range(self, path, name, start, end, progress, done):
        """Bytes [start, end) of one file, resuming from the last byte written when a connection breaks."""
        key = f"{name}@{start}"
        pos = start + done.get(key)
        progress.add(pos - start)
        if pos >= end:  # done in an earlier run
            return
        fd = os.open(path, os.O_WRONLY)
        try:
            def attempt():
                nonlocal pos
                headers = {"Range": f"bytes={pos}-{end - 1}"}
                with self._open(name, headers) as r:
                    if r.status == 200 and pos != 0:  # the server sends the whole file, not the range
                        if start != 0:
                            raise DownloadError(f"{name}: the server ignored a byte range request")
                        progress.add(-pos)
                        pos = 0
                    while pos < end:
                        block = r.read(min(BLOCK, end - pos))
                        if not block:
                            raise ConnectionError(f"connection closed at byte {pos} of {name}")
                        os.pwrite(fd, block, pos)
                        pos += len(block)
                        done.set(key, pos - start)
                        progress.add(len(block))
            self._with_retries(name, attempt)
        finally:
            os.close(fd)


class RangesDone:
    """Bytes done per byte range, saved beside the partial files so a later run resumes them.

    Saved after the bytes are written (at most once a second, and at the end), so a record never
    claims bytes that are not on disk. A record made for another source or manifest is discarded.
    """

    def __init__(self, path, identity):
        self.path, self.identity, self.lock, self.saved = path, identity, threading.Lock(), 0.0
        old = json.loads(path.read_text()) if path.exists() else {}
        self.done = old.get("done", {}) if old.get("identity") == identity else {}

    def get(self, key):
        return self.done.get(key, 0)

    def set(self, key, n):
        with self.lock:
            self.done[key] = n
            if time.monotonic() - self.saved > 1.0:
                self._write()

    def save(self):
        with self.lock:
            self._write()

    def _write(self):
        self.saved = time.monotonic()
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"identity": self.identity, "done": self.done}))
        tmp.replace(self.path)


def fetch_hf(repo, revision, staging):
    from huggingface_hub import HfApi, snapshot_download

    snapshot_download(repo_id=repo, revision=revision, allow_patterns=HF_FILES, local_dir=str(staging))
    shutil.rmtree(staging / ".cache", ignore_errors=True)
    sha = HfApi().model_info(repo, revision=revision).sha
    (staging / ".source.json").write_text(json.dumps({"source": f"hf://{repo}@{revision}", "commit": sha}) + "\n")
    lines = [f"{sha256_file(f)}  {f.relative_to(staging)}" for f in sorted(staging.rglob("*"))
             if f.is_file() and f.name not in ("SHA256SUMS", ".source.json")]
    (staging / "SHA256SUMS").write_text("\n".join(lines) + "\n")


def fetch(source, dest, **options):
    """Download SOURCE into DEST atomically; returns DEST. Raises DownloadError naming what failed."""
    dest = Path(dest)
    if dest.exists():
        raise DownloadError(f"{dest} already exists; remove it first to download again")
    staging = dest.with_name(f".{dest.name}.partial")
    if staging.exists():
        print(f"resuming the download kept in {staging}", file=sys.stderr)
    staging.mkdir(parents=True, exist_ok=True)
    try:
        m = re.fullmatch(r"hf://([\w.-]+/[\w.-]+)(?:@([\w./-]+))?", source)
        folder = staging
        if m:
            try:
                fetch_hf(m.group(1), m.group(2) or "main", staging)
            except Exception as e:  # noqa: BLE001 - the hub's many exception types, said in one line
                first = str(e).strip().splitlines()[0] if str(e).strip() else ""
                raise DownloadError(f"{source}: {type(e).__name__}: {first}", resumable=True) from None
        elif re.match(r"https?://", source) and ARCHIVE.search(source.split("#")[0]):
            folder = fetch_archive(source, staging, **options)
        elif re.match(r"https?://", source):
            UrlSource(source, **options).fetch(staging)
        else:
            raise DownloadError(f"source {source!r}: expected hf://owner/repo@revision, an http(s):// base URL or the "
                                "http(s):// URL of a .tar or .tar.gz")
        weights.verify(folder)
        (folder / ".progress.json").unlink(missing_ok=True)
        folder.rename(dest)
        shutil.rmtree(staging, ignore_errors=True)  # an archive's download, once extracted
    except (DownloadError, KeyboardInterrupt) as e:
        if (isinstance(e, KeyboardInterrupt) or e.resumable) and _holds_data(staging):
            print(f"download stopped; its partial files are kept in {staging}: run the same command again "
                  f"to resume", file=sys.stderr)
        else:
            shutil.rmtree(staging, ignore_errors=True)
        raise
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return dest


def _holds_data(staging):
    """Whether a stopped download left anything worth resuming: bytes recorded as done (URL sources, an
    archive's download too) or files the hub wrote."""
    records = [staging / ".progress.json", staging / "archive" / ".progress.json"]
    if any(p.exists() and any(json.loads(p.read_text()).get("done", {}).values()) for p in records):
        return True
    return not records[0].exists() and any(p.is_file() for p in staging.rglob("*"))


ARCHIVE = re.compile(r"\.(tar|tar\.gz|tgz)$")


def fetch_archive(url, staging, **options):
    """A .tar/.tar.gz of a model folder -> the extracted folder inside staging. The archive is downloaded
    into staging/archive (resumable), checked against `#sha256=<hex>` when the URL has one, and
    extracted with tarfile's data filter (no absolute paths, links out of the folder or devices). An
    archive holding one folder is that folder; else its top level is."""
    address, _, fragment = url.partition("#")
    expected = None
    if fragment:
        m = re.fullmatch(r"sha256=([0-9a-fA-F]{64})", fragment)
        if not m:
            raise DownloadError(f"{url}: the URL's fragment must be #sha256=<64 hex digits>, got #{fragment}")
        expected = m.group(1).lower()
    base, name = address.rsplit("/", 1)
    download = staging / "archive"
    download.mkdir(exist_ok=True)
    UrlSource(base, **options).download(download, {name: expected}, identity=url)
    extracted = staging / "folder"
    shutil.rmtree(extracted, ignore_errors=True)
    try:
        with tarfile.open(download / name) as tar:
            tar.extractall(extracted, filter="data")
    except (tarfile.TarError, OSError) as e:
        shutil.rmtree(download, ignore_errors=True)  # a corrupt archive is not resumed
        raise DownloadError(f"{name}: not a readable .tar/.tar.gz ({e})") from None
    entries = [p for p in extracted.iterdir() if not p.name.startswith(".")]
    return entries[0] if len(entries) == 1 and entries[0].is_dir() else extracted


def cached(url, cache):
    """The folder for a weights URL (COG_WEIGHTS or --weights): downloaded once into `cache`, named by the
    URL's hash, and reused (verified again, from its stamp) at later starts."""
    dest = Path(cache) / hashlib.sha256(url.encode()).hexdigest()[:16]
    if not dest.exists():
        made = not dest.parent.exists()
        dest.parent.mkdir(parents=True, exist_ok=True)
        print(f"downloading {url.split('#')[0]} into {dest}", file=sys.stderr)
        try:
            fetch(url, dest)
        except BaseException:
            if made:  # a failed first download leaves no empty cache folder behind (one to resume stays)
                with contextlib.suppress(OSError):
                    dest.parent.rmdir()
            raise
    return dest
