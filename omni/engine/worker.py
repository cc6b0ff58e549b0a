"""What the thinker and talker processes share: sockets, heartbeats, the busy loop's shape.

Each worker owns one model stage and runs a single-threaded loop: drain incoming messages,
then do one unit of model work (a decode step, a codec step, a prefill), then repeat. It
never blocks on a socket while it has work, so a cancel is seen within one step. It beats
every second from that same loop, so the front end can tell a hung model from a busy one.

A worker dies with the front end: a front end that was SIGKILLed must not leave workers
holding the model (and a GPU's memory). On Linux the kernel kills them (PR_SET_PDEATHSIG);
elsewhere, and as a second line, the loop checks once a second that the parent still lives.
"""

from __future__ import annotations

import ctypes
import logging
import multiprocessing
import os
import signal
import sys
import time
from collections import OrderedDict
from dataclasses import dataclass

import torch
import zmq

from omni.engine import protocol as p
from omni.engine.kv_memory import KVSlots

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Addresses:
    """ZeroMQ endpoints: ipc:// on one host, tcp:// across hosts. Workers bind their inbox."""

    thinker: str
    talker: str
    vocoder: str
    frontend: str


@dataclass(frozen=True)
class WorkerConfig:
    model_path: str
    device: str
    dtype: str
    addresses: Addresses
    allow_faults: bool = False
    max_frame_side: int = 448
    vocoder_steps: int = 10  # ODE time points per chunk
    vocoder_first_chunk_steps: int | None = None  # None: vocoder_steps
    vocoder_solver: str = "rk4"
    # batching (omni/engine/scheduler.py, kv_memory.py)
    kv_slots: int = 16  # sessions each worker holds KV memory for
    max_context_tokens: int = 32768  # per session, thinker and talker alike
    # the thinker's context budget per session (None: max_context_tokens minus the reserve)
    context_budget_tokens: int | None = None
    reply_reserve_tokens: int = 1024  # room kept for a reply (and positions kept for it)
    step_token_budget: int = 512  # rows one batched forward runs at most
    max_batch: int = 16  # sessions in one forward; 1 turns batching off
    attn_implementation: str = "sdpa"
    cuda_graphs: bool = False  # decode-only steps as CUDA graphs (the engine sets it on CUDA)


class EarlyCancels:
    """Replies cancelled before their start reached this worker (the front end's Cancel and
    the previous stage's start travel on different sockets). Bounded: the oldest are
    forgotten, since a start arrives within moments of its cancel or never."""

    def __init__(self, limit: int = 1024) -> None:
        self._replies: OrderedDict[str, None] = OrderedDict()
        self._limit = limit

    def add(self, reply: str) -> None:
        self._replies[reply] = None
        while len(self._replies) > self._limit:
            self._replies.popitem(last=False)

    def take(self, reply: str) -> bool:
        """True (and forgotten) if `reply` was cancelled early."""
        if reply not in self._replies:
            return False
        del self._replies[reply]
        return True


