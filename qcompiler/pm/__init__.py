"""Pass infrastructure: the Pass base, PassResult, PassManager, rewrite rules and pipeline parsing (the registry of
built-in passes is qcompiler.passes: registered_passes, get_pass_class)."""

from qcompiler.pm.base import Pass, PassContext, PassResult
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
]
