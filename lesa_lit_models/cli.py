"""lesa-lit-convert: original LESA / LIT checkpoint -> timm model.safetensors + config.json (+ hub push)."""
import argparse
import json
import sys
from pathlib import Path
from typing import List, Optional

from timm.utils import ParseKwargs

from lesa_lit_models import CheckpointError, package_models
from lesa_lit_models.convert import (
    ConversionError, ConversionResult, HubError, check_hub_access, convert, push_converted,
)

_EPILOG = """\
Accepted checkpoint formats: whatever the model family's checkpoint_filter_fn reads (the loading path is
timm.create_model(MODEL, pretrained=True, pretrained_cfg_overlay=dict(file=ORIGINAL))): bare state dicts,
{'net': {'module.<key>': ...}} (LESA ImageNet), {'model': ...} (LIT), mmdet {'meta', 'state_dict': {'backbone.*'}}
checkpoints, and timm-format files (.pth/.bin/.safetensors). Files are read with torch's weights-only unpickler
and an allow-list (numpy, argparse.Namespace, yacs CfgNode): a file that names anything else is refused, never run.

The output directory then loads with
  import lesa_lit_models; timm.create_model('local-dir:OUTPUT_DIR', pretrained=True)
and, once pushed, with timm.create_model('hf-hub:ORG/NAME', pretrained=True).

Examples:
  lesa-lit-convert lit_ti.in1k https://github.com/ziplab/LIT/releases/download/v1.0/lit_ti.pth out/lit_ti.in1k
  lesa-lit-convert lesa_resnet50_det mask_rcnn_lesa_r50.pth out/lesa_r50_det --model-kwargs img_size=1024
  lesa-lit-convert lit_s lit_s.pth out/lit_s --push-to-hub my-org/lit_s.in1k --private

Pushing uses your huggingface_hub login (`hf auth login` or the HF_TOKEN variable).
Exit status: 0 on success, 1 when the conversion or the push fails (the message says why), 2 on usage errors.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog='lesa-lit-convert', description=__doc__, epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        'model', metavar='MODEL_NAME',
        help='timm model name, optionally with a pretrained tag whose metadata goes into config.json '
             f'(one of: {", ".join(package_models())})')
    parser.add_argument(
        'checkpoint', metavar='ORIGINAL',
        help='original checkpoint file, or its http(s) URL (downloaded once into the torch hub cache)')
    parser.add_argument(
        'output_dir', metavar='OUTPUT_DIR', type=Path,
        help='folder to write model.safetensors, config.json and README.md into (created; must be new or empty)')
    parser.add_argument(
        '--model-kwargs', nargs='*', default={}, action=ParseKwargs, metavar='KEY=VALUE',
        help='extra timm.create_model kwargs, recorded in config.json model_args (e.g. img_size=1024 for the '
             '_det models, num_classes=0 for a headless backbone); give it after the positional arguments')
    parser.add_argument(
        '--push-to-hub', metavar='ORG/NAME', help='also upload the converted model to this Hugging Face Hub repo')
    parser.add_argument('--private', action='store_true', help='create the hub repo as private (with --push-to-hub)')
    parser.add_argument(
        '--model-card', metavar='CARD.json', type=Path,
        help='JSON object of model card fields that replace or extend the generated ones '
             '(description, citation, comparison, details: {...})')
    parser.add_argument(
        '--overwrite', action='store_true',
        help='replace model.safetensors/config.json/README.md in a non-empty OUTPUT_DIR (other files are kept)')
    parser.add_argument(
        '--no-verify', dest='verify', action='store_false',
        help='skip reloading local-dir:OUTPUT_DIR and comparing its weights and outputs with the converted model')
    return parser


def _read_model_card(path: Optional[Path]) -> Optional[dict]:
    if path is None:
        return None
    try:
        card = json.loads(path.read_text(encoding='utf-8'))
    except (OSError, json.JSONDecodeError) as e:
        raise ConversionError(f'Cannot read model card file {str(path)!r}: {e}. It must be a JSON object.') from e
    if not isinstance(card, dict):
        raise ConversionError(f'Model card file {str(path)!r} must hold a JSON object, not {type(card).__name__}.')
    return card


def _report(result: ConversionResult, args: argparse.Namespace) -> None:
    arch = result.model.pretrained_cfg.get('architecture')
    print(f'Converted {args.checkpoint} -> {arch} ({result.num_params:,} parameters, '
          f'{result.num_params / 1e6:.2f}M)')
    print(f'Wrote {args.output_dir}:')
    for f in result.files:
        print(f'  {f.path.name:<18} {f.size:>12,} bytes  sha256 {f.sha256}')
    if result.extra_files:
        print(f'  (kept other files already there: {", ".join(result.extra_files)})')
    if result.max_abs_diff is None:
        print('Not verified (--no-verify).')
    else:
        print(f'Verified: local-dir:{args.output_dir} reloads identical weights; outputs on a random '
              f'{"x".join(map(str, result.input_size))} input differ by at most {result.max_abs_diff:.2e}.')


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.private and not args.push_to_hub:
        parser.error('--private only applies together with --push-to-hub ORG/NAME')
    try:
        if args.push_to_hub:
            check_hub_access(args.push_to_hub)  # fail before the work
        result = convert(
            args.model, args.checkpoint, args.output_dir, model_kwargs=args.model_kwargs, overwrite=args.overwrite,
            verify=args.verify, repo_id=args.push_to_hub, model_card=_read_model_card(args.model_card))
        _report(result, args)
        if args.push_to_hub:
            print(f'Pushing to https://huggingface.co/{args.push_to_hub} ...', flush=True)
            print(f'Pushed: {push_converted(result, args.push_to_hub, private=args.private)}')
    except (CheckpointError, ConversionError, HubError) as e:
        print(f'{parser.prog}: error: {e}', file=sys.stderr)
        return 1
    return 0


if __name__ == '__main__':
    sys.exit(main())
