"""ONNX export of the package's models, checked with onnxruntime or OpenVINO (the ``lesa-lit-export`` command).

``torch.onnx.export(model, (x,), f, dynamo=True, dynamic_shapes=...)`` works on every model of the package as it
is: the banded attention records its bands in standard ops while exporting
(:mod:`lesa_lit_models.layers.banded_attention`) and the deformable convolution is ``GridSample`` + ``MatMul``. This
module adds what a deployment wants on top: a dynamic batch and, where the model takes any size, a dynamic height
and width in multiples of 32; one self-contained ``model.onnx``; and a check of the file with onnxruntime (or
OpenVINO) against eager PyTorch, judged against the model's own float32 rounding (eager float32 against eager
float64 on the same input), since a random deep network amplifies rounding far beyond 1e-6.

onnx, onnxruntime and onnxscript are the ``onnx`` extra (``pip install -e '.[onnx]'`` in a clone), OpenVINO the
``openvino`` extra; each is imported only here and only when used.
"""
import argparse
import copy
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple

import timm
import torch
import torch.nn as nn
from timm.utils import ParseKwargs

from . import package_models

__all__ = ['OnnxCheck', 'RUNTIMES', 'takes_any_size', 'export_onnx', 'check_onnx', 'onnx_session', 'main']

# an output is within tolerance at this many times the model's own float32 rounding, or this relative error
ROUNDING_FACTOR = 10.
MIN_RELATIVE_TOLERANCE = 1e-4
RUNTIMES = ('onnxruntime', 'openvino')  # the CPU runtimes a file is checked with


def _require_onnx():
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as e:
        raise ImportError(
            f'ONNX export needs onnx, onnxruntime and onnxscript ({e}): pip install -e ".[onnx]" in your clone of '
            'lesa-lit-models, or pip install "onnx>=1.16" "onnxruntime>=1.18" "onnxscript>=0.3".') from e


def _require_openvino():
    try:
        import openvino  # noqa: F401
    except ImportError as e:
        raise ImportError(f'Running ONNX files with OpenVINO needs openvino ({e}): pip install -e ".[openvino]" in '
                          'your clone of lesa-lit-models, or pip install "openvino>=2024.0".') from e


def onnx_session(path: os.PathLike, runtime: str = 'onnxruntime', threads: int = 0) -> Callable:
    """``run(image) -> outputs`` (NumPy in, NumPy out) for the ONNX file on the CPU with ``runtime``
    (:data:`RUNTIMES`), ``threads`` intra-op threads (0: the runtime's default), in float32 throughout (OpenVINO
    would otherwise compute in bfloat16 on CPUs that have it)."""
    if runtime == 'onnxruntime':
        _require_onnx()
        import onnxruntime
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1 if threads else 0
        # no memory pattern: at these graphs' dynamic sizes the pattern pre-allocates one block that peaks at 1.5x
        # the run without it, and runs no faster (docs/compile-export.md)
        options.enable_mem_pattern = False
        session = onnxruntime.InferenceSession(os.fspath(path), options, providers=['CPUExecutionProvider'])
        name = session.get_inputs()[0].name
        return lambda image: session.run(None, {name: image})
    if runtime == 'openvino':
        _require_openvino()
        import openvino
        config = {'INFERENCE_PRECISION_HINT': 'f32', **({'INFERENCE_NUM_THREADS': threads} if threads else {})}
        compiled = openvino.Core().compile_model(os.fspath(path), 'CPU', config)
        request = compiled.create_infer_request()
        return lambda image: [request.infer([image])[output] for output in compiled.outputs]
    raise ValueError(f'Unknown runtime {runtime!r}; use one of {", ".join(RUNTIMES)}.')


def _as_list(out) -> List[torch.Tensor]:
    return list(out) if isinstance(out, (list, tuple)) else [out]


def takes_any_size(model: nn.Module) -> bool:
    """Whether the model runs at any input size (its pretrained config does not fix one)."""
    cfg = getattr(model, 'pretrained_cfg', None) or {}
    return not cfg.get('fixed_input_size', False)


