"""torch.compile, torch.export and empty batches for every model family.

Compiled and exported models must compute what eager does: outputs, input and parameter gradients and the
BatchNorm running statistics, in float64 (in float32 a random-weight LESA backbone differs from its own float64
result by percents at C5, so fp32 gaps would be rounding, not bugs). Compilation (inductor, CPU) dominates the cost,
so the models are small configurations of each family that run the same code as the registered ones: fewer blocks,
narrower stages, 64x64 inputs, LIT's row bands forced to one row (``max_chunk_logits``) so that the banded,
recomputed attention runs on a 4x4 grid. LESA-WRN50 and LIT-M/B are LESA-ResNet50 and LIT-S at other widths and
depths. Empty batches run on every registered model, at its SMALL configuration.

TorchScript is not supported (see the README); compile and export are.
"""
import copy
from typing import List

import pytest
import timm
import torch
import torch.nn as nn
from torch.export import Dim

from lesa_lit_models import package_models
from lesa_lit_models.layers.lesa_attention import Lesa
from lesa_lit_models.layers.lesa_fused import detection_qr_binary
from lesa_lit_models.lit import LITStage, attend_in_row_bands
from _helpers import SIZE, SMALL, TRACED, as_list, assert_same_results, outputs_and_grads, small_model

MODELS = package_models()
# one model of each family: the 1-D classification table on a 4x4 grid; DCN and 2-D tables, banded; class token and
# plain SDPA; offset bias, banded
FAMILIES = ('lesa_resnet50', 'lesa_resnet50_det', 'lit_ti', 'lit_s')


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _small(name: str, dtype=torch.float64, **kwargs) -> nn.Module:
    return small_model(name, dtype=dtype, **{**TRACED[name], **kwargs})


def _images(batch: int = 2, size: int = SIZE, dtype=torch.float64) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, dtype=dtype, generator=torch.Generator().manual_seed(1))


# -------------------------------------------------------------------------------------------------- empty batches

@pytest.mark.parametrize('name', MODELS)
def test_an_empty_batch_gives_an_empty_output(name):
    """Batch 0 in, batch 0 out, classifier and features, eval and train, with zero gradients and unchanged
    BatchNorm statistics."""
    kwargs = dict(SMALL[name], **(dict(img_size=SIZE) if name.endswith('_det') else {}))
    size = timm.get_pretrained_cfg(name).input_size[-1] if timm.get_pretrained_cfg(name).fixed_input_size else SIZE
    for features_only in (False, True):
        model = timm.create_model(name, features_only=features_only, **kwargs).eval()
        with torch.no_grad():
            shapes = [(0, *o.shape[1:]) for o in as_list(model(torch.randn(1, 3, size, size)))]
        for training in (False, True):
            model.train(training)
            before = {n: b.clone() for n, b in model.named_buffers() if not n.endswith('num_batches_tracked')}
            outs = as_list(model(torch.randn(0, 3, size, size, requires_grad=True)))
            assert [o.shape for o in outs] == shapes
            model.zero_grad()
            sum(o.sum() for o in outs).backward()
            # zero, or None where a kernel returns no gradient for an empty batch (SDPA's for LIT's bias tables)
            assert not any(p.grad is not None and p.grad.any() for p in model.parameters())
            for n, b in model.named_buffers():  # nothing learned from no images
                if n in before:
                    torch.testing.assert_close(b, before[n], msg=lambda m: f'{n}: {m}')


# ------------------------------------------------------------------------------------------------- torch.compile

def _set_model_checkpointing(model: nn.Module, enable: bool):
    """The models' own gradient checkpointing (LESA: unary and binary terms; LIT: blocks), also inside wrappers."""
    for m in model.modules():
        if isinstance(m, (Lesa, LITStage)):
            m.grad_checkpointing = enable


# Each model through aot_eager (dynamo + AOTAutograd: the graphs inductor would compile, run by eager kernels) as a
# classifier and as features; on CUDA the features through inductor (Triton kernels). The cases whose code the
# others already trace are exhaustive: the LESA detection backbone's pooled output and LIT-S's head, the LESA
# classifier's trunk as features, LIT-Ti's stage 4 without its class token. The full-size compile matrix is in
# benchmarks (python -m benchmarks.run --compile).
_TRACED_ELSEWHERE = {('lesa_resnet50_det', False), ('lit_s', False), ('lesa_resnet50', True), ('lit_ti', True)}


