"""Turn measured cases into ``results.json``, the markdown table ``results.md`` and the chart ``chart.png``."""
import json
from dataclasses import asdict
from typing import Dict, List, Optional, Tuple

from .cases import MODES, UPSTREAM, Case, Comparison, comparisons, detection_cases, plain_key

__all__ = ['ratios', 'upstream_rows', 'write_json', 'read_json', 'write_markdown', 'write_chart', 'CHART']

CHART = 'chart.png'

_MiB = 2 ** 20
_GiB = 2 ** 30

METHOD = 'described once, in `benchmarks/README.md`.'


def _fmt_bytes(n: float) -> str:
    return f'{n / _MiB:.0f} MiB' if n < _GiB else f'{n / _GiB:.2f} GiB'


def _fmt_rate(r: float) -> str:
    return f'{r:.3g}' if r < 100 else f'{r:.0f}'


def _failure(result: Dict, mem_limit_gb: float) -> str:
    status = result.get('status', 'error')
    if status == 'oom':
        return f'OOM (> {result.get("mem_limit_gb", mem_limit_gb):g} GiB)'
    return {'missing': 'not registered', 'timeout': 'timeout'}.get(status, 'error')


def ratios(comp: Comparison, results: Dict[str, Dict], mem_limit_gb: float) -> Dict:
    """Memory ratio slow/fast (``>`` a lower bound when the slow case ran out of memory) and speed ratio fast/slow
    (None: not measurable)."""
    fast, slow = results.get(comp.fast.key, {}), results.get(comp.slow.key, {})
    out = {'title': comp.title, 'fast': comp.fast.key, 'slow': comp.slow.key, 'memory_ratio': None,
           'memory_ratio_is_lower_bound': False, 'speed_ratio': None, 'cpu_time_speed_ratio': None}
    if fast.get('status') != 'ok':
        return out
    # onnxruntime and OpenVINO allocate outside torch: both sides by the one measure taken alike (benchmarks/measure.py)
    memory = 'runs_rss_rise_bytes' if comp.fast.runtime and 'runs_rss_rise_bytes' in slow else 'peak_bytes'
    if slow.get('status') == 'ok':
        out['memory_ratio'] = slow[memory] / fast[memory]
        out['speed_ratio'] = fast['img_per_s'] / slow['img_per_s']
        if 'img_per_cpu_s' in fast and 'img_per_cpu_s' in slow:
            out['cpu_time_speed_ratio'] = fast['img_per_cpu_s'] / slow['img_per_cpu_s']
    elif slow.get('status') == 'oom':
        out['memory_ratio'] = slow.get('mem_limit_gb', mem_limit_gb) * _GiB / fast['peak_bytes']
        out['memory_ratio_is_lower_bound'] = True
    return out


def write_json(path: str, meta: Dict, cases: List[Case], results: Dict[str, Dict]) -> None:
    mem_limit_gb = meta['mem_limit_gb']
    doc = {
        **meta,
        'method': METHOD,
        'cases': [{'key': c.key, **asdict(c), 'result': results.get(c.key, {})} for c in cases],
        'comparisons': [ratios(comp, results, mem_limit_gb) for comp in comparisons(cases)],
        'upstream': upstream_rows(cases, results),
    }
    with open(path, 'w') as f:
        json.dump(doc, f, indent=1)
        f.write('\n')


def read_json(path: str) -> Tuple[Dict, List[Case], Dict[str, Dict]]:
    """(meta, cases, results) of a ``results.json``, to render its table and chart again."""
    with open(path) as f:
        doc = json.load(f)
    cases = [Case.from_dict(c) for c in doc['cases']]
    results = {c.key: d['result'] for c, d in zip(cases, doc['cases'])}
    meta = {k: v for k, v in doc.items() if k not in ('cases', 'comparisons', 'upstream', 'method')}
    return meta, cases, results


def _rows(cases: List[Case]) -> List[Tuple[Case, Dict[str, Optional[Case]]]]:
    """One row per setting, in suite order, with its case for each mode."""
    rows: Dict[Tuple, Dict[str, Optional[Case]]] = {}
    for c in cases:
        rows.setdefault(c.setting, {m: None for m in MODES})[c.mode] = c
    return [(next(c for c in by_mode.values() if c), by_mode) for by_mode in rows.values()]


