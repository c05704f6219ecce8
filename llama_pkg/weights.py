"""Model folders: where to find one, what kind it is, and whether it is complete enough to load."""

import json
import os
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_FOLDER = ROOT / "weights" / "llama-2-7b-chat"
DEMO_FOLDER = ROOT / "weights" / "smollm2-135m-instruct"
HOW_TO_GET = ("get Llama 2 weights with `python scripts/download_weights.py` (see weights/README.md), "
              "or prepare the demo model with `make demo`")


class WeightsError(RuntimeError):
    pass


@dataclass(frozen=True)
class ModelInfo:
    folder: Path
    config: dict
    context_length: int
    is_gptq: bool
    eos_token_ids: frozenset


def resolve(explicit=None, log=None):
    """The folder to load: explicit (setup's weights or --weights), else $COG_WEIGHTS, else the default,
    else the embedded demo model."""
    chosen = explicit or os.environ.get("COG_WEIGHTS")
    if chosen:
        folder = Path(str(chosen))
        if not (folder / "config.json").is_file():
            raise WeightsError(f"no model folder at {folder} (config.json missing); {HOW_TO_GET}")
        return folder
    if (DEFAULT_FOLDER / "config.json").is_file():
        return DEFAULT_FOLDER
    if (DEMO_FOLDER / "config.json").is_file():
        if log:
            log(f"No Llama 2 weights at {DEFAULT_FOLDER}: serving the embedded DEMO model "
                f"SmolLM2-135M-Instruct from {DEMO_FOLDER}. To serve Llama 2, {HOW_TO_GET}.")
        return DEMO_FOLDER
    raise WeightsError(f"no model folder at {DEFAULT_FOLDER} (nor the demo model at {DEMO_FOLDER}); {HOW_TO_GET}")


def inspect(folder):
    folder = Path(folder)
    for name in ("config.json", "tokenizer.json"):
        if not (folder / name).is_file():
            raise WeightsError(f"{folder / name} is missing; {HOW_TO_GET}")
    config = json.loads((folder / "config.json").read_text())
    eos = config.get("eos_token_id")
    eos_ids = frozenset(eos if isinstance(eos, list) else [] if eos is None else [eos])
    quant = config.get("quantization_config") or {}
    return ModelInfo(folder=folder, config=config, context_length=int(config.get("max_position_embeddings", 4096)),
                     is_gptq=quant.get("quant_method") == "gptq", eos_token_ids=eos_ids)
