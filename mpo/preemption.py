"""A graceful stop on SIGTERM (what schedulers send before they kill a job) and SIGINT (Ctrl-C).

The first signal sets a flag; at the end of the current optimizer step every rank agrees to stop
(one all-reduce of the flag per step, so ranks that got the signal at different moments stop at
the same step), a complete checkpoint is written (weights or ZeRO shards, optimizer, scheduler,
RNG, δ, data position), and the run exits with 128 + the signal number after saying where the
checkpoint is and how to resume. A second signal aborts at once, except one arriving within
``FORWARD_WINDOW_S`` of the first: launchers forward a copy of the signal they got (DeepSpeed's
``launch.py`` sends SIGTERM to its ranks on SIGINT), which is the same request, not a second one.

DeepSpeed 0.19.8's launcher kills the ranks still alive 30 s after it forwarded the signal: the
step and the save must fit in that, or signal the rank processes directly (as SLURM does). An
interrupted save is never resumed from (``mpo.checkpoints``).
"""

from __future__ import annotations

import os
import signal
import sys
import time

import torch
import torch.distributed as dist
from transformers import TrainerCallback

FORWARD_WINDOW_S = 2.0
SIGNALS = (signal.SIGTERM, signal.SIGINT)


class TrainingStopped(Exception):
    """Training stopped on a signal after saving; ``exit_code`` is 128 + the signal number."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum


class StopRequest:
    """The signal handler's state: which signal asked to stop, and when."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.first_at = 0.0
        self._previous: dict[int, object] = {}

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else ""

    def install(self) -> StopRequest:
        """Handle SIGTERM and SIGINT in this process (the main thread must call it)."""
        for sig in SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame) -> None:
        now = time.monotonic()
        if self.signum is None:
            self.signum, self.first_at = signum, now
            print(
                f"\n{signal.Signals(signum).name}: finishing the current step on every rank, then saving a "
                "checkpoint and stopping (send the signal again to abort at once, without saving)",
                file=sys.stderr,
                flush=True,
            )
        elif now - self.first_at > FORWARD_WINDOW_S:
            print(
                f"\n{signal.Signals(signum).name} again: aborting without saving", file=sys.stderr, flush=True
            )
            os._exit(128 + signum)

    def agreed(self, device: torch.device) -> bool:
        """Whether any rank was asked to stop (a collective when distributed: call on every rank)."""
        flag = torch.tensor([0 if self.signum is None else self.signum], dtype=torch.long, device=device)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() and self.signum is None:
            self.signum = int(flag.item())  # another rank's signal: stop with its exit code
        return bool(flag.item())


class GracefulStopCallback(TrainerCallback):
    """At each optimizer step's end: if a stop was asked for anywhere, save and stop."""

    def __init__(self, request: StopRequest):
        self.request = request
        self.stopped_at: int | None = None

    def on_step_end(self, args, state, control, **kwargs):
        if self.request.agreed(args.device):
            control.should_save = True
            control.should_training_stop = True
            self.stopped_at = state.global_step
