"""Model store: shipped models plus a per-user models folder with a JSON index.

A model is a ``.safetensors`` file with a JSON *card* beside it (same stem, ``.json``), as the
core's ``dualnet.modelfile.save_model`` writes. Shipped models live in ``dualnet/weights`` (read
only); imported or trained models are copied into the user folder and listed in
``models.json`` there. Nothing here loads torch: the card is read as JSON only, and the core
checks the weights when it loads them.
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

INDEX_NAME = "models.json"
INDEX_VERSION = 1
MODEL_SUFFIX = ".safetensors"


def default_user_models_dir() -> Path:
    """``$DUALNET_MODELS_DIR``, else the platform's per-user data folder ``.../DualNet/models``."""
    env = os.environ.get("DUALNET_MODELS_DIR")
    if env:
        return Path(env)
    home = Path.home()
    if sys.platform.startswith("win"):
        base = Path(os.environ.get("APPDATA", home / "AppData" / "Roaming"))
    elif sys.platform == "darwin":
        base = home / "Library" / "Application Support"
    else:
        base = Path(os.environ.get("XDG_DATA_HOME", home / ".local" / "share"))
    return base / "DualNet" / "models"


def shipped_models_dir() -> Path:
    """The core's weights folder (``dualnet/weights`` beside this Lib)."""
    return Path(__file__).resolve().parents[1] / "dualnet" / "weights"


def card_path(model_path: Path) -> Path:
    return Path(model_path).with_suffix(".json")


def read_card(model_path: Path) -> Dict:
    """The JSON card beside a model file ({} when missing or unreadable)."""
    p = card_path(model_path)
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError, RecursionError):
        return {}


def _modality(value) -> Optional[str]:
    """A card's or an index entry's modality if it is one this DualNet knows, else None."""
    from dualnet.modality import MODALITIES

    return value if value in MODALITIES else None


@dataclass
class ModelEntry:
    name: str
    path: str
    modality: Optional[str] = None
    shipped: bool = False
    added: Optional[str] = None
    source: Optional[str] = None
    card: Dict = field(default_factory=dict)

    @property
    def label(self) -> str:
        tag = "shipped" if self.shipped else "user"
        mod = f", {self.modality.upper()}" if self.modality else ""
        return f"{self.name} ({tag}{mod})"


