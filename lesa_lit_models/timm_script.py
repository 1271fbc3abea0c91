"""Run one of timm's own scripts (``validate.py``, ``train.py``, ``benchmark.py``, ``onnx_export.py``, ...) with this
package's models registered, without editing the script::

    python -m lesa_lit_models.timm_script path/to/timm/validate.py --model lit_s --pretrained --data-dir imagenet/

imports :mod:`lesa_lit_models` (which registers every model with timm), then runs the script as ``__main__`` with
``sys.argv`` set to the script and its arguments and the script's folder first on ``sys.path``, as
``python path/to/script.py ...`` would.
"""
import os
import runpy
import sys
from typing import List, Optional

__all__ = ['main']

_USAGE = 'usage: python -m lesa_lit_models.timm_script SCRIPT.py [SCRIPT ARGUMENTS ...]'


def main(argv: Optional[List[str]] = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ('-h', '--help'):
        print(f'{_USAGE}\n\n{__doc__}', file=sys.stderr if not argv else sys.stdout)
        sys.exit(2 if not argv else 0)
    script = argv[0]
    if not os.path.isfile(script):
        sys.exit(f'{_USAGE}\nerror: {script!r} is not a file: give the path of a timm script, e.g. a timm '
                 f'checkout\'s validate.py.')
    import lesa_lit_models  # noqa: F401  (registers the models with timm)
    sys.argv = [script, *argv[1:]]
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
    runpy.run_path(script, run_name='__main__')


if __name__ == '__main__':
    main()
