"""The verdict: the one place where measurements become PASS, FAIL or INCOMPLETE.

Every renderer, `ParityResult.passed`, the CLI's exit code and the pytest plugin read the verdict computed here from
the plain records (a probe as `ProbeResult.to_dict()` writes it, a section's extras, the run's list of checks that
did not run), so a report re-read from JSON gets the same verdict as the run that wrote it. The rules, in the order
a probe is judged (docs/verdict.md "How to read a verdict" gives each one's measured basis):

  gate     the propagated comparison is not `pass`: outside the dtype table's tolerance (16-bit: and beyond 8x
           HF's own rounding error, `parity.diff.FLOOR_GATE`), non-finite where the other side is finite, another
           shape or dtype, missing, raised, or nothing compared.
  own      the teacher-forced comparison (the FMS module re-run on HF's inputs) is neither `pass` nor without a
           verdict (`not_applicable`, `not_run`): a module's own error fails even where the propagated error passed.
  floor    the error (propagated or own) stands more than `floor_factor` times above the probe's measured noise floor.
  formula  the float64 formula check (FMS and HF both in float64 on the same inputs) is not `pass`.
  upcast   FMS runs a precision-sensitive op in 16 bits at this probe where HF runs none (a missing fp32 upcast).
  empty    a section with no probe fails: nothing was judged there.
  run      the run fails when a section fails; it is INCOMPLETE when every section passes but a planned check did
           not run for a cause the user did not ask for (`accepted`); else it passes.

`lenient` (`compare --lenient`) turns floor / formula / upcast into a *suspect* mark that does not fail, the rule
set of the harness before these were measured sound; the verdict line then says so.
"""

from dataclasses import dataclass, field
from typing import Dict, FrozenSet, Iterable, List, Mapping, Optional, Sequence

PASS, FAIL, INCOMPLETE = "pass", "fail", "incomplete"
SHARP_RULES = ("floor", "formula", "upcast")  # the rules --lenient turns into suspects
NO_VERDICT = ("not_applicable", "not_run")  # teacher-forced statuses that say nothing about the module
# how far above its measured noise floor an error must stand to fail. On correct ports the largest ratio measured
# was 3.0 on compare's default inputs (tiny on CPU; tiny and 2b, fp32 and bf16, on an H200; results/gpu-h200-compare)
# and 4.89 over 200 fuzzed configs in fp32 and bf16 (results/verdict/): 8 keeps a 1.6x margin above the worst.
FLOOR_FACTOR = 8.0

# causes of a check that did not run; the first three are the user's own choice when given on the command line
CAUSES = ("floors off", "phases two", "tensor parallel", "memory", "reference", "raised", "inputs")


@dataclass(frozen=True)
class Policy:
    """How strictly a run is judged. `accepted`: causes of not-run checks the user asked for (they do not make the
    run incomplete); `allow_partial` accepts every cause (`--allow-partial`)."""

    lenient: bool = False
    floor_factor: float = FLOOR_FACTOR
    accepted: FrozenSet[str] = field(default_factory=frozenset)
    allow_partial: bool = False

    def to_dict(self) -> dict:
        return {"lenient": self.lenient, "floor_factor": self.floor_factor, "accepted": sorted(self.accepted),
                "allow_partial": self.allow_partial}

    @classmethod
    def from_dict(cls, data: Optional[Mapping]) -> "Policy":
        data = data or {}
        return cls(lenient=bool(data.get("lenient", False)), floor_factor=float(data.get("floor_factor", FLOOR_FACTOR)),
                   accepted=frozenset(data.get("accepted", ())), allow_partial=bool(data.get("allow_partial", False)))


def _number(value) -> Optional[float]:
    try:
        return None if value is None else float(value)  # "inf" / "nan" strings of the JSON parse too
    except (TypeError, ValueError):
        return None


def _above(ratio, factor: float) -> bool:
    value = _number(ratio)
    return value is not None and (value > factor or value != value)  # NaN: broken numbers, never under a floor


