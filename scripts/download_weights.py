"""Download a model folder, verify it, and move it into place atomically.

    python scripts/download_weights.py [SOURCE] [DEST_DIR]

SOURCE  hf://owner/repo@revision (Hugging Face hub, only the files the backends need), an http(s)
        base URL serving the folder's files and a SHA256SUMS manifest (a CDN), or the http(s) URL of a
        .tar/.tar.gz of the folder (#sha256=<hex> at its end checks it).
        Default: hf://TheBloke/Llama-2-7B-Chat-GPTQ@main (GPTQ 4-bit, group size 128).
DEST    default: weights/llama-2-7b-chat

A URL download fetches large files as parallel byte ranges, resumes broken connections, retries with
backoff and checks every sha256; nothing is left at DEST unless the whole folder verified.
"""

import argparse
import sys

from llama_pkg.download import DownloadError, fetch
from llama_pkg.weights import DEFAULT_FOLDER, WeightsError

DEFAULT_SOURCE = "hf://TheBloke/Llama-2-7B-Chat-GPTQ@main"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("source", nargs="?", default=DEFAULT_SOURCE)
    ap.add_argument("dest", nargs="?", default=str(DEFAULT_FOLDER))
    ap.add_argument("--workers", type=int, default=8, help="parallel byte ranges (URL sources)")
    ap.add_argument("--retries", type=int, default=3)
    a = ap.parse_args(argv)
    options = {"workers": a.workers, "retries": a.retries} if not a.source.startswith("hf://") else {}
    try:
        print(fetch(a.source, a.dest, **options))
    except (DownloadError, WeightsError) as e:
        print(f"download failed: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
