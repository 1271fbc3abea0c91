"""What is measured: benchmark cases, the suites that group them, and the comparisons drawn from them."""
from dataclasses import dataclass, replace
from typing import Dict, List, Optional, Tuple

__all__ = ['Case', 'Comparison', 'suite', 'compile_suite', 'comparisons', 'PEERS', 'MODES', 'MMDET_PEERS',
           'DETECTION_PEERS', 'PEER_KWARGS', 'UPSTREAM', 'UpstreamReference']

MODES = ('fwd', 'fwd+bwd')

# each classifier of the package and the timm models of its class it is compared with at 224
PEERS: Dict[str, Tuple[str, ...]] = {
    'lesa_resnet50': ('resnet50', 'botnet26t_256'),
    'lesa_wrn50': ('wide_resnet50_2',),
    'lit_ti': ('pvt_v2_b1',),
    'lit_s': ('pvt_v2_b2', 'swin_tiny_patch4_window7_224'),
    'lit_m': (),
    'lit_b': (),
}
# timm models with a fixed input size other than 224
NATIVE_SIZE = {'botnet26t_256': 256}

# mmdet backbones measured next to ours, as mmdet's DCN configs build them (frozen_stages, norm_eval, with_cp per case)
_MMDET_RESNET50_DCN = dict(
    type='ResNet', depth=50, num_stages=4, out_indices=(0, 1, 2, 3), norm_cfg=dict(type='BN', requires_grad=True),
    style='pytorch', dcn=dict(type='DCN', deform_groups=1, fallback_on_stride=False),
    stage_with_dcn=(False, True, True, True))
# name: (mmdet ResNet config, width factor of the bottlenecks' 1x1-3x3-1x1 inner channels). mmdet has no wide
# ResNet (its ResNeXt widens grouped convolutions only): the wide peer is its ResNet-50 + DCN with the inner width
# doubled, as torchvision's wide_resnet50_2 doubles it
MMDET_PEERS = {
    'mmdet_resnet50_dcn': (_MMDET_RESNET50_DCN, 1),
    'mmdet_wide_resnet50_dcn': (_MMDET_RESNET50_DCN, 2),
}
# each detection backbone of the package and the same-size peers it is compared with (training step)
DETECTION_PEERS: Dict[Tuple[str, Tuple[int, int]], Tuple[str, ...]] = {
    ('lesa_resnet50_det', (1024, 1024)): ('mmdet_resnet50_dcn',),
    # the wide peer of the HTC config, and timm's wide ResNet-50 without DCN: the conv-only floor
    ('lesa_wrn50_det', (1280, 1280)): ('mmdet_wide_resnet50_dcn', 'wide_resnet50_2'),
    ('lit_ti', (800, 1344)): ('pvt_v2_b1',),
    ('lit_s', (800, 1344)): ('pvt_v2_b2',),
}


@dataclass(frozen=True)
class UpstreamReference:
    """The authors' backbone, measured once on the 2-core CPU (their code cannot be vendored): training step
    (forward + backward, batch 1, BatchNorm frozen) and peak RSS from ``/usr/bin/time``, forward alone where
    measured (seconds, GB = 1e9 bytes)."""
    setting: str
    step_s: float
    peak_rss_gb: float
    forward_s: Optional[float] = None


UPSTREAM = {
    ('lesa_resnet50_det', (1024, 1024)): UpstreamReference('as configured, with_cp_UB_terms_only=True', 66.9, 6.99),
    ('lit_ti', (800, 1344)): UpstreamReference('COCO backbone', 14.3, 6.08),
    ('lit_s', (800, 1344)): UpstreamReference('as configured, use_checkpoint=True', 35.8, 4.29, forward_s=10.6),
}
# the feature maps a peer's detector takes, where timm's features_only default differs (ResNets: C2-C5, no stem)
PEER_KWARGS = {'wide_resnet50_2': (('out_indices', (1, 2, 3, 4)),)}


