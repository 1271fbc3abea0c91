"""Measure one :class:`~benchmarks.cases.Case` inside the (forked) process that runs it.

Warm-ups, then the timed iterations, each recording its wall time (throughput) and the process's CPU time, which
on a shared machine is the steadier measure of the work (with one intra-op thread it equals the wall time of an
idle machine); then the process's peak resident size; last the memory pass, one more iteration: on CUDA the
allocator's peak (``torch.cuda.max_memory_allocated`` after a reset), on CPU the peak of the bytes the CPU
allocator reports to ``torch.profiler(profile_memory=True)`` during that iteration, added to what is resident
before it (weights, buffers, input). It comes last because the profiler's own records would count in the
resident size. onnxruntime and OpenVINO allocate outside torch: their peak is the rise of the process's resident
size (its peak reset after the export) over the session's creation and every run. Measured the same way for every
case (the one measure the runtimes and eager are compared by): the rise of the process's peak resident size over the
warm-up and timed runs above its resident size before them (weights, input and a runtime's session already there).

torch and timm are imported inside the functions: the harness process stays light, and the fork server that
starts each case has them preloaded.
"""
import copy
import gc
import os
import resource
import statistics
import tempfile
import time
import traceback
from typing import Callable, Dict, Tuple

from .cases import MMDET_PEERS, Case

__all__ = ['measure', 'build_step', 'describe_software', 'child_main', 'cpu_profiled_peak', 'proc_status_bytes']

_GiB = 2 ** 30


def proc_status_bytes(field: str, pid: str = 'self') -> int:
    with open(f'/proc/{pid}/status') as f:
        for line in f:
            if line.startswith(field + ':'):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def _limit_address_space(mem_limit_bytes: int) -> None:
    """Let this process grow by at most what keeps its resident size under the limit: a bigger allocation
    fails inside torch with a clear error (reported as OOM) instead of taking the machine's memory."""
    budget = mem_limit_bytes - proc_status_bytes('VmRSS')
    if budget <= 0:
        raise MemoryError(f'the process already holds more than the {mem_limit_bytes / _GiB:.1f} GiB limit')
    limit = proc_status_bytes('VmSize') + budget
    resource.setrlimit(resource.RLIMIT_AS, (limit, resource.getrlimit(resource.RLIMIT_AS)[1]))


def cpu_profiled_peak(step: Callable[[], None]) -> int:
    """Peak of (allocated - freed) bytes of the CPU allocator during ``step``, from the profiler's memory events."""
    from torch._C._autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == '[memory]']
    events.sort(key=lambda e: e.start_ns())
    current = peak = 0
    for e in events:
        if e.device_type() == DeviceType.CPU:
            current += e.nbytes()
            peak = max(peak, current)
    return peak


def _widen_bottlenecks(resnet, factor: int) -> None:
    """Multiply the inner width (conv1, conv2 and their norms) of every bottleneck of an mmdet ResNet by ``factor``,
    keeping its convolution types (DCN where configured) and strides: torchvision's wide ResNet from mmdet's."""
    from mmcv.cnn import build_conv_layer, build_norm_layer
    for layer_name in resnet.res_layers:
        for block in getattr(resnet, layer_name):
            width = block.planes * factor
            block.conv1 = build_conv_layer(None, block.inplanes, width, 1, stride=block.conv1_stride, bias=False)
            block.conv2 = build_conv_layer(block.dcn if block.with_dcn else None, width, width, 3,
                                           stride=block.conv2_stride, padding=block.dilation,
                                           dilation=block.dilation, bias=False)
            block.conv3 = build_conv_layer(None, width, block.planes * block.expansion, 1, bias=False)
            for name in (block.norm1_name, block.norm2_name):
                setattr(block, name, build_norm_layer(block.norm_cfg, width)[1])
    resnet.train(resnet.training)  # frozen stages and norm_eval for the new layers too


