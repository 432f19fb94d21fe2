"""What code a command may run: only what its own command line grants, never what an artifact records.

A manifest's self-hash is no signature (anyone can recompute it), so a manifest that says "this model
was a trusted pickle" or "import my_pkg:Net" grants nothing. A stage that would unpickle a model file
or import a user's module asks `current()`, which holds what the running command was given:

    --trust-pickle              load pickles / TorchScript / .pt2 (runs code from the file), and import
                                any `module:Class` architecture a pruned manifest records
    --allow-import MODULE:CLASS import that one class (a pruned manifest's --arch), nothing else
    --arch MODULE:CLASS         on prune / build: the class named there is granted for the whole run

The CLI grants per command (`granted_by(args)`); a library caller wraps its calls in `granted(...)`.
Process-wide on purpose: stage worker threads see the grant of the command that started them.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Grant:
    pickle: bool = False
    imports: frozenset[str] = frozenset()

    def allows_import(self, target: str) -> bool:
        return self.pickle or target in self.imports


_lock = threading.Lock()
_current = Grant()


def current() -> Grant:
    return _current


@contextlib.contextmanager
def granted(pickle: bool = False, imports: Iterable[str] = ()) -> Iterator[Grant]:
    """Grant trust for the block; the previous grant comes back afterwards."""
    global _current
    grant = Grant(bool(pickle), frozenset(imports))
    with _lock:
        saved, _current = _current, grant
    try:
        yield grant
    finally:
        with _lock:
            _current = saved


def is_python_arch(arch: str | None) -> bool:
    """`module:Class` (the user's own class), as opposed to a timm name, `timm:NAME` or `zoo:NAME`."""
    return bool(arch) and ":" in arch and not arch.startswith(("timm:", "zoo:"))


def granted_by(args: Any) -> contextlib.AbstractContextManager[Grant]:
    """The grant a parsed command line gives: --trust-pickle, --allow-import, and an --arch module:Class."""
    imports = list(getattr(args, "allow_import", None) or [])
    arch = getattr(args, "arch", None)
    if is_python_arch(arch):
        imports.append(arch)
    return granted(bool(getattr(args, "trust_pickle", False)), imports)


def add_trust_arguments(parser) -> None:
    """--trust-pickle and --allow-import for stages that rebuild a model from a pruned artifact."""
    group = parser.add_argument_group("trust (see docs/security.md)")
    group.add_argument("--trust-pickle", action="store_true",
                       help="allow re-opening the pickle / TorchScript / .pt2 model file the pruned artifact was "
                            "made from, and importing its module:Class (both run code; the manifest's record of "
                            "trust at prune time is not enough)")
    group.add_argument("--allow-import", action="append", default=[], metavar="MODULE:CLASS",
                       help="allow importing this --arch class that the pruned artifact records (repeatable)")
