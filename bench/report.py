#!/usr/bin/env python3
"""Tables the peer harness's report.py does not print, from the same 4-column results.tsv
(tool, metric, repeat, value). Cells: "best / median" over repeats, like the harness.

  report.py daemon RESULTS_DIR NSEG          walden daemon CPU / RSS next to the client's
  report.py datasets NAME=RESULTS_DIR ...    sizes, file counts; peak RSS / wall across datasets
  report.py replay RESULTS_DIR               replay time from local disk vs through Walden
  report.py phases PHASES_TSV                how long each phase of bench/run.sh took
"""
import collections
import os
import statistics
import sys


def load(res):
    """{(tool, metric): {rep: value}}; a rep written twice for the same tool and metric (rows
    booked by overlapping runs) is numbered by order of writing instead of overwritten."""
    data, fails, seen = collections.defaultdict(dict), [], collections.Counter()
    path = os.path.join(res, 'results.tsv')
    if not os.path.exists(path):
        return data, fails
    for line in open(path):
        parts = line.rstrip('\n').split('\t')
        if len(parts) != 4:
            continue
        t, m, r, v = parts
        if m.endswith('_fail'):
            fails.append(f'{t}: {m} (rep {r}): {v}')
            continue
        seen[(t, m)] += 1
        if r in data[(t, m)]:
            r = str(seen[(t, m)])
        try:
            data[(t, m)][r] = float(v)
        except ValueError:
            data[(t, m)][r] = v
    return data, fails


def labels(res):
    path = os.path.join(res, 'columns')
    if not os.path.exists(path):
        return {}
    return dict(l.rstrip('\n').split('\t', 1) for l in open(path) if '\t' in l)


def cell(values, hib=False, scale=1.0, dec=1):
    v = [x * scale for x in values if isinstance(x, float)]
    if not v:
        return 'n/a'
    best = max(v) if hib else min(v)
    med = statistics.median(v)
    return f'{best:.{dec}f} / {med:.{dec}f}' if len(v) > 1 else f'{med:.{dec}f}'


def med(values):
    v = [x for x in values if isinstance(x, float)]
    return statistics.median(v) if v else None


def table(title, cols, rows, note=None):
    """rows: [(name, [cell per column])]; rows whose cells are all n/a are left out."""
    rows = [(n, c) for n, c in rows if any(x != 'n/a' for x in c)]
    if not rows:
        return
    print(f'\n### {title}\n')
    if note:
        print(note + '\n')
    print('| metric | ' + ' | '.join(c.replace('|', '\\|') for c in cols) + ' |')
    print('|---|' + '---|' * len(cols))
    for n, c in rows:
        print(f'| {n} | ' + ' | '.join(c) + ' |')


def daemon(res, nseg):
    data, fails = load(res)
    lab = labels(res)
    ids = [t for t in lab if t.startswith('walden_')]
    phases = [('walpushbl', 'WAL push, all .ready at once'), ('walpush', 'WAL push, trickle'),
              ('walfetch', 'WAL fetch')]
    rows = []
    for p, name in phases:
        client = {t: data.get((t, f'{p}_cpu_ms_per_seg'), {}) for t in ids}
        dcpu = {t: {r: 1000 * v / nseg for r, v in data.get((t, f'{p}_daemon_cpu_s'), {}).items()} for t in ids}
        total = {}
        for t in ids:
            if not dcpu[t]:           # per-call columns: the client is the whole cost
                total[t] = dict(client[t])
            else:
                total[t] = {r: client[t][r] + d for r, d in dcpu[t].items() if r in client[t]}
        rows += [
            (f'{name}: segments/s', [cell(list(data.get((t, f'{p}_segps'), {}).values()), True) for t in ids]),
            (f'{name}: client CPU ms/segment', [cell(list(client[t].values()), dec=0) for t in ids]),
            (f'{name}: daemon CPU ms/segment', [cell(list(dcpu[t].values()), dec=0) for t in ids]),
            (f'{name}: client + daemon CPU ms/segment', [cell(list(total[t].values()), dec=0) for t in ids]),
            (f'{name}: client peak RSS MiB', [cell(list(data.get((t, f'{p}_rss'), {}).values()), scale=1 / 1024, dec=0) for t in ids]),
            (f'{name}: daemon peak RSS MiB', [cell(list(data.get((t, f'{p}_daemon_rss'), {}).values()), scale=1 / 1024, dec=0) for t in ids]),
            (f'{name}: prefetch hits', [cell(list(data.get((t, f'{p}_daemon_prefetch_hits'), {}).values()), True, dec=0) for t in ids]),
            (f'{name}: prefetch misses', [cell(list(data.get((t, f'{p}_daemon_prefetch_misses'), {}).values()), dec=0) for t in ids]),
        ]
    table(f'Walden per call vs through the daemon: client and daemon cost ({nseg} segments)',
          [lab.get(t, t) for t in ids], rows,
          'The daemon is a separate process (not a child of the archiver loop): its CPU is '
          'utime+stime from /proc over the phase, its peak RSS is VmHWM reset at each phase. '
          'Per-call columns: the client is the whole cost.')
    rows = []
    for pfx, name in (('lag', 'TPC-B load'), ('lagbulk', 'bulk-insert load')):
        cpu = {t: data.get((t, f'{pfx}_daemon_cpu_s'), {}) for t in ids}
        arch = {t: data.get((t, f'{pfx}_archived'), {}) for t in ids}
        per = {t: [1000 * v / arch[t][r] for r, v in cpu[t].items() if arch[t].get(r)] for t in ids}
        rows += [
            (f'{name}: archived segments', [cell(list(arch[t].values()) if cpu[t] else [], dec=0) for t in ids]),
            (f'{name}: daemon CPU s', [cell(list(cpu[t].values())) for t in ids]),
            (f'{name}: daemon CPU ms per archived segment', [cell(per[t], dec=0) for t in ids]),
            (f'{name}: daemon peak RSS MiB', [cell(list(data.get((t, f'{pfx}_daemon_rss'), {}).values()), scale=1 / 1024, dec=0) for t in ids]),
        ]
    table('Walden daemon during the archive-lag runs', [lab.get(t, t) for t in ids], rows)
    failures(fails, 'daemon')


