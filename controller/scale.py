"""Scale a running job's rollout workers and reward actors; the learner is not touched.

    python -m learner.scale --output runs/pocket --rollout-workers 8 --reward-actors 2
    python -m learner.scale --output runs/pocket --show

writes the wanted counts to `<output>/scale.json` (atomically). The driver of the run writing to
`<output>` reads it between iterations and about once a second while a rollout runs, and resizes:
new rollout workers pull the current adapter from the learner as they start and take tasks as soon as
they are ready (on a cluster whose autoscaler adds nodes, when their node has joined); removed ones
finish their current group first. A field left out keeps the value of the earlier request. The file
stays in the output directory, so a resumed run starts at the counts last asked for.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

SCALE_FILE = "scale.json"


class ScaleRequestError(ValueError):
    """The scale file cannot be read; the message names the file and the field."""


class ScaleRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    rollout_workers: int | None = Field(None, ge=1)
    reward_actors: int | None = Field(None, ge=1)
    requested_at: float = Field(default_factory=time.time)


def scale_file(output: str | Path) -> Path:
    return Path(output) / SCALE_FILE


def read_scale_request(output: str | Path) -> ScaleRequest | None:
    """The request in `<output>/scale.json`, or None if there is none."""
    path = scale_file(output)
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    try:
        return ScaleRequest.model_validate(json.loads(text))
    except json.JSONDecodeError as err:
        raise ScaleRequestError(f"{path} is not JSON: {err}") from None
    except ValidationError as err:
        fields = "; ".join(f"{'.'.join(map(str, e['loc'])) or '<root>'}: {e['msg']}" for e in err.errors())
        raise ScaleRequestError(f"{path}: {fields}") from None


def request_scale(output: str | Path, rollout_workers: int | None = None, reward_actors: int | None = None) -> ScaleRequest:
    """Write a scale request for the run writing to `output`; unnamed counts keep the earlier request's."""
    output = Path(output)
    if not output.is_dir():
        raise FileNotFoundError(f"no run output directory {output}")
    if rollout_workers is None and reward_actors is None:
        raise ValueError("name at least one of rollout_workers, reward_actors")
    try:
        earlier = read_scale_request(output)
    except ScaleRequestError:
        earlier = None  # a broken file is replaced by this request
    request = ScaleRequest(
        rollout_workers=rollout_workers if rollout_workers is not None else earlier and earlier.rollout_workers,
        reward_actors=reward_actors if reward_actors is not None else earlier and earlier.reward_actors,
    )
    path = scale_file(output)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(request.model_dump_json(indent=1) + "\n")
    tmp.replace(path)
    return request


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m learner.scale", description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", required=True, help="the run's output directory (as given to learner.main)")
    parser.add_argument("--rollout-workers", type=int, help="wanted number of rollout workers (>= 1)")
    parser.add_argument("--reward-actors", type=int, help="wanted number of reward actors (>= 1)")
    parser.add_argument("--show", action="store_true", help="print the current request and exit")
    args = parser.parse_args(argv)
    try:
        if args.show:
            request = read_scale_request(args.output)
            print(request.model_dump_json() if request else f"no scale request in {args.output}")
            return 0
        request = request_scale(args.output, args.rollout_workers, args.reward_actors)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"requested rollout_workers={request.rollout_workers} reward_actors={request.reward_actors} "
          f"in {scale_file(args.output)}; the driver applies it within a second or at the next iteration")
    return 0


if __name__ == "__main__":
    sys.exit(main())