def _compile_case(name: str, features_only: bool, device: str = 'cpu'):
    backend = 'inductor' if device == 'cuda' else 'aot_eager'
    marks = [pytest.mark.exhaustive if (name, features_only) in _TRACED_ELSEWHERE else pytest.mark.slow]
    if device == 'cuda':
        marks.append(pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA device'))
    return pytest.param(name, features_only, backend, device, marks=marks,
                        id=f'{name}-{"features" if features_only else "classifier"}-{backend}-{device}')


COMPILE_CASES = [_compile_case(name, features_only) for name in FAMILIES for features_only in (False, True)] + [
    _compile_case(name, True, 'cuda') for name in FAMILIES]


@pytest.mark.parametrize('name, features_only, backend, device', COMPILE_CASES)
def test_compiled_model_matches_eager(name, features_only, backend, device):
    """One graph per mode (``fullgraph=True`` fails at any graph break): outputs, input and parameter gradients and
    BatchNorm statistics of a train step (with the model's gradient checkpointing, LIT's recomputed bands) and of an
    eval step equal eager's; with aot_eager, a second input size recompiles (dynamic shapes where the model takes any
    size)."""
    model = _small(name, features_only=features_only).to(device)
    eager = copy.deepcopy(model)
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    for training in (True, False):
        for m in (model, eager):
            m.train(training)
            _set_model_checkpointing(m, training)
        x = _images().to(device)
        assert_same_results(outputs_and_grads(model, x, call=compiled), outputs_and_grads(eager, x), rtol=1e-7,
                            atol=1e-9)
    if backend == 'aot_eager' and name != 'lesa_resnet50':  # the classification table takes one grid only
        x = _images(size=SIZE + 32)
        with torch.no_grad():
            for got, want in zip(as_list(compiled(x)), as_list(eager(x))):
                torch.testing.assert_close(got, want, rtol=1e-7, atol=1e-9)


def _attention_unit(name: str, model: nn.Module):
    """The part of ``model`` that holds its attention: ``(unit, run, input)``, ``run(unit, x)`` as the model runs it.

    LESA: the binary (attention) term of the first LESA module (stage 3 at 64x64: a 4x4 grid, one row per band; the
    unary term, the fusion gate and the module's checkpointing compile through aot_eager above). LIT-S: the
    blocks of stage 3 (4x4 grid, offset bias, one row per band). LIT-Ti: those of stage 4, with the class token (plain
    SDPA).
    """
    gen = torch.Generator().manual_seed(2)
    if name == 'lesa_resnet50_det':
        lesa = next(b.conv2 for b in model.layer3 if isinstance(b.conv2, Lesa))
        x = torch.randn(2, lesa.dim, 4, 4, dtype=torch.float64, generator=gen)
        return lesa, lambda unit, t: unit.binary_pre_norm(t), x
    stage = model.stages[3] if name == 'lit_ti' else model.stages[2]
    channels, side = stage.blocks[0].norm1.normalized_shape[0], SIZE // (32 if name == 'lit_ti' else 16)
    class_token = torch.randn(2, 1, channels, dtype=torch.float64, generator=gen) if name == 'lit_ti' else None
    x = torch.randn(2, side, side, channels, dtype=torch.float64, generator=gen)
    return stage, lambda unit, t: unit.forward_blocks(t, class_token), x


# Inductor (C++ code generation, the slow part) compiles the training step of one unit per attention kind: LESA's
# banded operator, LIT's banded operator and plain SDPA. LESA's deformable sampling stays out (dcn_stages off:
# inductor lowers its grid_sample into large generated code); aot_eager runs it above.
@pytest.mark.slow
@pytest.mark.parametrize('name', ['lesa_resnet50_det', 'lit_s', 'lit_ti'])
def test_inductor_compiles_each_attention_kind_as_eager_computes_it(name):
    """The training step of the unit that holds the attention (LIT: with the stage's gradient checkpointing) compiled
    by inductor on the CPU: outputs, input and parameter gradients and BatchNorm statistics equal eager's (float64)."""
    kwargs = dict(dcn_stages=(False,) * 4) if name == 'lesa_resnet50_det' else {}
    unit, run, x = _attention_unit(name, _small(name, **kwargs))
    unit.train()
    _set_model_checkpointing(unit, True)
    eager = copy.deepcopy(unit)
    compiled = torch.compile(lambda t: run(unit, t), backend='inductor', fullgraph=True)
    assert_same_results(outputs_and_grads(unit, x, call=compiled),
                        outputs_and_grads(eager, x, call=lambda t: run(eager, t)), rtol=1e-7, atol=1e-9)


def _called(graph_module: torch.fx.GraphModule) -> List:
    return [node.target for gm in graph_module.modules() if isinstance(gm, torch.fx.GraphModule)
            for node in gm.graph.nodes if node.op == 'call_function']


def _lesa_binary_inputs(grid, groups=2, dim=4, batch=1):
    tokens = grid[0] * grid[1]
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(batch, groups, tokens, dim, dtype=torch.float64, generator=gen, requires_grad=True)
               for _ in range(3))
    tables = [torch.randn(2 * n - 1, dim, dtype=torch.float64, generator=gen, requires_grad=True) for n in grid]
    return q, k, v, *tables


