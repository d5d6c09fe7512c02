"""A model's parameter counts per top-level module, for the log at the start of a run."""
from collections import Counter
from typing import List, Tuple

from fvcore.nn import parameter_count
from torch import nn

__all__ = ["parameter_summary"]


def _top_level(name: str) -> str:
    return name.split(".", 1)[0]


def parameter_summary(model: nn.Module) -> str:
    """A table of the total and the trainable (``requires_grad``) parameter counts of ``model`` and of each
    of its top-level modules (and top-level parameters).

    The totals are fvcore's ``parameter_count`` (a parameter shared by two modules counts once, in the first);
    the table prints exact numbers, where fvcore's ``parameter_count_table`` rounds them (``26.1K``) and has no
    trainable column.

    Example::

        | module | parameters | trainable |
        |:-------|-----------:|----------:|
        | model  |     26,122 |    26,122 |
        | layers |     26,122 |    26,122 |
    """
    totals = parameter_count(model)
    trainable: Counter = Counter()
    for name, p in model.named_parameters():
        if p.requires_grad:
            trainable[_top_level(name)] += p.numel()
    tops: List[str] = []
    for name, _ in model.named_parameters():
        if _top_level(name) not in tops:
            tops.append(_top_level(name))
    rows: List[Tuple[str, str, str]] = [("module", "parameters", "trainable")]
    rows.append(("model", f"{totals['']:,}", f"{sum(trainable.values()):,}"))
    rows += [(top, f"{totals[top]:,}", f"{trainable[top]:,}") for top in tops]
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    lines = [f"| {a:<{widths[0]}} | {b:>{widths[1]}} | {c:>{widths[2]}} |" for a, b, c in rows]
    lines.insert(1, f"|:{'-' * widths[0]}-|-{'-' * widths[1]}:|-{'-' * widths[2]}:|")
    return "\n".join(lines)
