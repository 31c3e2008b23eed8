"""bench/summary.py, the last step of ``make bench``: each goal of issue 24 gets the verdict its
bench printed, or says plainly that it has none; JSON rows are judged by the issue's limit."""
import importlib.util
import json
import os

import pytest

SUMMARY = os.path.join(os.path.dirname(__file__), '..', '..', 'bench', 'summary.py')


@pytest.fixture(name='summary')
def fixture_summary():
    spec = importlib.util.spec_from_file_location('bench_summary', SUMMARY)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def goal(summary, what):
    return next(g for g in summary.GOALS if what in g[1])


def write(directory, name, text):
    with open(os.path.join(directory, name), 'w', encoding='utf-8') as handle:
        handle.write(text)


def test_a_printed_verdict_line_is_the_goals_verdict(summary, tmp_path):
    write(tmp_path, 'prune_bench.log', "load average before: 0.1 0.2 0.3\n"
          "simulate (epoch times, ids) for 100k backups: 1.402 s (target <= 1.0 s) MISSED\n")
    verdict, evidence = summary.judge(goal(summary, 'prune simulator'), str(tmp_path))
    assert verdict == 'MISSED'
    assert '1.402 s' in evidence


def test_a_json_row_is_judged_by_the_issues_limit_not_the_rows_older_target(summary, tmp_path):
    # the datastore bench's row still says <= 1.3x; issue 24 asks <= 1.1x
    row = {'what': 'encrypted full (AES-256-GCM, key kdf none)', 'shown': '1.20x',
           'figure': 1.2, 'target': '<= 1.3x unencrypted full', 'verdict': 'MET'}
    write(tmp_path, 'datastore_bench.json', json.dumps({'results': [row]}))
    write(tmp_path, 'datastore_bench.log', "      1.20 s   => 1.20x (target <= 1.3x) MET\n")
    verdict, evidence = summary.judge(goal(summary, 'encrypted full'), str(tmp_path))
    assert verdict == 'MISSED'
    assert "the issue's limit 1.1x" in evidence


def test_a_goal_without_a_verdict_line_points_to_its_bench(summary, tmp_path):
    write(tmp_path, 'backup_bench.log', "  full duration / qemu-img convert+fsync 1.05x "
          "(target <= 1.10x) MET\n")
    assert summary.judge(goal(summary, 'bare QEMU copy'), str(tmp_path)) == (
        'NO VERDICT', 'see the output of bench/backup_bench.py')
    assert summary.judge(goal(summary, 'S3'), str(tmp_path))[0] == 'NOT RUN'


def test_the_unchanged_fulls_floor_row_is_not_taken_for_the_fulls(summary, tmp_path):
    rows = [{'what': 'unchanged second full / read+sha256 floor', 'shown': '1.20x',
             'figure': 1.2, 'target': '<= 1.3x', 'verdict': 'MET'},
            {'what': 'full / floor with writes', 'shown': '1.40x', 'figure': 1.4,
             'target': '<= 1.15x', 'verdict': 'MISSED'}]
    write(tmp_path, 'datastore_bench.json', json.dumps({'results': rows}))
    write(tmp_path, 'datastore_bench.log', '')
    assert summary.judge(goal(summary, 'datastore full'), str(tmp_path))[0] == 'MISSED'
    assert summary.judge(goal(summary, 'unchanged second full'), str(tmp_path))[0] == 'MET'


def test_main_lists_every_goal_and_the_loads(summary, tmp_path, capsys):
    write(tmp_path, 'prune_bench.log', "load average before: 0.1 0.2 0.3\n"
          "simulate (epoch times, ids) for 100k backups: 0.4 s (target <= 1.0 s) MET\n"
          "load average after: 1.5 1.2 0.9\n")
    assert summary.main([str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert out.count('\ngoal ') == len(summary.GOALS)
    assert 'prune_bench          before 0.1 0.2 0.3, after 1.5 1.2 0.9' in out
