"""``sunjax bench http`` at toy size: both sides serve the same greedy workload, so they must
produce the same number of tokens, and the JSON report carries every figure."""

import json

import pytest

from apps.bench import http

pytestmark = pytest.mark.slow


def test_bench_http_serves_the_same_tokens_both_ways(tmp_path):
    assert http.main(["--out", str(tmp_path), "--requests", "6", "--slots", "4"]) == 0
    report = json.loads((tmp_path / "bench_http.json").read_text())
    local, remote = report["in_process"], report["http"]
    assert local["output_tokens"] == remote["output_tokens"] > 6
    for side in (local, remote):
        assert side["throughput_tok_s"] > 0 and side["tpot_ms_p50"] > 0
    assert report["http_cost_pct_tok_s"] == pytest.approx(
        100 * (1 - remote["throughput_tok_s"] / local["throughput_tok_s"])
    )