@dataclass(frozen=True)
class Case:
    """One measurement: a model, an input, a mode and an attention implementation, in a process of its own.

    ``detection`` cases build the model with ``features_only=True``, sum every feature map for the backward
    pass and keep BatchNorm in eval mode while training (mmdet's ``norm_eval=True``).
    ``grad_checkpointing`` switches on the model's own checkpointing (LESA: the unary and binary terms of each
    block, as upstream's detection setting), not timm's per-stage checkpointing of the feature wrapper.
    ``frozen_stages`` (detection, fwd+bwd) freezes the stem and that many stages as mmdet's ResNet does (no gradient,
    eval mode); the authors' LESA detectors train with ``frozen_stages=1``.
    ``bf16`` runs the model under ``torch.autocast(dtype=torch.bfloat16)`` (mixed precision, as the LIT detector
    configs train on GPU); otherwise fp32.
    ``compiled`` runs ``torch.compile(model)`` (inductor); its first call, the compilation, is timed apart.
    ``onnxruntime`` / ``openvino`` (forward, CPU) export the model to ONNX (dynamic batch, height and width) and run
    the file with that runtime on the CPU, with as many intra-op threads as torch has; the export is timed apart.
    """
    model: str
    img_size: Tuple[int, int]
    mode: str = 'fwd'
    batch_size: int = 1
    attn_impl: Optional[str] = None
    grad_checkpointing: bool = False
    frozen_stages: int = 0
    detection: bool = False
    model_kwargs: Tuple[Tuple[str, object], ...] = ()
    bf16: bool = False
    compiled: bool = False
    onnxruntime: bool = False
    openvino: bool = False
    warmup: int = 1
    iters: int = 3

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f'Unknown mode {self.mode!r}; use one of {MODES}.')
        if self.warmup < 1 or self.iters < 1:
            raise ValueError('A case needs at least one warm-up and one timed iteration.')
        if self.runtime and (self.mode != 'fwd' or self.compiled or self.bf16 or self.onnxruntime + self.openvino > 1):
            raise ValueError('An onnxruntime or openvino case is an fp32 forward of the exported model in one runtime '
                             '(not compiled).')

    @classmethod
    def from_dict(cls, d: Dict) -> 'Case':
        """Inverse of ``dataclasses.asdict`` after a JSON round trip (lists back to tuples, extra keys ignored)."""
        fields = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        fields['img_size'] = tuple(fields['img_size'])
        fields['model_kwargs'] = tuple(
            (k, tuple(v) if isinstance(v, list) else v) for k, v in fields.get('model_kwargs', ()))
        return cls(**fields)

    @property
    def setting(self) -> Tuple:
        """Everything but the mode and the iteration counts: one table row. The runtime (compiled, onnxruntime,
        openvino) comes last."""
        return (self.model, self.img_size, self.batch_size, self.attn_impl, self.grad_checkpointing, self.frozen_stages,
                self.detection, self.bf16, self.compiled, self.onnxruntime, self.openvino)

    @property
    def runtime(self) -> Optional[str]:
        """The runtime an exported case runs in (``'onnxruntime'``, ``'openvino'``), None for PyTorch."""
        return 'onnxruntime' if self.onnxruntime else 'openvino' if self.openvino else None

    @property
    def eager(self) -> bool:
        return not (self.compiled or self.runtime)

    @property
    def key(self) -> str:
        h, w = self.img_size
        parts = [self.model, f'{h}x{w}', f'b{self.batch_size}', self.mode]
        if self.attn_impl:
            parts.append(self.attn_impl)
        if self.grad_checkpointing:
            parts.append('ckpt')
        if self.frozen_stages:
            parts.append(f'frozen{self.frozen_stages}')
        if self.bf16:
            parts.append('bf16')
        if self.compiled:
            parts.append('compiled')
        if self.runtime:
            parts.append(self.runtime)
        return '-'.join(parts)

    @property
    def variant_label(self) -> str:
        """How the case differs from the plain fp32 one: `` +ckpt``, `` +frozen_stages=N``, `` +bf16``."""
        return (' +ckpt' if self.grad_checkpointing else '') + (
            f' +frozen_stages={self.frozen_stages}' if self.frozen_stages else '') + (' +bf16' if self.bf16 else '') + (
            ' +compile' if self.compiled else '') + (f' +{self.runtime}' if self.runtime else '')


@dataclass(frozen=True)
class Comparison:
    """``fast`` against ``slow`` in one mode: memory ratio slow/fast and speed ratio fast/slow."""
    title: str
    fast: Case
    slow: Case


def _classification_cases(size: int, batch_size: int, warmup: int, iters: int) -> List[Case]:
    models = []
    for ours, peers in PEERS.items():
        models.append(ours)
        models += [p for p in peers if p not in models]
    return [
        Case(m, (NATIVE_SIZE.get(m, size),) * 2, mode, batch_size, warmup=warmup, iters=iters)
        for m in models for mode in MODES
    ]


