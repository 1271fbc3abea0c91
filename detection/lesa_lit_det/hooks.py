"""A hook that says, early in a training run, how long the run will take on this machine."""
import datetime
import time

from mmengine.hooks import Hook
from mmengine.registry import HOOKS


def _minutes(seconds: float) -> str:
    return f'{int(seconds) // 60} min {int(seconds) % 60:02d} s'


@HOOKS.register_module()
class TrainingTimeHook(Hook):
    """Logs once, after the run's first ``after_iters`` training iterations (or its last, if it has fewer), how long
    the training takes on this machine and when it ends, from the mean wall time of those iterations."""

    def __init__(self, after_iters: int = 10):
        self.after_iters = after_iters

    def before_train(self, runner):
        self._started, self._iters_run = time.monotonic(), 0
        self._report_at = min(self.after_iters, runner.max_iters - runner.iter)

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
        self._iters_run += 1
        if self._iters_run != self._report_at:
            return
        per_iter = (time.monotonic() - self._started) / self._iters_run
        left = per_iter * (runner.max_iters - runner.iter - 1)
        ends = datetime.datetime.now() + datetime.timedelta(seconds=left)
        runner.logger.info(
            f'Training time on this machine: {runner.max_iters} iterations at {per_iter:.2f} s (the mean of the first '
            f'{self._iters_run} of this run), about {_minutes(per_iter * runner.max_iters)} in all; '
            f'{_minutes(left)} left, ends about {ends:%H:%M}.')
