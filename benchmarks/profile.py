"""Where one benchmark case spends its time: one step of it under ``torch.profiler``, operators by self time.

Usage (the case key as ``results.md`` and the run's log name it; fnmatch patterns allowed)::

    python -m benchmarks.profile lesa_resnet50_det-1024x1024-b1-fwd+bwd-fused --threads 2
    python -m benchmarks.profile 'lit_ti-800x1344-b1-fwd+bwd-compiled' --rows 40   # a compile_suite case

The case is built as :mod:`benchmarks.run` builds it (the detection backbones by the mmdet adapter, BatchNorm
frozen), in this process; its warm-up steps run first (after the compilation of a compiled case), then one step is
timed and one more runs under the profiler. A compiled case's generated C++ kernels are recorded by name
(``torch._inductor.config.cpp.enable_kernel_profile``).

On the CPU the report also gives the share of the step's self time spent in library kernels, which
``torch.compile`` calls as they are (convolutions and matmuls of oneDNN / BLAS, attention, torchvision's deformable
convolution): only the rest (elementwise work, reductions, copies) is what inductor fuses, so ``1 / share`` bounds
what compiling can gain.
"""
import argparse
import fnmatch
import re
import sys
import time
from typing import Iterable, List

from .cases import Case, compile_suite, suite
from .measure import build_step

__all__ = ['find_case', 'library_kernel_share', 'profile_case']

# operators (ATen / torchvision names) inductor leaves to their libraries instead of generating code for them
LIBRARY_KERNEL = re.compile(r'^(aten|torchvision|mkldnn)::(.*conv.*|mm|addmm|bmm|baddbmm|.*scaled_dot_product.*)$')


def find_case(pattern: str, device: str = 'cpu') -> Case:
    """The one case of the main or the compile suite whose key matches ``pattern``."""
    cases: List[Case] = list({c.key: c for c in (*suite(device=device), *compile_suite(device=device))}.values())
    matches = [c for c in cases if fnmatch.fnmatchcase(c.key, pattern)]
    if len(matches) != 1:
        listed = '\n  '.join(c.key for c in (matches or cases))
        what = f'{len(matches)} cases match' if matches else 'no case matches'
        raise ValueError(f'{what} {pattern!r}; name one of:\n  {listed}')
    return matches[0]


def library_kernel_share(events: Iterable) -> float:
    """Fraction of the self CPU time of profiler ``events`` (``prof.key_averages()``) spent in library kernels."""
    events = list(events)
    total = sum(e.self_cpu_time_total for e in events)
    library = sum(e.self_cpu_time_total for e in events if LIBRARY_KERNEL.match(e.key))
    return library / total if total else 0.


def profile_case(case: Case, device: str = 'cpu', threads: int = 0, rows: int = 30) -> str:
    """The step time of ``case`` and the profiler's table of its operators by self time (CPU, or CUDA on a GPU)."""
    import torch
    from torch.profiler import ProfilerActivity, profile
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    if case.compiled:
        torch._inductor.config.cpp.enable_kernel_profile = True
    step, sync, _ = build_step(case, device)
    for _ in range(case.warmup + (1 if case.compiled else 0)):  # the compilation first
        step()
        sync()
    t0 = time.perf_counter()
    step()
    sync()
    step_s = time.perf_counter() - t0
    cuda = torch.device(device).type == 'cuda'
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        step()
        sync()
    events = prof.key_averages()
    table = events.table(sort_by='self_cuda_time_total' if cuda else 'self_cpu_time_total', row_limit=rows,
                         max_name_column_width=60)
    head = (f'{case.key}: one step {step_s:.2f} s on {device} (threads={torch.get_num_threads()}; unprofiled, the '
            f'profiled step below runs slower)')
    if not cuda:  # on a GPU the CPU's self time is launch overhead, not the kernels
        share = library_kernel_share(events)
        head += (f'\nlibrary kernels (convolutions, matmuls, attention, deformable convolution): {share:.0%} of the '
                 f'CPU self time; compiling can make the step at most {1 / max(share, 1e-9):.2f}x faster')
    return f'{head}\n{table}'


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog='python -m benchmarks.profile', description=__doc__.split('\n\n')[0])
    parser.add_argument('case', help='a case key from results.md (fnmatch pattern)')
    parser.add_argument('--device', default='cpu', help="'cpu' or 'cuda' (or 'cuda:N')")
    parser.add_argument('--threads', type=int, default=0, help='intra-op threads (default: torch default)')
    parser.add_argument('--rows', type=int, default=30, help='operators to list')
    args = parser.parse_args(argv)
    try:
        case = find_case(args.case, args.device)
    except ValueError as e:
        print(e, file=sys.stderr)
        return 2
    print(profile_case(case, args.device, args.threads, args.rows))
    return 0


if __name__ == '__main__':
    sys.exit(main())
