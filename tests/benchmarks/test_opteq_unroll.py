"""benchmarks/opteq_unroll.py --table-seeds: the table over seeds (mean ± std, medians), from
given per-seed tables (the end-to-end run is the slow test in tests/layers/test_opteq.py)."""

import pytest
from scripts import load_script

pytestmark = pytest.mark.tensorflow_only("the benchmark imports TensorFlow")


class _Printer:
    def __init__(self):
        self.lines = []

    def print(self, *parts):
        self.lines.append(" ".join(str(p) for p in parts))


def test_seeds_table_means_and_medians():
    module = load_script("benchmarks/opteq_unroll.py")
    tables = [
        [("Unroll K=5", 0.95, 0.30, 0.25, 1e-4, 9), ("IFT thd 1e-3", 0.96, 1.2, 0.20, 1e-3, 7)],
        [("Unroll K=5", 0.97, 0.34, 0.27, 3e-4, 9), ("IFT thd 1e-3", 0.96, 1.0, 0.22, 1e-3, 7)],
    ]
    printer = _Printer()
    summary = module.seeds_table(tables, printer)
    assert [row[0] for row in summary] == ["Unroll K=5", "IFT thd 1e-3"]
    assert "| Unroll K=5 | 96.00 ± 1.41% | 95.00, 97.00 | 0.32 | 0.26 | 2.00e-04 |" in printer.lines


def test_merge_reads_the_per_seed_tables_of_saved_outputs(tmp_path):
    module = load_script("benchmarks/opteq_unroll.py")
    lines = ["note: something", "seed 3:", "| Method | Acc. | ...", "|---|"]
    for k, (name, _) in enumerate(module.ROWS):
        lines.append(f"| {name} | 96.{k}0% | 1.66 | 0.{k}8 | 3.85 | 0.26 | 4.48e-0{k + 1} | 9 |")
    (tmp_path / "a.txt").write_text("\n".join(lines))
    (tmp_path / "b.txt").write_text("seed 4:\n| Unroll K=5 | 95.00% | 1 | 1 | 1 | 1 | 1e-3 | 9 |")
    tables = module.merge([tmp_path / "a.txt", tmp_path / "b.txt"])
    assert list(tables) == [3]  # seed 4's table is incomplete
    assert tables[3][0] == ("Unroll K=5", 0.96, 0.08, 0.26, 4.48e-01, 9)
    assert [row[0] for row in tables[3]] == [name for name, _ in module.ROWS]