def _dynamic_shapes(dynamic_size: bool) -> Tuple[dict]:
    dims = {0: torch.export.Dim('batch', min=1, max=1024)}
    if dynamic_size:  # the networks' stride: each stage's grid is then a whole number of tokens
        dims.update({2: 32 * torch.export.Dim('height', min=2, max=128),
                     3: 32 * torch.export.Dim('width', min=2, max=128)})
    return (dims,)


def export_onnx(model: nn.Module, path: os.PathLike, example: torch.Tensor, dynamic_size: Optional[bool] = None,
                opset_version: Optional[int] = None) -> Path:
    """Export ``model`` (eval mode, float32) to one self-contained ONNX file at ``path``.

    Args:
        model: The model; its output (a tensor, or a list of feature maps) becomes ``logits`` / ``feature0..``.
        example: A float32 (N, C, H, W) input, N >= 2 (the batch is dynamic; an example batch of 1 would fix it).
        dynamic_size: Height and width dynamic, in multiples of 32 (``example``'s must be); default: where
            :func:`takes_any_size`.
        opset_version: ONNX opset (default: the exporter's).
    """
    _require_onnx()
    if example.shape[0] < 2:
        raise ValueError(f'Export with an example batch of at least 2 (got {example.shape[0]}): the exporter '
                         f'specialises a batch of 1, and the exported batch is dynamic.')
    dynamic_size = takes_any_size(model) if dynamic_size is None else dynamic_size
    if dynamic_size and (example.shape[-2] % 32 or example.shape[-1] % 32):
        raise ValueError(f'A dynamic-size export needs an example whose height and width are multiples of 32, got '
                         f'{tuple(example.shape[-2:])}.')
    model = model.eval().float()
    with torch.no_grad():
        num_outputs = len(_as_list(model(example)))
    output_names = ['logits'] if num_outputs == 1 and not hasattr(model, 'feature_info') else [
        f'feature{i}' for i in range(num_outputs)]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        program = torch.onnx.export(
            model, (example.float(),), dynamo=True, dynamic_shapes=_dynamic_shapes(dynamic_size),
            input_names=['image'], output_names=output_names, opset_version=opset_version, verbose=False)
    import onnx
    onnx.save(_scans_as_loops(program.model_proto), path)
    return path


def _scans_as_loops(model: 'onnx.ModelProto') -> 'onnx.ModelProto':
    """``model`` with local functions inlined and each top-level ``Scan`` (the banded attention's scan over grid rows)
    replaced by the equivalent ``Loop`` over its scan inputs' first dim, whose body gathers each step's slices:
    OpenVINO's ONNX reader (2026.4) miscounts the inputs of a Scan whose body reads values of the outer graph."""
    import onnx.inliner
    from onnx import TensorProto, helper

    model = onnx.inliner.inline_local_functions(model)
    nodes = []
    for node in model.graph.node:
        if node.op_type != 'Scan':
            nodes.append(node)
            continue
        attributes = {a.name: a for a in node.attribute}
        body, num_scanned = attributes['body'].g, attributes['num_scan_inputs'].i
        if any(any(attributes[key].ints) for key in
               ('scan_input_directions', 'scan_output_directions', 'scan_input_axes', 'scan_output_axes')
               if key in attributes):
            raise ValueError(f'{node.name}: only forward scans over dim 0 convert to a Loop.')
        num_states = len(node.input) - num_scanned
        states, scanned = list(node.input[:num_states]), list(node.input[num_states:])
        prefix = node.name or node.output[0]
        step, condition, trip_count = f'{prefix}_step', f'{prefix}_condition', f'{prefix}_trip_count'
        slices = [helper.make_node('Gather', [outer, step], [inner.name], axis=0)
                  for outer, inner in zip(scanned, body.input[num_states:])]
        loop_body = helper.make_graph(
            [*slices, helper.make_node('Identity', [condition], [f'{condition}_out']), *body.node], body.name,
            [helper.make_tensor_value_info(step, TensorProto.INT64, []),
             helper.make_tensor_value_info(condition, TensorProto.BOOL, []), *body.input[:num_states]],
            [helper.make_tensor_value_info(f'{condition}_out', TensorProto.BOOL, []), *body.output],
            value_info=body.value_info)
        nodes += [helper.make_node('Shape', [scanned[0]], [f'{prefix}_length'], start=0, end=1),
                  helper.make_node('Squeeze', [f'{prefix}_length'], [trip_count]),
                  helper.make_node('Loop', [trip_count, '', *states], list(node.output), name=node.name,
                                   body=loop_body)]
    model.graph.ClearField('node')
    model.graph.node.extend(nodes)
    return model