def _detection_backbone(case: Case):
    """The backbone as a detector trains it: the mmdet adapter (LESA/LIT/timm models) or mmdet's own ResNet peers,
    BatchNorm frozen (``norm_eval=True``), ``frozen_stages`` and gradient checkpointing (``with_cp``) as configured."""
    try:
        from mmdet.registry import MODELS
        from mmdet.utils import register_all_modules
        import lesa_lit_det  # noqa: F401  (registers TimmBackbone)
    except ImportError as e:
        raise RuntimeError(
            f'Detection cases build their backbones with mmdet and the adapter in detection/ ({e}); install the '
            f'detection dependencies (`make setup`) and put detection/ on PYTHONPATH, or select classifier cases '
            f'with --models.') from e
    register_all_modules(init_default_scope=True)
    frozen_stages = case.frozen_stages or -1
    if case.model in MMDET_PEERS:
        resnet_cfg, width_factor = MMDET_PEERS[case.model]
        # deep copy: mmdet's Bottleneck pops keys from the dcn dict it is given
        backbone = MODELS.build(dict(copy.deepcopy(resnet_cfg), frozen_stages=frozen_stages, norm_eval=True,
                                     with_cp=case.grad_checkpointing))
        if width_factor != 1:
            _widen_bottlenecks(backbone, width_factor)
        return backbone
    cfg = dict(type='TimmBackbone', model_name=case.model, frozen_stages=frozen_stages, norm_eval=True,
               with_cp=case.grad_checkpointing, **dict(case.model_kwargs))
    if case.attn_impl:
        cfg['attn_impl'] = case.attn_impl
    return MODELS.build(cfg)


def _reset_peak_rss() -> None:
    """Restart the process's peak resident size (``VmHWM``) from its current size (Linux ``clear_refs``)."""
    with open('/proc/self/clear_refs', 'w') as f:
        f.write('5')


def _exported_step(model, x, runtime: str, info: Dict) -> Callable[[], None]:
    """Export ``model`` to ONNX (timed into ``info['export_s']``), drop it, and return a forward of the file in
    ``runtime`` (onnxruntime, openvino) on the CPU with torch's intra-op threads; ``info['peak_bytes']`` then reads
    the rise of the resident size over the runtime's session and runs."""
    import torch
    from lesa_lit_models.export import export_onnx, onnx_session
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix='bench-onnx-') as folder:
        path = export_onnx(model.eval(), os.path.join(folder, 'model.onnx'), torch.randn(2, *x.shape[1:]),
                           dynamic_size=True)
        info['export_s'] = time.perf_counter() - t0
        del model
        gc.collect()
        _reset_peak_rss()
        rss_before = proc_status_bytes('VmRSS')
        run = onnx_session(path, runtime, torch.get_num_threads())
    image = x.numpy()
    info['peak_bytes'] = lambda: proc_status_bytes('VmHWM') - rss_before
    return lambda: run(image)


def _sum_outputs(out):
    if not isinstance(out, (list, tuple, dict)):
        return out.float().sum()
    if isinstance(out, dict):
        out = list(out.values())
    return sum(o.float().sum() for o in out)


def build_step(case: Case, device: str = 'cpu') -> Tuple[Callable[[], None], Callable[[], None], Dict]:
    """The case's model on ``device`` (``torch.compile``-d if the case says so) and one iteration of it.

    Returns ``(step, sync, info)``: ``step()`` runs one forward (inference mode) or forward + backward, ``sync()``
    waits for the device, ``info`` holds ``params_m`` and ``resident_bytes`` (weights, buffers and input); for an
    onnxruntime / openvino case also ``export_s`` and ``peak_bytes()``, the session's peak so far.
    """
    import timm
    import torch
    import lesa_lit_models  # noqa: F401  (registers the package's models)
    if case.detection:
        model = _detection_backbone(case).to(device)
    else:
        model = timm.create_model(case.model, pretrained=False, **dict(case.model_kwargs)).to(device)
    x = torch.randn(case.batch_size, 3, *case.img_size, device=device)
    train = case.mode == 'fwd+bwd'
    model.train(train)
    tensors = [*model.parameters(), *model.buffers(), x]
    info = {'params_m': sum(p.numel() for p in model.parameters()) / 1e6,
            'resident_bytes': sum(t.numel() * t.element_size() for t in tensors)}
    if case.compiled:
        model = torch.compile(model)
    if case.runtime:
        if torch.device(device).type != 'cpu':
            raise ValueError(f'{case.runtime} cases run on the CPU, not {device}.')
        return _exported_step(model, x, case.runtime, info), lambda: None, info

    def forward():
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=case.bf16):
            return model(x)

    def step():
        if train:
            model.zero_grad(set_to_none=True)
            _sum_outputs(forward()).backward()
        else:
            with torch.inference_mode():
                forward()

    def sync():
        if torch.device(device).type == 'cuda':
            torch.cuda.synchronize(device)

    return step, sync, info


