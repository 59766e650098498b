"""The serving limit without Serve: one uvicorn + FastAPI process doing what a ce-ray replica does
(multipart decode -> plan -> batched generator forward in a thread -> PNG encode), with the same
batching knobs (an asyncio queue: up to --max-batch-size requests, waiting at most --batch-wait-ms
after the first). bench/serve_load.py starts it beside the Serve apps and measures both in the same
run, so "Serve's overhead" is a ratio against this, not a guess.

    python bench/plain_server.py --model CKPT --port 8123 [--max-batch-size 8 --batch-wait-ms 5 --threads 1]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import time
from pathlib import Path

# Module level, not inside build(): with postponed annotations FastAPI resolves `request: Request`
# in this module's globals, and a name imported inside build() made it a required query parameter.
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def build(model: str, max_batch_size: int, batch_wait_ms: float, threads: int):
    import torch

    from ce_ray.data.images import decode_rgb, encode_png
    from ce_ray.errors import InpaintError
    from ce_ray.infer.planner import inpaint_many, plan
    from ce_ray.infer.resolve import load_generator

    torch.set_num_threads(threads)
    loaded = load_generator(model, "cpu")
    queue: asyncio.Queue = asyncio.Queue()

    async def batcher() -> None:
        while True:
            items = [await queue.get()]
            deadline = time.perf_counter() + batch_wait_ms / 1000
            while len(items) < max_batch_size:
                left = deadline - time.perf_counter()
                if left <= 0:
                    break
                try:
                    items.append(await asyncio.wait_for(queue.get(), left))
                except TimeoutError:
                    break
            try:
                results = await asyncio.to_thread(inpaint_many, loaded, [p for p, _ in items])
                for (_, fut), r in zip(items, results):
                    fut.set_result((r, len(items)))
            except Exception as e:  # a bug: fail this batch's requests, keep serving
                for _, fut in items:
                    fut.set_exception(e)

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        task = asyncio.get_running_loop().create_task(batcher())
        yield
        task.cancel()

    app = FastAPI(lifespan=lifespan)

    @app.post("/v1/inpaint")
    async def inpaint(request: Request) -> Response:
        form = await request.form()
        data = await form["image"].read()
        try:
            p = plan(loaded, decode_rgb(data))
        except InpaintError as e:
            return JSONResponse({"error": e.code, "detail": str(e)}, status_code=400)
        fut = asyncio.get_running_loop().create_future()
        await queue.put((p, fut))
        out, batch = await fut
        return Response(content=encode_png(out), media_type="image/png", headers={"X-Ce-Ray-Batch": str(batch)})

    @app.get("/healthz")
    async def healthz() -> dict:
        return {"status": "ok"}

    return app


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--max-batch-size", type=int, default=8)
    ap.add_argument("--batch-wait-ms", type=float, default=5.0)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    import uvicorn

    uvicorn.run(
        build(args.model, args.max_batch_size, args.batch_wait_ms, args.threads),
        host="127.0.0.1",
        port=args.port,
        log_level="warning",
        access_log=False,
    )


if __name__ == "__main__":
    main()
