"""Downloading weights from a local HTTP server on loopback: clean, resumed, corrupted, unreachable."""

import hashlib
import http.server
import json
import os
import shutil
import subprocess
import sys
import threading
import time

import pytest

from conftest import ROOT, free_port
from llama_pkg import weights
from llama_pkg.download import DownloadError, fetch, parse_manifest


class Served:
    """A folder over HTTP with byte ranges; can cut a file's first response short or corrupt a file."""

    def __init__(self, folder):
        self.folder, self.cut, self.cut_at, self.ranges = folder, {}, [], True
        self.requests = []
        served = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_HEAD(self):
                self._send(head=True)

            def do_GET(self):
                self._send(head=False)

            def _send(self, head):
                name = self.path.lstrip("/")
                path = served.folder / name
                served.requests.append((self.command, name, self.headers.get("Range")))
                if not path.is_file():
                    self.send_error(404)
                    return
                data = path.read_bytes()
                start, end = 0, len(data)
                rng = self.headers.get("Range") if served.ranges else None
                if rng:
                    a, b = rng.removeprefix("bytes=").split("-")
                    start, end = int(a), int(b) + 1
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{end - 1}/{len(data)}")
                else:
                    self.send_response(200)
                if served.ranges:
                    self.send_header("Accept-Ranges", "bytes")
                self.send_header("Content-Length", str(end - start))
                self.end_headers()
                if head:
                    return
                body = data[start:end]
                cut = served.cut.pop(name, None)
                if cut is not None:  # send part of it, then drop the connection
                    served.cut_at.append(start + cut)
                    self.wfile.write(body[:cut])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(body)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/"
        # a short poll: shutdown() waits up to one poll interval (0.5 s by default) for the loop to see it
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True).start()

    def close(self):
        self.httpd.shutdown()


def write_manifest(folder):
    lines = [f"{hashlib.sha256(f.read_bytes()).hexdigest()}  {f.name}" for f in sorted(folder.iterdir()) if f.is_file()]
    (folder / "SHA256SUMS").write_text("\n".join(lines) + "\n")


@pytest.fixture
def origin(test_model, tmp_path):
    folder = tmp_path / "origin"
    shutil.copytree(test_model, folder)
    write_manifest(folder)
    s = Served(folder)
    yield s
    s.close()


OPTIONS = dict(chunk_size=1 << 20, workers=4, retries=3, backoff=0.05, progress=False)


def same_files(a, b):
    return all((b / f.name).read_bytes() == f.read_bytes() for f in a.iterdir() if f.is_file())


def test_clean_download_in_parallel_ranges(origin, tmp_path):
    dest = fetch(origin.url, tmp_path / "dest", **OPTIONS)
    assert same_files(origin.folder, dest)
    ranges = [r for m, n, r in origin.requests if n == "model.safetensors" and m == "GET"]
    assert len(ranges) >= 8  # 8 MB in 1 MB ranges
    assert weights.verify(dest).folder == dest
    assert not list(tmp_path.glob(".dest.partial*"))


def range_starts(origin, name):
    return [int(r.removeprefix("bytes=").split("-")[0]) for m, n, r in origin.requests if n == name and m == "GET"]


def test_resume_after_the_server_cuts_the_connection(origin, tmp_path):
    origin.cut["model.safetensors"] = 300_000
    dest = fetch(origin.url, tmp_path / "dest", **OPTIONS)
    assert same_files(origin.folder, dest)
    assert origin.cut_at and origin.cut_at[0] in range_starts(origin, "model.safetensors")  # resumed, not restarted


def test_server_without_byte_ranges_restarts_a_cut_file(origin, tmp_path):
    origin.ranges = False
    origin.cut["model.safetensors"] = 300_000
    dest = fetch(origin.url, tmp_path / "dest", **OPTIONS)
    assert same_files(origin.folder, dest)
    assert len(range_starts(origin, "model.safetensors")) == 2  # one whole-file stream cut, one complete