def measure(case: Case, device: str = 'cpu', threads: int = 0, mem_limit_gb: float = 0.) -> Dict:
    """Build the case's model, time its iterations after the warm-ups, then measure its peak memory."""
    import timm
    import torch
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    import lesa_lit_models  # noqa: F401  (registers the package's models)
    result = {'threads': torch.get_num_threads()}
    if case.model not in MMDET_PEERS and not timm.is_model(case.model):
        return {**result, 'status': 'missing', 'error': f'{case.model} is not registered with timm'}
    step, sync, info = build_step(case, device)
    result['params_m'] = info['params_m']
    if 'export_s' in info:
        result['export_s'] = info['export_s']
    resident = info['resident_bytes']
    cuda = torch.device(device).type == 'cuda'

    if case.compiled:  # the compilation, outside the memory pass and the timings
        t0 = time.perf_counter()
        step()
        sync()
        result['compile_s'] = time.perf_counter() - t0
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    build_peak_rss = proc_status_bytes('VmHWM')
    _reset_peak_rss()
    runs_start_rss = proc_status_bytes('VmRSS')
    if mem_limit_gb and not cuda:
        _limit_address_space(int(mem_limit_gb * _GiB))
    warmup_s = []
    for _ in range(case.warmup):
        t0 = time.perf_counter()
        step()
        sync()
        warmup_s.append(time.perf_counter() - t0)
    times, cpu_times = [], []
    for _ in range(case.iters):
        t0, c0 = time.perf_counter(), time.process_time()
        step()
        sync()
        times.append(time.perf_counter() - t0)
        cpu_times.append(time.process_time() - c0)
    # the process's peak resident size, as /usr/bin/time reports it, taken before the memory pass, whose CPU
    # profiler keeps every event it records
    runs_peak_rss = proc_status_bytes('VmHWM')
    peak_rss = max(build_peak_rss, runs_peak_rss)
    if 'peak_bytes' in info:  # onnxruntime, openvino: their allocations are the process's resident growth
        peak = info['peak_bytes']()
    elif cuda:
        torch.cuda.reset_peak_memory_stats(device)
        step()
        sync()
        peak = torch.cuda.max_memory_allocated(device)
    else:
        peak = resident + cpu_profiled_peak(step)
    return {
        **result,
        'status': 'ok',
        'peak_bytes': peak,
        'resident_bytes': resident,
        'rss_growth_bytes': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss_before,
        'peak_rss_bytes': peak_rss,
        'runs_rss_rise_bytes': runs_peak_rss - runs_start_rss,
        'warmup_s': warmup_s,
        'iter_s': times,
        'iter_cpu_s': cpu_times,
        'img_per_s': case.batch_size / statistics.median(times),
        'img_per_cpu_s': case.batch_size / statistics.median(cpu_times),
    }


def describe_software(device: str = 'cpu', threads: int = 0) -> Dict:
    """Library versions, intra-op threads and, on CUDA, the GPU."""
    import timm
    import torch
    if threads:
        torch.set_num_threads(threads)
    info = {'torch': torch.__version__, 'timm': timm.__version__, 'threads': torch.get_num_threads()}
    if torch.device(device).type == 'cuda':
        props = torch.cuda.get_device_properties(device)
        info['gpu'] = f'{props.name}, {props.total_memory / _GiB:.0f} GiB'
        info['cuda'] = torch.version.cuda
    return info


def _is_oom(exc: BaseException) -> bool:
    import torch
    if isinstance(exc, (MemoryError, torch.OutOfMemoryError)):
        return True
    text = str(exc)
    return "can't allocate memory" in text or 'out of memory' in text.lower()


def child_main(fn: Callable[..., Dict], args: tuple, conn, log_path: str) -> None:
    """Entry of a forked process: its output goes to ``log_path``, ``fn(*args)`` (a dict) back through ``conn``."""
    log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(log_fd, 1)
    os.dup2(log_fd, 2)
    try:  # should the machine run out of memory anyway, the kernel stops this process, not a neighbour's
        with open('/proc/self/oom_score_adj', 'w') as f:
            f.write('1000')
    except OSError:
        pass
    try:
        result = fn(*args)
    except BaseException as exc:  # reported in the table, never raised into the harness
        traceback.print_exc()
        status = 'oom' if _is_oom(exc) else 'error'
        last = (str(exc).strip().splitlines() or [type(exc).__name__])[-1]
        result = {'status': status, 'error': f'{type(exc).__name__}: {last}'[:300]}
    conn.send(result)
    conn.close()
    # the kernel frees everything at once; skip interpreter teardown of large models
    os._exit(0)

