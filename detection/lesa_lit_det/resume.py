"""Training runs that survive being killed: files written whole or not at all, and epochs seeded so that a run
resumed from an epoch checkpoint draws what the uninterrupted run would have drawn.

mmengine writes a checkpoint straight into its final name and keeps each random generator's state running from
the start of the run (it saves none of them in a checkpoint). Killed while saving, a run leaves a truncated
``epoch_N.pth`` beside the complete ones; resumed, it draws other augmentations than the run it continues.
"""
import glob
import os
import os.path as osp
from typing import Union

from mmengine.fileio.backends import LocalBackend, register_backend
from mmengine.hooks import Hook
from mmengine.runner.utils import set_random_seed

__all__ = ['AtomicLocalBackend', 'EpochSeedHook', 'register_atomic_local_backend']


class AtomicLocalBackend(LocalBackend):
    """mmengine's backend for local files, writing each file into a temporary file beside it that then replaces it:
    a process killed while it saves leaves the earlier files as they were and no partial file under the name (the
    temporary file it leaves, ``NAME.PID.partial``, goes when NAME is next written)."""

    def put(self, obj: bytes, filepath: Union[str, os.PathLike]) -> None:
        self._write_whole(filepath, 'wb', obj)

    def put_text(self, obj: str, filepath: Union[str, os.PathLike], encoding: str = 'utf-8') -> None:
        self._write_whole(filepath, 'w', obj, encoding=encoding)

    @staticmethod
    def _write_whole(filepath, mode: str, obj, **open_kwargs) -> None:
        filepath = os.fspath(filepath)
        os.makedirs(osp.dirname(filepath) or '.', exist_ok=True)
        partial = f'{filepath}.{os.getpid()}.partial'
        try:
            with open(partial, mode, **open_kwargs) as f:
                f.write(obj)
                f.flush()
                os.fsync(f.fileno())
            os.replace(partial, filepath)
        finally:
            for leftover in glob.glob(glob.escape(filepath) + '.*.partial'):  # this one, or a killed writer's
                os.remove(leftover)


def register_atomic_local_backend():
    """Make :class:`AtomicLocalBackend` mmengine's backend for local paths (checkpoints, dumped results)."""
    register_backend('local', AtomicLocalBackend, force=True, prefixes='')


class EpochSeedHook(Hook):
    """Seeds Python's, numpy's and torch's generators (every device) at the start of each training epoch from the
    run's seed and the epoch, so that each epoch's draws (augmentations, dropout, the data loader's worker seeds) do
    not depend on what ran before it in this process: a run resumed from an epoch checkpoint continues as the
    uninterrupted run would have. Data loader workers that persist across epochs keep their own generators running
    (``persistent_workers=True``), so their draws after a resume still differ."""

    priority = 'VERY_HIGH'

    def before_train_epoch(self, runner) -> None:
        # runner.seed: the config's, or one drawn and shared by ranks; cuDNN's flags stay as the config set them
        set_random_seed((runner.seed + runner.epoch) % 2 ** 32)
