import json
from pathlib import Path

from kvmotion.center.report import report_document, write_report

TASK = {
    "id": 7,
    "target": "vm-a",
    "state": "success",
    "request": {"vm": "vm-a", "source": "172.16.0.172", "dest": "172.16.0.173"},
    "timeline": [{"step": "requested", "time": 1.0}, {"step": "source_removed", "time": 2.0}],
    "samples": [
        {"t": 0.1, "pass_no": 1, "transferred_bytes": 0, "remaining_bytes": 64 << 20,
         "dirty_rate_bps": 0, "throughput_bps": 0.0, "expected_downtime_ms": 100,
         "throttle_pct": 0},
        {"t": 5.0, "pass_no": 4, "transferred_bytes": 80 << 20, "remaining_bytes": 8 << 20,
         "dirty_rate_bps": 30 << 20, "throughput_bps": 10e6, "expected_downtime_ms": 800,
         "throttle_pct": 60},
    ],
    "summary": {
        "downtime_ms": 80, "passes": 5, "total_time_ms": 6000, "transferred_bytes": 90 << 20,
        "task_time_ms": 6400,
        "decisions": [{"t_s": 3.0, "action": "continue", "reason": "brake", "throttle_pct": 60}],
        "predicted": {"converges": True, "total_s": 5.5},
    },
    "error": None,
}  # fmt: skip


def test_document_puts_prediction_beside_actual() -> None:
    doc = report_document(TASK)
    assert doc["predicted"]["total_s"] == 5.5
    assert doc["actual"]["total_time_ms"] == 6000 and doc["actual"]["downtime_ms"] == 80
    assert doc["decisions"][0]["reason"] == "brake"


def test_files_are_written(tmp_path: Path) -> None:
    png, doc = write_report(TASK, tmp_path / "out")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert json.loads(doc.read_text())["task"] == 7