class ModelStore:
    """Shipped models plus a per-user folder.

    Args:
        user_dir: per-user models folder (created on first write).
        shipped_dir: read-only folder with shipped models and cards.
    """

    def __init__(self, user_dir: Optional[Path] = None, shipped_dir: Optional[Path] = None) -> None:
        self.user_dir = Path(user_dir) if user_dir is not None else default_user_models_dir()
        self.shipped_dir = Path(shipped_dir) if shipped_dir is not None else shipped_models_dir()

    # -- index ---------------------------------------------------------------------------
    @property
    def index_path(self) -> Path:
        return self.user_dir / INDEX_NAME

    def _read_index(self) -> List[dict]:
        try:
            data = json.loads(self.index_path.read_text(encoding="utf-8"))
        except (OSError, ValueError, RecursionError):
            return []
        models = data.get("models", []) if isinstance(data, dict) else []
        if not isinstance(models, list):
            return []  # an index edited by hand: one bad entry must not break the whole list
        return [m for m in models if isinstance(m, dict) and isinstance(m.get("name"), str)
                and isinstance(m.get("path"), str) and m["path"]]

    def _write_index(self, models: List[dict]) -> None:
        self.user_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.index_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps({"version": INDEX_VERSION, "models": models}, indent=1), encoding="utf-8")
        os.replace(tmp, self.index_path)

    # -- queries -------------------------------------------------------------------------
    def shipped_models(self) -> List[ModelEntry]:
        if not self.shipped_dir.is_dir():
            return []
        out = []
        for f in sorted(self.shipped_dir.glob("*" + MODEL_SUFFIX)):
            card = read_card(f)
            name = card.get("name") if isinstance(card.get("name"), str) else f.stem
            out.append(ModelEntry(name, str(f), _modality(card.get("modality")), True, None, "shipped", card))
        return out

    def user_models(self) -> List[ModelEntry]:
        out = []
        for m in self._read_index():
            path = Path(m["path"])
            if not path.is_absolute():
                path = self.user_dir / path
            if not path.exists():
                continue  # deleted behind our back: hide it, keep the index as is
            card = read_card(path)
            out.append(ModelEntry(m["name"], str(path), _modality(m.get("modality")) or _modality(card.get("modality")),
                                  False, m.get("added"), m.get("source"), card))
        return out

    def list_models(self, modality: Optional[str] = None) -> List[ModelEntry]:
        """Shipped then user models, optionally only those for ``modality`` (or without one)."""
        models = self.shipped_models() + self.user_models()
        if modality:
            models = [m for m in models if not m.modality or m.modality == modality]
        return models

    def find(self, name: str) -> Optional[ModelEntry]:
        return next((m for m in self.list_models() if m.name == name), None)

    # -- changes -------------------------------------------------------------------------
    def import_model(self, model_path, name: Optional[str] = None, *, copy: bool = True, source: str = "imported") -> ModelEntry:
        """Add a model (and its card) to the user folder and the index.

        Raises:
            FileNotFoundError: the model file or its JSON card is missing.
            ValueError: the file is not a ``.safetensors`` model or the name is taken.
        """
        src = Path(model_path)
        if src.suffix != MODEL_SUFFIX:
            raise ValueError(f"{src}: not a {MODEL_SUFFIX} model file")
        if not src.is_file():
            raise FileNotFoundError(f"{src}: no such model file")
        if not card_path(src).is_file():
            raise FileNotFoundError(f"{card_path(src)}: model card missing (the .json beside the weights)")
        card = read_card(src)
        name = name or card.get("name") or src.stem
        if self.find(name) is not None:
            raise ValueError(f"a model named '{name}' already exists; choose another name")
        self.user_dir.mkdir(parents=True, exist_ok=True)
        if copy and src.resolve().parent != self.user_dir.resolve():
            dst = self.user_dir / f"{model_file_stem(name)}{MODEL_SUFFIX}"
            self.check_free(dst)
            self._copy_with_graphs(src, dst, card)
        else:
            dst = src
            owner = self._entry_using(dst)
            if owner is not None:
                raise ValueError(f"{dst.name} is already the file of the model '{owner}'")
        entry = ModelEntry(name, str(dst), _modality(card.get("modality")), False,
                           datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), source, card)
        models = self._read_index()
        rec = {k: v for k, v in asdict(entry).items() if k not in ("card", "shipped")}
        try:
            rec["path"] = str(Path(dst).resolve().relative_to(self.user_dir.resolve()))
        except ValueError:
            pass
        models.append(rec)
        self._write_index(models)
        return entry

    def _copy_with_graphs(self, src: Path, dst: Path, card: Dict) -> None:
        """Copy a model's ONNX graphs (named after ``dst``), its card (naming them) and its weights, in
        that order: weights without a card are hidden, a card without its graphs warns on every load."""
        from dualnet.io import atomic_write_bytes

        copied = {}
        for kind, file in _graph_files(card, kinds=True):
            if not (src.parent / file).is_file():
                continue  # the core warns when it loads the card
            target = dst.with_name(f"{dst.stem}.onnx" if kind == "forward" else f"{dst.stem}.{kind}.onnx")
            if target.exists():
                raise ValueError(f"{target.name} is already in the models folder {self.user_dir}; choose another name")
            copied[kind] = (src.parent / file, target)
        for a, b in copied.values():
            _atomic_copy(a, b)
        if isinstance(card.get("onnx"), dict):  # the copy's card names the copied graphs (SHA-256 unchanged)
            new = json.loads(json.dumps(card))
            if copied:
                new["onnx"]["graphs"] = {kind: dict(new["onnx"]["graphs"][kind], file=target.name)
                                         for kind, (_, target) in copied.items()}
            else:  # no graph beside the source: the copy runs in PyTorch, as its source does
                new.pop("onnx")
            atomic_write_bytes(card_path(dst), (json.dumps(new, indent=1) + "\n").encode("utf-8"))
        else:
            _atomic_copy(card_path(src), card_path(dst))
        _atomic_copy(src, dst)

    def check_free(self, dst: Path) -> None:
        """Refuse a model file (or card) that exists or that an index entry uses: two names can
        map to one file (``my model`` and ``my_model``), and the second import replaced the first."""
        used = {str((self.user_dir / m["path"]).resolve()).lower() for m in self._read_index()}
        for f in (dst, card_path(dst)):
            if f.exists() or str(f.resolve()).lower() in used:
                raise ValueError(f"{f.name} is already in the models folder {self.user_dir}; choose another name")

    def remove_model(self, name: str, delete_files: bool = True) -> bool:
        """Remove a user model from the index (and its files when they are in the user folder)."""
        models = self._read_index()
        keep = [m for m in models if m["name"] != name]
        if len(keep) == len(models):
            return False
        if delete_files:
            still_used = {self._resolve(m["path"]) for m in keep}
            for m in models:
                path = self._resolve(m["path"])
                if m["name"] == name and path.parent == self.user_dir.resolve() and path not in still_used:
                    others = {g for k in keep for g in _graph_files(read_card(self._resolve(k["path"])))}
                    names = [g for g in _graph_files(read_card(path)) if g not in others]
                    for f in [path.parent / n for n in names if Path(n).name == n] + [path, card_path(path)]:
                        if f.exists():
                            f.unlink()
                    run = path.with_name(f"{path.stem}_run")  # its training run (DualNetTraining), if any
                    if run.is_dir():
                        shutil.rmtree(run, ignore_errors=True)
        self._write_index(keep)
        return True

    def _resolve(self, path: str) -> Path:
        p = Path(path)
        return (p if p.is_absolute() else self.user_dir / p).resolve()

    def _entry_using(self, path: Path) -> Optional[str]:
        """The name of the index entry whose file is ``path``, if any."""
        target = Path(path).resolve()
        return next((m["name"] for m in self._read_index() if self._resolve(m["path"]) == target), None)

    def clear_user_models(self) -> int:
        """Remove every user model; returns how many were removed. Shipped models stay."""
        names = [m["name"] for m in self._read_index()]
        for n in names:
            self.remove_model(n)
        return len(names)


