"""Fetching a model folder, from the Hugging Face hub or from a plain HTTP(S) base URL (a CDN).

SOURCE is `hf://owner/repo@revision`, or a base URL under which the folder's files and a
`SHA256SUMS` manifest (the format `sha256sum` writes) are served. A URL download fetches large files
as parallel byte ranges, resumes a range where a broken connection left it, retries with backoff,
shows progress, and verifies every sha256 before the folder is moved into place in one rename. A
failed download leaves nothing at DEST and removes its staging folder.
"""

import json
import os
import re
import shutil
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path, PurePosixPath

from . import weights
from .weights import sha256_file

HF_FILES = ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "tokenizer.model",
            "special_tokens_map.json", "quantize_config.json", "*.safetensors", "model.safetensors.index.json"]
BLOCK = 1 << 20


class DownloadError(RuntimeError):
    pass


def parse_manifest(text):
    """`sha256sum` output -> {relative name: sha256}; names that could leave the folder are refused."""
    entries = {}
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        m = re.fullmatch(r"([0-9a-fA-F]{64}) [ *](.+)", line.rstrip("\r"))
        if not m:
            raise DownloadError(f"SHA256SUMS line {n} is not '<sha256>  <file name>': {line[:80]!r}")
        entries[safe_name(m.group(2))] = m.group(1).lower()
    if not entries:
        raise DownloadError("SHA256SUMS lists no files")
    return entries


def safe_name(name):
    path = PurePosixPath(name)
    if "\\" in name or path.is_absolute() or any(p in ("..", "") for p in path.parts) or name.startswith("~"):
        raise DownloadError(f"refusing file name {name!r}: it would leave the weights folder")
    return str(path)


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
                    raise DownloadError(f"{what}: {reason} after {attempt + 1} attempts ({self.base})") from None
                time.sleep(self.backoff * 2**attempt)

    def _open(self, name, headers=None, method="GET"):
        req = urllib.request.Request(self.base + urllib.request.pathname2url(name), headers=headers or {}, method=method)
        return urllib.request.urlopen(req, timeout=self.timeout)

    def fetch(self, staging):
        text = self._with_retries("SHA256SUMS", lambda: self._open("SHA256SUMS").read().decode())
        manifest = parse_manifest(text)
        (staging / "SHA256SUMS").write_text(text)
        sizes = {}
        for name in manifest:
            def head(name=name):
                with self._open(name, method="HEAD") as r:
                    return int(r.headers["Content-Length"]), r.headers.get("Accept-Ranges") == "bytes"
            sizes[name] = self._with_retries(name, head)
        jobs = []
        for name, (size, ranged) in sizes.items():
            path = staging / name
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "wb") as f:
                f.truncate(size)
            step = self.chunk_size if ranged else max(size, 1)
            jobs += [(name, start, min(start + step, size)) for start in range(0, size, step)]
        progress = Progress(sum(s for s, _ in sizes.values()), self.show_progress)
        with ThreadPoolExecutor(self.workers) as pool:
            for future in [pool.submit(self._fetch_range, staging / n, n, a, b, progress) for n, a, b in jobs]:
                future.result()
        if self.show_progress:
            print(file=sys.stderr)
        for name, expected in manifest.items():
            got = sha256_file(staging / name)
            if got != expected:
                raise DownloadError(f"{name}: sha256 mismatch (expected {expected}, got {got}): the file is corrupt")

    def _fetch_range(self, path, name, start, end, progress):
        """Bytes [start, end) of one file, resuming from the last byte written when a connection breaks."""
        pos = start
        fd = os.open(path, os.O_WRONLY)
        try:
            def attempt():
                nonlocal pos
                headers = {"Range": f"bytes={pos}-{end - 1}"}
                with self._open(name, headers) as r:
                    if r.status == 200 and pos != 0:
                        raise DownloadError(f"{name}: the server ignored a byte range request")
                    while pos < end:
                        block = r.read(min(BLOCK, end - pos))
                        if not block:
                            raise ConnectionError(f"connection closed at byte {pos} of {name}")
                        os.pwrite(fd, block, pos)
                        pos += len(block)
                        progress.add(len(block))
            self._with_retries(name, attempt)
        finally:
            os.close(fd)


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
    staging = dest.with_name(f".{dest.name}.partial-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        m = re.fullmatch(r"hf://([\w.-]+/[\w.-]+)(?:@([\w./-]+))?", source)
        if m:
            fetch_hf(m.group(1), m.group(2) or "main", staging)
        elif re.match(r"https?://", source):
            UrlSource(source, **options).fetch(staging)
        else:
            raise DownloadError(f"source {source!r}: expected hf://owner/repo@revision or an http(s):// base URL")
        weights.verify(staging)
        staging.rename(dest)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return dest
