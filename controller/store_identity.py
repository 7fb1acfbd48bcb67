"""Which replay store a run's output directory belongs to: its run epoch, kept beside the run.

The first start of a run opens (or creates) the store, records its epoch in
`<output>/replay_epoch.json`, and hands every actor a store URL that names that epoch, so every
process refuses (`StoreLostError`) a store that is not this run's any more: one that lost its data
(a Redis restarted without persistence, its keys deleted) and would otherwise be recreated empty. A
resumed run (`--resume`) expects the recorded epoch in the same way.

To continue on a store that lost its data, the operator deletes `replay_epoch.json` and resumes:
the store gets a new epoch, and the applied set is rebuilt from the checkpoints' applied group ids
(the checkpoints are the record of what was applied), so no group is applied twice; the groups
queued since the newest checkpoint are produced again by the resumed iterations.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from learner.checkpoint import checkpoints_newest_first, read_checkpoint_state
from replay import ReplayStats, open_store, with_store_option

EPOCH_FILE = "replay_epoch.json"

log = logging.getLogger(__name__)


def pin_store_epoch(store_url: str, output: Path) -> tuple[str, ReplayStats]:
    """The store URL with the run's epoch in it, and the store's statistics now."""
    record = Path(output) / EPOCH_FILE
    expected = json.loads(record.read_text())["epoch"] if record.is_file() else None
    with open_store(store_url, **({"epoch": expected} if expected else {})) as store:
        if expected is None:
            applied = [g for path in checkpoints_newest_first(Path(output) / "checkpoints")
                       for g in read_checkpoint_state(path).applied_group_ids]
            restored = store.mark_applied(applied)
            if restored:
                log.warning("the replay store %r did not list %d of the %d groups this run's checkpoints applied "
                            "(a new or emptied store): they are in its applied set again", store, restored, len(applied))
        epoch, stats = store.epoch, store.stats()
    if expected is None:
        tmp = record.with_name(record.name + ".tmp")
        tmp.write_text(json.dumps({"epoch": epoch}) + "\n")
        tmp.replace(record)
    return with_store_option(store_url, "epoch", epoch), stats