class WorkerIO:
    def __init__(self, name: str, inbox: str, outputs: dict[str, str], allow_faults: bool) -> None:
        self.name = name
        self.ctx = zmq.Context()
        self.inbox = self.ctx.socket(zmq.PULL)
        self.inbox.bind(inbox)
        self.outputs = {}
        for key, address in outputs.items():
            sock = self.ctx.socket(zmq.PUSH)
            sock.setsockopt(zmq.LINGER, 2000)
            sock.connect(address)
            self.outputs[key] = sock
        self.allow_faults = allow_faults
        self.fault: p.InjectFault | None = None
        self.steps = 0
        self._last_beat = 0.0
        self._parent = multiprocessing.parent_process()  # None: not started by an engine

    def receive(self, timeout_ms: int) -> list[p.Msg]:
        """Everything waiting now, or the first message within `timeout_ms`."""
        msgs: list[p.Msg] = []
        if self.inbox.poll(timeout_ms):
            while True:
                try:
                    data = self.inbox.recv(zmq.NOBLOCK)
                except zmq.Again:
                    break
                try:
                    msg = p.decode(data)
                except Exception as exc:  # a malformed frame is reported, never fatal
                    self.send("frontend", p.WorkerError(self.name, f"undecodable message: {exc}"))
                    continue
                if isinstance(msg, p.InjectFault):
                    if self.allow_faults:
                        self.fault = msg
                    continue
                msgs.append(msg)
        return msgs

    def send(self, to: str, msg: p.Msg) -> None:
        self.outputs[to].send(p.encode(msg))

    def beat(
        self, kv: dict[str, int] | None = None, contexts: dict[str, int] | None = None
    ) -> None:
        now = time.monotonic()
        if now - self._last_beat >= 1.0:
            self._last_beat = now
            if self._parent is not None and not self._parent.is_alive():
                _exit_orphaned(self.name)
            self.send("frontend", p.Heartbeat(self.name, kv or {}, contexts or {}))

    def count_step(self) -> None:
        """Fault injection for tests: crash or hang after N model steps."""
        self.steps += 1
        fault = self.fault
        if fault is None or self.steps < fault.after_steps:
            return
        log.error("%s: injected fault %s", self.name, fault.kind)
        if fault.kind == "crash":
            os._exit(3)
        while fault.kind == "hang":
            time.sleep(3600)

    def close(self) -> None:
        self.ctx.destroy(linger=1000)


PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


def exit_with_parent(name: str) -> None:
    """Ask the kernel to SIGKILL this process when its parent dies (Linux), then check that
    the parent did not die before the request was made. The kernel's parent is the thread
    that started the worker: the engine's event loop thread, which lives as long as the engine.
    """
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            log.warning("%s: prctl(PR_SET_PDEATHSIG) failed (errno %d)", name, ctypes.get_errno())
    parent = multiprocessing.parent_process()
    if parent is not None and not parent.is_alive():
        _exit_orphaned(name)


def _exit_orphaned(name: str) -> None:
    log.error("%s: the engine front end is gone; exiting", name)
    os._exit(1)  # nothing to flush: every result went to the front end, which is gone


def kv_store(model_config, cfg: WorkerConfig, model: torch.nn.Module) -> KVSlots:
    """The stage's KV memory: a slot per admitted session (and a scratch slot for the padding
    rows of CUDA-graph decode batches)."""
    return KVSlots.for_model(
        model_config, cfg.kv_slots, cfg.max_context_tokens, model.device, model.dtype, cfg.cuda_graphs
    )


class _WorkerName(logging.Filter):
    """Tags every record with the worker it came from (`worker` in JSON logs)."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.worker = name

    def filter(self, record: logging.LogRecord) -> bool:
        record.worker = self.worker
        return True


def configure_worker(name: str, device: str) -> None:
    """Logging, death with the parent, no autograd, and on CPU one torch thread per worker:
    the thinker and talker run side by side, and OpenMP threads competing for the same cores
    slow small ops by 100x (measured: a tiny conv1d took 0.3 ms with 1 thread, 43 ms with 2
    on a busy 2-core box)."""
    from omni.logs import configure_logging  # the service's text or JSON format

    configure_logging(os.environ.get("OMNI_LOG_LEVEL", "INFO"), os.environ.get("OMNI_LOG_FORMAT", "text"))  # type: ignore[arg-type]
    logging.getLogger().handlers[0].addFilter(_WorkerName(name))
    exit_with_parent(name)  # first, before minutes of model loading
    torch.set_grad_enabled(False)
    if device.startswith("cuda"):  # TF32 for the fp32 parts (Token2Wav): ~bf16 speed, fp32 range
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if device == "cpu":
        torch.set_num_threads(int(os.environ.get("OMNI_CPU_THREADS", "1")))