def failures(fails, what):
    mine = [f for f in fails if 'daemon' in f or what != 'daemon']
    if mine:
        print(f'\n### Failures ({what})\n')
        for f in mine:
            print(f'- {f}')


def datasets(specs):
    sets = [s.split('=', 1) for s in specs]
    loaded = [(name, res, *load(res), labels(res)) for name, res in sets]
    print('\n### Datasets\n')
    print('| dataset | files in PGDATA | relations (pg_class, db postgres) | logical MiB (without pg_wal) |')
    print('|---|---|---|---|')
    for name, res, *_ in loaded:
        path = os.path.join(res, 'dataset.tsv')
        if os.path.exists(path):
            files, rels, lb = open(path).read().split()
            print(f'| {name} | {int(files):,} | {int(rels):,} | {int(lb) / 1048576:.0f} |')
    names = [n for n, *_ in loaded]
    tools = []
    extra = [x for x in loaded if not x[0].startswith('pgbench')] or loaded
    for *_, lab in extra:
        tools += [t for t in lab if t not in tools]
    metrics = [('push_rss', 'backup push peak RSS MiB', False, 1 / 1024, 0),
               ('fetch_rss', 'restore peak RSS MiB', False, 1 / 1024, 0),
               ('push_wall', 'backup push wall s', False, 1, 1),
               ('fetch_wall', 'restore wall s', False, 1, 1),
               ('push_mbs', 'backup push MB/s (logical)', True, 1, 0)]
    for m, title, hib, sc, dec in metrics:
        rows = []
        for t in tools:
            lab = next((l[t] for *_, l in loaded if t in l), t)
            rows.append((lab.replace('|', '\\|'),
                         [cell(list(d.get((t, m), {}).values()), hib, sc, dec) for _, _, d, _, _ in loaded]))
        table(f'{title}, by dataset', names, rows)
    for name, _, _, fails, _ in loaded:
        if fails:
            failures(fails, name)


def same_end(ends):
    if not ends:
        return 'n/a'
    if len(ends) == 1:
        return f'yes ({next(iter(ends))})'
    return 'NO: ' + ', '.join(sorted(map(str, ends)))


def replay(res):
    data, fails = load(res)
    lab = labels(res)
    ids = list(lab)
    nseg = open(os.path.join(res, 'segments')).read().strip() if os.path.exists(os.path.join(res, 'segments')) else '?'
    rec = {t: list(data.get((t, 'replay_recovery_s'), {}).values()) for t in ids}
    base = {b: med(rec.get(b, [])) for b in ('local_cp', 'pg_wal')}
    rows = [('recovery s (log: "starting archive recovery" to "ready to accept connections")', [cell(rec[t], dec=2) for t in ids])]
    for b, name in (('local_cp', 'cp from a local dir'), ('pg_wal', 'WAL already in pg_wal')):
        rows.append((f'ratio to {name} (medians)',
                     [f'{med(rec[t]) / base[b]:.2f}' if base[b] and med(rec[t]) else 'n/a' for t in ids]))
    rows += [('redo s (log: "redo done ... elapsed")', [cell(list(data.get((t, 'replay_redo_s'), {}).values()), dec=2) for t in ids]),
             ('wall s, `pg_ctl start` to ready (includes the start-up fsync of PGDATA)',
              [cell(list(data.get((t, 'replay_wall_s'), {}).values()), dec=2) for t in ids])]
    rows += [('daemon CPU s', [cell(list(data.get((t, 'replay_daemon_cpu_s'), {}).values()), dec=2) for t in ids]),
             ('daemon peak RSS MiB', [cell(list(data.get((t, 'replay_daemon_rss'), {}).values()), scale=1 / 1024, dec=0) for t in ids]),
             ('prefetch hits', [cell(list(data.get((t, 'replay_daemon_prefetch_hits'), {}).values()), True, dec=0) for t in ids]),
             ('prefetch misses', [cell(list(data.get((t, 'replay_daemon_prefetch_misses'), {}).values()), dec=0) for t in ids])]
    ends = {v for t in ids for v in data.get((t, 'replay_end_lsn'), {}).values()}
    table('Replay of the same WAL: local vs through Walden', [lab.get(t, t) for t in ids], rows,
          f'{nseg} WAL segments from the base backup on (pgbench TPC-B), same backup for every run; '
          f'recovery ends with the promotion ("ready to accept connections"). '
          f'Every run ended redo at the same LSN: {same_end(ends)}.')
    failures(fails, 'replay')


def phases(path):
    print('\n### Duration of each phase of bench/run.sh\n')
    print('| phase | seconds | minutes |')
    print('|---|---|---|')
    total = 0.0
    for line in open(path):
        name, secs = line.rstrip('\n').split('\t')
        total += float(secs)
        print(f'| {name} | {float(secs):.0f} | {float(secs) / 60:.1f} |')
    print(f'| total | {total:.0f} | {total / 60:.1f} |')


if __name__ == '__main__':
    cmd, args = sys.argv[1], sys.argv[2:]
    if cmd == 'daemon':
        daemon(args[0], int(args[1]))
    elif cmd == 'datasets':
        datasets(args)
    elif cmd == 'replay':
        replay(args[0])
    elif cmd == 'phases':
        phases(args[0])
    else:
        sys.exit(__doc__)