def _detection_cases(
        model: str,
        img_size: Tuple[int, int],
        impls: Tuple[str, ...],
        train_settings: Tuple[Tuple[str, bool, int], ...],
        warmup: int,
        iters: int,
        model_kwargs: Tuple = (),
) -> List[Case]:
    """Forward of each impl, forward+backward of each (impl, gradient checkpointing, frozen stages) setting."""
    base = Case(model, img_size, detection=True, model_kwargs=model_kwargs, warmup=warmup, iters=iters)
    return [
        *[replace(base, attn_impl=impl) for impl in impls],
        *[replace(base, mode='fwd+bwd', attn_impl=impl, grad_checkpointing=ckpt, frozen_stages=frozen)
          for impl, ckpt, frozen in train_settings],
    ]


LESA_IMPLS = ('fused', 'reference')
LIT_IMPLS = ('fused', 'reference')
# without checkpointing the LESA reference keeps several (G, L, L) fp32 tensors per block for backward (over 10 GiB
# at 1024x1024), so it is also run as upstream trains it: unary/binary terms checkpointed, stem and stage 1 frozen
LESA_TRAIN = tuple((impl, ckpt, frozen) for frozen in (0, 1) for ckpt in (False, True) for impl in LESA_IMPLS)
LIT_TRAIN = (('fused', False, 0), ('reference', False, 0))


def _lesa_det_kwargs(img_size: int) -> Tuple[Tuple[str, object], ...]:
    """Position tables for the benchmarked size; C2-C5 (timm feature indices 1-4, mmdet ResNet's 0-3)."""
    return ('img_size', img_size), ('out_indices', (1, 2, 3, 4))


def suite(quick: bool = False, device: str = 'cpu') -> List[Case]:
    """The full suite (classifiers at 224, detection backbones at detection sizes) or a tiny smoke suite.

    On CUDA, where an iteration takes milliseconds, every full-suite case warms up 3 times and times 10.
    """
    if quick:
        return [
            *[Case('resnet50', (64, 64), mode, warmup=1, iters=1) for mode in MODES],
            *_detection_cases('lesa_resnet50_det', (128, 128), LESA_IMPLS, LESA_TRAIN[:2], 1, 1, _lesa_det_kwargs(128)),
            *_detection_cases('lit_s', (128, 192), LIT_IMPLS, LIT_TRAIN, 1, 1),
            Case('mmdet_resnet50_dcn', (128, 128), 'fwd+bwd', detection=True, warmup=1, iters=1),
        ]
    cases = [
        *_classification_cases(224, batch_size=4, warmup=1, iters=3),
        # on 2 CPU cores one fwd+bwd iteration at 1024x1024 takes minutes: one warm-up, one timed
        *_detection_cases('lesa_resnet50_det', (1024, 1024), LESA_IMPLS, LESA_TRAIN, 1, 1, _lesa_det_kwargs(1024)),
        # the HTC backbone at its 1280x1280 (a wide network on 6400-token grids); the reference's training step
        # needs well over the memory cap, so only the fused one trains
        *_detection_cases('lesa_wrn50_det', (1280, 1280), LESA_IMPLS, (('fused', False, 0),), 1, 1,
                          _lesa_det_kwargs(1280)),
        *_detection_cases('lit_s', (800, 1344), LIT_IMPLS, LIT_TRAIN, 1, 2),
        *_detection_cases('lit_ti', (800, 1344), LIT_IMPLS, LIT_TRAIN, 1, 2),
        # the same-size peers of the detection backbones, training step
        *[Case(peer, size, 'fwd+bwd', detection=True, model_kwargs=PEER_KWARGS.get(peer, ()), warmup=1,
               iters=1 if size[0] >= 1024 else 2)
          for (_, size), peers in DETECTION_PEERS.items() for peer in peers],
    ]
    if not device.startswith('cuda'):
        return cases
    # mixed precision, as the LIT detectors train on GPU (bf16 matmuls on CPU are slow and not how anyone trains)
    cases += [replace(c, bf16=True) for c in cases if c.detection and c.model.startswith('lit_')]
    return [replace(c, warmup=3, iters=10) for c in cases]