def test_resume_across_runs(origin, tmp_path):
    origin.cut["model.safetensors"] = 300_000
    with pytest.raises(DownloadError) as e:
        fetch(origin.url, tmp_path / "dest", **{**OPTIONS, "retries": 0})
    assert e.value.resumable and not (tmp_path / "dest").exists()
    staging = tmp_path / ".dest.partial"
    with pytest.raises(weights.WeightsError):  # what was kept is nothing setup() would load
        weights.verify(staging)
    origin.requests.clear()
    dest = fetch(origin.url, tmp_path / "dest", **OPTIONS)
    assert same_files(origin.folder, dest) and not staging.exists()
    assert range_starts(origin, "model.safetensors") == origin.cut_at  # only the rest of the cut range


def test_corrupted_file_is_rejected_and_nothing_is_left(origin, tmp_path):
    data = bytearray((origin.folder / "tokenizer.json").read_bytes())
    data[100] ^= 0xFF
    (origin.folder / "tokenizer.json").write_bytes(bytes(data))
    with pytest.raises(DownloadError, match="tokenizer.json: sha256 mismatch"):
        fetch(origin.url, tmp_path / "dest", **OPTIONS)
    assert os.listdir(tmp_path) == ["origin"]


def test_unreachable_source_fails_fast_with_a_clear_message(tmp_path):
    start = time.monotonic()
    with pytest.raises(DownloadError, match="SHA256SUMS: .*refused.*127.0.0.1"):
        fetch(f"http://127.0.0.1:{free_port()}/model/", tmp_path / "dest", retries=2, backoff=0.05, progress=False)
    assert time.monotonic() - start < 5
    assert os.listdir(tmp_path) == []


def test_missing_file_on_the_server_is_named(origin, tmp_path):
    (origin.folder / "tokenizer_config.json").unlink()
    with pytest.raises(DownloadError, match="tokenizer_config.json: HTTP 404"):
        fetch(origin.url, tmp_path / "dest", **OPTIONS)
    assert os.listdir(tmp_path) == ["origin"]


@pytest.mark.parametrize("name", ["../escape.json", "/etc/passwd", "a/../../b", "..\\x"])
def test_manifest_names_cannot_leave_the_folder(name):
    with pytest.raises(DownloadError, match="leave the weights folder"):
        parse_manifest(f"{'0' * 64}  {name}\n")


