"""Throughput and peak memory of every model of the package against timm peers, fused vs reference attention.

Usage (``make bench`` runs the first line)::

    python -m benchmarks.run                        # full suite, CPU, writes benchmarks/results/
    python -m benchmarks.run --threads 1            # the committed results: 1 thread is steadier on a shared CPU
    python -m benchmarks.run --quick --out /tmp/b   # tiny sizes, 1 thread, under a minute: a smoke test
    python -m benchmarks.run --device cuda --out benchmarks/results/cuda
    python -m benchmarks.run --models 'lesa_resnet50_det,lit_s'   # only the cases of these models (fnmatch)
    python -m benchmarks.run --compile --cases '*-1024x1024-*-fwd+bwd*'   # only these case keys (fnmatch)
    python -m benchmarks.run --render benchmarks/results/results.json   # table and chart again, no measuring
    python -m benchmarks.run --compile --out benchmarks/results/compile   # torch.compile, onnxruntime, OpenVINO vs eager

What is measured and how (cases, peers, memory and time): ``benchmarks/README.md``.
"""
import argparse
import datetime
import fnmatch
import multiprocessing as mp
import os
import platform
import subprocess
import sys
import tempfile
import time
from typing import Callable, Dict, List

from . import measure, report
from .cases import Case, compile_suite, suite

_GiB = 2 ** 30
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _rss_bytes(pid: int) -> int:
    try:
        return measure.proc_status_bytes('VmRSS', str(pid))
    except (OSError, KeyError):  # exited meanwhile
        return 0


def _tail(path: str, lines: int = 3) -> str:
    try:
        with open(path, errors='replace') as f:
            return ' | '.join(line.strip() for line in f.read().strip().splitlines()[-lines:])
    except OSError:
        return ''


def run_in_child(ctx, fn: Callable[..., Dict], args: tuple, log_path: str, mem_limit_gb: float,
                 timeout_s: float) -> Dict:
    """``fn(*args)`` in a forked process, watched for its resident size and time; always returns a result dict."""
    recv_conn, send_conn = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=measure.child_main, args=(fn, args, send_conn, log_path))
    start = time.monotonic()
    proc.start()
    send_conn.close()
    result, max_rss = None, 0
    while result is None:
        if recv_conn.poll(0.1):
            try:
                result = recv_conn.recv()
            except EOFError:  # died without an answer
                break
            continue
        rss = _rss_bytes(proc.pid)
        max_rss = max(max_rss, rss)
        if mem_limit_gb and rss > mem_limit_gb * _GiB * 1.05:
            result = {'status': 'oom', 'error': f'resident size over {mem_limit_gb:g} GiB (stopped by the watchdog)'}
        elif time.monotonic() - start > timeout_s:
            result = {'status': 'timeout', 'error': f'over {timeout_s:g} s'}
        else:
            continue
        proc.kill()
    proc.join()
    recv_conn.close()
    if result is None:
        status = 'oom' if proc.exitcode == -9 else 'error'  # -9 without our kill: the kernel's OOM killer
        result = {'status': status, 'error': f'exit code {proc.exitcode}: {_tail(log_path)}'}
    elif result.get('status') == 'error' and not result.get('error'):
        result['error'] = _tail(log_path)
    result['wall_s'] = round(time.monotonic() - start, 2)
    result['max_rss_bytes'] = max_rss
    return result


def _git(*args: str) -> str:
    try:
        return subprocess.run(['git', *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return 'unknown'


# the vector instruction sets that set the speed of the convolutions, matmuls and attention kernels
_VECTOR_FLAGS = ('avx2', 'fma', 'avx512f', 'avx512_vnni', 'avx512_bf16', 'avx512_fp16', 'amx_tile', 'amx_bf16')


def _cpu_description() -> str:
    model, flags = platform.processor() or platform.machine(), set()
    with open('/proc/cpuinfo') as f:
        for line in f:
            if line.startswith('model name'):
                model = line.split(':', 1)[1].strip()
            elif line.startswith('flags'):
                flags = set(line.split(':', 1)[1].split())
                break
    ram = _meminfo_bytes('MemTotal') / _GiB
    vector = ' '.join(f for f in _VECTOR_FLAGS if f in flags) or 'none of ' + ' '.join(_VECTOR_FLAGS)
    return f'{model} (flags: {vector}), {os.cpu_count()} logical cores, {ram:.0f} GiB RAM'


def _meminfo_bytes(field: str) -> int:
    with open('/proc/meminfo') as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ':'))


def case_memory_limit_gb(requested_gb: float, reserve_gb: float) -> float:
    """The requested cap, lowered to what the machine has available now minus a reserve for everyone else."""
    return round(min(requested_gb, _meminfo_bytes('MemAvailable') / _GiB - reserve_gb), 1)


def _load() -> str:
    return ' / '.join(f'{x:.1f}' for x in os.getloadavg())


def _matches(name: str, patterns: str) -> bool:
    return any(fnmatch.fnmatchcase(name, p.strip()) for p in patterns.split(',') if p.strip())