def _cells(case: Optional[Case], results: Dict[str, Dict], mem_limit_gb: float) -> List[str]:
    if case is None:
        return ['—', '—']
    r = results.get(case.key, {})
    if r.get('status') != 'ok':
        return [_failure(r, mem_limit_gb), '—']
    return [_fmt_rate(r['img_per_s']), _fmt_bytes(r['peak_bytes'])]


def _params(by_mode: Dict[str, Optional[Case]], results: Dict[str, Dict]) -> str:
    for c in by_mode.values():
        if c is not None and 'params_m' in results.get(c.key, {}):
            return f'{results[c.key]["params_m"]:.1f}'
    return '—'


def _ratio_cell(value: Optional[float], lower_bound: bool = False) -> str:
    if value is None:
        return 'n/a'
    return f'{">" if lower_bound else ""}{value:.2f}x'


def upstream_rows(cases: List[Case], results: Dict[str, Dict]) -> List[Dict]:
    """Our fused detection backbones of this run next to the authors' figures (``cases.UPSTREAM``): times in
    seconds, peak RSS in GB (None: not measured)."""
    det = detection_cases(cases)

    def ours(model, size, mode):
        case = det.get(plain_key(model, size, mode))
        r = results.get(case.key, {}) if case else {}
        return r if r.get('status') == 'ok' else None

    rows = []
    for (model, size), ref in UPSTREAM.items():
        train, fwd = ours(model, size, 'fwd+bwd'), ours(model, size, 'fwd')
        rows.append({'model': model, 'img_size': size, 'upstream': asdict(ref),
                     'step_s': 1 / train['img_per_s'] if train else None,
                     'peak_rss_gb': train['peak_rss_bytes'] / 1e9 if train and 'peak_rss_bytes' in train else None,
                     'forward_s': 1 / fwd['img_per_s'] if fwd else None})
    return rows


def _upstream_lines(rows: List[Dict]) -> List[str]:
    def cell(value, unit):
        return '—' if value is None else f'{value:.1f} {unit}'

    lines = ['', "## Against the authors' code", '',
             "The authors' backbones cannot be vendored; their figures were measured once on the 2-core CPU (training "
             'step: forward + backward, batch 1, BatchNorm frozen, each in a fresh process, peak RSS from '
             '`/usr/bin/time`). Ours: the fused backbone of this run, wall time of one step and peak RSS of its '
             'process; GB = 1e9 bytes.', '',
             "| backbone | input | authors' setting | authors: step / forward / peak RSS | ours: step | ours: forward "
             '| ours: peak RSS |', '|---' * 7 + '|']
    for r in rows:
        ref = r['upstream']
        fwd = f' / {ref["forward_s"]:g} s' if ref['forward_s'] else ' / —'
        lines.append(
            f'| {r["model"]} | {r["img_size"][0]}x{r["img_size"][1]} | {ref["setting"]} | '
            f'{ref["step_s"]:g} s{fwd} / {ref["peak_rss_gb"]:g} GB | '
            f'{cell(r["step_s"], "s")} | {cell(r["forward_s"], "s")} | {cell(r["peak_rss_gb"], "GB")} |')
    return lines


def _compile_cell(result: Dict) -> str:
    seconds = result.get('compile_s', result.get('export_s'))
    return '—' if seconds is None else f'{seconds:.0f}'


