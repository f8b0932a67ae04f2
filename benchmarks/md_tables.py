"""Markdown tables of the benchmarks' reports (named so as not to shadow PyTables' `tables`).

header = "| model | test MSE |"
print(markdown(header, [f"| {r['model']} | {fmt(r['test_mse'])} |" for r in rows]))
"""


def fmt(value, spec=".3g"):
    """`value` formatted by `spec`; `-` for None (a cell with no value)."""
    return "-" if value is None else format(value, spec)


def markdown(header, rows):
    """The table of `header`, a line `| a | b |`, and `rows`, lines alike: the header, its
    separator `|---|---|`, then the rows, joined by newlines."""
    return "\n".join([header, "|" + "---|" * (header.count("|") - 1), *rows])
