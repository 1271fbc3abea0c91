#!/usr/bin/env bash
# timm's own model tests (tests/test_models.py of a pytorch-image-models checkout) on this package's models.
#
#   scripts/run_timm_tests.sh TIMM_CHECKOUT [pytest options]
#   scripts/run_timm_tests.sh ~/src/pytorch-image-models -k 'lit_ti and forward'
#
# The checkout's test module runs against the installed timm with lesa_lit_models imported first. Its model
# lists are narrowed to this package's models: timm.list_models / timm.list_pretrained keep only them, and the
# lists timm limits to its own modules with forward_intermediates (module=...) take them too, since every model
# here has forward_intermediates. The TorchScript tests are deselected: torch.jit.script cannot compile these
# models (the README's compile section says why); so are the tests that download pretrained weights and those of
# timm's own models (naflexvit, ...).
# Python: $PYTHON, else this checkout's .venv, else python3. The full module runs for tens of minutes on 2 cores.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
[[ $# -ge 1 ]] || { echo "usage: $0 TIMM_CHECKOUT [pytest options]" >&2; exit 2; }
TESTS="$1/tests/test_models.py"; shift
[[ -f "$TESTS" ]] || { echo "$TESTS not found: pass the root of a pytorch-image-models checkout" >&2; exit 2; }
PYTHON="${PYTHON:-$( [[ -x "$ROOT/.venv/bin/python" ]] && echo "$ROOT/.venv/bin/python" || echo python3)}"

WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
cp "$TESTS" "$WORK/test_models.py"
cat >"$WORK/conftest.py" <<'PY'
import timm
import timm.models

import lesa_lit_models  # noqa: F401  (registers the models)

_list_models, _list_pretrained = timm.list_models, timm.list_pretrained


def _ours(name):
    return timm.models.model_entrypoint(name.split('.')[0]).__module__.startswith('lesa_lit_models.')


def list_models(*args, module='', **kwargs):
    return [name for name in _list_models(*args, **kwargs) if _ours(name)]


def list_pretrained(*args, **kwargs):
    return [name for name in _list_pretrained(*args, **kwargs) if _ours(name)]


timm.list_models = timm.models.list_models = list_models
timm.list_pretrained = timm.models.list_pretrained = list_pretrained


def _runs_here(item):
    """A test of one of this package's models that neither scripts it nor downloads weights."""
    model = getattr(item, 'callspec', None) and item.callspec.params.get('model_name')
    return bool(model) and 'torchscript' not in item.name and 'pretrained' not in item.originalname


def pytest_collection_modifyitems(config, items):
    left_out = [item for item in items if not _runs_here(item)]
    if left_out:
        config.hook.pytest_deselected(items=left_out)
        items[:] = [item for item in items if _runs_here(item)]
PY
cd "$WORK"
PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" "$PYTHON" -m pytest test_models.py -p no:cacheprovider \
  -W ignore::pytest.PytestUnknownMarkWarning "$@"
