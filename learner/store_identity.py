"""Which replay store a run's output directory belongs to: its run epoch, kept beside the run.

The first start of a run opens (or creates) the store, records its epoch in
`<output>/replay_epoch.json`, and hands every actor a store URL that names that epoch, so every
process refuses (`StoreLostError`) a store that is not this run's any more: one that lost its data
(a Redis restarted without persistence, its keys deleted) and would otherwise be recreated empty. A
resumed run (`--resume`) expects the recorded epoch in the same way.
"""

from __future__ import annotations

import json
from pathlib import Path

from replay import ReplayStats, open_store, with_store_option

EPOCH_FILE = "replay_epoch.json"


def pin_store_epoch(store_url: str, output: Path) -> tuple[str, ReplayStats]:
    """The store URL with the run's epoch in it, and the store's statistics now."""
    record = Path(output) / EPOCH_FILE
    expected = json.loads(record.read_text())["epoch"] if record.is_file() else None
    with open_store(store_url, **({"epoch": expected} if expected else {})) as store:
        epoch, stats = store.epoch, store.stats()
    if expected is None:
        tmp = record.with_name(record.name + ".tmp")
        tmp.write_text(json.dumps({"epoch": epoch}) + "\n")
        tmp.replace(record)
    return with_store_option(store_url, "epoch", epoch), stats
