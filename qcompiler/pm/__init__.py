"""Pass infrastructure: the Pass base, PassResult, PassManager, rewrite rules and pipeline parsing."""

from qcompiler.pm.base import Pass, PassContext, PassResult, get_pass_class, registered_passes
from qcompiler.pm.manager import PassManager
from qcompiler.pm.rewrite import MatchResult, RewriteRule, apply_rules

__all__ = [
    "Pass",
    "PassContext",
    "PassResult",
    "PassManager",
    "MatchResult",
    "RewriteRule",
    "apply_rules",
    "get_pass_class",
    "registered_passes",
]
