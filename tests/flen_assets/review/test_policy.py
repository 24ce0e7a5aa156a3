"""Review policies: verdicts per policy, and the per-character setting file."""

from __future__ import annotations

import multiprocessing

import pytest

from flen_assets.review.policy import ReviewPolicy, character_policy, load_policies, set_character_policy
from flen_resources.project import InvalidNameError, Project


@pytest.mark.parametrize("failed, distance, auto, required, mixed", [
    ([], 0.30, "accepted", "pending", "accepted"),           # clear pass
    ([], 0.47, "accepted", "pending", "pending"),            # passes, but within the margin of 0.5
    (["identity"], 0.53, "rejected", "rejected", "pending"),  # fails identity only, borderline
    (["identity"], 0.70, "rejected", "rejected", "rejected"),  # clear identity drift
    (["one_face", "identity"], 0.52, "rejected", "rejected", "rejected"),  # other gates failed too
    (["one_face"], None, "rejected", "rejected", "rejected"),
])
def test_verdicts(failed, distance, auto, required, mixed):
    assert ReviewPolicy("auto").classify(failed, distance, 0.5)[0] == auto
    assert ReviewPolicy("required").classify(failed, distance, 0.5)[0] == required
    assert ReviewPolicy("mixed", 0.05).classify(failed, distance, 0.5)[0] == mixed


def test_unknown_policy_is_refused():
    with pytest.raises(ValueError, match="unknown review policy"):
        ReviewPolicy("sometimes")


def test_character_setting_round_trip(project: Project):
    assert character_policy(project, "alice") == ReviewPolicy("auto")
    set_character_policy(project, "alice", ReviewPolicy("required"))
    set_character_policy(project, "bob", ReviewPolicy("mixed", 0.08))
    assert character_policy(project, "alice").policy == "required"
    assert character_policy(project, "bob") == ReviewPolicy("mixed", 0.08)
    assert character_policy(project, "bob", override="auto") == ReviewPolicy("auto", 0.08)
    assert (project.data_dir / "review_policies.toml").is_file()
    with pytest.raises(InvalidNameError):
        set_character_policy(project, "../etc", ReviewPolicy("auto"))


def _set(root: str, name: str) -> None:
    set_character_policy(Project(__import__("pathlib").Path(root)), name, ReviewPolicy("required"))


def test_concurrent_setters_lose_nothing(project: Project):
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_set, args=(str(project.root), f"c{i}")) for i in range(8)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    assert sorted(load_policies(project)) == sorted(f"c{i}" for i in range(8))


def test_cli_policy(project: Project):
    from conftest import run_flen

    out = run_flen("character", "policy", "alice", "required", project=project.root).stdout
    assert "required" in out
    assert "alice: required" in run_flen("character", "policy", "alice", project=project.root).stdout
    bad = run_flen("character", "policy", "alice", "sometimes", project=project.root, check=False)
    assert bad.returncode != 0 and "unknown review policy" in bad.stderr


def test_one_status_rule_for_the_page_and_the_gate():
    """gate.verdict (the assets) and the store (the page, the check) apply the same status rule."""
    from flen_assets.review.gate import verdict
    from flen_assets.review.store import status_of

    policy = ReviewPolicy("required")
    for human in (None, {"passed": None}, {"passed": True}, {"passed": False}):
        v = verdict(policy, [], 0.3, 0.5, human)
        assert (v.status, v.decided_by) == status_of(human, "pending")
    assert status_of({"passed": False}, "accepted") == ("rejected", "human")
    assert status_of({"passed": None}, "accepted") == ("accepted", "policy")


def test_only_the_partitioned_check_preview_warning_is_silenced():
    import warnings

    import dagster as dg

    from flen_assets.review.gate import silence_partitioned_check_preview

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        silence_partitioned_check_preview()  # what importing gate.py does
        warnings.warn("Specifying a partitions_def on an AssetCheckSpec is currently in preview, ...", dg.PreviewWarning)
        warnings.warn("some other preview feature", dg.PreviewWarning)
    assert [str(w.message) for w in caught if issubclass(w.category, dg.PreviewWarning)] == ["some other preview feature"]