@dataclass
class OnnxCheck:
    """A runtime against eager PyTorch on one input, per output: the largest absolute error against eager float32,
    the model's own rounding there (eager float32 against eager float64) and the largest absolute output."""
    input_shape: Tuple[int, ...]
    errors: List[float]
    roundings: List[float]
    scales: List[float]
    runtime: str = 'onnxruntime'

    @property
    def tolerances(self) -> List[float]:
        return [max(ROUNDING_FACTOR * r, MIN_RELATIVE_TOLERANCE * s) for r, s in zip(self.roundings, self.scales)]

    @property
    def passed(self) -> bool:
        return all(e <= t for e, t in zip(self.errors, self.tolerances))

    @property
    def worst(self) -> int:
        """The output with the largest error relative to its tolerance."""
        return max(range(len(self.errors)), key=lambda i: self.errors[i] / max(self.tolerances[i], 1e-30))

    def summary(self) -> str:
        i = self.worst
        shape = 'x'.join(map(str, self.input_shape))
        return (f'{shape} input: {self.runtime} vs eager float32 max abs error {self.errors[i]:.2e} (output {i}; eager '
                f'float32 vs float64 {self.roundings[i]:.2e}, max |output| {self.scales[i]:.3g}, tolerance '
                f'{self.tolerances[i]:.2e}): {"ok" if self.passed else "FAILED"}')


def check_onnx(model: nn.Module, path: os.PathLike, inputs: Sequence[torch.Tensor], threads: int = 0,
               runtime: str = 'onnxruntime') -> List[OnnxCheck]:
    """Run the ONNX file with ``runtime`` (:func:`onnx_session`) on each input and compare with the eager model in
    float32 and in float64 (a copy of it); ``threads``: the runtime's intra-op threads (0: its default)."""
    run = onnx_session(path, runtime, threads)
    model = model.eval().float()
    model64 = copy.deepcopy(model).double()
    checks = []
    for x in inputs:
        got = run(x.float().numpy())
        with torch.no_grad():
            want, truth = _as_list(model(x.float())), _as_list(model64(x.double()))
        if len(got) != len(want):
            raise ValueError(f'The ONNX file has {len(got)} outputs, the model {len(want)}.')
        checks.append(OnnxCheck(
            tuple(x.shape),
            [(torch.from_numpy(g) - w).abs().max().item() for g, w in zip(got, want)],
            [(w.double() - t).abs().max().item() for w, t in zip(want, truth)],
            [t.abs().max().item() for t in truth], runtime))
    return checks