#: File stems a model may not take in the user folder: the index is ``models.json``.
RESERVED_STEMS = (Path(INDEX_NAME).stem,)


def model_file_stem(name: str) -> str:
    """The file stem of a model called ``name`` in the user folder (letters, digits, ``- _ .``).

    Raises:
        ValueError: nothing usable is left of the name, or it would be the index's own file name.
    """
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in str(name)).strip("._")
    if not safe:
        raise ValueError("choose a model name (letters, digits, - _ .)")
    if safe.lower() in RESERVED_STEMS:
        raise ValueError(f"the name '{name}' is reserved (the models index is {INDEX_NAME}); choose another name")
    return safe


def _graph_files(card: Dict, kinds: bool = False) -> list:
    """The ONNX graph file names a card lists (plain names beside its weights), or (kind, name) pairs."""
    onnx = card.get("onnx")
    graphs = onnx.get("graphs") if isinstance(onnx, dict) else None
    pairs = [(k, g["file"]) for k, g in (graphs.items() if isinstance(graphs, dict) else [])
             if isinstance(g, dict) and isinstance(g.get("file"), str) and Path(g["file"]).name == g["file"]
             and g["file"].endswith(".onnx")]
    return pairs if kinds else [name for _, name in pairs]


def _atomic_copy(src: Path, dst: Path) -> None:
    """Copy ``src`` to ``dst`` through the core's temporary file beside it and a rename."""
    from dualnet.io import atomic_path

    with atomic_path(dst) as tmp:
        shutil.copy2(src, tmp)