def write_markdown(path: str, meta: Dict, cases: List[Case], results: Dict[str, Dict]) -> None:
    mem = meta['mem_limit_gb']
    dev = meta['device']
    lines = [
        '# Throughput and peak memory',
        '',
        f'`{meta["command"]}` on {meta["date"]}, commit `{meta["commit"]}`.',
        '',
        f'Device: {dev["description"]}; torch {dev["torch"]}, timm {dev["timm"]}, {dev["threads"]} intra-op threads; '
        f'load average {meta["load_before"]} before the run, {meta.get("load_after", "unknown (interrupted)")} after; '
        f'host memory cap per case {mem:g} GiB, lowered to the memory available at its start minus '
        f'{meta.get("mem_reserve_gb", 0):g} GiB (an OOM cell names its cap); fp32 unless marked +bf16.',
        '',
        f'Method: {METHOD}',
        '',
        'Times: img/s, s/step and the speed ratio are wall time (the median step, `time.perf_counter`).',
        '',
        'Ratios: memory = peak of the reference (or peer) / peak of ours; speed = img/s of ours / img/s of the '
        'reference (or peer); above 1 means ours is leaner / faster. `>` marks a lower bound (the other case ran '
        'out of memory at the limit).',
    ]
    comps = [(comp, ratios(comp, results, mem)) for comp in comparisons(cases)]
    det_comps = [r for comp, r in comps if comp.fast.detection and comp.fast.eager]
    cls_comps = [r for comp, r in comps if not comp.fast.detection and comp.fast.eager]
    compile_comps = [r for comp, r in comps if not comp.fast.eager]
    cpu = any(r['cpu_time_speed_ratio'] is not None for _, r in comps) and dev['name'].startswith('cpu')
    ratio_head = '| comparison | memory ratio | speed ratio |' + (' speed ratio (CPU time) |' if cpu else '')
    ratio_rule = '|---' * (ratio_head.count('|') - 1) + '|'

    def ratio_cells(r: Dict) -> str:
        cells = [r['title'], _ratio_cell(r['memory_ratio'], r['memory_ratio_is_lower_bound']),
                 _ratio_cell(r['speed_ratio'])] + ([_ratio_cell(r['cpu_time_speed_ratio'])] if cpu else [])
        return '| ' + ' | '.join(cells) + ' |'

    if cpu:
        lines += ['', 'Speed ratio (CPU time): the same ratio from the CPU time of the processes (user + system), '
                  'which other jobs on a shared machine disturb far less than wall time.']
    if det_comps:
        lines += ['', '## Detection backbones: fused vs reference attention, and vs same-size peers', '',
                  ratio_head, ratio_rule]
        lines += [ratio_cells(r) for r in det_comps]
    upstream = [r for r in upstream_rows(cases, results) if r['step_s'] is not None or r['forward_s'] is not None]
    if upstream:
        lines += _upstream_lines(upstream)
    if compile_comps:
        lines += ['', '## torch.compile, onnxruntime and OpenVINO vs eager', '',
                  'Compiled: `torch.compile(model)` (inductor, default mode). Its first call, which compiles, is '
                  'not in the timings; its wall time is the last column. onnxruntime, OpenVINO: the model exported to '
                  'ONNX by `lesa_lit_models.export.export_onnx` (dynamic batch, height and width; the LESA / LIT '
                  'attention a loop over the rows of the query grid) run by onnxruntime\'s CPU provider, or by OpenVINO on the CPU in '
                  'float32, with the same intra-op threads and input; the export is the last column. The memory '
                  'ratio of a runtime vs eager compares, on both sides, the rise of the process\'s peak resident '
                  'size over the warm-up and timed runs (weights, input and the runtime\'s session resident before '
                  'them); in the tables, a runtime\'s peak is the rise over its session\'s creation and runs.', '',
                  ratio_head + ' compile / export (s) |', ratio_rule + '---|']
        lines += [f'{ratio_cells(r)} {_compile_cell(results.get(r["fast"], {}))} |' for r in compile_comps]
    det = [row for row in _rows(cases) if row[0].detection]
    if det:
        lines += ['', '## Detection backbones', '',
                  '| model | input | attention | params (M) | fwd img/s | fwd peak | fwd+bwd img/s | fwd+bwd peak | '
                  'fwd+bwd s/step | fwd+bwd peak RSS |', '|---' * 10 + '|']
        for case, by_mode in det:
            h, w = case.img_size
            impl = (case.attn_impl or 'default') + case.variant_label
            cells = [*_cells(by_mode['fwd'], results, mem), *_cells(by_mode['fwd+bwd'], results, mem)]
            train = results.get(by_mode['fwd+bwd'].key, {}) if by_mode['fwd+bwd'] else {}
            cells += [f'{1 / train["img_per_s"]:.1f}', _fmt_bytes(train['peak_rss_bytes'])] \
                if train.get('status') == 'ok' and 'peak_rss_bytes' in train else ['—', '—']
            lines.append(f'| {case.model} | {h}x{w} | {impl} | {_params(by_mode, results)} | {" | ".join(cells)} |')
    cls = [row for row in _rows(cases) if not row[0].detection]
    if cls:
        batch = sorted({c.batch_size for c, _ in cls})
        lines += ['', '## Classifiers', '',
                  f'Batch {", ".join(map(str, batch))} (images/s and peak memory of the whole batch), each model\'s '
                  'default attention (`fused`; the LESA classifiers compute their 1-D relative position terms '
                  'explicitly, which has no fused form and is cheap on the 14x14 grid), BatchNorm in train mode for '
                  'fwd+bwd.', '',
                  '| model | input | params (M) | fwd img/s | fwd peak | fwd+bwd img/s | fwd+bwd peak |',
                  '|---|---|---|---|---|---|---|']
        for case, by_mode in cls:
            h, w = case.img_size
            cells = [*_cells(by_mode['fwd'], results, mem), *_cells(by_mode['fwd+bwd'], results, mem)]
            lines.append(f'| {case.model}{case.variant_label} | {h}x{w} | {_params(by_mode, results)} | '
                         f'{" | ".join(cells)} |')
    if cls_comps:
        lines += ['', '## Classifiers vs timm peers', '', ratio_head, ratio_rule]
        lines += [ratio_cells(r) for r in cls_comps]
    failed = [(c, results.get(c.key, {})) for c in cases if results.get(c.key, {}).get('status') not in ('ok', 'oom')]
    if failed:
        lines += ['', '## Not measured', '']
        lines += [f'- `{c.key}`: {r.get("error", r.get("status", "not run"))}' for c, r in failed]
    lines += ['', f'![throughput and peak memory]({CHART})', '']
    with open(path, 'w') as f:
        f.write('\n'.join(lines))