@pytest.mark.slow  # a subprocess
def test_script_downloads_and_setup_accepts(origin, tmp_path):
    out = subprocess.run([sys.executable, "scripts/download_weights.py", origin.url, str(tmp_path / "w")],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    from llama_pkg.pipeline import Pipeline

    assert Pipeline.load(str(tmp_path / "w")).info.folder == tmp_path / "w"


class TestVerify:
    def test_truncated_tensor_file_is_named(self, origin, tmp_path):
        dest = shutil.copytree(origin.folder, tmp_path / "w")
        with open(dest / "model.safetensors", "r+b") as f:
            f.truncate(1000)
        with pytest.raises(weights.WeightsError, match="model.safetensors.*truncated"):
            weights.verify(dest)

    def test_changed_file_fails_its_manifest_even_after_a_passed_check(self, origin, tmp_path):
        dest = shutil.copytree(origin.folder, tmp_path / "w")
        weights.verify(dest)
        assert (dest / ".verified.json").exists()
        (dest / "tokenizer_config.json").write_text("{}")
        with pytest.raises(weights.WeightsError, match="tokenizer_config.json does not match its sha256"):
            weights.verify(dest)

    def test_manifest_naming_a_file_outside_is_refused(self, origin, tmp_path):
        dest = shutil.copytree(origin.folder, tmp_path / "w")
        (dest / "SHA256SUMS").write_text(f"{'0' * 64}  ../outside.json\n")
        with pytest.raises(weights.WeightsError, match="leave the weights folder"):
            weights.verify(dest)

    @pytest.mark.parametrize("change,message", [
        ("{not json", "is not valid JSON"), ("[1, 2]", "must be a JSON object, not a list"),
        ({"hidden_size": "abc"}, "hidden_size must be a positive integer, got 'abc'"),
        ({"num_key_value_heads": 0}, "num_key_value_heads must be a positive integer, got 0"),
        ({"rms_norm_eps": "small"}, "rms_norm_eps must be a positive number"),
        ({"eos_token_id": "</s>"}, "eos_token_id must be a token id"),
        ({"quantization_config": "gptq"}, "quantization_config must be a JSON object")])
    def test_broken_config_is_named_with_what_is_wrong(self, origin, tmp_path, change, message):
        dest = shutil.copytree(origin.folder, tmp_path / "w")
        if isinstance(change, dict):  # a good config with one field broken
            change = json.dumps({**json.loads((dest / "config.json").read_text()), **change})
        (dest / "config.json").write_text(change)
        with pytest.raises(weights.WeightsError) as e:
            weights.verify(dest)
        assert str(e.value).startswith(str(dest / "config.json")) and message in str(e.value)
        assert "\n" not in str(e.value)

    def test_missing_listed_file_is_named(self, origin, tmp_path):
        dest = shutil.copytree(origin.folder, tmp_path / "w")
        (dest / "tokenizer.model").unlink()
        with pytest.raises(weights.WeightsError, match="tokenizer.model is missing"):
            weights.verify(dest)


def test_hf_source_maps_to_a_pinned_snapshot_and_is_verified(test_model, tmp_path, monkeypatch):
    # No hub is reachable here: huggingface_hub's two calls are replaced by a local copy, which checks
    # what this package asks of the hub and what it does with the answer.
    import json

    import huggingface_hub

    asked = {}

    def snapshot_download(repo_id, revision, allow_patterns, local_dir):
        asked.update(repo_id=repo_id, revision=revision, allow_patterns=allow_patterns)
        shutil.copytree(test_model, local_dir, dirs_exist_ok=True)
        os.makedirs(f"{local_dir}/.cache/huggingface")
        return local_dir

    class Api:
        def model_info(self, repo, revision):
            return type("Info", (), {"sha": "f" * 40})()

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.setattr(huggingface_hub, "HfApi", Api)
    dest = fetch("hf://TheBloke/Llama-2-7B-Chat-GPTQ@gptq-4bit-128g-actorder_True", tmp_path / "w")
    assert asked["repo_id"] == "TheBloke/Llama-2-7B-Chat-GPTQ"
    assert asked["revision"] == "gptq-4bit-128g-actorder_True"
    assert "*.safetensors" in asked["allow_patterns"] and "tokenizer.json" in asked["allow_patterns"]
    assert json.loads((dest / ".source.json").read_text())["commit"] == "f" * 40
    assert not (dest / ".cache").exists()
    assert "model.safetensors" in parse_manifest((dest / "SHA256SUMS").read_text())
    weights.verify(dest)


@pytest.fixture
def archive(test_model, tmp_path):
    """The tiny model as weights.tar.gz (one folder inside, as `tar czf weights.tar.gz model/` makes it),
    served with byte ranges."""
    import tarfile

    folder = tmp_path / "served"
    folder.mkdir()
    path = folder / "weights.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        tar.add(test_model, arcname="llama-2-7b-chat")
    served = Served(folder)
    yield served, path, hashlib.sha256(path.read_bytes()).hexdigest()
    served.close()


def test_weights_from_an_archive_url_load_at_setup_and_are_reused(archive, tmp_path, monkeypatch):
    from llama_pkg.params import validate
    from llama_pkg.pipeline import Pipeline

    served, path, digest = archive
    monkeypatch.setenv("LLAMA_PKG_WEIGHTS_CACHE", str(tmp_path / "cache"))
    url = f"{served.url}weights.tar.gz#sha256={digest}"
    folder = weights.resolve(url)
    assert folder.parent == tmp_path / "cache" and (folder / "config.json").is_file()
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [folder.name]  # nothing else left
    engine = Pipeline.load(url)
    assert engine.info.folder == folder and engine.prompt_ids(validate({"prompt": "Hi"}))
    fetched = len(served.requests)
    assert weights.resolve(url) == folder and len(served.requests) == fetched  # the second start downloads nothing


def test_an_archive_cut_with_no_retries_left_is_kept_and_resumed(archive, tmp_path):
    served, path, digest = archive
    size = path.stat().st_size
    served.cut["weights.tar.gz"] = size // 3
    dest = tmp_path / "dest"
    url = f"{served.url}weights.tar.gz#sha256={digest}"
    with pytest.raises(DownloadError) as e:
        fetch(url, dest, retries=0, progress=False, chunk_size=1 << 40)  # one range: the cut ends the attempt
    assert e.value.resumable and not dest.exists()
    staging = tmp_path / ".dest.partial"
    assert staging.is_dir()
    before = len(served.requests)
    assert fetch(url, dest, retries=0, progress=False, chunk_size=1 << 40) == dest
    resumed = [r for r in served.requests[before:] if r[0] == "GET"]
    assert resumed == [("GET", "weights.tar.gz", f"bytes={size // 3}-{size - 1}")]  # from where it stopped
    assert not staging.exists() and (dest / "tokenizer.json").is_file()


def test_a_corrupt_archive_or_a_404_is_one_line(archive, tmp_path, monkeypatch):
    served, path, digest = archive
    monkeypatch.setenv("LLAMA_PKG_WEIGHTS_CACHE", str(tmp_path / "cache"))
    wrong = "0" * 64
    with pytest.raises(weights.WeightsError, match=f"weights from {served.url}weights.tar.gz: weights.tar.gz: sha256 "
                                                   f"mismatch \\(expected {wrong}"):
        weights.resolve(f"{served.url}weights.tar.gz#sha256={wrong}")
    with pytest.raises(weights.WeightsError, match="missing.tar.gz: HTTP 404"):
        weights.resolve(f"{served.url}missing.tar.gz")
    assert not (tmp_path / "cache").exists()  # neither left a folder, partial files, nor the cache folder


def test_a_hub_failure_is_one_line_and_keeps_what_it_fetched(tmp_path, monkeypatch):
    from llama_pkg import download

    def failing(repo, revision, staging):
        (staging / "model-00001-of-00002.safetensors").write_bytes(b"partial")
        raise OSError("Connection reset by peer\nTraceback-like detail on the next line")

    monkeypatch.setattr(download, "fetch_hf", failing)
    with pytest.raises(DownloadError) as e:
        fetch("hf://TheBloke/Llama-2-7B-Chat-GPTQ@main", tmp_path / "dest")
    assert str(e.value) == "hf://TheBloke/Llama-2-7B-Chat-GPTQ@main: OSError: Connection reset by peer"
    assert e.value.resumable and (tmp_path / ".dest.partial" / "model-00001-of-00002.safetensors").is_file()


def test_an_archive_reaching_out_of_its_folder_is_refused(tmp_path):
    import io
    import tarfile

    folder = tmp_path / "served"
    folder.mkdir()
    with tarfile.open(folder / "evil.tar", "w") as tar:
        data = b"owned"
        member = tarfile.TarInfo("../../outside.txt")
        member.size = len(data)
        tar.addfile(member, io.BytesIO(data))
    served = Served(folder)
    try:
        with pytest.raises(DownloadError, match="evil.tar: not a readable .tar/.tar.gz"):
            fetch(f"{served.url}evil.tar", tmp_path / "deep" / "dest", progress=False)
    finally:
        served.close()
    assert not list(tmp_path.rglob("outside.txt"))
