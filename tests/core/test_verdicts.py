"""The quarantine-or-wait decision for files that fail as if still being written."""

from __future__ import annotations

from segd.core.verdicts import SUSPECT_KINDS, Quarantine, Signature, Suspect, Wait, judge

QUIET = 2.0
HALF = Signature(size=3000, mtime_ns=1_000, ino=7)
WHOLE = Signature(size=6000, mtime_ns=2_000, ino=7)


def test_a_first_failure_waits_the_quiet_period() -> None:
    verdict = judge(HALF, None, now=100.0, quiet_s=QUIET)
    assert verdict == Wait(until=102.0, suspect=Suspect(HALF, since=100.0))


def test_the_same_signature_early_keeps_the_first_deadline() -> None:
    first = judge(HALF, None, now=100.0, quiet_s=QUIET)
    assert isinstance(first, Wait)
    again = judge(HALF, first.suspect, now=101.0, quiet_s=QUIET)
    assert again == Wait(until=102.0, suspect=first.suspect)


def test_the_same_signature_after_the_quiet_period_is_quarantined() -> None:
    previous = Suspect(HALF, since=100.0)
    assert judge(HALF, previous, now=102.0, quiet_s=QUIET) == Quarantine()
    assert judge(HALF, previous, now=500.0, quiet_s=QUIET) == Quarantine()


def test_a_grown_file_restarts_the_wait() -> None:
    previous = Suspect(HALF, since=100.0)
    verdict = judge(WHOLE, previous, now=103.0, quiet_s=QUIET)
    assert verdict == Wait(until=105.0, suspect=Suspect(WHOLE, since=103.0))


def test_any_changed_field_restarts_the_wait() -> None:
    previous = Suspect(HALF, since=100.0)
    for changed in (Signature(HALF.size, HALF.mtime_ns + 1, HALF.ino),
                    Signature(HALF.size, HALF.mtime_ns, HALF.ino + 1),
                    Signature(HALF.size - 1, HALF.mtime_ns, HALF.ino)):
        verdict = judge(changed, previous, now=110.0, quiet_s=QUIET)
        assert verdict == Wait(until=112.0, suspect=Suspect(changed, since=110.0)), changed


def test_no_quiet_period_quarantines_at_once() -> None:
    assert judge(HALF, None, now=100.0, quiet_s=0.0) == Quarantine()


def test_which_kinds_wait() -> None:
    assert {"empty", "truncated", "corrupt"} == SUSPECT_KINDS
    for kind in ("not-an-image", "too-large", "unsupported", "inaccessible"):
        assert kind not in SUSPECT_KINDS