def _bar_label(case: Case) -> str:
    h, w = case.img_size
    impl = f' {case.attn_impl}' if case.attn_impl and case.detection else ''
    return f'{case.model}{impl}{case.variant_label} {h}x{w}'


def write_chart(path: str, meta: Dict, cases: List[Case], results: Dict[str, Dict]) -> None:
    """Horizontal bars, log scale: throughput and peak memory, per setting, one bar per mode; OOM is marked."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, NullFormatter
    from matplotlib.transforms import blended_transform_factory

    groups = [(title, [row for row in _rows(cases) if row[0].detection == det])
              for title, det in (('classifiers', False), ('detection backbones', True))]
    groups = [(t, rows) for t, rows in groups if rows]
    heights = [max(2., 0.45 * len(rows) + 1.2) for _, rows in groups]
    fig, axes = plt.subplots(len(groups), 2, figsize=(15, sum(heights)), squeeze=False,
                             gridspec_kw={'height_ratios': heights})
    colors = {'fwd': '#4c72b0', 'fwd+bwd': '#dd8452'}
    for (title, rows), ax_row in zip(groups, axes):
        labels = [_bar_label(case) for case, _ in rows]
        for ax, metric, xlabel in zip(ax_row, ('img_per_s', 'peak_bytes'), ('images / s', 'peak memory (MiB)')):
            left_edge = blended_transform_factory(ax.transAxes, ax.transData)
            values = []
            for i, mode in enumerate(MODES):
                for j, (_, by_mode) in enumerate(rows):
                    y = j + (i - 0.5) * 0.4
                    case = by_mode[mode]
                    r = results.get(case.key, {}) if case else {}
                    if r.get('status') == 'ok':
                        value = r[metric] / (_MiB if metric == 'peak_bytes' else 1)
                        ax.barh(y, value, height=0.4, color=colors[mode])
                        ax.text(value, y, f' {value:.3g}' if value < 1000 else f' {value:.0f}', va='center', fontsize=7)
                        values.append(value)
                    elif r.get('status') == 'oom' and metric == 'peak_bytes':
                        limit_mib = r.get('mem_limit_gb', meta['mem_limit_gb']) * _GiB / _MiB
                        ax.barh(y, limit_mib, height=0.4, color='none', edgecolor=colors[mode], hatch='//')
                        ax.text(limit_mib, y, f' OOM (> {limit_mib:.0f})', va='center', fontsize=7)
                        values.append(limit_mib)
                    elif case is not None:
                        ax.text(0.01, y, _failure(r, meta['mem_limit_gb']), va='center', fontsize=7,
                                transform=left_edge)
            ax.set_xscale('log')
            if values:  # bars grow from a third of the smallest value; room on the right for the labels
                ax.set_xlim(min(values) / 3, max(values) * 6)
            ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f'{v:g}'))
            ax.xaxis.set_minor_formatter(NullFormatter())
            ax.set_yticks(range(len(rows)), labels, fontsize=8)
            ax.invert_yaxis()
            ax.set_xlabel(xlabel)
            ax.set_title(title, fontsize=10)
            ax.grid(axis='x', which='major', alpha=0.3)
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in colors.values()]
    fig.legend(handles, list(colors), loc='upper right', ncol=2)
    fig.suptitle(f'{meta["device"]["description"]}, {meta["date"]}', fontsize=10, x=0.01, ha='left')
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    fig.savefig(path, dpi=110)
    plt.close(fig)
