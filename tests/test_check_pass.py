"""check_pass: every registered pass fires on, and preserves, the instances it generates.

FXOPT_CHECK_EXAMPLES sets the instances per pass (default 15, to keep the suite fast; raise it
locally or in a nightly job to search harder).
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn as nn
from hypothesis import strategies as st
from torch.fx import Node

from fxopt.equivalence import CheckReport, check_pass
from fxopt.ops import IDENTITY
from fxopt.pattern import Match, Pass, Pattern, registered_passes
from fxopt.patterns.fold_bn import FOLD_BN
from fxopt.patterns.remove_noops import Identity, noop_instances
from fxopt.rewriter import Rewriter

EXAMPLES = int(os.environ.get("FXOPT_CHECK_EXAMPLES", "15"))

# Passes check_pass currently fails, reported to their authors. Strict: once a pass is fixed its
# test fails as XPASS, so the entry cannot outlive the bug; delete it then.
KNOWN_FAILURES: dict[str, str] = {}


def registered(p: Pass) -> object:
    reason = KNOWN_FAILURES.get(p.name)
    return pytest.param(p, id=p.name, marks=[pytest.mark.xfail(reason=reason, strict=True)] if reason else [])


@pytest.mark.parametrize("p", [registered(p) for p in registered_passes()])
def test_every_registered_pass_fires_and_preserves_its_instances(p: Pass) -> None:
    report = check_pass(p, max_examples=EXAMPLES)
    assert report.instances >= 1
    assert report.applied >= report.instances  # each instance had at least one match applied


def test_accepts_a_name_and_reports_what_it_checked() -> None:
    report = check_pass("remove_noops", max_examples=3)
    assert isinstance(report, CheckReport)
    assert (report.pass_name, report.instances) == ("remove_noops", 3)
    assert "3 instances" in str(report)


def test_a_pass_without_an_instance_generator_is_an_error() -> None:
    bare = Pass("no_instances", "a pass nobody can test", (Identity(),))
    with pytest.raises(ValueError, match="no instance generator"):
        check_pass(bare)


def test_a_pass_that_does_not_fire_on_its_instances_fails() -> None:
    # fold_bn's patterns offered models with no BatchNorm in them
    misdeclared = Pass("fold_bn_on_noops", "", FOLD_BN.patterns, instances=noop_instances)
    with pytest.raises(AssertionError, match="did not fire") as failure:
        check_pass(misdeclared, max_examples=5)
    assert "instance:\nSequential(" in str(failure.value) and "inputs: Tensor[" in str(failure.value)


class _IdentityForever(Pattern):
    """Replaces an identity by a new identity: its replacement matches again, forever."""

    anchor = IDENTITY

    def match(self, node: Node, rw: Rewriter) -> Match:
        return Match(node, {"identity": node})

    def rewrite(self, match: Match, rw: Rewriter) -> Node:
        return rw.call(IDENTITY, input=match.root.kwargs["input"])


def test_a_pass_that_crashes_or_never_reaches_a_fixed_point_fails_with_its_instance() -> None:
    instance = (nn.Sequential(nn.Identity()).eval(), (torch.randn(2, 3),))
    looping = Pass("identity_forever", "", (_IdentityForever(),), instances=lambda: st.just(instance))
    with pytest.raises(AssertionError, match=r"optimize raised \w+: .*fixed point(.|\n)*instance:\nSequential"):
        check_pass(looping)
