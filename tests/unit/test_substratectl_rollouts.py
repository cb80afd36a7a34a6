"""How substratectl shows a rollout to a person: the progress frame of `rollout watch`, and the
policy."""

from __future__ import annotations

from common.requests.rollout import RolloutView
from services.rollout.model import RolloutPolicy
from substratectl.rollouts import _policy_text, _progress_lines

ZERO = dict.fromkeys(
    ("total", "updated", "in_progress", "failed", "offline", "held", "pinned", "pending"), 0
)


def test_a_watch_frame_has_a_bar_per_stage_and_names_what_is_not_done() -> None:
    status = {
        "version": "2026.11.3", "state": "halted", "stage": "dedicated", "wave": 1, "waves": 4,
        "soak_until": None, "halt": {"reason": "1 cell(s) failed in dedicated canary",
                                     "failures": []},
        "stages": {
            "staging": {**ZERO, "total": 2, "updated": 2},
            "saas": {**ZERO, "total": 1, "updated": 1},
            "dedicated": {**ZERO, "total": 10, "failed": 1, "offline": 1, "pending": 8},
        },
    }  # fmt: skip
    view = RolloutView.model_validate({
        **status, "reversible": True, "started_at": "2026-11-26T12:00:00+00:00",
        "updated_at": "2026-11-26T12:30:00+00:00",
    })  # fmt: skip
    lines = _progress_lines(view)
    assert lines[0] == "2026.11.3: halted in dedicated wave 1 of 4"
    assert lines[1].startswith("  staging   [" + "#" * 30 + "] 2/2 updated")
    assert "[" + "-" * 30 + "] 0/10 updated; 1 failed, 1 offline, 8 pending" in lines[3]
    assert lines[-1] == "  halted: 1 cell(s) failed in dedicated canary"


def test_the_policy_reads_as_sentences() -> None:
    text = _policy_text(RolloutPolicy())
    assert "canary 1, then 10%, 50%, 100% of the rest" in text
    assert "1800s (between waves)" in text and "0 per wave" in text
