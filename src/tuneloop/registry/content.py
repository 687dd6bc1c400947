"""What may go into the artifact store: checks on the bytes of an artifact directory, not on file names.

* **Symlinks.** A link whose target resolves outside the directory (``notes.txt -> /etc/passwd``), or whose
  target does not exist, is refused. A link to a file inside the directory is followed: the store keeps a
  copy of the file it points to, under the link's name (stored artifacts contain no links); a link to a
  directory inside is not followed (its files are stored once, under their real path). Hidden entries
  (names starting with '.') are never stored, so links among them are not checked.
* **Safetensors.** Every ``*.safetensors`` file must parse: an 8-byte little-endian header length, a JSON
  header of tensors (dtype, shape, data_offsets), offsets that tile the data section exactly, and a file size
  that matches. The safetensors library then opens it as a final check.
* **Pickles, whatever the file is called.** A file starting with the pickle protocol 2-5 magic
  (``0x80`` then ``2``..``5``), a zip archive holding a ``*.pkl`` member (``torch.save``'s format, ``.npz``
  with object arrays), and a ``.npy`` array of Python objects are refused, because loading any of them can
  run arbitrary code. Text pickles (protocols 0 and 1) have no magic bytes and are caught only by their
  suffix (``.pkl``, ``.pickle``, ``.joblib``, ``.bin``, ``.pt``, ``.pth``, ``.ckpt``).
"""

from __future__ import annotations

import json
import os
import struct
import zipfile
from pathlib import Path

from tuneloop.errors import InputError

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".joblib")
MAX_SAFETENSORS_HEADER = 100 * 1024 * 1024  # the safetensors library's own limit
_NPY_MAGIC = b"\x93NUMPY"
_ZIP_MAGIC = b"PK\x03\x04"
# Bytes per element; sub-byte dtypes (F4, F6_*) and any newer ones are left to the safetensors library.
_DTYPE_SIZES = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E5M2": 1,
    "F8_E4M3": 1,
    "F8_E8M0": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
    "C64": 8,
}


def check_links(root: Path) -> None:
    """Refuse symlinks under ``root`` that point outside it or nowhere (InputError naming each one)."""
    root = Path(root)
    top = root.resolve()
    bad: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]  # hidden entries are never stored
        for name in [*dirnames, *filenames]:
            p = Path(dirpath) / name
            if name.startswith(".") or not p.is_symlink():
                continue
            rel = p.relative_to(root).as_posix()
            target = os.readlink(p)
            resolved = p.resolve()
            if not resolved.exists():
                bad.append(f"{rel} -> {target} (the target does not exist)")
            elif resolved != top and top not in resolved.parents:
                bad.append(f"{rel} -> {target} (resolves to {resolved}, outside {top})")
    if bad:
        shown = "\n".join(f"  - {b}" for b in bad[:20]) + (f"\n  ... and {len(bad) - 20} more" if len(bad) > 20 else "")
        raise InputError(
            f"artifact directory {root} has symlinks that leave it or point nowhere:\n{shown}\n"
            "A registered artifact must be self-contained: only files inside the directory are stored. Replace "
            "each link with a copy of the file (e.g. `cp -rL DIR NEWDIR`) if you trust its target, or remove it."
        )