def probe_rules(probe: Mapping, policy: Policy = Policy()) -> List[str]:
    """The rules a probe record breaks (empty: it passes), in the order of the module docstring."""
    broken = []
    if probe["propagated"]["status"] != PASS:
        broken.append("gate")
    if (probe.get("teacher") or {}).get("status", "not_run") not in (PASS, *NO_VERDICT):
        broken.append("own")
    if _above(probe.get("floor_ratio"), policy.floor_factor) or _above(probe.get("own_floor_ratio"),
                                                                       policy.floor_factor):
        broken.append("floor")
    if probe.get("float64") is not None and probe["float64"]["status"] != PASS:
        broken.append("formula")
    if probe.get("missing_upcast"):
        broken.append("upcast")
    return broken


def failing_rules(probe: Mapping, policy: Policy = Policy()) -> List[str]:
    """The rules that fail this probe under `policy` (the sharp ones only mark a suspect when lenient)."""
    return [rule for rule in probe_rules(probe, policy) if not (policy.lenient and rule in SHARP_RULES)]


def is_suspect(probe: Mapping, policy: Policy = Policy()) -> bool:
    """Passes under a lenient policy only because a sharp rule is not allowed to fail it."""
    broken = probe_rules(probe, policy)
    return bool(broken) and all(rule in SHARP_RULES for rule in broken)


def section_verdict(probes: Sequence[Mapping], policy: Policy = Policy()) -> dict:
    """{"verdict", "why", "rules": {rule: count of probes failing by it}} of one section's probe records."""
    if not probes:
        return {"verdict": FAIL, "why": "no probe was judged in this section", "rules": {"empty": 1}}
    rules: Dict[str, int] = {}
    for probe in probes:
        for rule in failing_rules(probe, policy):
            rules[rule] = rules.get(rule, 0) + 1
    if not rules:
        return {"verdict": PASS, "why": "", "rules": {}}
    why = ", ".join(f"{count} probe(s) by rule {rule}" for rule, count in rules.items())
    return {"verdict": FAIL, "why": why, "rules": rules}


def unaccepted(not_run: Iterable[Mapping], policy: Policy = Policy()) -> List[dict]:
    """The not-run check records whose cause the user did not ask for."""
    if policy.allow_partial:
        return []
    return [dict(record) for record in not_run if record.get("cause") not in policy.accepted]


def run_verdict(section_verdicts: Sequence[str], not_run: Sequence[Mapping], policy: Policy = Policy()) -> dict:
    """The run's verdict from its sections' verdicts and the checks that did not run."""
    missing = unaccepted(not_run, policy)
    if not section_verdicts:
        return {"verdict": FAIL, "why": "the run has no section", "unaccepted": missing}
    if any(v != PASS for v in section_verdicts):
        failed = sum(v != PASS for v in section_verdicts)
        return {"verdict": FAIL, "why": f"{failed} of {len(section_verdicts)} section(s) fail", "unaccepted": missing}
    if missing:
        return {"verdict": INCOMPLETE, "why": f"{len(missing)} planned check(s) did not run (not asked for)",
                "unaccepted": missing}
    return {"verdict": PASS, "why": "", "unaccepted": []}


def not_run_record(check: str, why: str, cause: str, section: Optional[str] = None) -> dict:
    """A planned check that did not run: what, why, and its cause (one of CAUSES)."""
    if cause not in CAUSES:
        raise ValueError(f"unknown cause {cause!r} of a check not run; expected one of {CAUSES}")
    record = {"check": check, "why": why, "cause": cause}
    if section is not None:
        record["section"] = section
    return record


def note_not_run(extra: dict, check: str, why: str, cause: Optional[str]) -> None:
    """Record in a section's extras a planned check that did not run (the verdict counts it; nothing is silent);
    `cause` None: it ran."""
    if cause is not None:
        extra.setdefault("not_run", []).append(not_run_record(check, why, cause))
