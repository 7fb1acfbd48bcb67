"""Local-store-only behaviour: several processes on one directory, damage at rest, URL forms."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time

import pytest

import replay
from replay.local_store import LocalStore
from replay_testing import FAST, assert_same_group, group

CHILD = """
import os, sys
sys.path.insert(0, {tests!r})
import replay
from replay_testing import group
store = replay.open_store({url!r}, claim_idle_s=0.3)
for i in range(3):
    store.push(group(i))
[d] = store.pull(1, "child")
print(d.group_id, flush=True)
os._exit(0)  # dies holding a delivery it never acks
"""


def test_a_second_process_pushes_and_dies_holding_a_delivery(tmp_path):
    url = f"file://{tmp_path / 'store'}"
    script = CHILD.format(tests=str(__import__("pathlib").Path(__file__).parent), url=url)
    child = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True, timeout=120)
    assert child.returncode == 0, child.stderr
    assert child.stdout.split() == ["group-0"]
    store = replay.open_store(url, **FAST)
    assert store.stats().pending == 1
    ready = store.pull(5, "parent")
    assert [d.group_id for d in ready] == ["group-1", "group-2"]
    for d in ready:
        assert_same_group(d.group, group(int(d.group_id[-1])))
        assert store.ack(d)
    time.sleep(0.35)
    [reclaimed] = store.pull(5, "parent")
    assert reclaimed.group_id == "group-0" and reclaimed.redelivered
    assert_same_group(reclaimed.group, group(0))
    assert store.ack(reclaimed)
    s = store.stats()
    assert (s.pushed, s.acked, s.queue_length) == (3, 3, 0)


def test_damaged_file_at_rest_is_dead_lettered_with_its_bytes_kept(tmp_path):
    store = replay.open_store(tmp_path / "store", **FAST)  # a plain path works too
    entry = store.push(group(0))
    store.push(group(1))
    state = json.loads((tmp_path / "store" / "state.json").read_text())
    path = tmp_path / "store" / "entries" / state["queue"][entry]["file"]
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(data)
    assert [d.group_id for d in store.pull(5, "learner")] == ["group-1"]
    [letter] = store.dead_letters()
    assert letter["gid"] == "group-0" and "checksum" in letter["reason"]
    dead_files = [p for p in (tmp_path / "store" / "dead").iterdir() if p.suffix == ".arrow"]
    assert [p.read_bytes() for p in dead_files] == [bytes(data)]


def test_payload_file_lost_at_rest_is_dead_lettered_not_retried_forever(tmp_path):
    store = replay.open_store(tmp_path / "store", **FAST)
    entry = store.push(group(0))
    state = json.loads((tmp_path / "store" / "state.json").read_text())
    (tmp_path / "store" / "entries" / state["queue"][entry]["file"]).unlink()
    assert store.pull(5, "learner") == []
    assert "missing" in store.dead_letters()[0]["reason"]
    assert store.stats().queue_length == 0


def test_default_url_and_url_forms(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(replay.URL_ENV, raising=False)
    default = replay.open_store()
    assert isinstance(default, LocalStore) and default.root.resolve() == (tmp_path / "runs" / "replay").resolve()
    monkeypatch.setenv(replay.URL_ENV, f"file://{tmp_path / 'from-env'}")
    assert replay.open_store().root == tmp_path / "from-env"
    relative = replay.open_store("file://rel/dir?max_queue_len=3")
    assert relative.root == type(relative.root)("rel/dir") and relative.options.max_queue_len == 3
    with pytest.raises(ValueError, match="unknown replay store option.*colour"):
        replay.open_store(f"file://{tmp_path}/x?colour=blue")


def test_with_store_option_sets_one_option_on_any_url_form(tmp_path):
    plain = replay.with_store_option(str(tmp_path / "q"), "max_queue_len", 7)
    store = replay.open_store(plain)
    assert store.root == tmp_path / "q" and store.options.max_queue_len == 7
    replaced = replay.with_store_option(f"file://{tmp_path}/q?max_queue_len=3&claim_idle_s=2", "max_queue_len", 9)
    store = replay.open_store(replaced)
    assert store.options.max_queue_len == 9 and store.options.claim_idle_s == 2
    redis_url = replay.with_store_option("redis://127.0.0.1:6379/0?prefix=t:", "max_queue_len", 5)
    assert redis_url == "redis://127.0.0.1:6379/0?prefix=t%3A&max_queue_len=5"
    with pytest.raises(ValueError, match="unknown replay store option 'colour'"):
        replay.with_store_option(plain, "colour", 1)