def test_compiled_banded_attention_is_one_operator_and_matches_eager():
    """The banded attention is one opaque operator in the traced graph, whatever the number of bands (a grid of 20
    rows attends one row per band here), with the eager outputs and gradients (float64); a second grid size runs
    in the bands of that size."""
    groups = 2
    bn = nn.BatchNorm2d(2 * groups, dtype=torch.float64).eval()
    graphs = []

    def backend(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    def attend(grid, *tensors):
        return detection_qr_binary(*tensors, grid, bn, max_chunk_logits=groups * grid[1] * grid[0] * grid[1])

    compiled = torch.compile(attend, backend=backend, fullgraph=True)
    for grid in ((20, 3), (9, 5)):
        inputs = _lesa_binary_inputs(grid, groups)
        got, want = compiled(grid, *inputs), attend(grid, *inputs)
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)
        for g, w in zip(torch.autograd.grad(got.sin().sum(), inputs), torch.autograd.grad(want.sin().sum(), inputs)):
            torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-10)
    called = _called(graphs[0])
    assert called.count(torch.ops.lesa_lit_models.lesa_relative_bias_attention.default) == 1
    assert torch.nn.functional.scaled_dot_product_attention not in called


def test_banded_attention_operators_pass_opcheck():
    """``torch.library.opcheck`` of both bias families' operators (schema, fake tensors, autograd registration,
    AOTAutograd with dynamic shapes), several bands each."""
    grid = (5, 3)
    q, k, v, _, _ = _lesa_binary_inputs(grid)
    query_rel = torch.randn(*q.shape[:-1], q.shape[-1] + 1, dtype=torch.float64, requires_grad=True)
    tables = torch.randn(grid[0] ** 2 + grid[1] ** 2, q.shape[-1], dtype=torch.float64, requires_grad=True)
    one_row = q.shape[1] * grid[1] * q.shape[2]
    torch.library.opcheck(torch.ops.lesa_lit_models.lesa_relative_bias_attention.default,
                          (q, k, v, query_rel, tables, list(grid), one_row, 1.0, True))
    offsets = torch.randn(q.shape[1], 2 * grid[0] - 1, 2 * grid[1] - 1, dtype=torch.float64, requires_grad=True)
    torch.library.opcheck(torch.ops.lesa_lit_models.lit_offset_bias_attention.default,
                          (q, k, v, None, offsets, list(grid), one_row, 0.5, False))


def test_compiled_banded_attention_keeps_no_tokens_by_tokens_tensor_for_backward(saved_for_backward):
    """Eagerly the LIT attention keeps q, k, v, its output and the offset grid for backward, never a (heads, N, N)
    bias or probabilities; compiled it keeps no more (with the bands traced into the graph, AOTAutograd merged the
    backward's rebuilt bias with the forward's and kept every band's probabilities)."""
    feat_size, heads, dim = (40, 40), 2, 32
    tokens = feat_size[0] * feat_size[1]
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, heads, tokens, dim, generator=gen, requires_grad=True) for _ in range(3))
    grid = torch.randn(heads, 2 * feat_size[0] - 1, 2 * feat_size[1] - 1, generator=gen, requires_grad=True)

    def attend(q, k, v, grid):
        return attend_in_row_bands(q, k, v, grid, feat_size)

    def saved_bytes(fn) -> int:
        with saved_for_backward() as saved:
            out = fn(q, k, v, grid)
        out.sum().backward()
        return sum(t.numel() * t.element_size() for t in saved)

    tokens_by_tokens = heads * tokens * tokens * 4  # bytes
    assert saved_bytes(attend) < tokens_by_tokens / 4  # the eager path, as its own tests check
    assert saved_bytes(torch.compile(attend, backend='aot_eager', fullgraph=True)) < tokens_by_tokens / 4


# -------------------------------------------------------------------------------------------------- torch.export

EXPORT_CASES = [pytest.param(name, features_only, 'fused', id=f'{name}-{"features" if features_only else "classifier"}')
                for name in FAMILIES for features_only in (False, True)] + [
    pytest.param('lit_s', True, 'reference', id='lit_s-features-reference')]  # the dense bias, gathered


@pytest.mark.slow
@pytest.mark.parametrize('name, features_only, attn_impl', EXPORT_CASES)
def test_exported_program_matches_eager(name, features_only, attn_impl):
    """``torch.export.export`` in eval mode; every model but the LESA classifier (whose table takes one grid) with a
    dynamic spatial size in multiples of 32, run at a second, non-square size. The banded attention of the LESA
    detection backbone and LIT-S is one operator of the program, which attends in the bands of the size it is run
    at (one query row per band in these small models); LIT-S's reference attention gathers its dense bias from index
    grids while exporting (``unfold``'s window sizes would fix the grid)."""
    model = _small(name, features_only=features_only, attn_impl=attn_impl).eval()
    inputs = [_images()]
    dynamic_shapes = None
    if name != 'lesa_resnet50':
        height, width = Dim('height', min=2, max=64), Dim('width', min=2, max=64)
        dynamic_shapes = ({2: 32 * height, 3: 32 * width},)
        inputs.append(torch.randn(2, 3, 96, 128, dtype=torch.float64))
    program = torch.export.export(model, (inputs[0],), dynamic_shapes=dynamic_shapes)
    banded = [t for t in _called(program.graph_module) if getattr(t, 'namespace', None) == 'lesa_lit_models']
    assert bool(banded) == ('max_chunk_logits' in TRACED[name] and attn_impl == 'fused')
    with torch.no_grad():
        for x in inputs:
            for got, want in zip(as_list(program.module()(x)), as_list(model(x))):
                torch.testing.assert_close(got, want, rtol=1e-7, atol=1e-9)
