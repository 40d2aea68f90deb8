"""What a person watching a run sees: a progress bar on a terminal, plain log lines elsewhere,
and a fixed-width table row per evaluation. Rank 0 only."""

from __future__ import annotations

import logging
import sys
import time

log = logging.getLogger("cnntrain")


def setup_logging(level: int = logging.INFO) -> None:
    """Plain one-line messages on stderr, once (a library user may have configured logging)."""
    if log.handlers:
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    log.addHandler(handler)
    log.setLevel(level)


def format_seconds(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:d}:{s:02d}"


class Progress:
    """A tqdm bar over all steps when attached to a terminal (``mode`` auto/bar), else log lines."""

    def __init__(self, mode: str, total_steps: int, start_step: int, enabled: bool) -> None:
        self.enabled = enabled and mode != "none"
        use_bar = mode == "bar" or (mode == "auto" and sys.stderr.isatty())
        self.bar = None
        self.total = total_steps
        self.started = time.perf_counter()
        self.start_step = start_step
        if self.enabled and use_bar:
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True,
                            file=sys.stderr, leave=True)

    def step(self, step: int) -> None:
        if self.bar is not None:
            self.bar.update(step - self.bar.n)

    def report(self, step: int, epoch: float, loss: float, err: float, lr: float, img_s: float,
               data_frac: float) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.set_postfix_str(f"ep {epoch:.2f} loss {loss:.4f} err {100 * err:.1f}% lr {lr:.4g} "
                                     f"{img_s:.0f} img/s", refresh=False)
            return
        done = step - self.start_step
        rate = done / max(time.perf_counter() - self.started, 1e-9)
        eta = (self.total - step) / rate if rate > 0 else 0.0
        log.info("step %*d/%d  epoch %6.2f  loss %.4f  err %5.2f%%  lr %.4g  %7.1f img/s  data %3.0f%%  eta %s",
                 len(str(self.total)), step, self.total, epoch, loss, 100 * err, lr, img_s,
                 100 * data_frac, format_seconds(eta))

    def write(self, message: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(message, file=sys.stderr)
        else:
            log.info("%s", message)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


TABLE_HEADER = (f"{'epoch':>7} {'step':>8} {'train loss':>10} {'train err':>9} {'val loss':>9} "
                f"{'val err':>8} {'top5 err':>8} {'lr':>9} {'img/s':>8} {'time':>8}")


def table_row(epoch: float, step: int, train_loss: float, train_err: float, val_loss: float,
              val_err: float, val_top5_err: float, lr: float, img_s: float, elapsed: float) -> str:
    return (f"{epoch:7.2f} {step:8d} {train_loss:10.4f} {100 * train_err:8.2f}% {val_loss:9.4f} "
            f"{100 * val_err:7.2f}% {100 * val_top5_err:7.2f}% {lr:9.4g} {img_s:8.1f} "
            f"{format_seconds(elapsed):>8}")
