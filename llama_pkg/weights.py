"""Model folders: where to find one, what kind it is, and whether it is complete enough to load."""

import hashlib
import json
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from . import settings

# Relative to the working directory, the project's folder (Cog's /src in the image), never to where the
# package is installed.
DEFAULT_FOLDER = Path("weights") / "llama-2-7b-chat"
DEMO_FOLDER = Path("weights") / "smollm2-135m-instruct"
HOW_TO_GET = ("give the model one of three ways: put Llama 2 weights at weights/llama-2-7b-chat "
              "(`python scripts/download_weights.py`, see weights/README.md); or name a model folder with "
              "--weights, setup(weights=...) or COG_WEIGHTS; or ask for the demo model by name: `make demo`, "
              "or --weights weights/smollm2-135m-instruct")


class WeightsError(RuntimeError):
    pass


@dataclass(frozen=True)
class ModelInfo:
    folder: Path
    config: dict
    context_length: int
    is_gptq: bool
    eos_token_ids: frozenset


def resolve(explicit=None):
    """The folder to load: explicit (setup's weights or --weights), else $COG_WEIGHTS, else the default.
    Never another model than asked for: without Llama 2 weights nothing is served (the demo model is
    loaded only when named), and the error says the three ways to give one."""
    chosen = explicit or settings.get("COG_WEIGHTS")
    if chosen and re.match(r"https?://", str(chosen)):
        from .download import DownloadError, cached

        try:
            return cached(str(chosen), settings.get("LLAMA_PKG_WEIGHTS_CACHE"))
        except DownloadError as e:
            raise WeightsError(f"weights from {str(chosen).split('#')[0]}: {e}") from None
    if chosen:
        folder = Path(str(chosen))
        refuse_other_formats(folder)
        if not (folder / "config.json").is_file():
            where = "" if folder.is_absolute() else f" (relative to the working directory, {Path.cwd()})"
            raise WeightsError(f"no model folder at {folder}{where}: config.json missing; {HOW_TO_GET}")
        return folder
    if (DEFAULT_FOLDER / "config.json").is_file():
        return DEFAULT_FOLDER
    raise WeightsError(f"no model folder at {DEFAULT_FOLDER} and none named; {HOW_TO_GET}")


SUPPORTED = ("this package runs Llama-architecture Hugging Face folders: GPTQ 4-bit (the Llama 2 default, "
             "`python scripts/download_weights.py`) or unquantized fp16/bf16/fp32 safetensors")


def refuse_other_formats(path):
    """A model in a format this package does not load is named as such, not reported as a missing file."""
    files = [path] if path.is_file() else sorted(path.glob("*")) if path.is_dir() else []
    if any(f.suffix == ".gguf" for f in files) and not (path / "config.json").is_file():
        raise WeightsError(f"{path} is a GGUF model (llama.cpp's format), which this package does not load; {SUPPORTED}")
    if any(f.name.startswith("consolidated.") and f.suffix == ".pth" for f in files):
        raise WeightsError(f"{path} is Meta's original checkpoint (consolidated.*.pth): convert it to a Hugging Face "
                           f"folder (transformers' convert_llama_weights_to_hf) first; {SUPPORTED}")


def inspect(folder):
    folder = Path(folder)
    for name in ("config.json", "tokenizer.json"):
        if not (folder / name).is_file():
            raise WeightsError(f"{folder / name} is missing; {HOW_TO_GET}")
    config = read_config(folder / "config.json")
    eos = config.get("eos_token_id")
    eos_ids = frozenset(eos if isinstance(eos, list) else [] if eos is None else [eos])
    quant = config.get("quantization_config") or {}
    method = quant.get("quant_method")
    if method not in (None, "gptq"):
        raise WeightsError(f"{folder / 'config.json'}: quantization_config.quant_method {method!r} is not supported; "
                           f"{SUPPORTED}")
    if method == "gptq" and quant.get("bits", 4) != 4:
        raise WeightsError(f"{folder / 'config.json'}: {quant.get('bits')}-bit GPTQ is not supported, only 4-bit; "
                           f"{SUPPORTED}")
    return ModelInfo(folder=folder, config=config, context_length=int(config.get("max_position_embeddings", 4096)),
                     is_gptq=quant.get("quant_method") == "gptq", eos_token_ids=eos_ids)


SHAPE_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
OPTIONAL_COUNTS = ("num_key_value_heads", "head_dim", "max_position_embeddings")