def _build_model(ref: str, features_only: bool, pretrained: bool, model_kwargs: dict) -> Tuple[nn.Module, Path]:
    """The model named by ``ref`` (a package model name, a converted folder, ``local-dir:`` / ``hf-hub:``) and where
    its ``model.onnx`` goes by default (into a converted folder, else the working directory)."""
    kwargs = dict(model_kwargs, **({'features_only': True} if features_only else {}))
    if os.path.isdir(ref):
        return timm.create_model(f'local-dir:{Path(ref).resolve()}', pretrained=True, **kwargs), Path(ref)
    if ref.startswith('local-dir:'):
        return timm.create_model(ref, pretrained=True, **kwargs), Path(ref[len('local-dir:'):])
    if ref.startswith('hf-hub:'):
        return timm.create_model(ref, pretrained=True, **kwargs), Path('.')
    if ref.split('.', 1)[0] not in package_models():
        raise ValueError(f'{ref!r} is neither a folder nor a model of this package ({", ".join(package_models())}'
                         f'); give a model name, a converted folder, local-dir:DIR or hf-hub:ORG/NAME.')
    return timm.create_model(ref, pretrained=pretrained, **kwargs), Path('.')


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog='lesa-lit-export',
        description='Export a LESA / LIT model to ONNX (model.onnx) and check it with onnxruntime (and OpenVINO) '
                    'against eager PyTorch on a random input.',
        epilog='Examples:\n'
               '  lesa-lit-export out/lit_s.in1k                      # a lesa-lit-convert folder -> its model.onnx\n'
               '  lesa-lit-export lesa_resnet50_det --features --input-size 800 1344 -o det/model.onnx\n'
               '  lesa-lit-export lit_ti.in1k --pretrained --runtime onnxruntime openvino\n'
               'Exit status: 0 when the file matches eager PyTorch, 1 when the export or the check fails, 2 on '
               'usage errors.',
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('model', metavar='MODEL',
                        help='a model name of this package (optionally with a pretrained tag), a folder written by '
                             'lesa-lit-convert, local-dir:DIR or hf-hub:ORG/NAME')
    parser.add_argument('-o', '--output', type=Path,
                        help='ONNX file to write (default: model.onnx in the converted folder, else in the working '
                             'directory)')
    parser.add_argument('--features', action='store_true',
                        help='export the feature pyramid (features_only=True, as the detectors use it)')
    parser.add_argument('--pretrained', action='store_true',
                        help="load the model name's pretrained weights (folders and hubs always load theirs)")
    parser.add_argument('--input-size', type=int, nargs=2, metavar=('H', 'W'),
                        help="example and check input size (default: the model's input size)")
    parser.add_argument('--batch-size', type=int, default=2, help='example batch size, at least 2 (default 2)')
    parser.add_argument('--static-size', action='store_true',
                        help='fix height and width to --input-size (default: dynamic where the model takes any size)')
    parser.add_argument('--opset', type=int, help="ONNX opset version (default: the exporter's)")
    parser.add_argument('--model-kwargs', nargs='*', default={}, action=ParseKwargs, metavar='KEY=VALUE',
                        help='extra timm.create_model kwargs (e.g. img_size=1024)')
    parser.add_argument('--runtime', nargs='+', choices=RUNTIMES, default=['onnxruntime'],
                        help='the CPU runtimes that check the file (default: onnxruntime; openvino needs the '
                             'openvino extra)')
    parser.add_argument('--no-verify', dest='verify', action='store_false',
                        help='skip the check')
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.batch_size < 2:
        parser.error('--batch-size must be at least 2 (the exported batch is dynamic)')
    import lesa_lit_models  # noqa: F401  (registers the models with timm)
    try:
        _require_onnx()
        if args.verify and 'openvino' in args.runtime:
            _require_openvino()
        model, folder = _build_model(args.model, args.features, args.pretrained, args.model_kwargs)
        model.eval()
        height, width = args.input_size or timm.data.resolve_model_data_config(model)['input_size'][1:]
        dynamic_size = takes_any_size(model) and not args.static_size
        output = args.output or folder / 'model.onnx'
        generator = torch.Generator().manual_seed(0)
        example = torch.randn(args.batch_size, 3, height, width, generator=generator)
        export_onnx(model, output, example, dynamic_size, args.opset)
        shape = 'dynamic batch' + (', height and width in multiples of 32' if dynamic_size else
                                   f', {height}x{width} only')
        print(f'Exported {args.model}{" features" if args.features else ""} ({shape}) -> {output} '
              f'({output.stat().st_size:,} bytes)')
        if not args.verify:
            return 0
        inputs = [torch.randn(1, 3, height, width, generator=generator)]
        if dynamic_size:  # another size than the export's
            inputs.append(torch.randn(1, 3, height, width + 32, generator=generator))
        checks = [check for runtime in args.runtime for check in check_onnx(model, output, inputs, runtime=runtime)]
        for check in checks:
            print(f'Checked on a random {check.summary()}')
        return 0 if all(c.passed for c in checks) else 1
    except (ImportError, TypeError, ValueError, RuntimeError, OSError) as e:
        print(f'{parser.prog}: error: {e}', file=sys.stderr)
        return 1


if __name__ == '__main__':
    sys.exit(main())