def safetensors_problem(path: Path) -> str | None:
    """Why ``path`` is not a well-formed safetensors file, or None when it is."""
    size = path.stat().st_size
    if size < 8:
        return f"{size} bytes: too short for a safetensors header"
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n > MAX_SAFETENSORS_HEADER or n > size - 8:
            return f"header length {n} does not fit in a {size}-byte file"
        try:
            header = json.loads(f.read(n).decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as e:
            return f"the header is not JSON ({e})"
    if not isinstance(header, dict):
        return "the header is not a JSON object"
    spans = []
    for name, t in header.items():
        if name == "__metadata__":
            continue
        try:
            begin, end = t["data_offsets"]
            count = 1
            for d in t["shape"]:
                count *= int(d)
            want = _DTYPE_SIZES[t["dtype"]] * count if t["dtype"] in _DTYPE_SIZES else None
        except (KeyError, TypeError, ValueError):
            return f"tensor {name!r} has no valid dtype, shape and data_offsets"
        if not (isinstance(begin, int) and isinstance(end, int) and 0 <= begin <= end) or (
            want is not None and end - begin != want
        ):
            return f"tensor {name!r}: data_offsets {t['data_offsets']} do not hold {want} bytes of {t['dtype']}"
        spans.append((begin, end))
    pos = 0
    for begin, end in sorted(spans):
        if begin != pos:
            return f"tensor data has a gap or an overlap at byte {pos} of the data section"
        pos = end
    if pos != size - 8 - n:
        return f"the tensors cover {pos} bytes but the data section has {size - 8 - n}"
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="numpy") as st:
            list(st.keys())
    except ImportError:
        pass
    except Exception as e:  # the library's own validation, whatever it raises
        return f"the safetensors library cannot open it ({e})"
    return None


def pickle_problem(path: Path) -> str | None:
    """Why ``path`` holds (or is) a pickle, judged by its bytes; None when it does not."""
    with open(path, "rb") as f:
        head = f.read(16)
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return f"it is a pickle (protocol {head[1]} magic bytes)"
    if head.startswith(_NPY_MAGIC):
        return _npy_problem(path)
    if head.startswith(_ZIP_MAGIC):
        return _zip_problem(path)
    return None


def _npy_problem(path: Path) -> str | None:
    import numpy as np

    try:
        with open(path, "rb") as f:
            return _npy_header_problem(f, np)
    except ValueError as e:
        return f"it starts like a .npy array but its header is unreadable ({e})"


def _npy_header_problem(f, np) -> str | None:
    version = np.lib.format.read_magic(f)
    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    _, _, dtype = read(f)
    return "it is a .npy array of Python objects (loading it unpickles them)" if dtype.hasobject else None


def _zip_problem(path: Path) -> str | None:
    import numpy as np

    try:
        with zipfile.ZipFile(path) as z:
            for info in z.infolist():
                name = info.filename
                if name.endswith((".pkl", ".pickle")) or name.rsplit("/", 1)[-1] == "data.pkl":
                    return f"it is a zip archive holding a pickle ({name}; torch.save writes this format)"
                if name.endswith(".npy"):
                    with z.open(info) as member:
                        if member.read(6) == _NPY_MAGIC:
                            with z.open(info) as m2:
                                why = _npy_header_problem(m2, np)
                            if why:
                                return f"it is a zip archive whose member {name} is a .npy array of Python objects"
    except (zipfile.BadZipFile, ValueError, OSError):
        return None  # not a readable zip: then nothing can unpickle it as one either
    return None


def check_contents(root: Path) -> None:
    """Refuse a directory with malformed safetensors or pickled content (InputError naming every file)."""
    root = Path(root)
    problems = []
    for f in content_files(root):
        rel = f.relative_to(root).as_posix()
        if f.suffix.lower() == ".safetensors":
            why = safetensors_problem(f)
            if why:
                problems.append(f"{rel}: not a valid safetensors file: {why}")
            continue
        why = pickle_problem(f)
        if why:
            problems.append(f"{rel}: {why}")
        elif f.suffix.lower() in PICKLE_SUFFIXES:
            problems.append(f"{rel}: a pickle-format file by its suffix ({f.suffix})")
    if problems:
        shown = "\n".join(f"  - {p}" for p in problems[:20]) + (
            f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        )
        raise InputError(
            f"artifact directory {root} contains pickle-format or malformed weight files:\n{shown}\n"
            "tuneloop stores and loads safetensors only, because loading a pickle can run arbitrary code. Re-save "
            "the weights with save_pretrained(dir, safe_serialization=True) and remove the pickle files "
            "(training_args.bin from transformers' Trainer is not needed)"
        )


def content_files(path: Path) -> list[Path]:
    """Files of an artifact directory as the store sees them (hidden files and folders skipped)."""
    path = Path(path)
    return sorted(
        p
        for p in path.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts)
    )