def read_config(path):
    """config.json, checked for what loading a Llama reads from it: one WeightsError naming the file."""
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise WeightsError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise WeightsError(f"{path} must be a JSON object, not a {type(config).__name__}")

    def count(name):
        value = config.get(name)
        return isinstance(value, int) and not isinstance(value, bool) and value > 0

    for name in SHAPE_FIELDS:
        if not count(name):
            raise WeightsError(f"{path}: {name} must be a positive integer, got {config.get(name)!r}")
    for name in OPTIONAL_COUNTS:
        if config.get(name) is not None and not count(name):
            raise WeightsError(f"{path}: {name} must be a positive integer, got {config[name]!r}")
    for name in ("rms_norm_eps", "rope_theta"):
        value = config.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0):
            raise WeightsError(f"{path}: {name} must be a positive number, got {value!r}")
    eos = config.get("eos_token_id")
    ids = eos if isinstance(eos, list) else [] if eos is None else [eos]
    if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
        raise WeightsError(f"{path}: eos_token_id must be a token id or a list of them, got {eos!r}")
    for name in ("quantization_config", "rope_scaling", "rope_parameters"):
        if config.get(name) is not None and not isinstance(config[name], dict):
            raise WeightsError(f"{path}: {name} must be a JSON object, got {config[name]!r}")
    return config


def _tensor_files(folder):
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [folder / n for n in names]
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise WeightsError(f"{folder}: no *.safetensors file; {HOW_TO_GET}")
    return files


def _check_safetensors_size(path):
    """The header says how long the file must be: a truncated download is caught without reading it."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise WeightsError(f"{path} is truncated ({size} bytes)")
        n = struct.unpack("<Q", head)[0]
        if n > size - 8:
            raise WeightsError(f"{path} is truncated or not safetensors (header of {n} bytes, file of {size})")
        try:
            header = json.loads(f.read(n))
        except ValueError:
            raise WeightsError(f"{path} has a corrupt safetensors header") from None
    end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    if size != 8 + n + end:
        raise WeightsError(f"{path} is {size} bytes, its header says {8 + n + end}: truncated or corrupt")
    if any(k.endswith(".q_weight") for k in header):
        raise WeightsError(f"{path} holds EXL2 tensors (ExLlamaV2's own quantization), which this package does not "
                           f"load; {SUPPORTED}")


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(8 << 20):
            h.update(block)
    return h.hexdigest()


def parse_manifest(text):
    """`sha256sum` output -> {relative name: sha256}; names that could leave the folder are refused."""
    entries = {}
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        m = re.fullmatch(r"([0-9a-fA-F]{64}) [ *](.+)", line.rstrip("\r"))
        if not m:
            raise WeightsError(f"SHA256SUMS line {n} is not '<sha256>  <file name>': {line[:80]!r}")
        entries[safe_name(m.group(2))] = m.group(1).lower()
    if not entries:
        raise WeightsError("SHA256SUMS lists no files")
    return entries


def safe_name(name):
    path = PurePosixPath(name)
    if "\\" in name or path.is_absolute() or any(p in ("..", "") for p in path.parts) or name.startswith("~"):
        raise WeightsError(f"refusing file name {name!r}: it would leave the weights folder")
    return str(path)


def verify(folder):
    """Check a folder before loading it; one WeightsError naming the missing or bad file.

    config.json and tokenizer.json, every tensor file the index lists (or at least one), each file's
    size against its safetensors header, and, when SHA256SUMS is present, every listed file's sha256.
    Hashing gigabytes takes seconds, so a stamp (.verified.json: size and mtime of each file) records a
    passed check, and the hashes are computed again only when a file changed.
    """
    folder = Path(folder)
    info = inspect(folder)
    for path in [folder / "config.json", folder / "tokenizer.json", *_tensor_files(folder)]:
        if path.is_file() and not os.access(path, os.R_OK):  # a container's user, and a mount's owner
            raise WeightsError(f"{path} cannot be read by this process (uid {os.getuid()}): make the weights "
                               "folder readable to it (chmod -R a+rX)")
    for path in _tensor_files(folder):
        if not path.is_file():
            raise WeightsError(f"{path} is missing (listed in model.safetensors.index.json)")
        _check_safetensors_size(path)
    manifest = folder / "SHA256SUMS"
    if manifest.is_file():
        entries = parse_manifest(manifest.read_text())
        stats = {}
        for name, digest in entries.items():
            path = folder / name
            if not path.is_file():
                raise WeightsError(f"{path} is missing (listed in SHA256SUMS)")
            st = path.stat()
            stats[name] = [st.st_size, st.st_mtime_ns, digest]
        stamp = folder / ".verified.json"
        if not (stamp.is_file() and json.loads(stamp.read_text()) == stats):
            for name, digest in entries.items():
                if sha256_file(folder / name) != digest:
                    raise WeightsError(f"{folder / name} does not match its sha256 in SHA256SUMS: corrupt")
            try:
                stamp.write_text(json.dumps(stats))
            except OSError:
                pass  # a read-only weights mount: verified again next start
    return info
