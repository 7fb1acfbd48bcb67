"""Serve any registered reward model over the plain HTTP scoring API (`http_schema.py`).

    python -m reward_service.serve --model videoalign --options '{"checkpoint_dir": "VideoReward"}' \
        --host 0.0.0.0 --port 8000 [--auth-token-env REWARD_TOKEN]

so a reward model can live on its own machines; a run then scores with
`reward.model: http, reward.options: {url: "http://reward-host:8000"}`. The model scores one
request at a time (a GPU model gains nothing from interleaving), in a worker thread, so the server
keeps answering `/health` meanwhile; run several servers for more throughput. A sample the model
cannot score comes back `null` with its reason, exactly as the in-process pool would mark it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
import time
from concurrent.futures import ThreadPoolExecutor

from aiohttp import web
from pydantic import ValidationError

from reward_service.base import RewardModel
from reward_service.http_schema import ScoreRequest, ServerInfo, decode_video, scores_response
from reward_service.registry import build_reward
from reward_service.scoring import score_isolated

log = logging.getLogger(__name__)


def make_app(model: RewardModel, *, auth_token: str | None = None, max_request_mb: float = 1024.0) -> web.Application:
    """The aiohttp application: GET /health, GET /info, POST /score."""
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="reward-model")
    info = ServerInfo(model=model.name, heads=list(model.heads))

    @web.middleware
    async def require_token(request: web.Request, handler):
        if auth_token is not None and request.path != "/health":
            if request.headers.get("Authorization") != f"Bearer {auth_token}":
                return _error(401, "missing or wrong bearer token")
        return await handler(request)

    async def health(_: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def get_info(_: web.Request) -> web.Response:
        return web.Response(text=info.model_dump_json(), content_type="application/json")

    async def score(request: web.Request) -> web.Response:
        try:
            body = ScoreRequest.model_validate_json(await request.read())
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg']}" for e in exc.errors()[:3])
            return _error(400, f"invalid score request: {problems}")
        videos = []
        for i, payload in enumerate(body.videos):
            try:
                videos.append(decode_video(payload))
            except ValueError as exc:
                return _error(400, f"videos[{i}]: {exc}")
        loop = asyncio.get_running_loop()
        started = time.monotonic()
        results = await loop.run_in_executor(executor, score_isolated, [model], videos, body.prompts, f"serve:{model.name}")
        invalid = sum(not r.valid for r in results)
        log.info("scored %d videos in %.2f s (%d invalid)", len(results), time.monotonic() - started, invalid)
        values = {h: [r.scores[h] for r in results] for h in model.heads}
        reply = scores_response(model.heads, values, [None if r.valid else r.reason for r in results])
        return web.Response(text=reply.model_dump_json(), content_type="application/json")

    async def close_executor(_: web.Application) -> None:
        executor.shutdown(wait=False, cancel_futures=True)

    app = web.Application(middlewares=[require_token], client_max_size=int(max_request_mb * 2**20))
    app.add_routes([web.get("/health", health), web.get("/info", get_info), web.post("/score", score)])
    app.on_cleanup.append(close_executor)
    return app


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


async def serve(app: web.Application, host: str, port: int, ready_line: str) -> None:
    """Run until SIGINT/SIGTERM; print `ready_line` with the bound URL once listening."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    bound_host, bound_port = runner.addresses[0][:2]
    print(ready_line.format(url=f"http://{bound_host}:{bound_port}"), flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m reward_service.serve", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="registered reward name (e.g. pocket, videoalign) or pkg.module:name")
    parser.add_argument("--options", default="{}", help="the model's options as a JSON object")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000, help="0 picks a free port (printed)")
    parser.add_argument("--auth-token-env", default=None, help="require `Authorization: Bearer $VAR` on /info and /score")
    parser.add_argument("--max-request-mb", type=float, default=1024.0, help="largest request body accepted")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        options = json.loads(args.options)
    except json.JSONDecodeError as exc:
        parser.error(f"--options is not valid JSON: {exc}")
    if not isinstance(options, dict):
        parser.error(f"--options must be a JSON object, got {type(options).__name__}")
    token = None
    if args.auth_token_env:
        token = os.environ.get(args.auth_token_env)
        if not token:
            parser.error(f"--auth-token-env names {args.auth_token_env!r}, but that environment variable is unset or empty")
    model = build_reward(args.model, **options)
    app = make_app(model, auth_token=token, max_request_mb=args.max_request_mb)
    ready = f"serving reward {model.name!r} (heads {', '.join(model.heads)}) on {{url}}"
    asyncio.run(serve(app, args.host, args.port, ready))
    sys.exit(0)


if __name__ == "__main__":
    main()
