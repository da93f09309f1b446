"""Where the director keeps an experiment's files, and the atomic ways it writes them.

Layout under ``state_dir``:
``experiments/<name>/bundle.bin`` (the opaque code bundle), ``model_round_NNNN.fjm`` (the
global model a round starts from), ``server_state_round_NNNN.fjm`` (the strategy's state
beside it), ``model_best.fjm``, ``round_NNNN/<envoy>.fjm`` (spooled updates of the round in
progress), ``spare/`` (the last round's large update files, for the next round's spools to write over);
``incoming/`` holds partial uploads and submissions.
"""
from __future__ import annotations

import errno
import os
import re
import shutil
import tempfile
import threading
import uuid
from collections.abc import Iterable, Sequence
from pathlib import Path

from fedjax_core.errors import InvalidRequestError
from fedjax_core.model_file import fsync_dir

MAX_BUNDLE_BYTES = 2 << 30
SPARE_MIN_BYTES = 1 << 20  # a smaller update file is deleted, not kept as a spare: too few pages to matter
_ROUND_FILE = re.compile(r"(?:(?:model|server_state)_)?round_(\d{4,})(?:\.fjm)?")


class ExperimentFiles:
    def __init__(self, state_dir: Path, sweep_incoming: bool = True):
        self.state_dir = Path(state_dir)
        self._spares_lock = threading.Lock()
        if sweep_incoming:  # partial uploads of a director that stopped (never while one runs)
            shutil.rmtree(self.incoming, ignore_errors=True)

    @property
    def incoming(self) -> Path:
        return self.state_dir / "incoming"

    def exp_dir(self, name: str) -> Path:
        return self.state_dir / "experiments" / name

    def model(self, name: str, round_: int) -> Path:
        return self.exp_dir(name) / f"model_round_{round_:04d}.fjm"

    def server_state(self, name: str, round_: int) -> Path:
        return self.exp_dir(name) / f"server_state_round_{round_:04d}.fjm"

    def best(self, name: str) -> Path:
        return self.exp_dir(name) / "model_best.fjm"

    def bundle(self, name: str) -> Path:
        return self.exp_dir(name) / "bundle.bin"

    def round_dir(self, name: str, round_: int) -> Path:
        return self.exp_dir(name) / f"round_{round_:04d}"

    def update(self, name: str, round_: int, envoy: str) -> Path:
        return self.round_dir(name, round_) / f"{envoy}.fjm"

    def staging_dir(self, name: str) -> Path:
        """A fresh folder for a submission, moved into place whole by :meth:`install`."""
        self.incoming.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f".{name}-", dir=self.incoming))

    def spool_path(self, envoy: str) -> Path:
        """A new name for a file being received (not made here: its writer makes it, under a name of its own
        until it is whole)."""
        self.incoming.mkdir(parents=True, exist_ok=True)
        return self.incoming / f".{envoy}-{uuid.uuid4().hex}.fjm"

    @staticmethod
    def drop_staging(staging: Path) -> None:
        shutil.rmtree(staging, ignore_errors=True)

    def install(self, staging: Path, name: str) -> None:
        target = self.exp_dir(name)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(target, ignore_errors=True)  # leftovers of a crash: the name is ours now
        os.replace(staging, target)
        fsync_dir(target.parent)

    def keep_updates(self, name: str, round_: int, spools: Sequence[tuple[str, Path]]) -> list[Path]:
        """Move spooled updates ``(envoy, spool)``, their data synced, into the round's folder for good: the
        folder synced once for all their new names."""
        paths = [self.update(name, round_, envoy) for envoy, _ in spools]
        if not paths:
            return paths
        paths[0].parent.mkdir(exist_ok=True)
        for (_, spool), path in zip(spools, paths):
            os.replace(spool, path)
        fsync_dir(paths[0].parent)
        return paths

    def copy_best(self, name: str, round_: int) -> None:
        """model_round_r -> model_best, atomically. A hard link: a model file is never changed once in place
        (writers replace files whole), so the two names can share it, and model_best outlives the round's
        name; copied only where the filesystem has no hard links."""
        tmp = self.best(name).with_suffix(".partial")
        tmp.unlink(missing_ok=True)  # left by a close that was cut off
        try:
            os.link(self.model(name, round_), tmp)
        except OSError as exc:
            if exc.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
                raise
            shutil.copyfile(self.model(name, round_), tmp)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        tmp.replace(self.best(name))
        fsync_dir(self.exp_dir(name))

    def carry_over(self, name: str, round_: int) -> None:
        """A round that did not average: round r + 1 starts from round r's model and strategy state (linked)."""
        for source, target in ((self.model(name, round_), self.model(name, round_ + 1)),
                               (self.server_state(name, round_), self.server_state(name, round_ + 1))):
            if source.exists():
                target.unlink(missing_ok=True)  # left by a close that was cut off
                os.link(source, target)
        fsync_dir(self.exp_dir(name))

    def download(self, name: str, round_: int, codec: str) -> Path:
        """Round r's model encoded under ``codec`` for compressed downloads (dropped with the round)."""
        return self.round_dir(name, round_) / f".download-{codec}.fjm"

    def sweep(self, name: str, current_round: int) -> list[Path]:
        """Remove what a crash left behind in an experiment's folder; returns what was removed.

        Partial files, and spooled rounds, models and strategy states of rounds before
        ``current_round`` (the round in progress and the best model stay).
        """
        removed = []
        folder = self.exp_dir(name)
        if not folder.is_dir():
            return removed
        for path in folder.iterdir():
            match = _ROUND_FILE.fullmatch(path.name)
            stale = path.name.endswith(".partial") or (match is not None and int(match.group(1)) < current_round)
            if stale:
                shutil.rmtree(path) if path.is_dir() else path.unlink()
                removed.append(path)
        return removed

    def drop_round(self, name: str, round_: int) -> None:
        """The spooled updates of a round that closed or was abandoned."""
        shutil.rmtree(self.round_dir(name, round_), ignore_errors=True)

    def spare_dir(self, name: str) -> Path:
        return self.exp_dir(name) / "spare"

    def retire_round(self, name: str, round_: int) -> None:
        """Drop a closed round's spooled updates, keeping those of SPARE_MIN_BYTES or more as spares that the next
        round's streamed updates write over (:meth:`take_spare`). A new file takes fresh pages in the page cache
        (each allocated, and where a VM hands freed memory back to its host, faulted in from the host again), and
        deleting one gives them up: a 256 MiB update is 65,536 pages a round. Spares the last round left unused
        are deleted, so they never hold more than one round's updates."""
        spare = self.spare_dir(name)
        with self._spares_lock:
            shutil.rmtree(spare, ignore_errors=True)
            try:  # spares only save work: whatever fails here leaves the files to be deleted, as without them
                kept = [e for e in os.scandir(self.round_dir(name, round_)) if _spare_worthy(e)]
                if kept:
                    spare.mkdir(exist_ok=True)
                for i, entry in enumerate(kept):
                    os.replace(entry.path, spare / f"{i}.fjm")
            except OSError:
                pass
        self.drop_round(name, round_)

    def take_spare(self, name: str) -> Path | None:
        """A spare of experiment ``name``, moved to a name of its own in incoming/ (only the caller has it), or None."""
        with self._spares_lock:
            try:
                entry = next(os.scandir(self.spare_dir(name)), None)
            except FileNotFoundError:
                return None
            if entry is None:
                return None
            taken = self.spool_path("spare")
            try:
                os.replace(entry.path, taken)
            except OSError:  # a new file instead
                return None
            return taken

    def drop_spares(self, name: str) -> None:
        """An ended experiment's spares."""
        with self._spares_lock:
            shutil.rmtree(self.spare_dir(name), ignore_errors=True)

    def drop_superseded(self, name: str, round_: int) -> None:
        """The model and server state a closed round started from (model_best.fjm holds a copy if needed)."""
        self.model(name, round_).unlink(missing_ok=True)
        self.server_state(name, round_).unlink(missing_ok=True)


def _spare_worthy(entry: os.DirEntry) -> bool:
    """An update file to keep as a spare: large enough, and its one name (a file with another name, as
    model_best has, must never be written over)."""
    if entry.name.startswith(".") or not entry.name.endswith(".fjm") or not entry.is_file(follow_symlinks=False):
        return False
    st = entry.stat(follow_symlinks=False)
    return st.st_size >= SPARE_MIN_BYTES and st.st_nlink == 1


def write_bundle(path: Path, pieces: Iterable[bytes]) -> int:
    size = 0
    with open(path, "wb") as f:
        for piece in pieces:
            size += len(piece)
            if size > MAX_BUNDLE_BYTES:
                raise InvalidRequestError("experiment bundle exceeds 2 GiB; keep data out of the bundle")
            f.write(piece)
    return size
