"""Finding a stage's artifact from what a user types: its id (or a unique prefix) in a store, or
the artifact's own folder (`<store>/artifacts/<stage>/<id>`, whose store is three levels up)."""

from __future__ import annotations

import os
from pathlib import Path

from tasks.store import MANIFEST_NAME, Manifest, Store

DEFAULT_STORE = "store"


def default_store() -> Path:
    """The store the CLI uses when none is given: $TOK1D_STORE, else ./store."""
    return Path(os.environ.get("TOK1D_STORE", DEFAULT_STORE)).expanduser()


def artifact_folder_store(folder: Path) -> Store | None:
    """The store holding `folder` when it is an artifact folder (`<store>/artifacts/<stage>/<id>`
    with a manifest), else None."""
    folder = folder.expanduser().resolve()
    if (folder / MANIFEST_NAME).is_file() and folder.parent.parent.name == "artifacts":
        return Store(folder.parents[2])
    return None


def find_artifact(source: str | Path, stage: str, store: str | Path | Store | None = None) -> tuple[Manifest, Store]:
    """The manifest and store of `stage`'s artifact `source`: an artifact folder, or an id (a unique
    prefix will do) in `store` (default: `default_store()`). Its files are checked against the
    manifest's hashes, so an altered artifact fails here, not later with odd numbers."""
    path = Path(source).expanduser()
    folder_store = artifact_folder_store(path) if path.is_dir() else None
    if folder_store is not None:
        manifest = Store.read_manifest_in(path.resolve())
        assert manifest is not None
        store = folder_store
    else:
        store = store if isinstance(store, Store) else _existing_store(Path(store) if store else default_store())
        manifest = _manifest_by_id(str(source), stage, store)
    if manifest.stage != stage:
        raise ValueError(f"{source} is a {manifest.stage} artifact; expected a {stage} artifact")
    problems = manifest.problems(store)
    if problems:
        raise ValueError(f"{stage}/{manifest.artifact_id} is damaged ({problems[0]}); `tok1d verify` lists every "
                         "problem, rerun the stage to rebuild it")
    return manifest, store


def _existing_store(root: Path) -> Store:
    if not (root / "artifacts").is_dir():
        raise FileNotFoundError(f"no tok1d store at {root.resolve()} (no artifacts/ folder); pass store= or --store, "
                                "or set TOK1D_STORE")
    return Store(root)


def _manifest_by_id(artifact_id: str, stage: str, store: Store) -> Manifest:
    folder = store.root / "artifacts" / stage
    if not artifact_id or any(c in artifact_id for c in "/\\"):
        raise FileNotFoundError(f"{artifact_id!r} is neither an artifact folder nor a {stage} artifact id")
    matches = sorted(p for p in folder.glob(f"{artifact_id}*") if (p / MANIFEST_NAME).is_file()) if folder.is_dir() else []
    if not matches:
        raise FileNotFoundError(f"no {stage} artifact {artifact_id!r} in the store {store.root}; "
                                f"`tok1d status --store {store.root}` lists what it holds")
    if len(matches) > 1:
        raise ValueError(f"{artifact_id!r} names {len(matches)} {stage} artifacts in {store.root}; give more of the id")
    manifest = Store.read_manifest_in(matches[0])
    assert manifest is not None
    return manifest


def latest_artifact(stage: str, store: str | Path | Store | None = None) -> str:
    """The id of `stage`'s newest artifact in `store` (by the time its manifest was created)."""
    store = store if isinstance(store, Store) else _existing_store(Path(store) if store else default_store())
    manifests = [m for m in (Store.read_manifest_in(p) for p in (store.root / "artifacts" / stage).glob("*")) if m]
    if not manifests:
        raise FileNotFoundError(f"the store {store.root} holds no {stage} artifact; run the pipeline first")
    return max(manifests, key=lambda m: (m.created_at, m.artifact_id)).artifact_id
