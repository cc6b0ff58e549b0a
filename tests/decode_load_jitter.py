"""How much one client's large images disturb another call's outbound audio.

    PYTHONPATH=. python tests/decode_load_jitter.py [--images 20] [--seconds 8]

One WebRTC call plays a long reply while, in the same server, a WebSocket client in another
process sends `--images` large JPEGs (3000x2000 noise, ~7 MB of base64 each) as fast as it
can. Reported:
the call's reply-frame arrival jitter (|inter-arrival - 20 ms|, p95 and max) with no load,
with the load (decoding off the event loop, as served), and with the load decoded inline on
the event loop (what the server did before), for comparison. A measurement, not a test:
timings depend on the machine, so nothing is asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import sys
from functools import partial
from typing import Any

import numpy as np
from fake_engine import fake_engine
from PIL import Image
from realtime_helpers import API_KEY, running_server
from websockets.sync.client import connect

import omni.session.session as session_module
from omni.bench.calls import CallClient, _jitter_ms


def noise_jpeg(width: int = 3000, height: int = 2000) -> str:
    pixels = np.random.default_rng(0).integers(0, 256, (height, width, 3), np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="JPEG", quality=90)
    return "data:image/jpeg;base64," + base64.b64encode(out.getvalue()).decode()


def send_images(port: int, count: int) -> None:
    """The load, run in its own process so its own work is not on the measured loop."""
    image = noise_jpeg()
    url = f"ws://127.0.0.1:{port}/v1/realtime"
    headers = {"Authorization": f"Bearer {API_KEY}"}
    item = {"type": "message", "role": "user",
            "content": [{"type": "input_image", "image_url": image}]}
    with connect(url, additional_headers=headers, max_size=None) as ws:
        ws.recv()
        for _ in range(count):
            ws.send(json.dumps({"type": "conversation.item.create", "item": item}))
        done = 0
        while done < count:  # each image answered (an item, or an error once the turn is full)
            event = json.loads(ws.recv())
            done += event["type"] in ("conversation.item.done", "error")


async def measure(images: int, seconds: float) -> tuple[float, float]:
    engine = partial(fake_engine, filler_tokens=6000)  # a reply far longer than the window
    async with running_server(engine, max_turn_input_bytes=2**30) as server:
        call = CallClient(f"http://127.0.0.1:{server.port}", API_KEY)
        assert (await call.connect()).status_code == 201
        call.send({"type": "response.create"})
        await call.first_sound_after(0.0)
        await asyncio.sleep(1.0)  # past the reply's start
        call.arrivals.clear()
        load = None
        if images:
            load = await asyncio.create_subprocess_exec(
                sys.executable, __file__, "--send-to", str(server.port), "--images", str(images)
            )
        await asyncio.sleep(seconds)
        jitter = _jitter_ms(list(call.arrivals))
        if load is not None:
            await load.wait()
        await call.hang_up()
    return float(np.percentile(jitter, 95)), max(jitter)


async def inline(threads: int, fn: Any, *args: Any) -> Any:
    return fn(*args)


async def main(images: int, seconds: float) -> None:
    print(f"image: {len(noise_jpeg()) / 2**20:.1f} MiB of base64; window {seconds:g} s")
    rows = [("no load", 0)]
    rows += [(f"{images} images, decoded off the loop", images)]
    for label, count in rows:
        p95, worst = await measure(count, seconds)
        print(f"{label:40s} jitter p95 {p95:6.1f} ms, max {worst:6.1f} ms")
    session_module.off_loop = inline  # type: ignore[assignment]
    p95, worst = await measure(images, seconds)
    print(f"{f'{images} images, decoded on the loop':40s} jitter p95 {p95:6.1f} ms, "
          f"max {worst:6.1f} ms")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=20)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--send-to", type=int, help=argparse.SUPPRESS)  # the load's process
    args = parser.parse_args()
    if args.send_to:
        send_images(args.send_to, args.images)
    else:
        asyncio.run(main(args.images, args.seconds))
