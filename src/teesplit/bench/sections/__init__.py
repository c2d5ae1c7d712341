"""Sections of `teesplit bench` that live in their own modules.

Every module in this package that defines ``SECTION = Section(...)`` is found at run time
(``discover``) and measured in the same run as the plans, after them, under the name of its
module. Its data lands in ``bench.json`` as ``result["sections"][name]``, its Markdown after
the other sections of ``bench.md``, its targets in the targets table.

``teesplit bench --sections a,b`` picks which sections a run measures (``none``: no section);
``teesplit bench --only-sections a,b`` measures just those (no plans), writing
``NAME.json`` and ``NAME.md`` per section into ``--out-dir``.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from teesplit.bench.common import Progress, Settings


@dataclass
class SectionContext:
    """What a section gets: the run's model, settings, scratch folder and progress log, and
    the monolithic baseline (measured once, on first use, when the run has none yet)."""

    model_dir: Path
    settings: Settings
    tmp: Path
    log: Progress
    prompt: list[int]
    vocab: int
    _baseline: dict[str, Any] | None = field(default=None, repr=False)

    def baseline(self) -> dict[str, Any]:
        """bench.measure_baseline's figures: ["decode"]["ms_per_token"], ["contexts"][c], ..."""
        if self._baseline is None:
            from teesplit.bench.common import measure_baseline

            self._baseline = measure_baseline(
                self.model_dir, self.settings, self.prompt, self.vocab, self.log, batches=False
            )
        return self._baseline


@dataclass(frozen=True)
class Section:
    title: str
    measure: Callable[[SectionContext], dict[str, Any]]
    render: Callable[[dict[str, Any]], list[str]]  # the section's data -> Markdown lines
    # the section's data -> target entries, built with teesplit.bench.target(...)
    targets: Callable[[dict[str, Any]], list[dict[str, Any]]] = lambda data: []


def discover() -> dict[str, Section]:
    """Every section in this package, by module name, in name order."""
    found = {}
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
        module = importlib.import_module(f"{__name__}.{info.name}")
        section = getattr(module, "SECTION", None)
        if isinstance(section, Section):
            found[info.name] = section
    return found
