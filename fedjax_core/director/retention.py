"""Bounded disk use: the files of old ended experiments go, their history stays.

``settings.keep_experiments: N`` keeps the folders (code bundle, models, best model) of the
N most recently submitted experiments that ended (finished, failed or cancelled) and
removes the older ones after each experiment ends and at start-up; ``fedjax director gc``
does the same on demand. Status, metrics and events stay in the database, which grows by
kilobytes per experiment; asking for a removed experiment's model says why it is gone.
"""
from __future__ import annotations

import logging
import shutil

from fedjax_core import records as r
from fedjax_core.director.files import ExperimentFiles
from fedjax_core.director.store_api import Store

log = logging.getLogger("fedjax.director")


def collect(store: Store, files: ExperimentFiles, keep: int, source: str = "settings.keep_experiments") -> list[str]:
    """Remove the folders of ended experiments older than the newest ``keep``; returns their names. ``source``
    names where ``keep`` came from, for the log (the setting, or `fedjax director gc --keep`)."""
    if keep < 0:
        raise ValueError(f"keep must be >= 0, got {keep}")
    ended = [row.name for row in store.experiments() if row.state in r.TERMINAL_STATES]  # in submission order
    removed = []
    for name in ended[:len(ended) - keep]:
        folder = files.exp_dir(name)
        if folder.exists():
            shutil.rmtree(folder)
            removed.append(name)
            log.info("removed the files of experiment %r (%s=%d); its history stays", name, source, keep)
    return removed
