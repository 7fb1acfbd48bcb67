"""The scale request file and its command.

Scaling a run while it goes on (the learner untouched, a worker waiting for a node that then joins
the cluster) is part of the drilled run in tests/faults/test_drilled_run.py, which shares its
multi-node cluster with the fault drills.
"""

from __future__ import annotations

import json

import pytest

from controller.scale import SCALE_FILE, ScaleRequestError, main as scale_main, read_scale_request, request_scale


def test_scale_request_keeps_counts_not_named_again(tmp_path):
    assert read_scale_request(tmp_path) is None
    first = request_scale(tmp_path, rollout_workers=4)
    assert (first.rollout_workers, first.reward_actors) == (4, None)
    second = request_scale(tmp_path, reward_actors=2)
    assert (second.rollout_workers, second.reward_actors) == (4, 2)
    on_disk = read_scale_request(tmp_path)
    assert (on_disk.rollout_workers, on_disk.reward_actors) == (4, 2)
    assert not list(tmp_path.glob("*.tmp"))  # written atomically


def test_scale_command_validates_and_shows(tmp_path, capsys):
    assert scale_main(["--output", str(tmp_path), "--rollout-workers", "3"]) == 0
    assert json.loads((tmp_path / SCALE_FILE).read_text())["rollout_workers"] == 3
    assert scale_main(["--output", str(tmp_path), "--rollout-workers", "0"]) == 2
    assert "rollout_workers" in capsys.readouterr().err
    assert read_scale_request(tmp_path).rollout_workers == 3  # a refused request changes nothing
    assert scale_main(["--output", str(tmp_path / "missing"), "--reward-actors", "2"]) == 2
    assert scale_main(["--output", str(tmp_path)]) == 2  # nothing asked for
    assert scale_main(["--output", str(tmp_path), "--show"]) == 0
    assert '"rollout_workers":3' in capsys.readouterr().out


def test_broken_scale_file_names_the_file_and_field(tmp_path):
    (tmp_path / SCALE_FILE).write_text('{"rollout_workers": "many"}')
    with pytest.raises(ScaleRequestError, match=r"scale\.json: rollout_workers"):
        read_scale_request(tmp_path)
    (tmp_path / SCALE_FILE).write_text("{not json")
    with pytest.raises(ScaleRequestError, match="not JSON"):
        read_scale_request(tmp_path)