def compile_suite(quick: bool = False, device: str = 'cpu') -> List[Case]:
    """Eager and ``torch.compile``-d pairs: the classifiers at 224 (batch 4) and the detection backbones at their
    detection sizes (batch 1, as in :func:`suite`), fwd and fwd+bwd, default attention, no checkpointing; on the CPU
    also the detection backbones' forward exported to ONNX and run by onnxruntime and by OpenVINO."""
    if quick:
        eager = [
            *[Case('lit_ti', (64, 64), mode, warmup=1, iters=1) for mode in MODES],
            *[Case('lesa_resnet50_det', (64, 64), mode, detection=True, model_kwargs=_lesa_det_kwargs(64),
                   warmup=1, iters=1) for mode in MODES],
        ]
    else:
        eager = [
            *[Case(m, (224, 224), mode, 4, warmup=1, iters=3) for m in PEERS for mode in MODES],
            *[Case(m, size, mode, detection=True, model_kwargs=kwargs, warmup=1, iters=iters)
              for m, size, kwargs, iters in (  # the quickest to compile first: an interrupted run keeps the most
                  ('lit_ti', (800, 1344), (), 2),
                  ('lit_s', (800, 1344), (), 2),
                  ('lesa_resnet50_det', (1024, 1024), _lesa_det_kwargs(1024), 1),
                  ('lesa_wrn50_det', (1280, 1280), _lesa_det_kwargs(1280), 1))
              for mode in MODES],
        ]
        if device.startswith('cuda'):
            eager = [replace(c, warmup=3, iters=10) for c in eager]
    onnx = [replace(e, **{runtime: True}) for e in eager if e.detection and e.mode == 'fwd'
            and not device.startswith('cuda') for runtime in ('onnxruntime', 'openvino')]
    return [c for e in eager for c in (e, replace(e, compiled=True))] + onnx


def _compiled_vs_eager(cases: List[Case]) -> List[Comparison]:
    """Each compiled and each onnxruntime / openvino case against the eager case of the same setting."""
    eager = {c.setting[:-3] + (c.mode,): c for c in cases if c.eager}
    out = []
    for fast in cases:
        slow = None if fast.eager else eager.get(fast.setting[:-3] + (fast.mode,))
        if slow is not None:
            h, w = fast.img_size
            runtime = 'compiled' if fast.compiled else fast.runtime
            out.append(Comparison(f'{fast.model} {h}x{w} {fast.mode}: {runtime} vs eager', fast, slow))
    return out


_REFERENCE_OF = {'fused': 'reference'}


def _label(case: Case) -> str:
    return case.attn_impl + (' +ckpt' if case.grad_checkpointing else '') + (' +bf16' if case.bf16 else '')


def detection_cases(cases: List[Case]) -> Dict[tuple, Case]:
    """Eager detection cases by ``(model, img_size, mode, frozen_stages, bf16, attn_impl, grad_checkpointing)``;
    a backbone's plain case (fused, no freezing, fp32, no checkpointing) is ``plain_key(model, img_size, mode)``."""
    return {(c.model, c.img_size, c.mode, c.frozen_stages, c.bf16, c.attn_impl, c.grad_checkpointing): c
            for c in cases if c.detection and c.eager}


def plain_key(model: str, img_size: Tuple[int, int], mode: str, attn_impl: Optional[str] = 'fused') -> tuple:
    return model, img_size, mode, 0, False, attn_impl, False


def comparisons(cases: List[Case]) -> List[Comparison]:
    """Fused vs reference detection backbones, detection backbones vs their peers, classifiers vs theirs at 224.

    A fused detection case is compared with the reference case of the same settings and, when it runs without
    checkpointing, also with the checkpointed reference (how upstream trains).
    """
    out = []
    det = detection_cases(cases)
    for (model, size, mode, frozen, bf16, impl, ckpt), fast in det.items():
        if impl not in _REFERENCE_OF:
            continue
        for slow_ckpt in ((ckpt,) if ckpt else (False, True)):
            slow = det.get((model, size, mode, frozen, bf16, _REFERENCE_OF[impl], slow_ckpt))
            if slow is not None:
                title = (f'{model} {size[0]}x{size[1]} {mode}{f" frozen_stages={frozen}" if frozen else ""}: '
                         f'{_label(fast)} vs {_label(slow)}')
                out.append(Comparison(title, fast, slow))
    for (model, size), peers in DETECTION_PEERS.items():
        ours = det.get(plain_key(model, size, 'fwd+bwd'))
        for peer in peers:
            theirs = det.get(plain_key(peer, size, 'fwd+bwd', attn_impl=None))
            if ours is not None and theirs is not None:
                out.append(Comparison(f'{model} {size[0]}x{size[1]} fwd+bwd: fused vs {peer}', ours, theirs))
    cls = {(c.model, c.mode): c for c in cases if not c.detection and c.eager}
    for ours, peers in PEERS.items():
        for peer in peers:
            for mode in MODES:
                if (ours, mode) in cls and (peer, mode) in cls:
                    out.append(Comparison(f'{ours} vs {peer} {mode}', cls[(ours, mode)], cls[(peer, mode)]))
    return out + _compiled_vs_eager(cases)