def select(cases: List[Case], models: str = '*', keys: str = '*') -> List[Case]:
    """The cases whose model matches one of the comma-separated ``models`` patterns and whose key one of ``keys``."""
    return [c for c in cases if _matches(c.model, models) and _matches(c.key, keys)]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog='python -m benchmarks.run', description=__doc__.split('\n\n')[0])
    parser.add_argument('--quick', action='store_true',
                        help='tiny sizes and iteration counts, one thread unless --threads (< 1 min)')
    parser.add_argument('--out', default=os.path.join('benchmarks', 'results'), help='output folder')
    parser.add_argument('--device', default='cpu', help="'cpu' or 'cuda' (or 'cuda:N')")
    parser.add_argument('--threads', type=int, default=None,
                        help='intra-op threads (default: torch default, 1 with --quick)')
    parser.add_argument('--mem-limit-gb', type=float, default=16., help='memory cap of each case process')
    parser.add_argument('--mem-reserve-gb', type=float, default=2.,
                        help='lower the cap of a case to the available memory minus this (a shared machine)')
    parser.add_argument('--case-timeout', type=float, default=900., help='seconds before a case is stopped')
    parser.add_argument('--models', default='*', help='comma-separated fnmatch patterns of models to run')
    parser.add_argument('--cases', default='*',
                        help="comma-separated fnmatch patterns of case keys (as the log names them), e.g. '*-fwd+bwd*'")
    parser.add_argument('--compile', action='store_true',
                        help='measure torch.compile (and on the CPU onnxruntime and OpenVINO) vs eager '
                             '(cases.compile_suite) instead of the main suite')
    parser.add_argument('--render', metavar='RESULTS_JSON',
                        help='write results.md and the chart into --out from this results.json, measuring nothing')
    args = parser.parse_args(argv)
    if args.threads is None:
        args.threads = 1 if args.quick else 0
    if not args.device.startswith(('cpu', 'cuda')):
        parser.error(f'--device must be cpu or cuda[:N], got {args.device!r}')
    return args


def write_outputs(out: str, meta: Dict, cases: List[Case], results: Dict[str, Dict], json_too: bool = True) -> None:
    os.makedirs(out, exist_ok=True)
    if json_too:
        report.write_json(os.path.join(out, 'results.json'), meta, cases, results)
    report.write_markdown(os.path.join(out, 'results.md'), meta, cases, results)
    report.write_chart(os.path.join(out, report.CHART), meta, cases, results)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.render:
        meta, cases, results = report.read_json(args.render)
        same_file = os.path.abspath(args.render) == os.path.abspath(os.path.join(args.out, 'results.json'))
        write_outputs(args.out, meta, cases, results, json_too=not same_file)
        print(f'Rendered {args.render} into {args.out}')
        return 0
    cases = select((compile_suite if args.compile else suite)(quick=args.quick, device=args.device), args.models,
                   args.cases)
    if not cases:
        print(f'No case matches --models {args.models!r} and --cases {args.cases!r}.', file=sys.stderr)
        return 2
    os.makedirs(args.out, exist_ok=True)
    ctx = mp.get_context('forkserver')
    ctx.set_forkserver_preload(['torch', 'timm'])
    started = time.monotonic()
    meta = {
        'command': ' '.join(['python -m benchmarks.run', *(argv if argv is not None else sys.argv[1:])]),
        'date': datetime.datetime.now().astimezone().strftime('%Y-%m-%d %H:%M %Z'),
        'commit': _git('rev-parse', '--short', 'HEAD'),
        'uncommitted_model_changes': bool(_git('status', '--porcelain', '--', 'lesa_lit_models')),
        'load_before': _load(),
        'mem_limit_gb': args.mem_limit_gb,
        'mem_reserve_gb': args.mem_reserve_gb,
    }
    results: Dict[str, Dict] = {}
    with tempfile.TemporaryDirectory(prefix='bench-logs-') as logs:
        software = run_in_child(ctx, measure.describe_software, (args.device, args.threads),
                                os.path.join(logs, 'software.log'), args.mem_limit_gb, args.case_timeout)
        if software.get('status') == 'error':
            print(f'Cannot start torch in a child process: {software["error"]}', file=sys.stderr)
            return 1
        description = software.get('gpu') or _cpu_description()
        meta['device'] = {'name': args.device, 'description': description, **software}
        print(f'{len(cases)} cases on {description} (torch {software["torch"]}, {software["threads"]} threads)')
        for i, case in enumerate(cases, 1):
            limit = case_memory_limit_gb(args.mem_limit_gb, args.mem_reserve_gb)
            result = run_in_child(ctx, measure.measure, (case, args.device, args.threads, limit),
                                  os.path.join(logs, case.key + '.log'), limit, args.case_timeout)
            result['mem_limit_gb'] = limit
            results[case.key] = result
            summary = (f'{result["img_per_s"]:.3g} img/s, peak {result["peak_bytes"] / 2 ** 20:.0f} MiB'
                       if result['status'] == 'ok' else f'{result["status"]}: {result.get("error", "")}')
            print(f'[{i}/{len(cases)}] {case.key}: {summary} ({result["wall_s"]:.0f} s)', flush=True)
            # kept after every case: an interrupted run still renders (--render) what it measured
            report.write_json(os.path.join(args.out, 'results.json'), meta, cases[:i], results)
    meta['load_after'] = _load()
    meta['total_s'] = round(time.monotonic() - started, 1)
    write_outputs(args.out, meta, cases, results)
    print(f'Wrote results.md, results.json and {report.CHART} to {args.out} in {meta["total_s"]:.0f} s')
    return 0


if __name__ == '__main__':
    sys.exit(main())
